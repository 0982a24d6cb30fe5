"""The small PV guest: a busybox initramfs that loads UML's virtio modules and boots a root disk,
and a busybox root filesystem as an ext4 image, built with mkfs.ext4 -d (no mounts, no loop).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from slimvisor.images.cpio import write_initramfs
from slimvisor.images.modules import module_load_order, module_name, plain_module

BUSYBOX = "/bin/busybox"
UML_MODULES_ROOT = Path("/usr/lib/uml/modules")
# Virtio drivers the guest loads at boot, in the order the devices need them.
GUEST_MODULES = (
    "virtio_blk", "virtio_net", "virtio_console", "virtio_balloon", "vmw_vsock_virtio_transport",
)  # fmt: skip

# Host programs copied into the root disk with their libraries (UML runs them unchanged):
# network tests and benchmarks, vsock (socat speaks AF_VSOCK from 1.7.4 on), and Debian's
# xenstore-utils (one program that acts on the name it is called by).
XENSTORE_PROGRAM = "/usr/bin/xenstore"
GUEST_TOOLS = ("/usr/bin/iperf3", "/usr/bin/socat", XENSTORE_PROGRAM)
XENSTORE_COMMANDS = ("read", "write", "ls", "rm", "exists", "list", "watch", "chmod")
XENSTORED_PATH = "/run/xenstored/socket"  # where the guest's xenstore tools connect
# Libraries that programs load at run time (ldd cannot see them): glibc's pthread_cancel, which
# libxenstore calls to end its watch thread, aborts without libgcc_s.
GUEST_LIBS = ("/lib/x86_64-linux-gnu/libgcc_s.so.1",)

INITRAMFS_INIT = r"""#!/bin/sh
# slimvisor's PV boot initramfs: load virtio drivers, mount root=, switch to it.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# module.param=value on the command line goes to that module, as modprobe does it
for m in $(cat /etc/modules); do
  params=
  for arg in $(cat /proc/cmdline); do
    case "$arg" in "$m".?*=*) params="$params ${arg#"$m".}" ;; esac
  done
  insmod "/lib/modules/$m.ko" $params 2>/dev/null
done
root=; init=/sbin/init; fstype=ext4; mode=rw; vdevs=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    sv.vdevs=*) vdevs="${arg#sv.vdevs=}" ;;
    init=*) init="${arg#init=}" ;;
    rootfstype=*) fstype="${arg#rootfstype=}" ;;
    ro) mode=ro ;;
  esac
done
# Xen's disk names: sv.vdevs=xvda,xvda1,xvdc says the guest's vda, vdb, vdc are the config's xvda,
# xvda1, xvdc. root=/dev/xvdXN, /dev/sdXN or /dev/hdXN names that disk (or partition N of it).
xen_key() { case "$1" in xvd*) echo "${1#xvd}" ;; sd*|hd*) echo "${1#??}" ;; esac; }
letters=abcdefghijklmnopqrstuvwxyz
want=; case "$root" in /dev/xvd*|/dev/sd*|/dev/hd*) want=$(xen_key "${root#/dev/}") ;; esac
i=0
for v in $(echo "$vdevs" | tr ',' ' '); do
  i=$((i+1)); vd=vd$(echo $letters | cut -c$i); k=$(xen_key "$v")
  if [ -n "$want" ] && [ "$want" = "$k" ]; then root=/dev/$vd; fi
  case "$want" in "$k"[0-9]*) [ -n "$k" ] && root=/dev/$vd${want#"$k"} ;; esac
done
if [ -z "$root" ]; then
  echo "slimvisor-initrd: no root= on the command line; starting a shell"
  exec setsid cttyhack sh
fi
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
i=0
for v in $(echo "$vdevs" | tr ',' ' '); do  # /dev/xvdX names beside /dev/vdX, so a Xen guest's fstab works
  i=$((i+1)); vd=vd$(echo $letters | cut -c$i)
  [ "$v" = "$vd" ] || ln -sf "$vd" "/dev/$v"
  for p in /dev/"$vd"[0-9]*; do [ -b "$p" ] && ln -sf "${p#/dev/}" "/dev/$v${p#/dev/$vd}"; done
done
mkdir -p /newroot
if ! mount -t "$fstype" -o "$mode" "$root" /newroot; then
  echo "slimvisor-initrd: cannot mount root $root ($fstype)"
  exit 1
fi
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /sys /proc
exec switch_root /newroot "$init"
"""

ROOTFS_FILES = {
    "etc/inittab": """::sysinit:/etc/init.d/rcS
::once:/etc/init.d/console
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
""",
    "etc/init.d/rcS": """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -o remount,rw / 2>/dev/null
name=slimvisor
for arg in $(cat /proc/cmdline); do
  case "$arg" in sv.hostname=*) name="${arg#sv.hostname=}" ;; esac
done
hostname "$name"
ip link set lo up 2>/dev/null
# Networking from the command line: sv.ip=ADDR/LEN[,GATEWAY] for the first network card
# (eth0 on virtio-net, vec0 on UML's vector driver); sv.hosts=NAME=ADDR,...
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    sv.ip=*) v="${arg#sv.ip=}"; ip link set "$nic" up; ip addr add "${v%%,*}" dev "$nic"
             case "$v" in *,*) ip route add default via "${v#*,}" ;; esac ;;
    sv.hosts=*) echo "${arg#sv.hosts=}" | tr ',' '\n' | while IFS== read -r h a; do echo "$a $h"; done >> /etc/hosts ;;
  esac
done
# sv.xenstore=PORT: the domain's xenstore is vsock port PORT of the host (CID 2); the xenstore
# tools reach it through a bridge on XENSTORED_PATH (exported by /etc/profile).
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    sv.xenstore=*) mkdir -p /run/xenstored
      socat UNIX-LISTEN:/run/xenstored/socket,fork,mode=600 "VSOCK-CONNECT:2:${arg#sv.xenstore=}" \
        </dev/null >/dev/null 2>/run/xenstored/bridge.log &
      i=0; while [ ! -S /run/xenstored/socket ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
      # its own process group, so `kill -- -$(cat /run/xen-shutdown.pid)` stops all of it
      setsid /etc/init.d/xen-shutdown </dev/null >/dev/null 2>&1 &
      echo $! > /run/xen-shutdown.pid ;;
  esac
done
# The ACPI power button (an HVM/PVH domain's `slimvisor shutdown`): busybox acpid runs
# /etc/acpi/PWRF/00000080 on it. UML has no ACPI: nothing to listen to there.
[ -d /sys/firmware/acpi ] && acpid -c /etc/acpi -l /run/acpid.log
[ -x /etc/rc.local ] && /etc/rc.local
echo "slimvisor: $(hostname) is up"
""",
    "etc/acpi/PWRF/00000080": "#!/bin/sh\npoweroff\n",
    "etc/init.d/xen-shutdown": f"""#!/bin/sh
# Xen's PV shutdown protocol (xen: docs/misc/xenstore-paths.pandoc, ~/control/shutdown): say we
# take part, then wait for the toolstack to write poweroff or reboot there; clear it and do it.
# A watch ends when slimvisord restarts (domains outlive it): then watch again.
export XENSTORED_PATH={XENSTORED_PATH}
xenstore-write control/feature-poweroff 1 control/feature-reboot 1 || exit 0
while :; do
  xenstore-watch control/shutdown | while read -r _; do
    case "$(xenstore-read control/shutdown 2>/dev/null)" in
      poweroff|halt) xenstore-write control/shutdown ""; poweroff; exit ;;
      reboot) xenstore-write control/shutdown ""; reboot; exit ;;
    esac
  done
  sleep 1
done
""",
    "etc/init.d/console": """#!/bin/sh
# The console shell; when it ends, so does the domain.
setsid cttyhack sh -l
poweroff
""",
    "etc/profile": "export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport PS1='\\h:\\w\\$ '\n"
    f"if [ -S {XENSTORED_PATH} ]; then export XENSTORED_PATH={XENSTORED_PATH}; fi\n",
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": "slimvisor\n",
    "etc/hosts": "127.0.0.1 localhost\n",
}


def uml_modules_dir() -> Path:
    """The module tree matching the installed linux.uml."""
    dirs = sorted(p for p in UML_MODULES_ROOT.glob("*") if (p / "modules.dep").exists())
    if not dirs:
        raise FileNotFoundError(f"no UML modules under {UML_MODULES_ROOT} (apt-get install user-mode-linux)")
    return dirs[-1]


def _install_busybox(root: Path) -> None:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True, text=True).stdout
    for applet in applets.split():
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "bin/busybox", link.parent))


def _write_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if "init.d/" in rel or rel.startswith("etc/acpi/") or rel in ("init", "etc/rc.local"):
            path.chmod(0o755)


def build_initramfs(dest: Path, moddir: Path | None = None, modules: Iterable[str] = GUEST_MODULES) -> None:
    """The boot initramfs: busybox, virtio modules, an init that switches to root=. The same for
    every engine: UML's modules by default, an x86 kernel's (`slimvisor.images.cloud`) for HVM/PVH."""
    moddir = moddir or uml_modules_dir()
    with tempfile.TemporaryDirectory(prefix="slimvisor-initrd-") as tmp:
        root = Path(tmp)
        for d in ("proc", "sys", "dev", "newroot", "lib/modules", "etc"):
            (root / d).mkdir(parents=True, exist_ok=True)
        _install_busybox(root)
        mods = module_load_order(moddir, modules)
        for m in mods:  # busybox insmod neither decompresses nor reads '-' as '_': NAME.ko, plain
            (root / "lib/modules" / f"{module_name(m)}.ko").write_bytes(plain_module(m))
        (root / "etc/modules").write_text("\n".join(module_name(m) for m in mods) + "\n")
        _write_files(root, {"init": INITRAMFS_INIT})
        write_initramfs(root, dest)


def build_rootfs(dest: Path, size_mib: int = 64, extra_files: dict[str, str] | None = None,
                 extra_tree: Path | None = None) -> None:  # fmt: skip
    """A busybox root filesystem as a sparse ext4 image, written atomically to `dest`."""
    with tempfile.TemporaryDirectory(prefix="slimvisor-rootfs-") as tmp:
        root = Path(tmp)
        rootfs_tree(root, extra_files)
        if extra_tree is not None:
            shutil.copytree(extra_tree, root, symlinks=True, dirs_exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with open(part, "wb") as f:
            f.truncate(size_mib << 20)
        try:
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(root), str(part)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            part.unlink(missing_ok=True)
            raise RuntimeError(f"mkfs.ext4 failed: {e.stderr.strip()}") from e
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)


def add_host_binaries(root: Path, binaries: Iterable[str]) -> None:
    """Copy host programs and every shared library `ldd` says they need into a guest tree.

    UML guests run host x86-64 binaries unchanged, so tools such as fio need no cross build.
    """
    for binary in binaries:
        files = {os.path.realpath(binary): binary}
        out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if path.startswith("/"):
                files[os.path.realpath(path)] = path
        for real, as_named in files.items():
            dest = root / as_named.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, dest)


def rootfs_tree(root: Path, extra_files: dict[str, str] | None = None) -> None:
    """The busybox guest's root tree in `root`: busybox, the guest tools, the files above."""
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "mnt", "etc/init.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    _install_busybox(root)
    add_host_binaries(root, [t for t in (*GUEST_TOOLS, *GUEST_LIBS) if os.path.exists(t)])
    if os.path.exists(XENSTORE_PROGRAM):
        for command in XENSTORE_COMMANDS:
            link = root / f"{XENSTORE_PROGRAM.lstrip('/')}-{command}"
            link.symlink_to(os.path.basename(XENSTORE_PROGRAM))
    _write_files(root, {**ROOTFS_FILES, **(extra_files or {})})


def build_bootable(dest: Path, vmlinuz: Path, initrd: Path, size_mib: int = 96) -> None:
    """The busybox guest as a disk SeaBIOS boots (slimvisor.images.bootable): GRUB in the MBR, the
    root on partition 1 with `vmlinuz` and `initrd` (an x86 kernel and slimvisor's initramfs for it)."""
    from slimvisor.images.bootable import build_disk

    with tempfile.TemporaryDirectory(prefix="slimvisor-bootable-") as tmp:
        root = Path(tmp)
        rootfs_tree(root)
        (root / "boot").mkdir()
        shutil.copyfile(vmlinuz, root / "boot" / "vmlinuz")
        shutil.copyfile(initrd, root / "boot" / "initrd.img")
        part = dest.with_name(dest.name + ".part")
        try:
            build_disk(part, root, size_mib, "root=/dev/vda1 console=ttyS0")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)


def build(outdir: Path) -> tuple[Path, Path]:
    """`slimvisor image busybox DIR`: DIR/initrd.cpio.gz and DIR/rootfs.ext4."""
    outdir.mkdir(parents=True, exist_ok=True)
    initrd, rootfs = outdir / "initrd.cpio.gz", outdir / "rootfs.ext4"
    build_initramfs(initrd)
    build_rootfs(rootfs)
    return initrd, rootfs


def fingerprint() -> str:
    """Changes when anything the images are built from changes (cache key)."""
    h = hashlib.sha256(INITRAMFS_INIT.encode() + repr(sorted(ROOTFS_FILES.items())).encode())
    h.update(repr((GUEST_MODULES, GUEST_TOOLS, GUEST_LIBS, XENSTORE_COMMANDS)).encode())
    for p in (Path(BUSYBOX), uml_modules_dir() / "modules.dep", *map(Path, (*GUEST_TOOLS, *GUEST_LIBS))):
        if not p.exists():
            continue
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
