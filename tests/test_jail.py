"""Domains are separated from dom0: the jail on its own, then hostile guests that try to get out.

The first part starts busybox (not a guest) in a jail and looks at it from inside and outside; the
second boots real UML domains whose root user attacks the host the ways a guest root can.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from slimvisor.engines.uml import MAX_TASKS, host_options
from slimvisor.jail import Bind, JailError, JailSpec, UidLease, spawn, uid_range
from slimvisor.jail.seccomp import compile_allowlist
from slimvisor.jail.spawn import shared_libraries
from tests.guest import Console, leftovers
from tests.toolstack import Toolstack, process_uid

BUSYBOX = "/bin/busybox"
UP = r"slimvisor: \S+ is up"


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _jail_busybox(tmp_path: Path, script: str, lease: UidLease, **kw: object) -> tuple[int, str]:
    """Run `busybox sh -c script` in a jail; returns (exit code, output)."""
    root = tmp_path / "jail"
    root.mkdir()
    binds = [Bind(p, p) for p in (BUSYBOX, *shared_libraries(BUSYBOX))]
    spec = JailSpec("j1", lease.uid, lease.gid, root, binds, 8 << 20, **kw)  # type: ignore[arg-type]
    out_r, out_w = os.pipe()
    try:
        jailed = spawn(spec, [BUSYBOX, "sh", "-c", script], {"PATH": "/bin"}, os.open(os.devnull, os.O_RDONLY), out_w)
    finally:
        os.close(out_w)
    with os.fdopen(out_r) as f:
        text = f.read()
    rc = jailed.wait()
    jailed.close()
    return rc, text


@pytest.fixture
def lease() -> object:
    held = UidLease.acquire("test")
    yield held
    held.release()


# -- the jail itself ------------------------------------------------------------------------------


def test_jail_view_identity_and_privileges(tmp_path: Path, lease: UidLease) -> None:
    script = ("id -u; id -G; hostname; echo pid=$$; ls /; ls /dev; busybox cat /proc/self/status 2>&1; "
              "touch /planted 2>&1; touch /tmp/ok && echo tmp-writable; ulimit -u")  # fmt: skip
    rc, out = _jail_busybox(tmp_path, script, lease, rlimits={resource.RLIMIT_NPROC: 77})
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == str(lease.uid) and lines[1] == str(lease.gid)  # no supplementary groups
    assert lines[2] == "j1"
    assert lines[3] == "pid=1"  # the init of its own PID namespace
    assert set(out.split("\n", 4)[4].split()) >= {"bin", "dev", "tmp"}
    assert "etc" not in out.split() and "proc" not in out.split()
    assert "null" in out and "urandom" in out
    assert "No such file" in out  # no /proc in the jail
    assert "Read-only file system" in out
    assert "tmp-writable" in out
    assert lines[-1] == "77"
    assert not (tmp_path / "jail" / "planted").exists()


def test_jail_drops_every_privilege(tmp_path: Path, lease: UidLease) -> None:
    root = tmp_path / "jail"
    root.mkdir()
    binds = [Bind(p, p) for p in (BUSYBOX, *shared_libraries(BUSYBOX))]
    spec = JailSpec("j2", lease.uid, lease.gid, root, binds, 8 << 20)
    r, w = os.pipe()  # the jailed shell waits on it, so we can look at it from outside
    jailed = spawn(spec, [BUSYBOX, "sh", "-c", "read x; true"], {}, r, os.open(os.devnull, os.O_WRONLY))
    try:
        st = _status(jailed.pid)
        assert st["Uid"].split() == [str(lease.uid)] * 4
        assert st["Groups"] == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[caps], 16) == 0, caps
        assert st["NoNewPrivs"] == "1"
        for kind in ("mnt", "pid", "net", "ipc", "uts"):
            assert _ns(jailed.pid, kind) != _ns("self", kind), kind
        assert os.listdir(jailed.path("/tmp")) == []
        assert os.listdir(root) == []  # the jail's root is mounted in its own namespace only
    finally:
        os.close(w)
        assert jailed.wait() == 0
        jailed.close()
        os.close(r)


# What static busybox's sh needs to start and echo (strace -f -c).
SH_SYSCALLS = ["execve", "brk", "arch_prctl", "set_tid_address", "set_robust_list", "rseq", "prlimit64", "mprotect",
               "readlink", "uname", "getrandom", "getuid", "geteuid", "getpid", "getppid", "prctl", "newfstatat",
               "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "write", "exit_group", "mmap", "munmap", "read",
               "close", "openat", "ioctl", "fcntl", "getcwd", "access", "getgid", "getegid", "setuid", "setgid",
               "wait4"]  # fmt: skip


def test_seccomp_kills_outside_the_allowlist(tmp_path: Path, lease: UidLease) -> None:
    rc, out = _jail_busybox(tmp_path, "echo before; cd /tmp; echo after", lease,
                            seccomp=compile_allowlist(SH_SYSCALLS))  # fmt: skip
    assert out.splitlines()[0] == "before"
    assert rc == -signal.SIGSYS and "after" not in out  # chdir is not allowed: the shell died of it


def test_seccomp_init_abort_is_death_not_a_spin(tmp_path: Path, lease: UidLease) -> None:
    """Signals an init sends itself are dropped; abort() in a jailed engine must still end it."""
    rc, out = _jail_busybox(tmp_path, "kill -TERM $$; echo still-here; kill -ABRT $$; echo survived", lease,
                            seccomp=compile_allowlist([*SH_SYSCALLS, "kill"]))  # fmt: skip
    assert "still-here" in out  # SIGTERM to itself, as init: ignored, as the kernel does
    assert "survived" not in out and rc == -signal.SIGSYS


def test_jail_refuses_bad_specs(tmp_path: Path, lease: UidLease) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    spec = JailSpec("j3", lease.uid, lease.gid, tmp_path / "full", [], 1 << 20)
    with pytest.raises(JailError, match="not an empty directory"):
        spawn(spec, [BUSYBOX], {}, 0, 1)
    (tmp_path / "empty").mkdir()
    spec = JailSpec("j3", lease.uid, lease.gid, tmp_path / "empty", [Bind("/nonexistent/x", "/x")], 1 << 20)
    with pytest.raises(JailError, match="/nonexistent/x: no such file"):
        spawn(spec, [BUSYBOX], {}, 0, 1)
    spec = JailSpec("j3", lease.uid, lease.gid, tmp_path / "empty", [Bind(BUSYBOX, "/bin/../../x")], 1 << 20)
    with pytest.raises(JailError, match="not a plain absolute path"):
        spawn(spec, [BUSYBOX], {}, 0, 1)
    spec = JailSpec("j3", lease.uid, lease.gid, tmp_path / "empty", [], 1 << 20)
    with pytest.raises(JailError, match=r"jail of j3: .*No such file"):  # not bound in: exec fails inside, reported
        spawn(spec, [BUSYBOX], {}, 0, 1)
    with pytest.raises(JailError, match="/bin/nothing-here: No such file"):
        spawn(spec, ["/bin/nothing-here"], {}, 0, 1)
    (tmp_path / "mine").write_bytes(Path(BUSYBOX).read_bytes())
    os.chmod(tmp_path / "mine", 0o777)
    with pytest.raises(JailError, match="writable by group or others"):  # anyone could swap the engine
        spawn(spec, [str(tmp_path / "mine")], {}, 0, 1)
    assert os.listdir(tmp_path / "empty") == []


def test_uid_leases_are_exclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMVISOR_UID_RANGE", "700000-700002")
    held = [UidLease.acquire("a", tmp_path), UidLease.acquire("b", tmp_path), UidLease.acquire("c", tmp_path)]
    assert sorted(h.uid for h in held) == [700000, 700001, 700002]
    with pytest.raises(JailError, match="no free uid in 700000-700002"):
        UidLease.acquire("d", tmp_path)
    held[1].release()
    again = UidLease.acquire("d", tmp_path)
    assert again.uid == held[1].uid
    # Another process sees the leases too (flock is per open file, across processes).
    code = ("import sys; from pathlib import Path; from slimvisor.jail import UidLease\n"
            f"print(UidLease.acquire('e', Path('{tmp_path}')).uid)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "SLIMVISOR_UID_RANGE": "700000-700002"})  # fmt: skip
    assert "no free uid" in proc.stderr
    for h in [*held, again]:
        h.release()


@pytest.mark.parametrize("text", ["5-3", "abc", "10-20", "1000-4294967295", "1000"])
def test_uid_range_is_validated(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("SLIMVISOR_UID_RANGE", text)
    with pytest.raises(JailError, match=f"SLIMVISOR_UID_RANGE={text!r}: expected FIRST-LAST"):
        uid_range()


def _sample(head: str) -> str:
    """A word that `linux.uml --help`'s entry `head` (like "con[0-9]*=<channel") describes."""
    prefix = head.split("<")[0].replace("[0-9]*", "1").replace("[0-9]+", "1")
    if "<" not in head:
        return prefix
    return prefix + ("x" if prefix.endswith(("=", ":")) else "0=x")


def test_every_host_option_in_uml_help_is_refused() -> None:
    """UML's own --help lists its host-side options; each must be caught (a new UML adding one
    fails here). Guest-side words (console=, root=, quiet) pass."""
    text = subprocess.run(["/usr/bin/linux.uml", "--help"], capture_output=True, text=True).stdout
    heads = {line.split()[0] for line in text.splitlines()[1:] if line[:1].isalpha() or line[:1] == "-"}
    samples = {_sample(h) for h in heads}
    guest_side = {"console=x", "root=x", "quiet", "debug"}  # UML's `debug` is a no-op; the kernel's sets loglevel
    assert guest_side <= samples and len(samples) > 20, samples  # the help was read
    for word in sorted(samples - guest_side):
        assert host_options(word) == [word], word
    assert host_options(" ".join(guest_side) + " sv.ip=10.0.0.2/24 virtio_net.napi_tx=0 panic=-1") == []
    assert host_options("quiet ubd1r=/etc/shadow --showconfig vec0:transport=tap") == [
        "ubd1r=/etc/shadow", "--showconfig", "vec0:transport=tap"]  # fmt: skip


# -- hostile guests -------------------------------------------------------------------------------

guest = pytest.mark.guest


def _ls_sections(listing: str) -> dict[str, set[str]]:
    """`ls -a DIR...` output as {DIR: names}, without . and .."""
    out: dict[str, set[str]] = {}
    current: set[str] = set()
    for word in listing.split():
        if word.endswith(":"):
            current = out[word[:-1]] = set()
        elif word not in (".", ".."):
            current.add(word)
    return out


def _disk_copy(busybox: tuple[Path, Path], tmp_path: Path, name: str) -> Path:
    """A root disk of its own for a second domain beside the one under test."""
    disk = tmp_path / f"{name}.ext4"
    disk.write_bytes(busybox[1].read_bytes())
    return disk


def _neighbour(busybox: tuple[Path, Path], tmp_path: Path, name: str) -> Console:
    """A second busybox domain beside the one under attack: it must keep working."""
    return Console("--disk", str(_disk_copy(busybox, tmp_path, name)), "--memory", "64M", name=name)


def _engine_pids(con: Console) -> list[int]:
    uml = psutil.Process(con.uml_pid())
    return [uml.pid, *(c.pid for c in uml.children(recursive=True))]


@guest
def test_guest_root_sees_only_its_jail(rootfs: Path, busybox: tuple[Path, Path], domname: str,
                                      tmp_path: Path) -> None:  # fmt: skip
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST-SECRET-7f3a\n")
    victim = _neighbour(busybox, tmp_path, domname + "v")
    con = Console("--disk", str(rootfs), "--memory", "96M", name=domname)
    try:
        victim.expect(UP)
        con.expect(UP)
        con.run("mkdir -p /mnt/h /mnt/r /mnt/e /mnt/u")
        listing = con.run("mount -t hostfs none /mnt/h -o / && ls -a /mnt/h /mnt/h/sock /mnt/h/tmp /mnt/h/dev")
        seen = _ls_sections(listing)
        libs_tops = {p.split("/")[1] for p in ["/usr/bin/linux.uml", *shared_libraries("/usr/bin/linux.uml")]}
        assert seen["/mnt/h"] == {"boot", "dev", "sock", "tmp"} | libs_tops, listing
        assert seen["/mnt/h/sock"] == {"0-vda.sock", "notify"}  # its own sockets, nobody else's
        assert seen["/mnt/h/tmp"] == {domname}  # its uml_dir; its memory file is unlinked
        assert seen["/mnt/h/dev"] == {"null", "zero", "random", "urandom"}
        assert domname + "v" not in listing  # the victim's memory file and sockets are not in view
        for attempt in (f"cat /mnt/h{secret}", "mount -t hostfs none /mnt/r -o /root && ls -a /mnt/r",
                        "mount -t hostfs none /mnt/e -o /etc && ls -a /mnt/e && cat /mnt/e/shadow",
                        f"mount -t hostfs none /mnt/u -o /../../../..{tmp_path} && ls /mnt/u",
                        "ls /mnt/h/../../../..", "echo pwned > /mnt/h/WRITTEN_BY_GUEST",
                        "echo pwned > /mnt/h/sock/WRITTEN_BY_GUEST", "cat /mnt/h/proc/1/environ"):  # fmt: skip
            out = con.run(attempt + "; echo rc=$?")
            assert "HOST-SECRET-7f3a" not in out and not re.search(r"(?m)^root:[^:\s]*:\d+:", out), (attempt, out)
            assert "host-secret" in attempt or "host-secret" not in out, (attempt, out)  # not even listed
        for host_path in ("/WRITTEN_BY_GUEST", "/root/WRITTEN_BY_GUEST", "/tmp/WRITTEN_BY_GUEST"):
            assert not os.path.exists(host_path), host_path
        assert con.run("hostname").strip() == "slimvisor"  # the guest's own; the jail's is the domain name
        assert victim.run("echo victim-$((6 * 7))").strip() == "victim-42"
        # From the host: the two engines run as two different unprivileged uids, seccomp'd.
        uids = {psutil.Process(c.uml_pid()).uids().real for c in (con, victim)}
        assert len(uids) == 2 and all(u >= uid_range()[0] for u in uids)
        for pid in _engine_pids(con):
            st = _status(pid)
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0, pid
        con.send("poweroff")
        assert con.wait() == 0
        victim.send("poweroff")
        assert victim.wait() == 0
    finally:
        con.kill()
        victim.kill()
    assert leftovers(domname) == [] and leftovers(domname + "v") == []


@guest
def test_fork_bomb_is_bounded(rootfs: Path, busybox: tuple[Path, Path], domname: str, tmp_path: Path) -> None:
    """Each guest process is a host process (UML's SKAS0): a guest that forks without end is
    stopped by its own task bound; the other domain and the host keep working."""
    other = _neighbour(busybox, tmp_path, domname + "o")
    con = Console("--disk", str(rootfs), "--memory", "256M", name=domname)
    try:
        other.expect(UP)
        con.expect(UP)
        uid = psutil.Process(con.uml_pid()).uids().real
        con.send("bomb() { bomb | bomb & }; bomb")

        def tasks() -> int:
            count = 0
            for p in psutil.process_iter():
                with contextlib.suppress(psutil.Error):  # a task of the bomb may be gone already
                    count += p.num_threads() if process_uid(p) == uid else 0
            return count

        deadline, most = time.monotonic() + 90, 0
        while time.monotonic() < deadline and most < MAX_TASKS * 0.9:
            most = max(most, tasks())
            time.sleep(0.2)
        assert most <= MAX_TASKS
        assert most >= MAX_TASKS * 0.9, f"the bomb reached only {most} host tasks"
        assert other.run("echo other-$((20 + 22))", timeout=120).strip() == "other-42"
        assert subprocess.run(["true"]).returncode == 0  # the host still forks
        other.send("poweroff")
        assert other.wait(60) == 0
    finally:
        con.kill()
        other.kill()
    assert leftovers(domname) == [] and leftovers(domname + "o") == []



@guest
def test_host_options_in_the_command_line_are_refused(rootfs: Path, domname: str, tmp_path: Path) -> None:
    for words in ("quiet ubd1=/etc/shadow", "hostfs=/", "eth0=tuntap,tap0", "mconsole=notify:/tmp/x", "umid=x",
                  "virtio_uml.device=/run/x.sock:2", "con1=port:9000", "mem=4G", "initrd=/etc/shadow"):  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "slimvisor", "run", "--name", domname, "--disk", str(rootfs),
                               "--cmdline", words], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 1, (words, proc.stderr)
        assert "is a User-Mode Linux host option" in proc.stderr and repr(words.split()[-1]) in proc.stderr
        assert leftovers(domname) == []


@guest
def test_killed_runner_takes_the_whole_domain(rootfs: Path, domname: str) -> None:
    con = Console("--disk", str(rootfs), name=domname)
    try:
        con.expect(UP)
        pids = _engine_pids(con)
        uid = psutil.Process(pids[0]).uids().real
        os.kill(con.proc.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
        assert alive == []
        assert [p.pid for p in psutil.process_iter() if process_uid(p) == uid] == []
    finally:
        con.kill()


@guest
def test_supervisor_sigkill_takes_the_whole_domain(toolstack: Toolstack, rootfs: Path, domname: str,
                                                   tmp_path: Path) -> None:  # fmt: skip
    toolstack.sv("create", str(toolstack.config(tmp_path / "d.cfg", domname, rootfs)))
    row = toolstack.domains()[domname]
    assert row["uid"] >= uid_range()[0] and row["jail"].endswith("/jail")
    info = toolstack.json("info", domname)
    assert info["uid"] == row["uid"] and info["limits"].get("pids.max") == MAX_TASKS
    engine = [p for p in psutil.process_iter() if process_uid(p) == row["uid"]]
    assert engine, "no process runs as the domain's uid"
    assert _status(info["supervisor"])["Seccomp"] == "2"  # dom0's own process confined itself too
    os.kill(info["supervisor"], signal.SIGKILL)
    _, alive = psutil.wait_procs(engine, timeout=30)
    assert alive == [], f"survived their supervisor: {alive}"
    assert [p.pid for p in psutil.process_iter() if process_uid(p) == row["uid"]] == []


@guest
def test_seccomp_violation_crashes_only_that_domain(toolstack: Toolstack, rootfs: Path, busybox: tuple[Path, Path],
                                                   domname: str, tmp_path: Path) -> None:  # fmt: skip
    """hostfs symlink() is a host system call UML's allowlist leaves out: the guest that makes
    UML call it dies of SIGSYS, its on_crash applies, and its neighbour keeps running."""
    other_disk = _disk_copy(busybox, tmp_path, domname + "o")
    toolstack.sv("create", str(toolstack.config(tmp_path / "o.cfg", domname + "o", other_disk)))
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs, 'on_crash = "preserve"')
    toolstack.sv("create", str(cfg))
    con = toolstack.console(domname)
    try:
        con.expect(UP, timeout=240)
        con.run("mkdir -p /mnt/t && mount -t hostfs none /mnt/t -o /tmp")
        con.send("ln -s target /mnt/t/link")
        toolstack.wait_state(domname, ("crashed",), timeout=60)
        con.expect(r"killed by SIGSYS.*on_crash=preserve", timeout=30)
    finally:
        con.kill()
    other = toolstack.console(domname + "o")
    try:
        other.expect(UP, timeout=240)
        assert other.run("echo alive-$((1 + 1))").strip() == "alive-2"
    finally:
        other.kill()
    assert toolstack.domains()[domname + "o"]["state"] in ("running", "blocked")
