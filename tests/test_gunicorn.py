"""examples/gunicorn_app.py under a real gunicorn master with 4 workers.

Each case (sync/gthread x preload on/off) sends 1,000 requests from 16 client
threads over loopback. While they run, a worker is SIGKILLed inside a
serialized section, workers recycle through max_requests, the test process
moves the sequence ahead of the clock with jump_forward(), and the master gets
HUP. Afterwards the returned nonces, the per-worker order, the serialized
sections, the gunicorn log and a fresh attach are checked.
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gunicorn.config  # type: ignore[import-untyped]
import psutil
import pytest

from shmnonce import ShmNonce

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NAME = "gunicorn-e2e"
WORKERS = 4
THREADS = 4
MAX_REQUESTS = 100
JITTER = 30
REQUESTS = 1000  # per case; 4,000 over the four cases
CALL_EVERY = 4  # every 4th request goes to /call
CLIENTS = 16
DEADLINE_S = 30.0
JUMP_NS = 600 * 10**9  # jump_forward by 10 minutes after the kill

RETRYABLE = (ConnectionError, http.client.IncompleteRead, http.client.BadStatusLine)


@dataclass(frozen=True)
class Issued:
    """One nonce and the monotonic interval that contains its issue."""

    pid: int
    nonce: int
    start: int
    end: int


@dataclass
class Section:
    """One /call response."""

    pid: int
    nonce: int
    t_req: int
    t_enter: int
    t_exit: int
    collision: int | None


@dataclass
class Run:
    """What one load run observed."""

    issued: list[Issued] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retries: int = 0
    victim_pid: int = 0
    victim_nonce: int = 0
    t_kill: int = 0
    t_hup_done: int = 0
    pids_before_hup: set[int] = field(default_factory=set)
    jumped_to: int = 0


class Server:
    """gunicorn started from examples/gunicorn_conf.py; every process it forks is tracked."""

    def __init__(self, tmp: Path, worker_class: str, preload: bool) -> None:
        self.state_dir = tmp / "state"
        self.obs_dir = tmp / "observer"
        self.log_path = tmp / "gunicorn.log"
        self.state_dir.mkdir(exist_ok=True)
        self.obs_dir.mkdir()
        self.worker_class = worker_class
        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port: int = listener.getsockname()[1]
        fd = listener.fileno()
        pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT)]),
            "SHMNONCE_STATE_DIR": str(self.state_dir),
            "SHMNONCE_EXAMPLE_NAME": NAME,
            "SHMNONCE_EXAMPLE_OBSERVER_DIR": str(self.obs_dir),
            "SHMNONCE_EXAMPLE_CALL_MS": "2",
            "SHMNONCE_EXAMPLE_WORKERS": str(WORKERS),
            "SHMNONCE_EXAMPLE_WORKER_CLASS": worker_class,
            "SHMNONCE_EXAMPLE_THREADS": str(THREADS),
            "SHMNONCE_EXAMPLE_PRELOAD": "1" if preload else "0",
            "SHMNONCE_EXAMPLE_MAX_REQUESTS": str(MAX_REQUESTS),
            "SHMNONCE_EXAMPLE_MAX_REQUESTS_JITTER": str(JITTER),
        }
        cmd = [
            sys.executable, "-m", "gunicorn",
            "-c", str(EXAMPLES / "gunicorn_conf.py"),
            "--chdir", str(EXAMPLES),
            "--bind", f"fd://{fd}",
            "--error-logfile", str(self.log_path),
            "--log-level", "info",
        ]  # fmt: skip
        if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS):
            cmd.append("--no-control-socket")  # gunicorn >= 24 would share ~/.gunicorn/*.ctl
        cmd.append("gunicorn_app:app")
        with listener, open(tmp / "gunicorn.out", "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=tmp, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.master = psutil.Process(self.proc.pid)
        self.seen: dict[int, psutil.Process] = {self.proc.pid: self.master}
        self._lock = threading.Lock()

    def workers(self) -> set[int]:
        """Live worker pids (children of the master); remembers every pid seen."""
        try:
            children = self.master.children(recursive=True)
        except psutil.NoSuchProcess:
            return set()
        with self._lock:
            for child in children:
                self.seen.setdefault(child.pid, child)
        return {c.pid for c in children if _alive(c)}

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(0.01)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if len(self.workers()) != WORKERS:
                return False
            try:
                get(self.port, "/peek", attempts=1, timeout=2.0)
            except (*RETRYABLE, TimeoutError):
                return False
            return True

        self.wait_for("4 workers answering", ready)

    def stop(self) -> None:
        """Graceful TERM to the master, then SIGKILL every tracked pid still alive."""
        self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with self._lock:
            left = [p for p in self.seen.values() if _alive(p)]
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(left, timeout=5)

    def leftovers(self) -> list[int]:
        with self._lock:
            return [pid for pid, p in self.seen.items() if _alive(p)]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _maps_shm(pid: int) -> bool:
    try:
        return any(m.path.startswith("/dev/shm/") for m in psutil.Process(pid).memory_maps())
    except psutil.NoSuchProcess:
        return True  # recycled meanwhile; its successor is checked on the next poll


def get(port: int, path: str, attempts: int = 6, timeout: float = DEADLINE_S) -> dict[str, Any]:
    """GET over a fresh loopback connection; retries only on connection-level failures.

    Returns the decoded JSON plus ``"_retries"``.
    """
    for attempt in range(attempts):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
        except RETRYABLE:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
            continue
        finally:
            conn.close()
        if resp.status != 200:
            raise AssertionError(f"GET {path}: HTTP {resp.status} {body[:300]!r}")
        data: dict[str, Any] = json.loads(body)
        data["_retries"] = attempt
        return data
    raise AssertionError("unreachable")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[str, bool], Server]]:
    started: list[Server] = []

    def start(worker_class: str, preload: bool) -> Server:
        server = Server(tmp_path, worker_class, preload)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        with ShmNonce.attach(NAME, state_dir=server.state_dir) as eng:
            eng.unlink()


def run_load(server: Server) -> Run:
    """Drive REQUESTS requests in three chunks with the kill and the HUP between them."""
    run = Run()
    paths = ["/call" if i % CALL_EVERY == 0 else "/nonce" for i in range(REQUESTS)]
    chunks = [paths[: REQUESTS // 3], paths[REQUESTS // 3 : 2 * REQUESTS // 3]]
    chunks.append(paths[2 * REQUESTS // 3 :])
    work: queue.Queue[str | None] = queue.Queue()
    done = [0]
    lock = threading.Lock()
    stop_tracking = threading.Event()

    def client() -> None:
        while (path := work.get()) is not None:
            try:
                data = get(server.port, path)
            except Exception as exc:
                with lock:
                    run.errors.append(f"{path}: {exc!r}")
                    done[0] += 1
                continue
            with lock:
                run.retries += data["_retries"]
                if path == "/nonce":
                    run.issued.append(Issued(data["pid"], data["nonce"], data["t0"], data["t1"]))
                else:
                    run.sections.append(Section(
                        data["pid"], data["nonce"], data["t_req"], data["t_enter"],
                        data["t_exit"], data["collision"],
                    ))  # fmt: skip
                    run.issued.append(
                        Issued(data["pid"], data["nonce"], data["t_req"], data["t_enter"])
                    )
                done[0] += 1

    def track() -> None:
        while not stop_tracking.wait(0.02):
            server.workers()

    def wait_done(n: int) -> None:
        server.wait_for(f"{n} responses", lambda: done[0] >= n)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=track, daemon=True))
    for t in threads:
        t.start()
    try:
        for p in chunks[0]:
            work.put(p)
        wait_done(len(chunks[0]) // 2)
        kill_worker_inside_section(server, run)
        for p in chunks[1]:
            work.put(p)
        wait_done(len(chunks[0]) + len(chunks[1]) // 2)
        run.pids_before_hup = server.workers()
        server.master.send_signal(signal.SIGHUP)
        server.wait_for("HUP handled", lambda: "Hang up: Master" in server.log())
        server.wait_for(
            "pre-HUP workers gone",
            lambda: not (server.workers() & run.pids_before_hup)
            and len(server.workers()) == WORKERS,
        )
        run.t_hup_done = time.monotonic_ns()
        for p in chunks[2]:
            work.put(p)
    finally:
        for _ in range(CLIENTS):
            work.put(None)
        for t in threads[:-1]:
            t.join(timeout=60)
        stop_tracking.set()
        threads[-1].join()
    assert not any(t.is_alive() for t in threads), "client threads did not finish"
    return run


def kill_worker_inside_section(server: Server, run: Run) -> None:
    """SIGKILL the worker serving a long /call while it holds serialized(); wait for respawn."""
    outcome: list[object] = []

    def victim_request() -> None:
        try:
            outcome.append(get(server.port, "/call?hold_ms=8000&tag=victim", attempts=1))
        except Exception as exc:
            outcome.append(exc)

    victim = threading.Thread(target=victim_request, daemon=True)
    victim.start()
    marker = server.obs_dir / "held"

    def victim_inside() -> bool:
        early = [p.name for p in server.obs_dir.iterdir() if p.name.startswith(("overlap", "coll"))]
        assert not early, f"serialized sections overlapped before the kill: {early}"
        try:
            return marker.read_text().endswith(" victim")
        except FileNotFoundError:
            return False

    server.wait_for("victim inside serialized()", victim_inside)
    pid_s, nonce_s, _ = marker.read_text().split()
    run.victim_pid, run.victim_nonce = int(pid_s), int(nonce_s)
    assert run.victim_pid in server.workers(), "the section holder is not a gunicorn worker"
    run.t_kill = time.monotonic_ns()
    os.kill(run.victim_pid, signal.SIGKILL)
    server.wait_for(
        "master to reap and respawn the killed worker",
        lambda: f"Worker (pid:{run.victim_pid}) was sent SIGKILL" in server.log()
        and run.victim_pid not in server.workers()
        and len(server.workers()) == WORKERS,
    )
    victim.join(timeout=DEADLINE_S)
    # From here on the sequence runs ahead of the wall clock, so every value is
    # last + 1: a lost update in any worker would show up as a duplicate.
    with ShmNonce.attach(NAME, state_dir=server.state_dir) as eng:
        run.jumped_to = eng.jump_forward(JUMP_NS)
    assert len(outcome) == 1 and isinstance(outcome[0], Exception), (
        f"the killed worker still answered: {outcome}"
    )


def check_real_time_order(issued: list[Issued]) -> int:
    """Every value issued after another value was returned is larger; returns pairs constrained."""
    by_end = sorted(issued, key=lambda r: r.end)
    ends = [r.end for r in by_end]
    prefix_max: list[int] = []
    for r in by_end:
        prefix_max.append(max(r.nonce, prefix_max[-1]) if prefix_max else r.nonce)
    constrained = 0
    bad: list[str] = []
    for r in issued:
        i = bisect.bisect_left(ends, r.start)  # by_end[:i] returned before r started
        if i:
            constrained += 1
            if prefix_max[i - 1] >= r.nonce:
                bad.append(f"{r} issued after a return of {prefix_max[i - 1]}")
    assert not bad, f"{len(bad)} values not above earlier returns, e.g. {bad[:3]}"
    return constrained


def check_run(server: Server, run: Run, fresh: int) -> dict[str, int]:
    """All assertions on one run; returns a few counts for the report."""
    assert not run.errors, run.errors[:5]
    assert len(run.issued) == REQUESTS
    nonces = [r.nonce for r in run.issued] + [run.victim_nonce]
    assert len(set(nonces)) == len(nonces), "duplicate nonces"
    assert fresh > max(nonces), "a fresh attach did not continue above every returned nonce"

    # Real-time order, globally and within each worker.
    constrained = check_real_time_order(run.issued)
    assert constrained >= len(run.issued) // 2
    per_pid: dict[int, list[Issued]] = defaultdict(list)
    for r in run.issued:
        per_pid[r.pid].append(r)
    for pid, recs in per_pid.items():
        recs.sort(key=lambda r: r.end)  # the order this worker returned them
        check_real_time_order(recs)
        if server.worker_class == "sync":  # one request at a time: a total order
            assert all(a.end < b.start for a, b in itertools.pairwise(recs)), pid
            assert [r.nonce for r in recs] == sorted({r.nonce for r in recs}), (
                f"worker {pid} returned nonces out of order"
            )

    # Serialized sections: disjoint, increasing, one legitimate stale marker.
    sections = sorted(run.sections, key=lambda s: s.t_enter)
    assert len(sections) == REQUESTS // CALL_EVERY
    assert len({s.pid for s in sections}) >= 2
    for a, b in itertools.pairwise(sections):
        assert b.t_enter > a.t_exit, f"sections overlap: {a} / {b}"
        assert b.nonce > a.nonce, f"section nonces not in entry order: {a} / {b}"
    waited = sum(1 for a, b in itertools.pairwise(sections) if b.t_req < a.t_exit)
    waited_on_victim = sum(1 for s in sections if s.t_req < run.t_kill < s.t_enter)
    assert waited + waited_on_victim >= 1, "no section ever waited: no contention was tested"
    collisions = [s for s in sections if s.collision is not None]
    assert len(collisions) == 1, f"expected one stale marker (the killed holder): {collisions}"
    assert collisions[0].collision == run.victim_pid
    assert collisions[0].t_enter > run.t_kill, "entered while the victim was still alive"
    files = sorted(p.name for p in server.obs_dir.iterdir())
    assert not [f for f in files if f.startswith("overlap-")], files
    assert len([f for f in files if f.startswith("collision-")]) == 1, files

    # Lifecycle: recycling, respawn, reload, all while serving.
    log = server.log()
    assert log.count("Autorestarting worker after current request") >= 2
    assert f"Worker (pid:{run.victim_pid}) was sent SIGKILL" in log
    assert "Hang up: Master" in log
    served: dict[int, int] = {pid: len(recs) for pid, recs in per_pid.items()}
    assert len(served) >= WORKERS + 2, served
    if server.worker_class == "sync":  # gthread counts requests from several threads loosely
        assert max(served.values()) <= MAX_REQUESTS + JITTER, served
    after_hup = {r.pid for r in run.issued if r.start > run.t_hup_done}
    assert after_hup and not after_hup & run.pids_before_hup
    assert any(r.end < run.t_kill for r in run.issued)
    after_jump = [r.nonce for r in run.issued if r.nonce > run.jumped_to]
    assert len(after_jump) >= REQUESTS // 3, "too few values issued after jump_forward"
    assert min(after_jump) == run.jumped_to + 1, "the value after the jump is not last + 1"
    assert max(nonces) < run.jumped_to + REQUESTS, "more values after the jump than requests sent"
    return {
        "pids": len(served),
        "constrained": constrained,
        "waited": waited + waited_on_victim,
        "retries": run.retries,
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_pool(
    start_server: Callable[[str, bool], Server], worker_class: str, preload: bool
) -> None:
    server = start_server(worker_class, preload)
    server.wait_ready()
    # The attached engine keeps its /dev/shm segment mapped: with preload the master
    # imported the app, without it only the workers did.
    assert _maps_shm(server.master.pid) is preload
    server.wait_for(
        "every worker to map the segment",
        lambda: all(_maps_shm(pid) for pid in server.workers()),
    )
    run = run_load(server)
    with ShmNonce.attach(NAME, state_dir=server.state_dir) as eng:
        live = eng.next()
    server.stop()
    assert server.proc.returncode == 0, server.log()[-4000:]
    assert server.leftovers() == []
    assert len(server.seen) >= WORKERS + 2
    with ShmNonce.attach(NAME, state_dir=server.state_dir) as eng:
        fresh = eng.next()
    assert fresh > live
    counts = check_run(server, run, live)
    print(f"{worker_class} preload={preload}: {counts}")
