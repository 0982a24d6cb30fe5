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

echo
echo "demo: the toolstack: 'slimvisor cluster up 3' (slimvisord starts on demand; CoW overlay root disks)"
slimvisor cluster up 3 --name demo
trap 'slimvisor cluster down demo >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
for node in node1 node2 node3; do
    for _ in $(seq 300); do
        grep -qa "slimvisor: $node is up" "/var/log/slimvisor/$node.console.log" 2>/dev/null && break
        sleep 0.2
    done
done
slimvisor list
echo "demo: on node1's console: ping the others by name, read its address from the xenstore"
{ printf '%s\n' 'for n in node2 node3; do ping -c 1 -W 3 $n; done' 'xenstore-read name attr/ip'; sleep 5; } |
    timeout 8 slimvisor console node1 | tail -n +2 || true
echo
echo "demo: the same xenstore from dom0 (Xen's wire protocol)"
slimvisor xenstore-ls /tool/slimvisor/cluster/demo
slimvisor cluster down demo
slimvisor list
