"""asyncio: aserialized() throughput against serialized(), and hand-off latency against
filelock's AsyncFileLock (its default 50 ms poll and a 1 ms poll), in one run.

Hand-off latency: from one holder's exit (the last thing it does inside) to the next
holder's entry (the first thing it does inside). Measured in rounds: a gate (held by
this process's main thread) holds the section while 8 tasks each ask for it once;
30 ms later the gate leaves and the 8 tasks go through one after the other, each
holding for 0.5 ms. Every entry of a round follows the exit of the previous holder
with all the remaining tasks waiting (8 at the first hand-off, 1 at the last). The
tasks run in one event loop (a thread of this process) or in two other processes
(4 tasks each). No task asks twice in a round, so an unfair lock cannot flatter its
figure by letting the last holder back in.

Floors, on figures of this run (quick mode: SHMNONCE_BENCH_QUICK=1, fewer rounds):
p99 hand-off <= 2 ms for 8 tasks in one loop and <= 5 ms for 8 tasks in 2 other processes
(over 540 hand-offs in both modes), and p50 and p99 at least 10 x lower than
AsyncFileLock at its default poll in the same setting.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import filelock
import pytest

from shmnonce import ShmNonce

from .conftest import QUICK

pytestmark = pytest.mark.timeout(900)
TASKS = 8
HOLD_S = 0.0005
QUEUE_S = 0.03
HANDOFF_ROUNDS = 15 if QUICK else 60
SHM_HANDOFF_ROUNDS = 60
"""shmnonce's own rows use the full count in quick mode too: a p99 of ~130 hand-offs is
their second-highest value, too noisy for a floor; 540 hand-offs cost about a second."""
BATCH = 500 if QUICK else 2000
ROUNDS = 8 if QUICK else 25
RESULTS: dict[str, Any] = {}

Factory = Callable[[int], AbstractAsyncContextManager[Any]]


def _factory(kind: str, arg: str, state_dir: str, poll: float) -> Factory:
    if kind == "shm":
        eng = ShmNonce.attach(arg, state_dir)
        return lambda i: eng.aserialized(timeout=60)
    locks: dict[int, filelock.AsyncFileLock] = {}

    def make(i: int) -> AbstractAsyncContextManager[Any]:
        lock = locks.get(i)
        if lock is None:  # one lock object per task: each has its own descriptor
            lock = locks[i] = filelock.AsyncFileLock(arg, poll_interval=poll)
        return lock
    return make


async def _contender(factory: Factory, tag: str, tasks: int, get: Callable[[], Any],
                     put: Callable[[Any], None]) -> list[list[Any]]:
    """Each round (announced through ``get``): ``tasks`` tasks enter once each."""
    loop = asyncio.get_running_loop()
    records: list[list[Any]] = []

    async def once(i: int) -> None:
        t_req = time.monotonic_ns()
        async with factory(i):
            t_in = time.monotonic_ns()
            await asyncio.sleep(HOLD_S)
            records.append([t_req, t_in, time.monotonic_ns(), f"{tag}:{i}"])

    while (await loop.run_in_executor(None, get)) is not None:
        await asyncio.gather(*(once(i) for i in range(tasks)))
        put("done")
    return records


def _child(kind: str, arg: str, state_dir: str, poll: float, tag: str, tasks: int,
           cmds: Any, done: Any, out: str) -> None:
    factory = _factory(kind, arg, state_dir, poll)
    records = asyncio.run(_contender(factory, tag, tasks, cmds.get, done.put))
    with open(out, "w") as fh:
        json.dump(records, fh)


def _handoffs(records: list[list[Any]]) -> list[float]:
    """Hand-off latencies in ms; checks exclusion on the way."""
    recs = sorted(records, key=lambda r: r[1])
    out = []
    for a, b in itertools.pairwise(recs):
        assert b[1] >= a[2], "two holders at once"
        if b[0] < a[2]:  # b was waiting when a left
            out.append((b[1] - a[2]) / 1e6)
    return out


def _pcts(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    assert len(v) >= 50, f"only {len(v)} hand-offs"
    return {"p50": v[len(v) // 2], "p99": v[min(len(v) - 1, int(len(v) * 0.99))], "n": len(v)}


def _run(kind: str, where: str, tmp: str, poll: float = 0.0) -> dict[str, float]:
    rounds = SHM_HANDOFF_ROUNDS if kind == "shm" else HANDOFF_ROUNDS
    name = f"ho-{kind}-{where}-{int(poll * 1000)}"
    arg = name if kind == "shm" else os.path.join(tmp, name + ".lock")
    if kind == "shm":
        gate_eng = ShmNonce.attach(name, tmp)
        acquire: Callable[[], object] = gate_eng.enter
        held: list[Any] = []
    else:
        gate_lock = filelock.FileLock(arg)
    records: list[list[Any]] = []
    if where == "loop":
        cmds: Any = queue.Queue()
        done: Any = queue.Queue()
        box: list[list[list[Any]]] = []
        factory = _factory(kind, arg, tmp, poll)
        runner = threading.Thread(target=lambda: box.append(asyncio.run(
            _contender(factory, "loop", TASKS, cmds.get, done.put))))
        runner.start()
        contenders = 1
    else:
        ctx = mp.get_context("fork")
        cmds, done = ctx.Queue(), ctx.Queue()
        outs = [os.path.join(tmp, f"{name}-{i}.json") for i in range(2)]
        procs = [ctx.Process(target=_child, args=(kind, arg, tmp, poll, f"p{i}", TASKS // 2,
                                                   cmds, done, outs[i])) for i in range(2)]
        for p in procs:
            p.start()
        contenders = 2
    for _ in range(rounds):
        if kind == "shm":
            held.append(acquire())
        else:
            gate_lock.acquire()
        t_in = time.monotonic_ns()
        for _ in range(contenders):
            cmds.put(1)
        time.sleep(QUEUE_S)
        t_out = time.monotonic_ns()
        if kind == "shm":
            held.pop().leave()
        else:
            gate_lock.release()
        records.append([0, t_in, t_out, "gate"])
        for _ in range(contenders):
            done.get(timeout=120)
    for _ in range(contenders):
        cmds.put(None)
    if where == "loop":
        runner.join()
        records += box[0]
    else:
        for p, o in zip(procs, outs, strict=True):
            p.join(120)
            assert p.exitcode == 0
            with open(o) as fh:
                records += json.load(fh)
    if kind == "shm":
        gate_eng.unlink()
    return _pcts(_handoffs(records))


@pytest.mark.parametrize("where", ["loop", "processes"])
def test_handoff_latency(tmp_path: Any, where: str) -> None:
    tmp = str(tmp_path)
    res = {
        "shmnonce aserialized()": _run("shm", where, tmp),
        "AsyncFileLock, poll 1 ms": _run("filelock", where, tmp, 0.001),
        "AsyncFileLock, default poll (50 ms)": _run("filelock", where, tmp, 0.05),
    }
    RESULTS[where] = res
    label = "8 tasks in one event loop" if where == "loop" else "8 tasks in 2 other processes"
    print(f"\nhand-off latency, {label}:\n| lock | p50 ms | p99 ms | hand-offs |\n"
          "|---|---:|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {v['p50']:.3f} | {v['p99']:.3f} | {v['n']} |")
    shm, fl = res["shmnonce aserialized()"], res["AsyncFileLock, default poll (50 ms)"]
    print(f"AsyncFileLock default / shmnonce: p50 {fl['p50'] / shm['p50']:.0f} x, "
          f"p99 {fl['p99'] / shm['p99']:.0f} x")
    # The floor (p99 <= 2 ms with 8 waiting tasks) is asserted for the tasks of one
    # loop. Waiters in 2 other processes add a scheduler wake-up per hand-off on this
    # 2-core machine (p99 0.6-2.1 ms seen): 5 ms there, and the 10 x ratio in both.
    assert shm["p99"] <= (2.0 if where == "loop" else 5.0), shm
    assert fl["p50"] >= 10 * shm["p50"] and fl["p99"] >= 10 * shm["p99"], res


def test_aserialized_throughput_against_serialized(tmp_path: Any) -> None:
    """Uncontended enter+leave per second, in alternating rounds (same machine load)."""
    eng = ShmNonce.attach("tp", str(tmp_path))

    def sync_batch() -> float:
        t0 = time.perf_counter()
        for _ in range(BATCH):
            with eng.serialized():
                pass
        return BATCH / (time.perf_counter() - t0)

    async def async_batch() -> float:
        t0 = time.perf_counter()
        for _ in range(BATCH):
            async with eng.aserialized():
                pass
        return BATCH / (time.perf_counter() - t0)

    best = {"serialized": 0.0, "aserialized": 0.0}

    async def rounds() -> None:
        for _ in range(ROUNDS):
            best["serialized"] = max(best["serialized"], sync_batch())
            best["aserialized"] = max(best["aserialized"], await async_batch())

    asyncio.run(rounds())
    ratio = best["aserialized"] / best["serialized"]
    print(f"\nenter+leave, uncontended, best of {ROUNDS} rounds of {BATCH}: "
          f"serialized() {best['serialized']:,.0f}/s, aserialized() {best['aserialized']:,.0f}/s "
          f"(ratio {ratio:.2f})")
    RESULTS["throughput"] = best
    assert ratio >= 0.5, best
    eng.unlink()
