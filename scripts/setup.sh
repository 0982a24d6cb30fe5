#!/usr/bin/env bash
# Install what slimvisor needs on Debian 12 (as root) and the project itself into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(user-mode-linux busybox-static e2fsprogs mmdebstrap kmod fio
      iperf3 socat iputils-ping qemu-system-x86 qemu-system-common qemu-utils xenstore-utils python3 python3-venv python3-pip
      lz4 zstd grub-pc-bin fdisk libatomic1 iproute2 etcd-server etcd-client)
missing=()
for p in "${DEBS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
