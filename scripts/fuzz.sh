#!/usr/bin/env bash
# Fuzz one target for a while: scripts/fuzz.sh TARGET SECONDS (targets: vhostuser virtqueue
# xenstore switch xlcfg). Uses atheris when it is installed (.venv/bin/pip install atheris),
# hypothesis otherwise. A failing input is saved into fuzz/corpus/TARGET/, which the test suite
# replays from then on (tests/test_fuzz.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ]; then
    echo "usage: $0 TARGET SECONDS" >&2
    exit 2
fi
exec .venv/bin/python -m fuzz "$1" "$2"
