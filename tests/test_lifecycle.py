"""Handles under fork races, deleted files, torn queue headers, timeouts and close()."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from shmnonce import LockTimeout, NonceError, ShmNonce
from shmnonce.shm.segment import QUEUE

from ._workers import held_by_thread

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fork_while_other_threads_attach_and_close(state_dir: str) -> None:
    """The fork hooks must not trip over engines added or removed during fork()."""
    # Python >= 3.12 warns in the parent of a fork() while other threads run (this script
    # does that on purpose); only that warning is filtered, any other stderr output fails.
    code = f"""
import os, sys, threading, warnings
warnings.filterwarnings(
    "ignore", category=DeprecationWarning,
    message=r"This process \\(pid=[0-9]+\\) is multi-threaded, use of fork\\(\\) may lead to deadlocks",
)
from shmnonce import ShmNonce
sd = {state_dir!r}
main = ShmNonce.attach("main", sd)
stop = threading.Event()
def churn():
    i = 0
    while not stop.is_set():
        e = ShmNonce.attach(f"c{{i % 3}}", sd)
        e.next()
        e.close()
        i += 1
threads = [threading.Thread(target=churn) for _ in range(2)]
for t in threads:
    t.start()
for _ in range(100):
    pid = os.fork()
    if pid == 0:
        main.next()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
stop.set()
for t in threads:
    t.join()
main.next()
main.close()
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=100, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert res.stderr == "", res.stderr  # no "Exception ignored in" from a fork hook


def test_deleted_lock_files_do_not_split_the_lock(state_dir: str) -> None:
    """Children forked after the files were deleted still lock the same inodes."""
    eng = ShmNonce.attach("del", state_dir)
    eng.next()
    os.unlink(os.path.join(eng.state_dir, "del.lock"))
    os.unlink(os.path.join(eng.state_dir, "del.queue"))
    r, w = os.pipe()
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            vals = [eng.next() for _ in range(5000)]
            os.write(w, ("\n".join(map(str, vals)) + "\n").encode())
            os._exit(0)
        pids.append(pid)
    os.close(w)
    mine = [eng.next() for _ in range(5000)]
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    theirs = [int(x) for x in data.split()]
    assert len(theirs) == 15_000
    assert len(set(theirs) | set(mine)) == 20_000, "duplicates: the lock was split"
    eng.unlink()  # the conftest cleanup finds segments through NAME.lock, deleted here


def test_new_thread_after_queue_file_deleted_is_still_excluded(eng: ShmNonce) -> None:
    result: list[str] = []

    def newcomer() -> None:  # a thread that never used the queue before
        try:
            with eng.serialized(timeout=0.3):
                result.append("entered while held")
        except LockTimeout:
            result.append("timeout")

    with held_by_thread(eng):
        os.unlink(os.path.join(eng.state_dir, "t.queue"))
        n = threading.Thread(target=newcomer)
        n.start()
        n.join()
    assert result == ["timeout"]

def test_torn_queue_header_is_rebuilt_and_exclusion_holds(eng: ShmNonce) -> None:
    for _ in range(300):  # tickets past 0xFF, so a torn little-endian write can lower tail
        with eng.serialized():
            pass
    with held_by_thread(eng):
        raw = list(QUEUE.struct.unpack_from(eng._buf, QUEUE.offset))
        raw[0] += 1  # first generation word written, the rest not yet
        raw[1] = raw[1] & ~0xFF00  # tail half-written: lower than the truth
        QUEUE.struct.pack_into(eng._buf, QUEUE.offset, *raw)
        with pytest.raises(LockTimeout):
            with eng.serialized(timeout=0.3):
                pass
    with eng.serialized(timeout=2):
        pass
    assert eng.stats()["torn_recoveries"] == 1

def test_repeated_timeouts_against_one_holder_use_one_helper(eng: ShmNonce) -> None:
    with held_by_thread(eng):
        threads_before = threading.active_count()
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(200):
            with pytest.raises(LockTimeout):
                with eng.serialized(timeout=0.001):
                    pass
        assert threading.active_count() <= threads_before + 1
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    with eng.serialized(timeout=2):
        pass

def test_close_refuses_while_a_thread_is_inside(eng: ShmNonce) -> None:
    other = ShmNonce.attach("t", eng.state_dir)
    with held_by_thread(eng):
        with pytest.raises(NonceError, match="close"):
            eng.close()
        with pytest.raises(NonceError, match="close"):
            eng.unlink()
        with pytest.raises(LockTimeout):  # the section is still held
            with other.serialized(timeout=0.2):
                pass
    other.close()
    eng.close()
    with pytest.raises(NonceError, match="closed"):
        eng.next()

def test_logging_happens_after_the_lock_is_released(eng: ShmNonce) -> None:
    """A slow log handler must not hold up next() in other processes."""
    lock_path = os.path.join(eng.state_dir, "t.lock")
    seen: list[bool] = []

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fd = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free, or this raises
                fcntl.flock(fd, fcntl.LOCK_UN)
                seen.append(True)
            except BlockingIOError:
                seen.append(False)
            finally:
                os.close(fd)

    logger = logging.getLogger("shmnonce")
    probe = Probe(logging.WARNING)
    logger.addHandler(probe)
    try:
        base = time.time_ns()
        clock = [base]
        eng._clock = lambda: clock[0]  # type: ignore[method-assign]
        eng.next()
        clock[0] = base - 10_000_000  # a regression: logged
        eng.next()
        clock[0] = base - 20_000_000
        eng.jump_forward(0)
    finally:
        logger.removeHandler(probe)
    assert seen == [True, True]



def test_fork_child_whose_reopen_fails_raises_instead_of_sharing(eng: ShmNonce) -> None:
    """If the child cannot get its own descriptors it must not use the parent's lock."""
    from shmnonce import StateError
    from shmnonce.shm import linux as _posix

    eng.next()
    real = _posix.reopen
    _posix.reopen = lambda fd, path: (_ for _ in ()).throw(OSError(24, "EMFILE"))  # type: ignore[assignment]
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                try:
                    eng.next()
                    os.write(w, b"issued with the parent's descriptor")
                except StateError:
                    os.write(w, b"StateError")
            finally:
                os._exit(0)
    finally:
        _posix.reopen = real
    os.close(w)
    out = os.read(r, 100)
    os.close(r)
    os.waitpid(pid, 0)
    assert out == b"StateError"
    assert eng.next() > 0  # the parent is unaffected


def test_fork_during_attach_in_another_thread(state_dir: str, tmp_path: object) -> None:
    """A child forked while another thread attaches must not keep the parent's flock."""
    ready = os.path.join(str(tmp_path), "ready")
    code = f"""
import os, signal, threading, time
import shmnonce.shm.engine as E
from shmnonce import ShmNonce
real = E.read_ceiling
def slow(path):
    time.sleep(0.5)  # a slow disk while attaching
    return real(path)
E.read_ceiling = slow
box = []
t = threading.Thread(target=lambda: box.append(ShmNonce.attach("fa", {state_dir!r})))
t.start()
time.sleep(0.2)
if os.fork() == 0:
    time.sleep(8)
    os._exit(0)
t.join()
eng = box[0]
with eng._short_lock():  # die while holding the counter lock
    open({ready!r}, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == -9
    assert os.path.exists(ready)
    t0 = time.monotonic()
    with ShmNonce.attach("fa", state_dir) as eng:
        eng.next()
        took = time.monotonic() - t0
        eng.unlink()
    assert took < 1.0, f"attach+next() waited {took:.1f} s for a lock a forked child kept"


def test_concurrent_unlink_between_open_and_lock_is_retried(
    state_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment must not be bound to a lock file that was removed while attaching."""
    from shmnonce.shm import engine as _engine

    ShmNonce.attach("ul", state_dir).unlink()  # make the state dir
    real = _engine.ShmNonce._open_lock
    calls = []

    def racing(path: str) -> int:
        fd = real(path)
        if path.endswith(".queue") and not calls:
            calls.append(path)
            os.unlink(path[: -len(".queue")] + ".lock")  # 'shmnonce unlink' got in between
        return fd

    monkeypatch.setattr(_engine.ShmNonce, "_open_lock", staticmethod(racing))
    a = ShmNonce.attach("ul", state_dir)
    monkeypatch.setattr(_engine.ShmNonce, "_open_lock", staticmethod(real))
    a.next()
    with ShmNonce.attach("ul", state_dir) as b:  # not refused: same files as a
        assert b.next() > 0
    assert calls
    a.unlink()


def test_handles_dropped_without_close_release_descriptors(state_dir: str) -> None:
    import gc

    ShmNonce.attach("dr", state_dir).next()
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        ShmNonce.attach("dr", state_dir).next()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    with ShmNonce.attach("dr", state_dir) as e:
        seg = e.segment_name
    os.unlink(f"/dev/shm/{seg}")  # nobody is attached any more: a new segment may start
    ShmNonce.attach("dr", state_dir).unlink()
