"""Debian's cloud kernel and a busybox test initramfs, for booting QEMU as a second front-end.

slimvisor's own guests are User-Mode Linux; to show that the vhost-user back-ends also serve an
independent front-end, tests boot QEMU (TCG) with Debian's `linux-image-cloud-amd64` kernel and
a tiny initramfs: busybox, the virtio-pci, -blk, -net and -rng modules, and an /init that runs the
check named by `sv.test=` on the kernel command line (blk, net or rng) and powers off.

The kernel is fetched with the ordinary Debian clients (`apt-cache`, `apt-get download`,
`dpkg-deb`); busybox comes from the host's busybox-static and modules.dep from the host's depmod
(kmod). All is cached under CACHE/cloud-kernel/, built next to its final place and renamed in
whole, so a build that is killed leaves nothing a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from slimvisor.images.cache import locked
from slimvisor.images.cloud import CloudKernelError, static_busybox, unpack_kernel
from slimvisor.images.cpio import write_initramfs
from slimvisor.images.modules import module_load_order, module_name, plain_module

# What the guest needs to see vhost-user-blk-pci, virtio-net-pci (over vhost-user) and
# vhost-user-rng-pci devices; dependencies come from modules.dep.
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng")
# What modules.dep should lead to; virtio_net needs net_failover and failover (for standby
# NICs), which a busybox insmod would not find by itself.
EXPECTED_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
    "failover", "net_failover", "virtio_net", "virtio_rng",
)  # fmt: skip
BUILD_VERSION = 1  # bump when the layout of the cache entry changes

# Lines the tests look for all start with "SV-"; kernel messages are turned down once the
# modules are in so they cannot split those lines. Each sv.test= mode is a shell function that
# waits for its own device, so a boot without a disk (net, rng) does not wait for /dev/vda.
INIT_SCRIPT = r"""#!/bin/busybox sh
# slimvisor cloud-kernel test initramfs: load virtio, run the check named by sv.test=, power off.
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "SV-BOOT: kernel $(uname -r), $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /etc/sv-modules); do
  insmod "/lib/modules/$m.ko" || echo "SV-ERROR: insmod $m failed"
done
echo 4 > /proc/sys/kernel/printk

finish() {
  sync
  echo "SV-POWEROFF"
  poweroff -f
  sleep 5
  reboot -f  # with -no-reboot QEMU exits on a reset too
}

# wait_for TENTHS TEST...: poll until TEST succeeds, at most TENTHS tenths of a second.
wait_for() {
  local n=$1; shift
  while ! "$@" && [ "$n" -gt 0 ]; do usleep 100000; n=$((n-1)); done
  "$@"
}

hex() { od -An -tx1 -v | tr -d ' \n'; }

test_blk() {
  if ! wait_for 300 test -b /dev/vda; then
    echo "SV-ERROR: no /dev/vda after 30 s"
    ls /sys/bus/virtio/devices /sys/bus/pci/devices 2>&1
    return
  fi
  echo "SV-DISK: sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro)"
  echo "SV-HEAD: $(dd if=/dev/vda bs=16 count=1 2>/dev/null | hex)"
  if printf '%s' "$marker" | dd of=/dev/vda bs=1M seek=1 conv=notrunc,fsync 2>/tmp/dd.err; then
    echo "SV-WRITE: ok"
  else
    echo "SV-WRITE: failed rc=$? $(tr '\n' ' ' < /tmp/dd.err)"
  fi
  # Read back from the device, not from the page cache.
  blockdev --flushbufs /dev/vda
  echo 3 > /proc/sys/vm/drop_caches
  echo "SV-SHA256: $(dd if=/dev/vda bs=1M count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
  echo "SV-DONE"
}

# eth0 at sv.ip=, ping sv.peer=, then (sv.nc=PORT) 1 MiB to the peer with nc, md5 of what went.
test_net() {
  if ! wait_for 100 test -e /sys/class/net/eth0; then
    echo "SV-ERROR: no eth0 after 10 s"
    ls /sys/class/net /sys/bus/virtio/devices 2>&1
    return
  fi
  ip link set lo up
  ip link set eth0 up
  ip addr add "$ip" dev eth0
  echo "SV-MAC: $(cat /sys/class/net/eth0/address)"
  wait_for 50 grep -qx up /sys/class/net/eth0/operstate
  echo "SV-LINK: $(cat /sys/class/net/eth0/operstate)"
  ping -c 3 -W 5 "$peer" > /tmp/ping.out 2>&1
  loss=$(sed -n 's/.* \([0-9]*\)% packet loss.*/\1/p' /tmp/ping.out)
  echo "SV-PING: ${loss:-?}%"
  [ "$loss" = 0 ] || sed 's/^/SV-PING-LOG: /' /tmp/ping.out
  if [ -n "$ncport" ]; then
    head -c 1048576 /dev/urandom > /tmp/tx
    echo "SV-NC-MD5: $(md5sum < /tmp/tx | cut -d' ' -f1)"
    # -w: nc leaves once the peer has been idle that long after our end of stdin.
    nc -w 5 "$peer" "$ncport" < /tmp/tx
    echo "SV-NC: rc=$?"
  fi
  echo "SV-DONE"
}

rng_current() {
  cat /sys/class/misc/hw_random/rng_current 2>/dev/null ||
    cat /sys/devices/virtual/misc/hw_random/rng_current 2>/dev/null
}

# /dev/hwrng exists as soon as the hw_random core is up; it reads only once a source is bound.
rng_ready() { test -c /dev/hwrng && [ -n "$(rng_current)" ] && [ "$(rng_current)" != none ]; }

test_rng() {
  if ! wait_for 50 rng_ready; then
    echo "SV-ERROR: no hw_random source after 5 s (current: $(rng_current))"
    return
  fi
  echo "SV-RNG-CURRENT: $(rng_current)"
  echo "SV-RNG: $(timeout 10 head -c 64 /dev/hwrng | hex)"
  echo "SV-DONE"
}

test=; marker=SLIMVISOR-MARKER; ip=; peer=; ncport=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    sv.test=*) test="${arg#sv.test=}" ;;
    sv.marker=*) marker="${arg#sv.marker=}" ;;
    sv.ip=*) ip="${arg#sv.ip=}" ;;
    sv.peer=*) peer="${arg#sv.peer=}" ;;
    sv.nc=*) ncport="${arg#sv.nc=}" ;;
  esac
done

case "$test" in
  blk|net|rng) "test_$test" ;;
  "") echo "SV-ERROR: no sv.test= on the kernel command line" ;;
  *) echo "SV-ERROR: unknown sv.test=$test" ;;
esac
finish
"""


def default_cache_dir() -> Path:
    """$SLIMVISOR_CACHE, else ~/.cache/slimvisor."""
    return Path(os.environ.get("SLIMVISOR_CACHE") or Path.home() / ".cache" / "slimvisor")


def ensure_cloud_kernel(cache_dir: Path) -> tuple[Path, Path]:
    """(vmlinuz, initrd.cpio.gz) for QEMU, fetched and built once into cache_dir/cloud-kernel/."""
    entry = Path(cache_dir) / "cloud-kernel"
    if not _valid(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        with locked(entry.parent / "cloud-kernel.lock"):
            if not _valid(entry):  # another process may have built it while we waited
                _rebuild(entry)
    return entry / "vmlinuz", entry / "initrd.cpio.gz"


def fingerprint() -> str:
    """Changes when what the initramfs is built from (script, module list, layout) changes."""
    h = hashlib.sha256(INIT_SCRIPT.encode())
    h.update(repr((WANTED_MODULES, EXPECTED_MODULES, BUILD_VERSION)).encode())
    return h.hexdigest()[:16]


# -- cache entry -----------------------------------------------------------------------------------
def _valid(entry: Path) -> bool:
    """Whether entry is a finished build of this fingerprint (a stale one is rebuilt)."""
    try:
        info = json.loads((entry / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint() and all(
        (entry / name).is_file() for name in ("vmlinuz", "initrd.cpio.gz")
    )


def _sweep(parent: Path) -> None:
    """Remove the scratch directories of this or an earlier, killed build (all .cloud-kernel.*)."""
    for scratch in parent.glob(".cloud-kernel.*"):
        shutil.rmtree(scratch, ignore_errors=True)


def _rebuild(entry: Path) -> None:
    """Build into a directory next to entry and rename it into place, so no half entry is seen."""
    _sweep(entry.parent)
    staging = Path(tempfile.mkdtemp(prefix=".cloud-kernel.new.", dir=entry.parent))
    work = Path(tempfile.mkdtemp(prefix=".cloud-kernel.work.", dir=entry.parent))
    try:
        _build(staging, work)
        if entry.exists():  # stale: move it out whole, the sweep removes it
            os.replace(entry, work / "old-entry")
        os.replace(staging, entry)
    finally:
        _sweep(entry.parent)


def _build(out: Path, work: Path) -> None:
    """Unpack the kernel package in work; write vmlinuz, initrd.cpio.gz and build.json into out."""
    package, deb, moddir, vmlinuz = unpack_kernel(work)
    modules = _modules(moddir, package)
    _write_initramfs(work / "initramfs", modules, out / "initrd.cpio.gz")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    info = {
        "fingerprint": fingerprint(),
        "package": package,
        "deb": deb.name,
        "kernel": moddir.name,
        "modules": [module_name(m) for m in modules],
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    out.chmod(0o755)


def _write_initramfs(root: Path, modules: list[Path], dest: Path) -> None:
    """busybox, the modules as plain NAME.ko with their load order in /etc/sv-modules, and /init."""
    for d in ("bin", "dev", "etc", "lib/modules", "proc", "sys", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy2(static_busybox(), root / "bin" / "busybox")
    for path in modules:
        (root / "lib" / "modules" / f"{module_name(path)}.ko").write_bytes(plain_module(path))
    (root / "etc" / "sv-modules").write_text("".join(f"{module_name(m)}\n" for m in modules))
    (root / "init").write_text(INIT_SCRIPT)
    for exe in (root / "bin" / "busybox", root / "init"):
        exe.chmod(0o755)
    write_initramfs(root, dest)


def _modules(moddir: Path, package: str) -> list[Path]:
    """WANTED_MODULES and their dependencies in load order, checked against EXPECTED_MODULES."""
    try:
        modules = module_load_order(moddir, WANTED_MODULES)
    except FileNotFoundError as e:
        raise CloudKernelError(f"{package}: {e}") from e
    missing = set(EXPECTED_MODULES) - {module_name(m) for m in modules}
    if missing:  # a future kernel that builds some of these in would still boot, but say so
        raise CloudKernelError(f"{package}: modules.dep does not lead to {sorted(missing)}")
    return modules
