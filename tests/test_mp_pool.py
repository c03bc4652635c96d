"""examples/mp_pool.py under fork, spawn and forkserver: run as a script and imported.

Each start method runs multiprocessing.Pool (workers recycled every 8 tasks, one
worker SIGKILLed inside serialized()) and ProcessPoolExecutor (replaced by a
fresh executor halfway), with the parent issuing nonces throughout. The
results are checked here, independently of the example's own checks.
"""

from __future__ import annotations

import bisect
import importlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from shmnonce import ShmNonce

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NAME = "mp-e2e"
START_METHODS = ["fork", "spawn", "forkserver"]
PROCESSES = 4
TASKS = 24
PER_TASK = 25
CALLS = 16
RECYCLE = 8
JUMP_NS = 3600 * 10**9
RUN_TIMEOUT_S = 25.0  # per pool run; a healthy run takes well under 2 s
# Long-lived stdlib helpers shared by every test in this process; they exit with it.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")

# Python >= 3.12 warns when fork() happens while threads run; Pool forks its
# replacement workers from its handler thread (harmless here: shmnonce takes its
# own locks around fork).
FORK_WITH_THREADS = "ignore:This process .* is multi-threaded:DeprecationWarning"


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    path.mkdir(exist_ok=True)
    yield path
    with ShmNonce.attach(NAME, state_dir=path) as eng:
        eng.unlink()


@pytest.fixture
def mp_pool(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example imported as ``mp_pool``; spawn/forkserver children import it by that name."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module("mp_pool")
    assert Path(module.__file__ or "").resolve() == EXAMPLES / "mp_pool.py"
    return module


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check_result(res: dict[str, Any], kill: bool) -> dict[str, int]:
    """Assertions on one run of mp_pool.run(); returns counts for the report."""
    issued = res["issued"]
    parent = res["parent_pid"]
    killed = res["killed"]
    nonces = [r[1] for r in issued] + ([killed["nonce"]] if killed else [])
    expected = TASKS * PER_TASK + CALLS
    workers_issued = [r for r in issued if r[0] != parent]
    assert len(workers_issued) == expected
    assert len(set(nonces)) == len(nonces), "duplicate nonces"

    # Each process (all single-threaded) returned increasing values.
    by_pid: dict[int, list[list[int]]] = defaultdict(list)
    for r in issued:
        by_pid[r[0]].append(r)
    for pid, recs in by_pid.items():
        recs.sort(key=lambda r: r[3])
        assert all(a[3] < b[2] for a, b in itertools.pairwise(recs)), pid
        assert all(a[1] < b[1] for a, b in itertools.pairwise(recs)), f"pid {pid} out of order"

    # Across processes: a value requested after another was returned is larger.
    by_end = sorted(issued, key=lambda r: r[3])
    ends = [r[3] for r in by_end]
    best = list(itertools.accumulate((r[1] for r in by_end), max))
    constrained = 0
    for r in issued:
        i = bisect.bisect_left(ends, r[2])
        if i:
            constrained += 1
            assert best[i - 1] < r[1], f"{r} requested after {best[i - 1]} was returned"
    assert constrained >= len(issued) // 2

    # The parent issued while the workers did (interleaved in time).
    own = [r for r in issued if r[0] == parent]
    first_worker = min(r[2] for r in workers_issued)
    last_worker = max(r[3] for r in workers_issued)
    assert len([r for r in own if first_worker < r[2] < last_worker]) >= 10

    # Serialized sections: disjoint, increasing in entry order, contended.
    secs = sorted(res["sections"], key=lambda s: s["t_enter"])
    assert len(secs) == CALLS
    assert len({s["pid"] for s in secs}) >= 2
    for a, b in itertools.pairwise(secs):
        assert b["t_enter"] > a["t_exit"], f"sections overlap: {a} {b}"
        assert b["nonce"] > a["nonce"]
    files = res["observer_files"]
    assert not [f for f in files if f.startswith("overlap-")], files
    collisions = [s for s in secs if s["collision"] is not None]
    if kill:
        assert killed is not None
        assert not psutil.pid_exists(killed["pid"]) or not _alive(psutil.Process(killed["pid"]))
        assert [s["collision"] for s in collisions] == [killed["pid"]], collisions
        assert collisions[0]["t_enter"] > killed["t_kill"], "entered while the holder lived"
        assert all(s["t_exit"] < killed["t_kill"] for s in secs if s["pid"] == killed["pid"])
    else:
        assert killed is None and collisions == [], collisions
    waited = [b for a, b in itertools.pairwise(secs) if b["t_req"] < a["t_exit"]]
    if killed:
        waited += [s for s in secs if s["t_req"] < killed["t_kill"] < s["t_enter"]]
    assert waited, "no section ever waited for another: mutual exclusion went untested"
    assert len([f for f in files if f.startswith("collision-")]) == len(collisions)

    # Recycling (Pool) or the replaced executor brought in new worker processes.
    worker_pids = set(by_pid) - {parent}
    assert len(worker_pids) >= (PROCESSES + 1 if res["pool"] == "pool" else 2), worker_pids
    return {
        "values": len(nonces),
        "worker_pids": len(worker_pids),
        "parent_values": len(own),
        "constrained": constrained,
        "waited": len(waited),
    }


def _max_nonce(res: dict[str, Any]) -> int:
    values: list[int] = [r[1] for r in res["issued"]]
    if res["killed"]:
        values.append(res["killed"]["nonce"])
    return max(values)


@pytest.mark.timeout(90)
@pytest.mark.filterwarnings(FORK_WITH_THREADS)
@pytest.mark.parametrize("method", START_METHODS)
def test_imported(mp_pool: ModuleType, state_dir: Path, tmp_path: Path, method: str) -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    highest = 0
    try:
        for kind in ("pool", "executor"):
            obs = tmp_path / f"observer-{kind}"
            obs.mkdir()
            res = mp_pool.run(
                method, kind, NAME, str(state_dir), str(obs),
                processes=PROCESSES, tasks=TASKS, per_task=PER_TASK, calls=CALLS,
                recycle=RECYCLE, kill=kind == "pool", timeout=RUN_TIMEOUT_S,
            )  # fmt: skip
            assert mp_pool.check(res) == []
            counts = check_result(res, kill=kind == "pool")
            print(f"{method} {kind} (imported): {counts}")
            highest = max(highest, _max_nonce(res))
    finally:
        mp_pool.close_engines()
        new = [p for p in me.children(recursive=True) if p.pid not in before]
        stray = [p for p in new if _alive(p) and not any(h in _cmdline(p) for h in HELPERS)]
        for p in stray:
            p.kill()
        psutil.wait_procs(stray, timeout=5)
    assert stray == [], f"pool processes left running: {stray}"
    with ShmNonce.attach(NAME, state_dir=state_dir) as eng:
        assert eng.next() > highest


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_script(state_dir: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "results.json"
    # Run the script with the sequence ahead of the clock: every value is then last + 1,
    # so a lost update would show as a duplicate (test_imported covers clock-driven values).
    with ShmNonce.attach(NAME, state_dir=state_dir) as eng:
        jumped = eng.jump_forward(JUMP_NS)
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT)])}
    cmd = [
        sys.executable, str(EXAMPLES / "mp_pool.py"), "--start-method", method,
        "--name", NAME, "--state-dir", str(state_dir), "--processes", str(PROCESSES),
        "--tasks", str(TASKS), "--per-task", str(PER_TASK), "--calls", str(CALLS),
        "--recycle", str(RECYCLE), "--kill", "--timeout", str(RUN_TIMEOUT_S),
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    top = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 2 * RUN_TIMEOUT_S + 10
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                for child in top.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.02)
        timed_out = proc.poll() is None
        if timed_out:
            proc.kill()
        output = proc.communicate()[0]
    finally:
        left = [p for p in seen.values() if _alive(p)]
        _, left = psutil.wait_procs(left, timeout=5)  # helpers exit when the parent has
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=5)
    assert not timed_out, f"mp_pool.py did not finish in time:\n{output}"
    assert proc.returncode == 0, output
    assert left == [], f"processes outlived the script: {[_cmdline(p) for p in left]}"
    lines = output.splitlines()
    assert len([ln for ln in lines if ln.startswith(method) and ln.endswith(": OK")]) == 2, output
    assert lines[-1].startswith("fresh attach:") and lines[-1].endswith("OK"), output

    data = json.loads(out.read_text())
    assert [(r["start_method"], r["pool"]) for r in data["runs"]] == [
        (method, "pool"),
        (method, "executor"),
    ]
    highest = 0
    for res in data["runs"]:
        assert res["parent_pid"] == proc.pid
        counts = check_result(res, kill=res["pool"] == "pool")
        print(f"{method} {res['pool']} (script): {counts}")
        highest = max(highest, _max_nonce(res))
    assert data["fresh"] > highest
    values = sorted(r[1] for res in data["runs"] for r in res["issued"])
    assert values[0] == jumped + 1 and values[-1] < data["fresh"] < jumped + JUMP_NS // 2
    with ShmNonce.attach(NAME, state_dir=state_dir) as eng:
        assert eng.next() > data["fresh"]
