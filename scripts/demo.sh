#!/usr/bin/env bash
# Set everything up, then boot a PV domain whose root disk is served by slimvisor's own
# vhost-user-blk backend; run a few commands on its console; power it off.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d /var/tmp/slimvisor-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "demo: building the busybox guest (cached in ${SLIMVISOR_CACHE:-~/.cache/slimvisor})"
slimvisor image busybox "$work" >/dev/null
echo "demo: booting domain 'demo' (User-Mode Linux, root on /dev/vda via vhost-user)"
printf '%s\n' 'uname -a' 'df -h /' 'md5sum /bin/busybox' 'poweroff' |
    slimvisor run --name demo --memory 128M --disk "$work/rootfs.ext4" --cmdline quiet
