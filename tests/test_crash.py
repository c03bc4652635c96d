"""SIGKILL anywhere: no duplicate, no regression, no stuck lock."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from shmnonce import ShmNonce
from shmnonce.shm.segment import Q_TAIL, QUEUE

from . import _workers
from ._workers import held_by_thread

pytestmark = pytest.mark.timeout(180)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hold_and_report(name: str, state_dir: str, ready: str, eng: ShmNonce | None) -> None:
    e = ShmNonce.attach(name, state_dir) if eng is None else eng
    with e.serialized() as nonce:
        with open(ready + ".tmp", "w") as fh:
            fh.write(str(nonce))
        os.rename(ready + ".tmp", ready)
        time.sleep(60)


def test_sigkill_inside_serialized_releases_the_section(state_dir: str, tmp_path: object) -> None:
    tmp = str(tmp_path)
    eng = ShmNonce.attach("k", state_dir)
    seen: list[int] = []
    kinds = ["fork", "spawn", "unrelated"]
    for i in range(24):
        ready = os.path.join(tmp, f"ready{i}")
        kind = kinds[i % 3]
        if kind == "unrelated":
            env = dict(os.environ, PYTHONPATH=ROOT)
            proc = subprocess.Popen([sys.executable, "-m", "tests._workers", "hold", "k",
                                     state_dir, ready, "60"], cwd=ROOT, env=env)
            pid = proc.pid
        else:
            p = mp.get_context(kind).Process(
                target=_hold_and_report, args=("k", state_dir, ready, eng if kind == "fork" else None))
            p.start()
            pid = p.pid  # type: ignore[assignment]
        _workers.wait_for_file(ready)
        with open(ready) as fh:
            text = fh.read()
        if kind != "unrelated":
            seen.append(int(text))
        # the section is held: a waiter must time out now
        with pytest.raises(TimeoutError), eng.serialized(timeout=0.05):
            pass
        os.kill(pid, signal.SIGKILL)
        if kind == "unrelated":
            proc.wait()
        else:
            p.join()
        t0 = time.monotonic()
        with eng.serialized(timeout=5) as nonce:
            assert time.monotonic() - t0 < 1.0
            assert not seen or nonce > max(seen)
            seen.append(nonce)
    assert seen == sorted(set(seen))
    eng.unlink()


def test_sigkill_during_next_never_duplicates(state_dir: str, tmp_path: object) -> None:
    """Kill busy issuers at random moments, 18 times.

    A kill rarely lands inside the 56-byte record write itself; torn records are
    covered by the simulations in test_durability.py. This checks the end-to-end
    property: whatever the kill interrupted, no value repeats and none goes back.
    """
    tmp = str(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    outs: list[str] = []
    rng = random.Random(7)
    for rnd in range(6):
        procs = []
        for i in range(3):
            out = os.path.join(tmp, f"r{rnd}p{i}.txt")
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests._workers", "forever", "kk", state_dir, out],
                cwd=ROOT, env=env))
        for out in outs[-3:]:
            deadline = time.monotonic() + 30
            while not (os.path.exists(out) and os.path.getsize(out) > 0):
                assert time.monotonic() < deadline
                time.sleep(0.005)
        time.sleep(0.2 + rng.random() * 0.3)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
    merged: list[int] = []
    for out in outs:
        with open(out) as fh:
            lines = fh.read().split("\n")
        assert lines[0] == "ready"
        # the last line may be cut by the kill; every complete one counts
        vals = [int(x) for x in lines[1:-1]]
        assert all(a < b for a, b in itertools.pairwise(vals)), out
        merged.extend(vals)
    assert len(merged) > 1000
    assert len(set(merged)) == len(merged), "duplicate nonce after SIGKILL"
    with ShmNonce.attach("kk", state_dir) as eng:
        assert eng.next() > max(merged)
        # killed writers never leave the counter lock held
        t0 = time.monotonic()
        for _ in range(100):
            eng.next()
        assert time.monotonic() - t0 < 1.0
        eng.unlink()


def _parent_forks_while_holding(name: str, state_dir: str, ready: str) -> None:
    eng = ShmNonce.attach(name, state_dir)
    eng.next()
    with eng.serialized():
        child = os.fork()
        if child == 0:  # the grandchild outlives its parent, holding inherited descriptors
            time.sleep(60)
            os._exit(0)
        with open(ready + ".tmp", "w") as fh:
            fh.write(str(child))
        os.rename(ready + ".tmp", ready)
        time.sleep(60)


def test_forked_child_does_not_keep_a_dead_parents_lock(state_dir: str, tmp_path: object) -> None:
    """A child inheriting a locked descriptor must not keep the lock after the parent dies."""
    ready = os.path.join(str(tmp_path), "ready")
    p = mp.get_context("fork").Process(target=_parent_forks_while_holding, args=("fk", state_dir, ready))
    p.start()
    _workers.wait_for_file(ready)
    with open(ready) as fh:
        grandchild = int(fh.read())
    try:
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join()
        os.kill(grandchild, 0)  # still alive
        with ShmNonce.attach("fk", state_dir) as eng:
            with eng.serialized(timeout=3):
                pass
            t0 = time.monotonic()
            eng.next()
            assert time.monotonic() - t0 < 1.0
            eng.unlink()
    finally:
        os.kill(grandchild, signal.SIGKILL)
        # reap is done by init (it was the killed parent's child)


def test_fork_inherited_handle_in_child_and_parent_stay_unique(state_dir: str) -> None:
    eng = ShmNonce.attach("fi", state_dir)
    first = eng.next()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            vals = [eng.next() for _ in range(2000)]
            with eng.serialized(timeout=10) as n:
                vals.append(n)
            os.write(w, ("\n".join(map(str, vals))).encode())
        finally:
            os._exit(0)
    os.close(w)
    mine = [eng.next() for _ in range(2000)]
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    theirs = [int(x) for x in data.decode().split("\n")]
    assert len(theirs) == 2001 and min(theirs) > first
    assert len(set(mine) | set(theirs)) == 4001
    eng.unlink()


def _wait_in_queue(name: str, state_dir: str, marker: str) -> None:
    eng = ShmNonce.attach(name, state_dir)
    with open(marker, "w"):
        pass
    with eng.serialized():  # blocks behind the holder until killed
        time.sleep(60)


def test_killed_waiters_do_not_block_the_queue(state_dir: str, tmp_path: object) -> None:
    """Tickets of waiters SIGKILLed while queued are skipped; FIFO order resumes."""
    eng = ShmNonce.attach("kw", state_dir)
    waiters = []
    with held_by_thread(eng):
        for i in range(3):
            marker = os.path.join(str(tmp_path), f"w{i}")
            p = mp.get_context("fork").Process(target=_wait_in_queue, args=("kw", state_dir, marker))
            p.start()
            _workers.wait_for_file(marker)
            waiters.append(p)
        deadline = time.monotonic() + 10
        while eng.stats()["section_entries"] < 1 or _queued(eng) < 4:
            assert time.monotonic() < deadline, "waiters never queued"
            time.sleep(0.01)
        for p in waiters:
            os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
            p.join()
    t0 = time.monotonic()
    with eng.serialized(timeout=5):
        assert time.monotonic() - t0 < 1.0
    eng.unlink()


def _queued(eng: ShmNonce) -> int:
    """Tickets taken so far (holder and waiters), from the queue header."""
    raw = QUEUE.struct.unpack_from(eng._buf, QUEUE.offset)
    return int(raw[1 + Q_TAIL])
