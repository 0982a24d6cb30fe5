"""The console pump that the runner and the supervisor share, over real pipes and a real loop."""

from __future__ import annotations

import os

from slimvisor.domain.console import MAX_PENDING_INPUT, ConsolePump
from slimvisor.runtime.loop import EventLoop


def _pipes() -> tuple[int, int, int, int]:
    """(guest's console out: read end, write end), (guest's console in: read end, write end)."""
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    for fd in (out_r, in_w):
        os.set_blocking(fd, False)
    return out_r, out_w, in_r, in_w


def test_output_reaches_the_user_and_typing_reaches_the_guest_after_a_reboot():
    loop = EventLoop()
    shown: list[bytes] = []
    drained: list[bool] = []
    pump = ConsolePump(loop, shown.append, on_drained=lambda: drained.append(True))
    assert pump.type(b"typed before boot\n")  # kept until a guest is attached
    for boot in (1, 2):
        out_r, out_w, in_r, in_w = _pipes()
        pump.attach(out_r, in_w)
        os.write(out_w, f"login {boot}: ".encode())
        if boot == 2:
            assert pump.type(b"root\n")
        while len(shown) < boot or pump.pending:
            loop.run_once(1.0)
        assert shown[-1] == f"login {boot}: ".encode()
        assert os.read(in_r, 4096) == (b"typed before boot\n" if boot == 1 else b"root\n")
        pump.detach()
        for fd in (out_r, out_w, in_r, in_w):
            os.close(fd)
    assert len(drained) == 2 and pump.pending == b""
    loop.close()


def test_a_guest_that_does_not_read_makes_typing_ahead_fail_not_grow():
    loop = EventLoop()
    pump = ConsolePump(loop, lambda data: None)
    assert pump.type(bytes(MAX_PENDING_INPUT))
    assert not pump.type(b"x")
    assert len(pump.pending) == MAX_PENDING_INPUT
    loop.close()


def test_a_gone_guest_drops_what_was_typed_for_it():
    loop = EventLoop()
    drained: list[bool] = []
    pump = ConsolePump(loop, lambda data: None, on_drained=lambda: drained.append(True))
    out_r, out_w, in_r, in_w = _pipes()
    os.close(in_r)  # the engine exited
    pump.attach(out_r, in_w)
    assert pump.type(b"too late\n")
    while not drained:
        loop.run_once(1.0)
    assert pump.pending == b""
    pump.detach()
    for fd in (out_r, out_w, in_w):
        os.close(fd)
    loop.close()
