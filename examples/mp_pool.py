"""multiprocessing.Pool and ProcessPoolExecutor workers sharing one shmnonce sequence.

Run (with shmnonce importable)::

    python examples/mp_pool.py                                  # all start methods, both pools
    python examples/mp_pool.py --start-method spawn --pool executor --state-dir /tmp/demo
    python examples/mp_pool.py --kill --json results.json       # also SIGKILL a Pool worker

The pattern: pass the sequence *name* (and state_dir) to the pool's
``initializer`` and attach there, once per worker process (``engine()`` below).
That works for every start method. Under ``fork`` the parent's handle, attached
before the pool was created, is inherited and reused as is: shmnonce closes the
lock descriptors the child inherited and opens its own, and the shared-memory
mapping carries over. Pass the name, not the handle, in task arguments: a
pickled ShmNonce re-attaches in the worker, a new handle for every task.

Each run mixes tasks that issue nonces with tasks that make a ``serialized()``
"call"; the parent keeps issuing nonces while the pool works (and while Pool
forks replacement workers). Pool recycles its workers (``maxtasksperchild``);
the executor is replaced by a fresh one halfway instead, because
``max_tasks_per_child`` is refused under fork and deadlocks the executor on
Python releases without the fix for CPython gh-115634 (3.11 included). With
``--kill`` one Pool worker kills itself with SIGKILL while inside
``serialized()``; the pool replaces it and the other workers must still get in.
Afterwards the script checks the results and that a fresh attach continues
above every value, prints one line per run and exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.pool import AsyncResult
from typing import Any

import psutil
from _observer import Observer  # the script's own directory is on sys.path

from shmnonce import ShmNonce

START_METHODS = ("fork", "spawn", "forkserver")
POOLS = ("pool", "executor")

_ENGINES: dict[tuple[str, str | None], ShmNonce] = {}


def engine(name: str, state_dir: str | None = None) -> ShmNonce:
    """This process's handle on ``(name, state_dir)``, attached on first use.

    Used as the pool ``initializer``. A handle attached in the parent before a
    ``fork`` is inherited through this cache and reused.
    """
    key = (name, state_dir)
    eng = _ENGINES.get(key)
    if eng is None:
        eng = _ENGINES[key] = ShmNonce.attach(name, state_dir=state_dir)
    return eng


def close_engines() -> None:
    """Detach every handle this process holds (the sequences live on)."""
    while _ENGINES:
        _ENGINES.popitem()[1].close()


def issue(name: str, state_dir: str | None, count: int, pause_ms: float = 0.0) -> list[list[int]]:
    """Task: ``count`` values as ``[pid, nonce, t0, t1]`` (``t0``/``t1``: monotonic ns)."""
    eng = engine(name, state_dir)
    out = []
    for _ in range(count):
        t0 = time.monotonic_ns()
        n = eng.next()
        out.append([os.getpid(), n, t0, time.monotonic_ns()])
        time.sleep(pause_ms / 1000)  # stands for the work between two requests
    return out


def call(
    name: str, state_dir: str | None, obs_dir: str, hold_ms: float, die: bool = False
) -> dict[str, Any]:
    """Task: one ``serialized()`` section holding for ``hold_ms``, watched by the observer.

    With ``die`` the worker writes ``killed-<pid>`` (nonce and time) and SIGKILLs
    itself inside the section.
    """
    eng = engine(name, state_dir)
    obs = Observer(obs_dir)
    t_req = time.monotonic_ns()
    with eng.serialized(timeout=30.0) as nonce:
        t_enter = time.monotonic_ns()
        collision = obs.enter(nonce)
        if die:
            path = os.path.join(obs_dir, f"killed-{os.getpid()}")
            with open(path + ".tmp", "w") as f:
                f.write(f"{nonce} {time.monotonic_ns()}")
            os.replace(path + ".tmp", path)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hold_ms / 1000)  # the exchange request would go here
        obs.exit(nonce)
        t_exit = time.monotonic_ns()
    return {
        "pid": os.getpid(),
        "nonce": nonce,
        "t_req": t_req,
        "t_enter": t_enter,
        "t_exit": t_exit,
        "collision": collision,
    }


Job = tuple[Callable[..., Any], tuple[Any, ...]]


def run(
    start_method: str,
    pool: str,
    name: str,
    state_dir: str | None,
    obs_dir: str,
    *,
    processes: int = 4,
    tasks: int = 24,
    per_task: int = 25,
    calls: int = 16,
    hold_ms: float = 5.0,
    pause_ms: float = 0.5,
    parent_burst: int = 20,
    recycle: int = 8,
    kill: bool = False,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """One pool under one start method; returns everything observed (JSON-ready).

    ``kill`` applies to ``pool="pool"`` only: a ProcessPoolExecutor whose worker
    dies is broken by design (BrokenProcessPool), it does not replace the worker.
    ``recycle`` (tasks per worker) applies to Pool only.
    """
    ctx = mp.get_context(start_method)
    parent = engine(name, state_dir)  # attached before the pool forks
    # Calls come in bursts of `processes`, so several workers want the section at once.
    burst = max(1, min(processes, calls))
    ops: list[Job] = [(issue, (name, state_dir, per_task, pause_ms)) for _ in range(tasks)]
    for i in reversed(range(0, calls, burst)):
        at = (i // burst + 1) * tasks // (calls // burst + 1)
        n = min(burst, calls - i)
        ops[at:at] = [(call, (name, state_dir, obs_dir, hold_ms))] * n
    first, second = ops[: len(ops) // 2], ops[len(ops) // 2 :]
    own: list[list[int]] = []
    killed: dict[str, int] | None = None

    def issue_in_parent() -> None:
        # Short bursts: Pool forks replacement workers from its handler thread, which
        # can happen while this thread is inside next().
        for _ in range(parent_burst):
            t0 = time.monotonic_ns()
            n = parent.next()
            own.append([os.getpid(), n, t0, time.monotonic_ns()])
        time.sleep(0.001)

    deadline = time.monotonic() + timeout
    if pool == "pool":
        p = ctx.Pool(processes, engine, (name, state_dir), maxtasksperchild=recycle or None)
        try:
            pending: list[AsyncResult[Any]] = [p.apply_async(f, a) for f, a in first]
            if kill:
                p.apply_async(call, (name, state_dir, obs_dir, 30_000.0, True))
                killed = _wait_killed(obs_dir, deadline, issue_in_parent)
            pending += [p.apply_async(f, a) for f, a in second]
            while not all(r.ready() for r in pending) and time.monotonic() < deadline:
                issue_in_parent()
            if not all(r.ready() for r in pending):
                raise TimeoutError(_stuck(start_method, pool, pending, timeout))
            results = [r.get() for r in pending]
        finally:
            p.terminate()  # close()+join() would wait forever for the killed task
            p.join()
    elif pool == "executor":
        if kill:
            raise ValueError("kill is only supported with pool='pool'")
        results = []
        for half in (first, second):  # a fresh executor for each half, like a reload
            ex = ProcessPoolExecutor(processes, ctx, engine, (name, state_dir))
            ok = False
            try:
                futures: list[Future[Any]] = [ex.submit(f, *a) for f, a in half]
                while not all(f.done() for f in futures) and time.monotonic() < deadline:
                    issue_in_parent()
                if not all(f.done() for f in futures):
                    raise TimeoutError(_stuck(start_method, pool, futures, timeout))
                results += [f.result() for f in futures]
                ok = True
            finally:
                if not ok:  # do not wait on a stuck pool: kill its workers
                    for proc in list(getattr(ex, "_processes", {}).values()):
                        proc.kill()
                ex.shutdown(wait=ok, cancel_futures=not ok)
    else:
        raise ValueError(f"unknown pool {pool!r}")

    issued = list(own)
    sections = []
    for res in results:
        if isinstance(res, dict):
            sections.append(res)
            issued.append([res["pid"], res["nonce"], res["t_req"], res["t_enter"]])
        else:
            issued.extend(res)
    return {
        "start_method": start_method,
        "pool": pool,
        "parent_pid": os.getpid(),
        "processes": processes,
        "recycle": recycle,
        "issued": issued,
        "sections": sections,
        "killed": killed,
        "observer_files": sorted(os.listdir(obs_dir)),
    }


def _stuck(start_method: str, pool: str, pending: Sequence[object], timeout: float) -> str:
    return (
        f"{start_method} {pool}: {len(pending)} tasks not finished in {timeout:g} s;"
        " a worker may be deadlocked (for example on a lock inherited across fork)"
    )


def _wait_killed(obs_dir: str, deadline: float, meanwhile: Callable[[], None]) -> dict[str, int]:
    """Wait for the self-killing worker's note, then for the process to be gone."""
    while time.monotonic() < deadline:
        notes = [f for f in os.listdir(obs_dir) if f.startswith("killed-") and "." not in f]
        if notes:
            pid = int(notes[0].split("-")[1])
            with open(os.path.join(obs_dir, notes[0])) as f:
                nonce, t_kill = map(int, f.read().split())
            while _pid_alive(pid) and time.monotonic() < deadline:
                meanwhile()
            if not _pid_alive(pid):
                return {"pid": pid, "nonce": nonce, "t_kill": t_kill}
            break
        meanwhile()
    raise TimeoutError("the self-killing worker did not die in time")


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check(result: dict[str, Any]) -> list[str]:
    """The checks for one run; returns the failures (empty when all hold)."""
    fail: list[str] = []
    issued = result["issued"]
    nonces = [r[1] for r in issued]
    if result["killed"]:
        nonces.append(result["killed"]["nonce"])
    if len(set(nonces)) != len(nonces):
        fail.append(f"{len(nonces) - len(set(nonces))} duplicate nonces")
    late = _later_but_smaller(issued)
    if late:
        fail.append(f"{late} values not above a value returned before they were requested")
    by_pid: dict[int, list[list[int]]] = defaultdict(list)
    for r in issued:
        by_pid[r[0]].append(r)
    for pid, recs in by_pid.items():
        recs.sort(key=lambda r: r[3])  # single-threaded processes: the return order
        if any(a[1] >= b[1] for a, b in itertools.pairwise(recs)):
            fail.append(f"pid {pid}: nonces not increasing in the order it returned them")
    secs = sorted(result["sections"], key=lambda s: s["t_enter"])
    for a, b in itertools.pairwise(secs):
        if b["t_enter"] <= a["t_exit"] or b["nonce"] <= a["nonce"]:
            fail.append(f"sections overlap or out of order: {a} {b}")
    # The only acceptable stale marker is the one the killed holder left behind,
    # found by the first section entered after it was killed.
    killed = result["killed"]
    coll = [s for s in secs if s["collision"] is not None]
    legit = killed is not None and [
        (s["collision"], s["t_enter"] > killed["t_kill"]) for s in coll
    ] == [(killed["pid"], True)]
    if (coll and not legit) or (killed is not None and not coll):
        fail.append(f"observer collisions {coll} (killed: {killed})")
    if any(f.startswith("overlap-") for f in result["observer_files"]):
        fail.append(f"observer overlaps: {result['observer_files']}")
    workers = {pid for pid in by_pid if pid != result["parent_pid"]}
    if len(workers) < 2:
        fail.append(f"only {len(workers)} worker processes took part")
    return fail


def _later_but_smaller(issued: Sequence[Sequence[int]]) -> int:
    """Count values smaller than one returned (t1) before they were requested (t0)."""
    by_end = sorted(issued, key=lambda r: r[3])
    ends = [r[3] for r in by_end]
    best: list[int] = []
    for r in by_end:
        best.append(max(r[1], best[-1]) if best else r[1])
    count = 0
    for r in issued:
        i = bisect.bisect_left(ends, r[2])
        if i and best[i - 1] >= r[1]:
            count += 1
    return count


def summary(result: dict[str, Any], failures: list[str]) -> str:
    pids = {r[0] for r in result["issued"]} - {result["parent_pid"]}
    return (
        f"{result['start_method']:<10} {result['pool']:<8} "
        f"{len(result['issued'])} nonces from {len(pids)} worker pids + parent, "
        f"{len(result['sections'])} serialized calls, "
        f"killed {result['killed']['pid'] if result['killed'] else '-'}: "
        + ("OK" if not failures else "FAILED: " + "; ".join(failures))
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--start-method", choices=(*START_METHODS, "all"), default="all")
    ap.add_argument("--pool", choices=(*POOLS, "both"), default="both")
    ap.add_argument("--name", default="mp-example")
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=24, help="tasks that issue nonces")
    ap.add_argument("--per-task", type=int, default=25)
    ap.add_argument("--calls", type=int, default=16, help="serialized() tasks")
    ap.add_argument("--recycle", type=int, default=8, help="tasks per worker; 0: never")
    ap.add_argument("--kill", action="store_true", help="SIGKILL one Pool worker in a section")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--json", metavar="FILE", help="write all results to FILE")
    args = ap.parse_args(argv)
    methods = START_METHODS if args.start_method == "all" else (args.start_method,)
    pools = POOLS if args.pool == "both" else (args.pool,)

    runs = []
    failed = False
    for method in methods:
        for kind in pools:
            with tempfile.TemporaryDirectory(prefix="shmnonce-observer-") as obs:
                result = run(
                    method, kind, args.name, args.state_dir, obs,
                    processes=args.processes, tasks=args.tasks, per_task=args.per_task,
                    calls=args.calls, recycle=args.recycle, kill=args.kill and kind == "pool",
                    timeout=args.timeout,
                )  # fmt: skip
            failures = check(result)
            failed = failed or bool(failures)
            print(summary(result, failures), flush=True)
            runs.append(result)
    close_engines()
    highest = max(
        max([r[1] for r in res["issued"]] + [res["killed"]["nonce"] if res["killed"] else 0])
        for res in runs
    )
    with ShmNonce.attach(args.name, state_dir=args.state_dir) as eng:
        fresh = eng.next()
    ok = fresh > highest
    failed = failed or not ok
    print(f"fresh attach: next() = {fresh}, above all {highest}: {'OK' if ok else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "fresh": fresh}, f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
