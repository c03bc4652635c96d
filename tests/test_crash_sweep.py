"""Kill a creating, dropping or unlinking process at every system call it makes.

The sequence is first moved an hour ahead of the clock, so that only the persisted
state knows how far it got: a value from the clock alone would be below it. For
each system call name the operation makes (found with ``strace -c``), the child is
killed by strace at its 1st, 2nd, ... call of that name (``-e inject=NAME:signal=
KILL:when=N``) until it completes; after every kill a fresh attach must work and
its ``next()`` must be above every value issued before. The children come from a
fork server (tests/_sweep_server.py) and stop themselves before the operation, so
the sweep covers the operation's system calls, not the interpreter's start-up.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from shmnonce import ShmNonce
from shmnonce._paths import segment_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUR = 3600 * 10**9
pytestmark = pytest.mark.timeout(300)
SKIP = {"exit_group"}  # killing a process that is exiting changes nothing


class Server:
    """The fork server plus strace around each child."""

    def __init__(self, tmp: str) -> None:
        assert shutil.which("strace"), ".ci/run installs strace"
        self.tmp = tmp
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._sweep_server"], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.runs = 0

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def _start(self, op: str, name: str, state_dir: str, out: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{op} {name} {state_dir} {out}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def _status(self) -> int:
        assert self.proc.stdout is not None
        return int(self.proc.stdout.readline())

    def run(self, op: str, name: str, state_dir: str, out: str, strace_args: list[str]) -> int:
        """Run ``op`` in a child traced by strace with ``strace_args``; its exit code."""
        self.runs += 1
        pid = self._start(op, name, state_dir, out)
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-p", str(pid), *strace_args],
                                  stderr=subprocess.DEVNULL)
        _wait_traced(pid, tracer)
        os.kill(pid, signal.SIGCONT)
        code = self._status()
        tracer.wait(timeout=30)
        return code

    def run_killed_after(self, op: str, name: str, state_dir: str, out: str, delay: float) -> int:
        """Run ``op`` untraced; SIGKILL it ``delay`` seconds after it starts unless it ended."""
        assert self.proc.stdout is not None
        self.runs += 1
        pid = self._start(op, name, state_dir, out)
        os.kill(pid, signal.SIGCONT)
        ended, _, _ = select.select([self.proc.stdout], [], [], delay)
        if not ended:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGKILL)
        return self._status()

    def syscalls(self, op: str, name: str, state_dir: str, out: str) -> dict[str, int]:
        """System call names and counts of one uninterrupted run of ``op``."""
        summary = os.path.join(self.tmp, f"summary-{self.runs}")
        code = self.run(op, name, state_dir, out, ["-c", "-o", summary])
        assert code == 0, _err(out)
        counts: dict[str, int] = {}
        with open(summary) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                    counts[parts[-1]] = int(parts[3])
        return counts


def _wait_traced(pid: int, tracer: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("TracerPid:") and int(line.split()[1]) != 0:
                    return
        assert tracer.poll() is None, "strace exited before attaching"
        time.sleep(0.001)
    raise AssertionError("strace did not attach")


def _err(out: str) -> str:
    try:
        with open(out + ".err") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def _issued(out: str) -> list[int]:
    try:
        with open(out) as fh:
            return [int(x) for x in fh.read().split()]
    except FileNotFoundError:
        return []


@pytest.fixture
def server(tmp_path: object) -> Iterator[Server]:
    srv = Server(str(tmp_path))
    yield srv
    srv.close()


def _sweep(
    server: Server, op: str, name: str, state_dir: str, out: str,
    before: Callable[[], None], after: Callable[[int, str, int], None],
) -> dict[str, int]:
    """Kill ``op`` at every call of every system call name it makes.

    ``before()`` prepares each run; ``after(exit_code, syscall, n)`` checks the state
    it left. Returns the number of kill points per system call name.
    """
    before()
    counts = server.syscalls(op, name, state_dir, out)
    after(0, "", 0)
    assert counts, "strace saw no system calls"
    swept: dict[str, int] = {}
    for syscall in sorted(set(counts) - SKIP):
        n = 0
        while True:
            n += 1
            assert n <= counts[syscall] + 20, f"{op} still killed at {syscall} #{n}"
            before()
            code = server.run(op, name, state_dir, out, [
                "-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=KILL:when={n}",
                "-o", "/dev/null"])
            assert code in (0, -signal.SIGKILL), (op, syscall, n, code, _err(out))
            after(code, syscall, n)
            if code == 0:
                break
        swept[syscall] = n - 1
    return swept


def _ahead(state_dir: str, name: str) -> int:
    """Attach, move the sequence an hour ahead of the clock if it is not, return the last value."""
    with ShmNonce.attach(name, state_dir) as eng:
        last = eng.peek()
        if last < time.time_ns() + HOUR // 2:
            last = eng.jump_forward(HOUR)
    return last


def _reboot(state_dir: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{segment_name(name, os.path.realpath(state_dir))}")


class Issued:
    """The highest value issued so far, and the check that a fresh attach goes above it."""

    def __init__(self) -> None:
        self.max = 0

    def add(self, values: list[int]) -> None:
        self.max = max([self.max, *values])

    def check(self, state_dir: str, name: str, where: str) -> int:
        try:
            with ShmNonce.attach(name, state_dir) as eng:
                v = eng.next()
        except Exception as exc:
            raise AssertionError(f"after a kill at {where}: attach/next() failed: {exc!r}") from exc
        assert v > self.max, f"after a kill at {where}: {v} is not above {self.max}"
        self.max = v
        return v


def test_attach_creating_killed_at_every_system_call(server: Server, state_dir: str) -> None:
    name = "cs"
    out = os.path.join(server.tmp, "issued")
    issued = Issued()
    issued.add([_ahead(state_dir, name)])

    def before() -> None:
        _reboot(state_dir, name)  # every run creates the segment

    def after(code: int, syscall: str, n: int) -> None:
        issued.add(_issued(out))
        issued.check(state_dir, name, f"{syscall} #{n}")

    swept = _sweep(server, "attach", name, state_dir, out, before, after)
    # the creation path: the segment is built, linked into place, the ceiling extended
    assert {"openat", "flock", "ftruncate", "mmap", "linkat", "unlink", "fsync", "rename"} <= set(swept)
    assert sum(swept.values()) >= 30
    print(f"attach: {sum(swept.values())} kill points over {len(swept)} system calls: {swept}")


def test_drop_segment_killed_at_every_system_call(server: Server, state_dir: str) -> None:
    name = "cd"
    out = os.path.join(server.tmp, "issued")
    issued = Issued()
    issued.add([_ahead(state_dir, name)])

    def before() -> None:
        _ahead(state_dir, name)  # a live segment, ahead of the clock

    def after(code: int, syscall: str, n: int) -> None:
        issued.check(state_dir, name, f"{syscall} #{n}")

    swept = _sweep(server, "drop", name, state_dir, out, before, after)
    assert {"openat", "flock", "unlink"} <= set(swept)
    print(f"drop-segment: {sum(swept.values())} kill points over {len(swept)} system calls: {swept}")


@pytest.mark.parametrize("op", ["destroy", "unlink"])
def test_unlink_killed_at_every_system_call(server: Server, state_dir: str, op: str) -> None:
    """An interrupted unlink either kept the ceiling (values go on above it) or had
    already removed the segment with it (the sequence starts again, as unlink means);
    in both cases the next attach works."""
    name = "cu"
    out = os.path.join(server.tmp, "issued")
    sd = os.path.realpath(state_dir)
    issued = Issued()
    issued.add([_ahead(state_dir, name)])

    def before() -> None:
        issued.add([_ahead(state_dir, name)])

    def after(code: int, syscall: str, n: int) -> None:
        kept = os.path.exists(os.path.join(sd, f"{name}.ceiling"))
        if not kept:
            assert not os.path.exists(f"/dev/shm/{segment_name(name, sd)}"), (syscall, n)
            issued.max = 0  # destroyed: a new sequence starts from the clock
        issued.check(state_dir, name, f"{syscall} #{n}")

    swept = _sweep(server, op, name, state_dir, out, before, after)
    assert {"unlink"} <= set(swept)
    print(f"{op}: {sum(swept.values())} kill points over {len(swept)} system calls: {swept}")


def test_creating_process_killed_at_random_moments(server: Server, state_dir: str) -> None:
    """300 creators SIGKILLed after a random delay within the time a creation takes.

    The delay is drawn from [0, median run time], the median taken over the runs that
    completed so far (the machine's load changes it); runs go on until 300 were killed.
    """
    name = "cr"
    out = os.path.join(server.tmp, "issued")
    issued = Issued()
    issued.add([_ahead(state_dir, name)])
    durations: list[float] = []
    rng = random.Random(8)
    killed = runs = 0
    deadline = time.monotonic() + 150
    while killed < 300:
        assert runs < 3000 and time.monotonic() < deadline, f"only {killed} kills in {runs} runs"
        _reboot(state_dir, name)
        span = sorted(durations)[len(durations) // 2] if len(durations) >= 5 else 10.0
        t0 = time.perf_counter()
        code = server.run_killed_after("attach", name, state_dir, out, rng.uniform(0, span))
        runs += 1
        assert code in (0, -signal.SIGKILL), (code, _err(out))
        if code == 0:
            durations = [*durations[-20:], time.perf_counter() - t0]
        killed += code != 0
        issued.add(_issued(out))
        issued.check(state_dir, name, f"random kill, run {runs}")
    print(f"random kills: {killed} of {runs} creators killed")
