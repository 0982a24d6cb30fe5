"""Debian's cloud kernel and a busybox test initramfs, for booting QEMU as a second front-end.

slimvisor's own guests are User-Mode Linux; to show that the vhost-user back-ends also serve an
independent front-end, tests boot QEMU (TCG) with Debian's `linux-image-cloud-amd64` kernel and
a tiny initramfs: busybox, the virtio-pci and virtio-blk modules, and an /init that runs the check
named by `sv.test=` on the kernel command line and powers off.

Everything is fetched with the ordinary Debian clients (`apt-cache`, `apt-get download`,
`dpkg-deb`) and cached under CACHE/cloud-kernel/. The cache directory is built next to its final
place and renamed in whole, so a build that is killed leaves nothing a later run would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from slimvisor.images.cpio import write_initramfs

META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
HOST_BUSYBOX = Path("/bin/busybox")
# What the guest needs to see a vhost-user-blk-pci disk; dependencies come from modules.dep.
WANTED_MODULES = ("virtio_pci", "virtio_blk")
EXPECTED_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
)  # fmt: skip
BUILD_VERSION = 1  # bump when the layout of the cache entry changes

# Lines the tests look for all start with "SV-"; kernel messages are turned down once the
# modules are in so they cannot split those lines.
INIT_SCRIPT = r"""#!/bin/busybox sh
# slimvisor cloud-kernel test initramfs: load virtio, wait for /dev/vda, run sv.test=, power off.
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "SV-BOOT: kernel $(uname -r), $(cat /proc/uptime | cut -d' ' -f1)s"
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

test=; marker=SLIMVISOR-MARKER
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    sv.test=*) test="${arg#sv.test=}" ;;
    sv.marker=*) marker="${arg#sv.marker=}" ;;
  esac
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done
if [ ! -b /dev/vda ]; then
  echo "SV-ERROR: no /dev/vda after 30 s"
  ls /sys/bus/virtio/devices /sys/bus/pci/devices 2>&1
  finish
fi
echo "SV-DISK: sectors=$(cat /sys/block/vda/size) ro=$(cat /sys/block/vda/ro)"

case "$test" in
  blk)
    echo "SV-HEAD: $(dd if=/dev/vda bs=16 count=1 2>/dev/null | od -An -tx1 -v | tr -d ' \n')"
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
    ;;
  "")
    echo "SV-ERROR: no sv.test= on the kernel command line"
    ;;
  *)
    echo "SV-ERROR: unknown sv.test=$test"
    ;;
esac
finish
"""


class CloudKernelError(RuntimeError):
    """The cloud kernel or its initramfs could not be fetched or built."""


def default_cache_dir() -> Path:
    """$SLIMVISOR_CACHE, else ~/.cache/slimvisor."""
    return Path(os.environ.get("SLIMVISOR_CACHE") or Path.home() / ".cache" / "slimvisor")


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, which is also the guest's under TCG (QEMU reads the host TSC)."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "cpu MHz":
                    return round(float(value) * 1000)
    except (OSError, ValueError):
        pass
    return None


def tcg_boot_args() -> str:
    """Kernel arguments this kernel needs to boot reliably on QEMU's microvm under TCG.

    microvm has no HPET or ACPI PM timer, so the kernel calibrates the TSC against the PIT alone;
    on a busy host TCG is too uneven for that ("tsc: Unable to calibrate against PIT"), the TSC is
    marked unstable and the boot hangs before the first timer tick. Telling it the frequency
    skips the calibration. A frequency that is off only makes the guest's clock run off.
    """
    khz = host_tsc_khz()
    return f"tsc_early_khz={khz}" if khz else ""


def ensure_cloud_kernel(cache_dir: Path) -> tuple[Path, Path]:
    """(vmlinuz, initrd.cpio.gz) for QEMU, fetched and built once into cache_dir/cloud-kernel/."""
    entry = Path(cache_dir) / "cloud-kernel"
    vmlinuz, initrd = entry / "vmlinuz", entry / "initrd.cpio.gz"
    if _valid(entry):
        return vmlinuz, initrd
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.parent / "cloud-kernel.lock"):
        if _valid(entry):  # another process built it while we waited
            return vmlinuz, initrd
        for leftover in entry.parent.glob(".cloud-kernel.*"):  # from a build that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        # Both next to the entry, so the sweep above also removes what a killed build left.
        staging = Path(tempfile.mkdtemp(prefix=".cloud-kernel.new.", dir=entry.parent))
        work = Path(tempfile.mkdtemp(prefix=".cloud-kernel.work.", dir=entry.parent))
        try:
            _build(staging, work)
            if entry.exists():  # stale: an older build or fingerprint; swap it out whole
                old = Path(tempfile.mkdtemp(prefix=".cloud-kernel.old.", dir=entry.parent))
                os.replace(entry, old / "entry")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return vmlinuz, initrd


def fingerprint() -> str:
    """Changes when what the initramfs is built from (script, module list, layout) changes."""
    h = hashlib.sha256(INIT_SCRIPT.encode())
    h.update(repr((WANTED_MODULES, EXPECTED_MODULES, BUILD_VERSION)).encode())
    return h.hexdigest()[:16]


# -- cache entry -----------------------------------------------------------------------------------
def _valid(entry: Path) -> bool:
    try:
        info = json.loads((entry / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("fingerprint") == fingerprint()
        and (entry / "vmlinuz").is_file()
        and (entry / "initrd.cpio.gz").is_file()
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(out: Path, work: Path) -> None:
    package, deb = _download(resolve_kernel_package, work)
    tree = work / "tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)])
    kver = _kernel_version(tree)
    vmlinuz = tree / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise CloudKernelError(f"{deb.name} has no boot/vmlinuz-{kver}")
    moddir = _module_dir(tree, kver)
    modules = module_load_order(moddir, WANTED_MODULES)
    missing = set(EXPECTED_MODULES) - {name for name, _ in modules}
    if missing:  # a future kernel that builds some of these in would still boot, but say so
        raise CloudKernelError(f"{package}: modules.dep does not lead to {sorted(missing)}")

    root = work / "initramfs"
    for d in ("bin", "dev", "etc", "lib/modules", "proc", "sys", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy2(_busybox(work), root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for name, path in modules:
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(_decompressed(path))
    (root / "etc" / "sv-modules").write_text("".join(f"{name}\n" for name, _ in modules))
    (root / "init").write_text(INIT_SCRIPT)
    (root / "init").chmod(0o755)

    write_initramfs(root, out / "initrd.cpio.gz")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    info = {
        "fingerprint": fingerprint(),
        "package": package,
        "deb": deb.name,
        "kernel": kver,
        "modules": [name for name, _ in modules],
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    out.chmod(0o755)


# -- Debian packages -------------------------------------------------------------------------------
def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise CloudKernelError(f"{argv[0]} is not installed") from e
    if r.returncode != 0:
        raise CloudKernelError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _apt_update() -> None:
    _run(["apt-get", "update"])


def _depends_of(package: str) -> list[str]:
    out = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True).stdout
    deps = []
    for line in out.splitlines():
        kind, _, name = line.strip().partition(":")
        if kind.lstrip("|") in ("Depends", "PreDepends") and name.strip():
            deps.append(name.strip().strip("<>"))
    return deps


def resolve_kernel_package() -> str:
    """The versioned image package `linux-image-cloud-amd64` depends on (from the local lists)."""
    images = [d for d in _depends_of(META_PACKAGE) if d.startswith("linux-image-")]
    if not images:
        raise CloudKernelError(f"apt-cache depends {META_PACKAGE} names no linux-image package")
    return images[0]


def _download_once(package: str, dest: Path) -> Path:
    before = set(dest.glob("*.deb"))
    r = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
    debs = sorted(set(dest.glob(f"{package}_*.deb")) - before)
    if r.returncode != 0 or not debs:
        raise CloudKernelError(f"apt-get download {package} failed: {r.stderr.strip()}")
    return debs[-1]


def _download(resolve: Callable[[], str], dest: Path) -> tuple[str, Path]:
    """Resolve a package name and `apt-get download` it into dest.

    When that fails (no package lists yet, or lists so old the mirror dropped that version),
    `apt-get update` once and resolve again: after an update the name itself may have changed.
    """
    try:
        package = resolve()
        return package, _download_once(package, dest)
    except CloudKernelError as first:
        try:
            _apt_update()
        except CloudKernelError as e:
            raise CloudKernelError(f"{first}; and then {e}") from e
        package = resolve()
        return package, _download_once(package, dest)


def _busybox(work: Path) -> Path:
    """Debian's static busybox: the host's when busybox-static is installed, else downloaded."""
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", BUSYBOX_PACKAGE], capture_output=True, text=True
    ).stdout
    if status.endswith("installed") and HOST_BUSYBOX.is_file():
        return HOST_BUSYBOX
    _, deb = _download(lambda: BUSYBOX_PACKAGE, work)
    tree = work / "busybox-tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)])
    for candidate in (tree / "bin" / "busybox", tree / "usr" / "bin" / "busybox"):
        if candidate.is_file():
            return candidate
    raise CloudKernelError(f"{deb.name} has no bin/busybox")


# -- kernel modules --------------------------------------------------------------------------------
def _kernel_version(tree: Path) -> str:
    for base in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        if base.is_dir():
            versions = sorted(p.name for p in base.iterdir() if p.is_dir())
            if versions:
                return versions[-1]
    raise CloudKernelError(f"no lib/modules/<version> in {tree}")


def _module_dir(tree: Path, kver: str) -> Path:
    """lib/modules/KVER with a modules.dep: from `depmod -b`, or read from the modules themselves."""
    for base in (tree, tree / "usr"):
        moddir = base / "lib" / "modules" / kver
        if moddir.is_dir():
            break
    else:
        raise CloudKernelError(f"no lib/modules/{kver} in {tree}")
    depmod = shutil.which("depmod") or next(
        (p for p in ("/usr/sbin/depmod", "/sbin/depmod") if os.access(p, os.X_OK)), None
    )
    if depmod is not None:
        with contextlib.suppress(CloudKernelError):  # the fallback below says the same
            _run([depmod, "-b", str(moddir.parent.parent.parent), kver])
    if not (moddir / "modules.dep").exists():
        # No kmod on this machine: the same file from each module's .modinfo "depends=".
        (moddir / "modules.dep").write_text(_modules_dep_from_modinfo(moddir))
    return moddir


def _module_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def module_load_order(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """(name, file) for `wanted` and everything they need, each after its dependencies."""
    deps: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, sep, rest = line.partition(":")
        if not sep:
            continue
        name = _module_name(mod)
        deps[name] = [_module_name(d) for d in rest.split()]
        files[name] = moddir / mod
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in deps:
            raise CloudKernelError(f"kernel module {name} is not in {moddir}/modules.dep")
        if name in visiting:
            raise CloudKernelError(f"kernel module dependency cycle through {name}")
        visiting.add(name)
        for dep in reversed(deps[name]):  # modules.dep lists the farthest dependency last
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(_module_name(name))
    return [(n, files[n]) for n in order]


def _decompressed(path: Path) -> bytes:
    """The plain .ko: busybox insmod does not decompress."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _modules_dep_from_modinfo(moddir: Path) -> str:
    """A modules.dep for the modules under moddir, as depmod would write it (without symbols)."""
    paths = {}
    for p in sorted(moddir.rglob("*.ko*")):
        if p.name.endswith((".ko", ".ko.xz", ".ko.gz", ".ko.zst")):
            paths[_module_name(p)] = p
    direct = {name: _modinfo_depends(_decompressed(p)) for name, p in paths.items()}
    lines = []
    for name, p in paths.items():
        closure: list[str] = []

        def walk(n: str, closure: list[str] = closure) -> None:
            for d in direct.get(n, []):
                if d in paths and d not in closure:
                    closure.append(d)
                    walk(d)

        walk(name)
        deps = " ".join(str(paths[d].relative_to(moddir)) for d in closure)
        lines.append(f"{p.relative_to(moddir)}: {deps}".rstrip() + "\n")
    return "".join(lines)


def _modinfo_depends(elf: bytes) -> list[str]:
    """The `depends=` entry of an ELF64 module's .modinfo section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return []
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        if elf[stroff + name : elf.index(b"\0", stroff + name)] == b".modinfo":
            for item in elf[off : off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d.replace("-", "_") for d in item[8:].decode().split(",") if d]
    return []
