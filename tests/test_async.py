"""aserialized(): the section for asyncio tasks, across tasks, threads and processes,
without blocking the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from shmnonce import LockTimeout, NonceError, ShmNonce
from shmnonce.shm import linux as backend
from shmnonce.shm.segment import QUEUE, SLOTS, SLOTS_OFFSET

from . import _workers
from ._section_workers import observed
from ._workers import held_by_thread

pytestmark = pytest.mark.timeout(180)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKING = os.environ.get("SHMNONCE_TEST_BLOCKING_ASYNC") == "1"
"""Demonstration switch: the loop-lag test uses a blocking implementation (an asyncio.Lock
in front of the synchronous serialized(), what a user would write) and must then fail."""

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the [test] extra
    uvloop = None

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    uvloop is None, reason="uvloop is not installed"))]


def _run(coro: Callable[[], Awaitable[Any]], loop_kind: str = "asyncio") -> Any:
    if loop_kind == "uvloop":
        assert uvloop is not None
        return uvloop.run(coro())
    return asyncio.run(coro())


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "tests._section_workers", *args], cwd=ROOT,
                            env=env)


def _tail(eng: ShmNonce) -> int:
    return int(QUEUE.struct.unpack_from(eng._buf, QUEUE.offset)[1])


def _live_tickets(eng: ShmNonce) -> list[int]:
    """Tickets between head and tail whose slot is not DONE or whose byte is locked."""
    raw = QUEUE.struct.unpack_from(eng._buf, QUEUE.offset)
    fd = backend.reopen(eng._queue._base, eng._queue._path)  # sees this process's locks too
    try:
        live = []
        for t in range(raw[2], raw[1]):
            phase = int.from_bytes(eng._buf[SLOTS_OFFSET + (t % SLOTS) * 16 + 8:
                                            SLOTS_OFFSET + (t % SLOTS) * 16 + 16], "little")
            if phase != 0 or backend.ofd_test(fd, t % SLOTS) != backend.F_UNLCK:
                live.append(t)
        return live
    finally:
        os.close(fd)


def _entries(log: str) -> list[list[str]]:
    with open(log) as fh:
        return [line.split() for line in fh.read().splitlines()]


@contextlib.contextmanager
def _held_by_process(name: str, state_dir: str, tmp: str, seconds: float) -> Iterator[str]:
    """Another (unrelated) process holds the section for ``seconds``; yields its ready file."""
    ready = os.path.join(tmp, f"ready-{time.monotonic_ns()}")
    proc = subprocess.Popen([sys.executable, "-m", "tests._workers", "hold", name, state_dir,
                             ready, str(seconds)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        _workers.wait_for_file(ready)
        yield ready
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tasks_of_one_loop_exclude_each_other_in_arrival_order(
    eng: ShmNonce, tmp_path: object, loop_kind: str
) -> None:
    """60 tasks of one thread: no overlap, entry order = arrival order, nonces increase."""
    log, marker = os.path.join(str(tmp_path), "log"), os.path.join(str(tmp_path), "marker")
    open(log, "w").close()
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND)

    async def entrant(i: int) -> None:
        async with eng.aserialized(timeout=30) as nonce:
            with observed(marker, logfd, b"%d %d\n" % (i, nonce)):
                await asyncio.sleep(0.0005)

    async def main() -> None:
        with held_by_thread(eng):  # everyone queues first
            tasks = []
            for i in range(60):
                tasks.append(asyncio.create_task(entrant(i)))
                await asyncio.sleep(0)  # the task takes its ticket
        await asyncio.gather(*tasks)

    _run(main, loop_kind)
    entries = _entries(log)
    assert not [e for e in entries if e[0] == "OVERLAP"]
    assert [int(e[0]) for e in entries] == list(range(60))
    nonces = [int(e[1]) for e in entries]
    assert nonces == sorted(set(nonces))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_processes_tasks_and_threads_never_overlap(
    state_dir: str, tmp_path: object, loop_kind: str
) -> None:
    """Three unrelated processes with 50 tasks and 2 threads each, plus this process's
    tasks (under ``loop_kind``): the O_EXCL marker sees no overlap, every entry is
    logged, and nonces increase in entry order (the log is written inside)."""
    tmp = str(tmp_path)
    log, marker, go = (os.path.join(tmp, f) for f in ("log", "marker", "go"))
    open(log, "w").close()
    rounds, ntasks, nthreads = 3, 50, 2
    procs = [_spawn("async_mix", "mix", state_dir, str(ntasks), str(nthreads), str(rounds),
                    marker, log, go, "0.0002") for _ in range(3)]
    eng = ShmNonce.attach("mix", state_dir)
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND)

    async def task(i: int) -> None:
        for _ in range(rounds):
            async with eng.aserialized(timeout=60) as nonce:
                with observed(marker, logfd, b"%d - %d m%d\n" % (nonce, os.getpid(), i)):
                    await asyncio.sleep(0.0002)

    async def main() -> None:
        open(go, "w").close()
        await asyncio.gather(*(task(i) for i in range(ntasks)))

    try:
        _run(main, loop_kind)
        for p in procs:
            assert p.wait(240) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    entries = _entries(log)
    assert not [e for e in entries if e[0] == "OVERLAP"], "two holders at once"
    assert len(entries) == rounds * (4 * ntasks + 3 * nthreads)
    nonces = [int(e[0]) for e in entries]
    assert all(a < b for a, b in itertools.pairwise(nonces)), "nonces not in entry order"
    assert len({e[2] for e in entries}) == 4
    eng.unlink()


@pytest.mark.timeout(120)
def test_loop_keeps_running_while_another_process_holds(state_dir: str, tmp_path: object) -> None:
    """Another process holds the section for 150 ms at a time, 6 times; three tasks of
    this loop want it all along. A 5 ms heartbeat task's worst lag stays under 50 ms,
    and the tasks did wait for the other process (so the wait was exercised).

    With SHMNONCE_TEST_BLOCKING_ASYNC=1 the tasks use a blocking implementation (an
    asyncio.Lock in front of the synchronous serialized()): the lag is then about one
    hold (150 ms) and this test fails, as it must.

    The pytest process's own heap is frozen out of the garbage collector first: a full
    collection over it pauses any event loop for tens of milliseconds (measured: up to
    37 ms here), which is not what this test is about.
    """
    gc.collect()
    gc.freeze()
    try:
        _loop_lag(state_dir, str(tmp_path))
    finally:
        gc.unfreeze()


def _loop_lag(state_dir: str, tmp: str) -> None:
    out = os.path.join(tmp, "spans")
    eng = ShmNonce.attach("lag", state_dir)
    holder = _spawn("hold_cycles", "lag", state_dir, "6", "0.15", "0.01", out)
    waits: list[float] = []
    lags: list[float] = []
    gate = asyncio.Lock() if BLOCKING else None

    async def heartbeat(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - t - 0.005)

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while loop.time() < end:
            t = loop.time()
            if gate is not None:
                async with gate:
                    with eng.serialized(timeout=30):
                        waits.append(loop.time() - t)
                        await asyncio.sleep(0.001)
            else:
                async with eng.aserialized(timeout=30):
                    waits.append(loop.time() - t)
                    await asyncio.sleep(0.001)
            await asyncio.sleep(0.002)

    async def main() -> None:
        _workers.wait_for_file(out + ".ready")
        stop = asyncio.Event()
        beat = asyncio.create_task(heartbeat(stop))
        await asyncio.gather(*(worker() for _ in range(3)))
        stop.set()
        await beat

    try:
        asyncio.run(main())
        assert holder.wait(60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert max(waits) > 0.05, "the tasks never waited for the other process"
    with open(out) as fh:
        holds = [b - a for a, b in json.load(fh)]
    worst = max(lags)
    print(f"\nloop lag: worst {worst * 1000:.1f} ms, median "
          f"{sorted(lags)[len(lags) // 2] * 1000:.2f} ms over {len(lags)} beats; longest wait "
          f"{max(waits) * 1000:.0f} ms, longest hold by the other process "
          f"{max(holds) * 1000:.0f} ms ({'blocking' if BLOCKING else 'aserialized'})")
    assert worst < 0.05, f"event loop blocked for {worst * 1000:.0f} ms"
    eng.unlink()


def test_waiting_task_cancelled_gives_its_place_up_at_once(state_dir: str, tmp_path: object) -> None:
    """Cancelled while waiting: its slot is DONE and its byte unlocked before cancel()
    returns control, and the next task enters when the holder leaves."""
    eng = ShmNonce.attach("cw", state_dir)
    probe = backend.reopen(eng._queue._base, eng._queue._path)  # sees this process's locks

    async def main() -> None:
        entered: list[str] = []

        async def entrant(label: str) -> None:
            async with eng.aserialized():
                entered.append(label)

        with _held_by_process("cw", state_dir, str(tmp_path), 1.0):
            first_ticket = _tail(eng)
            a = asyncio.create_task(entrant("a"))
            await asyncio.sleep(0.01)
            b = asyncio.create_task(entrant("b"))
            await asyncio.sleep(0.01)
            assert _tail(eng) == first_ticket + 2
            byte = first_ticket % SLOTS
            assert backend.ofd_test(probe, byte) == backend.F_WRLCK
            a.cancel()
            with pytest.raises(asyncio.CancelledError):
                await a
            assert backend.ofd_test(probe, byte) == backend.F_UNLCK
            phase = int.from_bytes(eng._buf[SLOTS_OFFSET + byte * 16 + 8:SLOTS_OFFSET + byte * 16 + 16],
                                   "little")
            assert phase == 0  # DONE
            assert entered == []
            await asyncio.wait_for(b, 10)  # after the other process's hold ends
        assert entered == ["b"]

    asyncio.run(main())
    os.close(probe)
    eng.unlink()


def test_holding_task_cancelled_leaves_the_section(state_dir: str, tmp_path: object) -> None:
    eng = ShmNonce.attach("ch", state_dir)
    out = os.path.join(str(tmp_path), "probe")

    async def main() -> None:
        inside = asyncio.Event()

        async def holder() -> None:
            async with eng.aserialized():
                inside.set()
                await asyncio.sleep(3600)

        t = asyncio.create_task(holder())
        await inside.wait()
        probe = _spawn("timeout_probe", "ch", state_dir, out)
        while probe.poll() is None:
            await asyncio.sleep(0.01)
        with open(out) as fh:
            assert fh.read() == "timeout"  # held while the task holds
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        probe = _spawn("timeout_probe", "ch", state_dir, out)
        while probe.poll() is None:
            await asyncio.sleep(0.01)
        with open(out) as fh:
            assert fh.read() == "entered"

    asyncio.run(main())
    eng.unlink()


def test_timeout_raises_locktimeout_without_blocking_the_loop(state_dir: str, tmp_path: object) -> None:
    eng = ShmNonce.attach("to", state_dir)

    async def main() -> None:
        beats = 0

        async def heartbeat() -> None:
            nonlocal beats
            while True:
                await asyncio.sleep(0.005)
                beats += 1

        beat = asyncio.create_task(heartbeat())
        with _held_by_process("to", state_dir, str(tmp_path), 3.0):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(LockTimeout, match="aserialized"):
                async with eng.aserialized(timeout=0.3):
                    pass
            took = loop.time() - t0
        beat.cancel()
        assert 0.29 <= took < 1.0, took
        assert beats >= 20, beats  # the loop ran during the wait

    asyncio.run(main())
    assert isinstance(LockTimeout("x"), TimeoutError)
    eng.unlink()


def test_sync_serialized_from_two_tasks_is_refused_with_a_pointer(eng: ShmNonce) -> None:
    async def main() -> None:
        inside = asyncio.Event()

        async def first() -> None:
            with eng.serialized(timeout=1):
                inside.set()
                await asyncio.sleep(0.1)

        async def second() -> None:
            await inside.wait()
            with pytest.raises(NonceError, match="aserialized"):
                with eng.serialized(timeout=1):
                    pass

        await asyncio.gather(first(), second())
        # and the async form works for both
        async with eng.aserialized(timeout=1):
            pass

    asyncio.run(main())


def test_aserialized_is_not_reentrant_in_one_task(eng: ShmNonce) -> None:
    async def main() -> None:
        async with eng.aserialized(timeout=1):
            with pytest.raises(NonceError, match="re-entrant"):
                async with eng.aserialized(timeout=1):
                    pass
            assert eng.next() > 0  # next() inside works

    asyncio.run(main())


def test_sync_holder_task_and_async_waiter_in_one_loop(eng: ShmNonce) -> None:
    """A task holding the section through serialized() across an await does not stop
    another task of the loop from waiting in aserialized()."""
    order: list[str] = []

    async def main() -> None:
        async def holder() -> None:
            with eng.serialized(timeout=1):
                order.append("sync in")
                await asyncio.sleep(0.05)
                order.append("sync out")

        async def waiter() -> None:
            await asyncio.sleep(0.01)
            async with eng.aserialized(timeout=5):
                order.append("async in")

        await asyncio.gather(holder(), waiter())

    asyncio.run(main())
    assert order == ["sync in", "sync out", "async in"]


@pytest.mark.timeout(240)
def test_cancellation_storm(state_dir: str, tmp_path: object) -> None:
    """Two processes, 40 tasks each; for 3 s tasks are cancelled at random while waiting
    or holding (and replaced). Nobody is ever inside with another (observer), and
    afterwards every process enters at once and the queue is empty."""
    tmp = str(tmp_path)
    log, marker = os.path.join(tmp, "log"), os.path.join(tmp, "marker")
    open(log, "w").close()
    script = os.path.join(tmp, "storm.py")
    with open(script, "w") as fh:
        fh.write(STORM)
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, script, "storm", state_dir, log, marker, str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE) for i in range(2)]
    reports = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=200)
            assert p.returncode == 0
            reports.append(json.loads(stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    entries = _entries(log)
    assert not [e for e in entries if e[0] == "OVERLAP"]
    assert all(r["entered"] > 20 and r["cancelled_waiting"] > 5 and r["cancelled_holding"] > 2
               for r in reports), reports
    nonces = [int(e[0]) for e in entries]
    assert all(a < b for a, b in itertools.pairwise(nonces))
    with ShmNonce.attach("storm", state_dir) as eng:
        t0 = time.monotonic()
        with eng.serialized(timeout=5):
            pass
        assert time.monotonic() - t0 < 0.5
        assert _live_tickets(eng) == [], "tickets left in the queue"
        eng.unlink()


STORM = r'''
import asyncio, json, os, random, sys, time
from shmnonce import ShmNonce
sys.path.insert(0, os.getcwd())
from tests._section_workers import observed

def main(state_dir, log, marker, seed):
    rng = random.Random(int(seed))
    eng = ShmNonce.attach("storm", state_dir)
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND)
    stats = {"entered": 0, "cancelled_waiting": 0, "cancelled_holding": 0}
    holding = set()

    async def entrant():
        while True:
            me = asyncio.current_task()
            async with eng.aserialized() as n:
                holding.add(me)
                try:
                    with observed(marker, logfd, b"%d %d\n" % (n, os.getpid())):
                        stats["entered"] += 1
                        await asyncio.sleep(rng.random() * 0.003)
                finally:
                    holding.discard(me)
            await asyncio.sleep(rng.random() * 0.002)

    async def run():
        tasks = [asyncio.create_task(entrant()) for _ in range(40)]
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            await asyncio.sleep(rng.random() * 0.004)
            i = rng.randrange(len(tasks))
            t = tasks[i]
            key = "cancelled_holding" if t in holding else "cancelled_waiting"
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                stats[key] += 1
            tasks[i] = asyncio.create_task(entrant())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    eng.close()
    print(json.dumps(stats))

if __name__ == "__main__":
    main(*sys.argv[2:])
'''


@pytest.mark.timeout(120)
def test_sigkill_of_a_process_with_waiting_tasks(state_dir: str, tmp_path: object) -> None:
    """Process V queues 20 tasks behind this process's holder; another process W queues
    20 more after V's; V is SIGKILLed. When the holder leaves, W's tasks all enter and
    this process's next entry is prompt: the dead tickets block nobody."""
    tmp = str(tmp_path)
    eng = ShmNonce.attach("kw", state_dir)
    held = eng.enter()
    ready_v, ready_w = os.path.join(tmp, "v"), os.path.join(tmp, "w")
    victim = _spawn("async_waiters", "kw", state_dir, "20", ready_v)
    _workers.wait_for_file(ready_v)
    done = os.path.join(tmp, "done")
    witness_code = WITNESS.format(root=ROOT)
    witness = subprocess.Popen([sys.executable, "-c", witness_code, state_dir, ready_w, done],
                               cwd=ROOT)
    try:
        _workers.wait_for_file(ready_w)
        assert _tail(eng) >= 41
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        held.leave()
        assert witness.wait(30) == 0
        with open(done) as fh:
            assert fh.read() == "20"
        t0 = time.monotonic()
        with eng.serialized(timeout=5):
            pass
        assert time.monotonic() - t0 < 0.5
    finally:
        for p in (victim, witness):
            if p.poll() is None:
                p.kill()
    eng.unlink()


WITNESS = r'''
import asyncio, sys
sys.path.insert(0, {root!r})
from shmnonce import ShmNonce
state_dir, ready, done = sys.argv[1:]
eng = ShmNonce.attach("kw", state_dir)
count = 0
async def task():
    global count
    async with eng.aserialized(timeout=20):
        count += 1
async def main():
    tasks = [asyncio.create_task(task()) for _ in range(20)]
    await asyncio.sleep(0.2)
    open(ready, "w").close()
    await asyncio.gather(*tasks)
asyncio.run(main())
open(done, "w").write(str(count))
'''


def test_async_waiter_wakes_when_another_process_leaves(state_dir: str, tmp_path: object) -> None:
    """No polling: the task enters within milliseconds of the other process's exit."""
    eng = ShmNonce.attach("wk", state_dir)
    delays = []

    async def main() -> None:
        for i in range(10):
            ready = os.path.join(str(tmp_path), f"r{i}")
            proc = subprocess.Popen([sys.executable, "-m", "tests._workers", "hold", "wk",
                                     state_dir, ready, "0.15"], cwd=ROOT,
                                    env=dict(os.environ, PYTHONPATH=ROOT))
            while not os.path.exists(ready):
                await asyncio.sleep(0.002)
            async with eng.aserialized(timeout=30):
                entered = time.time()
            proc.wait()
            with open(ready + ".left") as fh:
                delays.append(entered - float(fh.read()))

    asyncio.run(main())
    delays.sort()
    assert delays[len(delays) // 2] < 0.01, delays
    eng.unlink()


def test_random_timeouts_threads_and_tasks_keep_the_queue_working(eng: ShmNonce) -> None:
    """Threads and tasks with short random timeouts against each other: no overlap in
    memory, every survivor enters, and the queue ends empty."""
    inside = [0]
    errors: list[str] = []
    end = time.monotonic() + 1.5

    def check_in() -> None:
        inside[0] += 1
        if inside[0] != 1:
            errors.append("overlap")

    def thread_worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            with contextlib.suppress(LockTimeout):
                with eng.serialized(timeout=rng.choice([0, 0.001, 0.01, None])):
                    check_in()
                    time.sleep(rng.random() * 0.001)
                    inside[0] -= 1

    async def task_worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            with contextlib.suppress(LockTimeout):
                async with eng.aserialized(timeout=rng.choice([0, 0.001, 0.01, None])):
                    check_in()
                    await asyncio.sleep(rng.random() * 0.001)
                    inside[0] -= 1

    async def main() -> None:
        await asyncio.gather(*(task_worker(i) for i in range(20)))

    threads = [threading.Thread(target=thread_worker, args=(100 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    asyncio.run(main())
    for t in threads:
        t.join()
    assert errors == []
    with eng.serialized(timeout=2):
        pass
    assert _live_tickets(eng) == []
    assert eng._queue._mine == {}


KILLED_WORKER = r'''
import asyncio, random, sys, threading, time
sys.path.insert(0, sys.argv[3])
from _observer import Observer
from shmnonce import LockTimeout, ShmNonce
state_dir, obsdir = sys.argv[1:3]
eng = ShmNonce.attach("ks", state_dir)
obs = Observer(obsdir)

def thread_worker(i):
    r = random.Random()
    while True:
        try:
            with eng.serialized(timeout=r.choice([None, 0.001, 0.05])) as n:
                obs.enter(n, f"t{i}")
                time.sleep(r.random() * 0.002)
                obs.exit(n, f"t{i}")
        except LockTimeout:
            pass

async def task(i):
    r = random.Random()
    while True:
        try:
            async with eng.aserialized(timeout=r.choice([None, 0.001, 0.05])) as n:
                obs.enter(n, f"a{i}")
                try:
                    await asyncio.sleep(r.random() * 0.002)
                finally:
                    obs.exit(n, f"a{i}")
        except LockTimeout:
            pass

async def main():
    tasks = [asyncio.create_task(task(i)) for i in range(15)]
    r = random.Random()
    while True:  # cancel a random task (waiting or holding) every 5 ms
        await asyncio.sleep(0.005)
        k = r.randrange(len(tasks))
        tasks[k].cancel()
        tasks[k] = asyncio.create_task(task(100 + k))

for i in range(3):
    threading.Thread(target=thread_worker, args=(i,), daemon=True).start()
asyncio.run(main())
'''


@pytest.mark.timeout(180)
def test_random_sigkills_of_processes_mixing_threads_and_tasks(state_dir: str, tmp_path: object) -> None:
    """Three processes, each with 3 threads and 15 tasks (random timeouts, a task
    cancelled every 5 ms), one of them SIGKILLed every 0-0.4 s for 5 s and replaced.
    The independent observer (examples/_observer.py) sees no overlap; every marker
    found on entry belonged to a killed process; the section is then entered at once."""
    obsdir = os.path.join(str(tmp_path), "obs")
    os.makedirs(obsdir)
    ShmNonce.attach("ks", state_dir).close()
    examples = os.path.join(ROOT, "examples")

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", KILLED_WORKER, state_dir, obsdir, examples],
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))

    procs = [spawn() for _ in range(3)]
    killed: set[int] = set()
    rng = random.Random(7)
    end = time.monotonic() + 5.0
    try:
        while time.monotonic() < end:
            time.sleep(rng.random() * 0.4)
            i = rng.randrange(3)
            os.kill(procs[i].pid, signal.SIGKILL)
            procs[i].wait()
            killed.add(procs[i].pid)
            procs[i] = spawn()
    finally:
        for p in procs:
            p.kill()
            p.wait()
            killed.add(p.pid)
    files = os.listdir(obsdir)
    assert not [f for f in files if f.startswith("overlap-")], files
    for f in files:
        if f.startswith("collision-"):
            with open(os.path.join(obsdir, f)) as fh:
                holder = fh.read().split()
            if not holder:  # the finder was killed between creating and writing the record
                assert int(f.split("-")[1]) in killed, f
                continue
            assert int(holder[0]) in killed, f
    with ShmNonce.attach("ks", state_dir) as eng:
        assert eng.stats()["section_entries"] > 200
        t0 = time.monotonic()
        with eng.serialized(timeout=5):
            pass
        assert time.monotonic() - t0 < 0.5
        assert _live_tickets(eng) == []
        eng.unlink()
