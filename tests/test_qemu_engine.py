"""The HVM/PVH engine's pure parts: kernel formats and the PVH note, the accelerator choice, QEMU's
command line, the QMP client (against a scripted peer on a socketpair). Guests: tests/test_hvm.py."""

from __future__ import annotations

import contextlib
import gzip
import json
import lzma
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from slimvisor.engines.base import EngineError, EngineEvent
from slimvisor.engines.qemu import accel, kernel
from slimvisor.engines.qemu.engine import _translate, host_tid, qemu_argv
from slimvisor.engines.qemu.qmp import Qmp, QmpError
from slimvisor.model.spec import DiskSpec, DomainSpec, NetSpec, SpecError
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_RNG, VIRTIO_ID_VSOCK


# -- kernels -------------------------------------------------------------------------------------
def elf_with_notes(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    """A minimal ELF64 LE file with one PT_NOTE segment holding `notes`."""
    body = b""
    for name, kind, desc in notes:
        n = name + b"\0"
        body += struct.pack("<III", len(n), len(desc), kind)
        body += n.ljust((len(n) + 3) // 4 * 4, b"\0") + desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", kernel.PT_NOTE, 4, 64 + 56, 0, 0, len(body), len(body), 4)
    return bytes(ehdr) + phdr + body


def bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    """A bzImage header (boot protocol 2.15) whose payload is `payload`, after the setup sectors."""
    img = bytearray((setup_sects + 1) * 512 + 0x100)
    img[kernel.SETUP_SECTS] = setup_sects
    struct.pack_into("<H", img, kernel.BOOT_FLAG, 0xAA55)
    img[kernel.HEADER : kernel.HEADER + 4] = b"HdrS"
    struct.pack_into("<H", img, kernel.VERSION, 0x020F)
    struct.pack_into("<II", img, kernel.PAYLOAD_OFFSET, 0x100, len(payload))
    return bytes(img) + payload + struct.pack("<I", 12345)  # the build appends the size: ignored


PVH = (b"Xen", kernel.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000230))


def test_pvh_note_found_in_elf_and_in_compressed_bzimages(tmp_path: Path) -> None:
    elf = elf_with_notes([(b"GNU", 3, b"\x01" * 20), PVH])
    assert kernel.pvh_entry(elf) == 0x1000230
    for name, packed in (("gz", gzip.compress(elf)), ("xz", lzma.compress(elf))):
        path = tmp_path / f"bz-{name}"
        path.write_bytes(bzimage(packed))
        info = kernel.inspect(str(path))
        assert (info.kind, info.pvh_entry) == ("bzImage", 0x1000230) and kernel.is_bzimage(str(path))
        assert kernel.inspect(str(path), tmp_path / "cache") == info
        out = kernel.pvh_kernel(str(path), tmp_path / "cache")
        assert out.read_bytes() == elf and out.parent == tmp_path / "cache"
        assert kernel.pvh_kernel(str(path), tmp_path / "cache") == out  # extracted once


def test_kernel_without_pvh_note_is_refused_for_pvh(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(elf_with_notes([(b"Linux", 6, b"6.1")]))
    assert kernel.inspect(str(path)).pvh_entry is None and not kernel.is_bzimage(str(path))
    with pytest.raises(kernel.KernelError, match=r"no Xen PVH entry note \(XEN_ELFNOTE_PHYS32_ENTRY\)"):
        kernel.pvh_kernel(str(path), tmp_path / "cache")


@pytest.mark.parametrize(("data", "message"), [
    (b"MZ" + bytes(4000), "neither an ELF vmlinux nor a bzImage"),
    (bzimage(b"\x00\x11\x22\x33" + bytes(100)), "unknown format .magic 00112233"),
    (bzimage(gzip.compress(b"not an elf")), "payload is not an ELF kernel"),
    (b"\x7fELF\x01\x01" + bytes(100), "not a 64-bit little-endian ELF"),
])  # fmt: skip
def test_bad_kernels_are_named(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(data)
    with pytest.raises(kernel.KernelError, match=message):
        kernel.inspect(str(path))


def test_payload_outside_the_file_is_refused() -> None:
    img = bytearray(bzimage(b"x" * 64))
    struct.pack_into("<I", img, kernel.PAYLOAD_LENGTH, 1 << 30)
    with pytest.raises(kernel.KernelError, match="payload lies outside the file"):
        kernel.bzimage_payload(bytes(img))


def test_hostile_note_lengths_stay_inside_the_segment() -> None:
    elf = bytearray(elf_with_notes([PVH]))
    struct.pack_into("<I", elf, 64 + 56 + 4, 0xFFFFFFF0)  # descsz of the note: past the end
    assert kernel.elf_notes(bytes(elf)) == [] and kernel.pvh_entry(bytes(elf)) is None


# -- accelerator ---------------------------------------------------------------------------------
def modules(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).mkdir(parents=True)
    return tmp_path


def test_pvm_kvm_is_never_chosen(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    kvm.touch()
    got = accel.choose(modules(tmp_path / "m", "kvm", "kvm_pvm"), "flags\t: fpu sse2\n", str(kvm))
    assert got == accel.Accel("tcg", "/dev/kvm is PVM (module kvm_pvm): it runs only PVM-built guest kernels")


def test_kvm_needs_the_module_and_the_cpu_flag(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    kvm.touch()
    assert accel.choose(modules(tmp_path / "a", "kvm_intel"), "flags\t: fpu vmx sse2\n", str(kvm)).name == "kvm"
    assert accel.choose(modules(tmp_path / "b", "kvm_amd"), "flags\t: fpu svm\n", str(kvm)).args()[:2] == [
        "-accel", "kvm"]  # fmt: skip
    no_flag = accel.choose(modules(tmp_path / "c", "kvm_intel"), "flags\t: fpu sse2\n", str(kvm))
    assert no_flag == accel.Accel("tcg", "the CPU has no VMX or SVM")
    no_module = accel.choose(modules(tmp_path / "d"), "flags\t: vmx\n", str(kvm))
    assert no_module == accel.Accel("tcg", "no kvm_intel or kvm_amd module loaded")
    tcg = accel.Accel("tcg", "")
    assert tcg.args() == ["-accel", f"tcg,thread=multi,tb-size={accel.TCG_TB_MIB}", "-cpu", "max"]


# -- command line --------------------------------------------------------------------------------
def spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = {"name": "h", "kernel": "", "memory_mib": 128, "type": "hvm", "vcpus": 2}
    return DomainSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_argv_attaches_slimvisor_backends_and_qemu_balloon() -> None:
    s = spec(disks=[DiskSpec("/a"), DiskSpec("/b")], nets=[NetSpec("sw", mac=bytes.fromhex("52540000aa01"))],
             balloon=True, balloon_deflate_on_oom=True, rng=True)  # fmt: skip
    devices = [("/sock/0-vda", VIRTIO_ID_BLOCK), ("/sock/1-vdb", VIRTIO_ID_BLOCK), ("/sock/2-n", VIRTIO_ID_NET),
               ("/sock/3-v", VIRTIO_ID_VSOCK)]  # fmt: skip
    argv = qemu_argv("hvm", s, devices, None, False, paused=True, acc=accel.Accel("tcg", ""))
    line = " ".join(argv)
    assert "-machine q35,memory-backend=mem" in line and "-smp 2 -m 128M" in line and "-S" in argv
    assert "vhost-user-blk-pci,chardev=vu0,num-queues=1,bootindex=1" in line  # disk boot: the first disk
    assert "vhost-user-blk-pci,chardev=vu1,num-queues=1 " in line
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:aa:01,vectors=0,romfile=" in line
    assert "vhost-user-vsock-pci,chardev=vu3" in line
    # QEMU's own rng (vhost-user-rng cannot migrate); an rng socket has no QEMU front-end any more.
    assert "-object rng-builtin,id=rng0 -device virtio-rng-pci,rng=rng0" in line
    with pytest.raises(EngineError, match="virtio device 4 has no QEMU front-end here"):
        qemu_argv("hvm", s, [("/sock/4-r", VIRTIO_ID_RNG)], None, False, paused=False, acc=accel.Accel("tcg", ""))
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on" in line and "-kernel" not in argv


def test_argv_pvh_boots_the_kernel_on_microvm() -> None:
    s = spec(type="pvh", kernel="/k", root="/dev/vda", cmdline="quiet")
    argv = qemu_argv("pvh", s, [], "/boot/kernel", True, paused=False, acc=accel.Accel("kvm", ""))
    assert argv[argv.index("-machine") + 1] == "microvm,acpi=on,pcie=on,memory-backend=mem"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 root=/dev/vda quiet"  # no TSC hint under KVM
    assert argv[argv.index("-initrd") + 1] == "/boot/initrd" and "-S" not in argv


def test_spec_engine_section_is_checked() -> None:
    with pytest.raises(SpecError, match="type 'xen': expected one of pv, pvh, hvm"):
        spec(type="xen")
    with pytest.raises(SpecError, match="vcpus 0: expected a whole number from 1"):
        spec(vcpus=0)


# -- QMP -----------------------------------------------------------------------------------------
class FakeQemu:
    """The QEMU end of a QMP socket: greets, answers as told, can send events and hang up."""

    def __init__(self, answers: dict[str, dict[str, object]]) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.answers = answers
        self.seen: list[dict[str, object]] = []
        self.theirs.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        f = self.theirs.makefile("rb")
        for line in f:
            msg = json.loads(line)
            self.seen.append(msg)
            reply = self.answers.get(str(msg["execute"]), {"return": {}})
            self.theirs.sendall(b'{"event": "RESUME", "data": {}}\n' + json.dumps({**reply, "id": msg["id"]}).encode()
                                + b"\n")  # fmt: skip

    def event(self, name: str, data: dict[str, object]) -> None:
        self.theirs.sendall(json.dumps({"event": name, "data": data}).encode() + b"\n")


def pump_until(qmp: Qmp, done: Callable[[], bool]) -> None:
    """Pump as the supervisor's loop does when the socket is readable, until `done` (5 s at most)."""
    deadline = time.monotonic() + 5
    while not done():
        assert time.monotonic() < deadline, "QMP: nothing arrived"
        select.select([qmp.fileno()], [], [], 1)
        qmp.pump()


def test_qmp_handshake_commands_and_events() -> None:
    fake = FakeQemu({"query-cpus-fast": {"return": [{"thread-id": 7}]}, "balloon": {"error": {"desc": "no balloon"}}})
    qmp = Qmp(fake.ours)
    with pytest.raises(QmpError, match="query-status: QEMU is still starting"):
        qmp.execute("query-status")
    pump_until(qmp, lambda: qmp.ready)
    assert fake.seen[0]["execute"] == "qmp_capabilities"
    assert qmp.execute("query-cpus-fast") == [{"thread-id": 7}]
    with pytest.raises(QmpError, match="balloon: no balloon"):
        qmp.execute("balloon", {"value": 1})
    qmp.send("stop")  # not waited for
    fake.event("SHUTDOWN", {"guest": True, "reason": "guest-reset"})
    events: list[dict[str, object]] = []
    pump_until(qmp, lambda: any(e["event"] == "SHUTDOWN" for e in events) or bool(events.extend(qmp.collect())))
    assert [e["event"] for e in events].count("RESUME") >= 2  # one before each answer
    fake.theirs.shutdown(socket.SHUT_RDWR)
    pump_until(qmp, lambda: qmp.eof)
    with pytest.raises(QmpError, match="cont: QEMU closed its monitor"):
        qmp.send("cont")


def test_qmp_rejects_a_peer_that_is_not_qemu() -> None:
    ours, theirs = socket.socketpair()
    theirs.sendall(b'{"hello": 1}\n')
    qmp = Qmp(ours)
    with pytest.raises(QmpError, match="not a QMP greeting"):
        pump_until(qmp, lambda: False)
    ours2, theirs2 = socket.socketpair()
    theirs2.setblocking(False)
    flood = Qmp(ours2)
    with pytest.raises(QmpError, match="a message longer than 1 MiB"):
        for _ in range(64):
            with contextlib.suppress(BlockingIOError):
                theirs2.send(b"x" * 65536)
            flood.pump()


def test_qmp_events_become_engine_events() -> None:
    assert _translate({"event": "SHUTDOWN", "data": {"reason": "guest-reset"}}) == [(EngineEvent.REBOOT_REQUESTED, "")]
    assert _translate({"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}}) == []
    assert _translate({"event": "GUEST_PANICKED", "data": {"action": "exit-failure"}}) == [
        (EngineEvent.PANICKED, "reported through pvpanic")]  # fmt: skip


def test_host_tid_of_our_own_thread() -> None:
    assert host_tid(os.getpid(), threading.get_native_id()) == threading.get_native_id()
