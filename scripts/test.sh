#!/usr/bin/env bash
# Set everything up, then run the linters and the whole test suite (real UML and QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check slimvisor tests bench scripts fuzz
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
