"""Throughput of ccxt private calls on one key through shmnonce.ccxt, against 1/L (issue 11).

With server latency L, serialized calls of one key can reach at most 1/L per second.
Pools of ccxt processes on one key must reach >= 0.9/L: sync (4 processes), async (one
process, 20 tasks) and mixed (3 sync processes + 1 async process with 20 tasks).
Same run, same server: plain ccxt in one process, one call after the other (the HTTP
round-trip ceiling without any lock), and the krakenex adapter's 4-process pool (the
figure of bench/test_bench_kraken.py). ccxt's throttle and shmnonce's rate model are
off (Kraken's real limits are far below 1/L); the call counter is still updated on
every call. Quick mode (SHMNONCE_BENCH_QUICK=1) makes fewer calls and asserts the
same floor.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmnonce import ShmNonce
from tests._ccxt_workers import Pool, release
from tests._ccxt_workers import totals as ccxt_totals
from tests.kraken_server import ServerProcess, Workers
from tests.kraken_server import totals as kraken_totals

from .conftest import QUICK

LATENCIES = (0.05,) if QUICK else (0.05, 0.1)
CALLS = 40 if QUICK else 100  # per pool and round
ROUNDS = 1 if QUICK else 3
FLOOR = 0.9  # x 1/L
RESULTS: dict[str, dict[str, float]] = {}
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: Any) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("ccxt-bench"))
    yield path
    for entry in os.listdir(path):
        if entry.endswith(".lock"):
            with contextlib.suppress(Exception):
                ShmNonce.attach(entry[: -len(".lock")], path).unlink()


def _ccxt_round(srv: ServerProcess, state_dir: str, latency: float, sync_procs: int,
                async_tasks: int, install: bool = True) -> float:
    """One round: ``sync_procs`` forked sync processes and, if ``async_tasks``, one async
    process with that many tasks; CALLS calls in all, on one key. Returns calls/s."""
    srv.configure(latency_s=latency)
    creds = list(srv.register("k"))
    barrier = tempfile.mkdtemp(dir=state_dir)
    workers = sync_procs + (1 if async_tasks else 0)
    per_worker = CALLS // workers
    base = {"exchange": "kraken", "url": srv.url, "creds": creds, "state_dir": state_dir,
            "install": install, "options": {"rate_limit": None}, "barrier": barrier}
    with Pool() as pool:
        for _ in range(sync_procs):
            pool.fork({**base, "calls": per_worker})
        if async_tasks:
            pool.fork({**base, "mode": "async", "tasks": async_tasks,
                       "calls": max(1, per_worker // async_tasks)})
        release(barrier, workers)
        results = pool.results(timeout=300)
    out = ccxt_totals(results)
    expected = sync_procs * per_worker + (async_tasks * max(1, per_worker // async_tasks)
                                          if async_tasks else 0)
    assert out["ok"] == expected and not out["exceptions"], out
    ks = srv.stats()["keys"]["k"]
    assert ks["invalid_nonce"] == 0 and ks["max_inflight"] == 1
    return float(out["ok"] / (out["t1"] - out["t0"]))


def _krakenex_round(srv: ServerProcess, state_dir: str, latency: float) -> float:
    """bench/test_bench_kraken.py's one-key row: 4 forked krakenex processes."""
    srv.configure(latency_s=latency)
    creds = [srv.register("kx")]
    start_at = time.time() + 1.0
    with Workers() as w:
        for _ in range(4):
            w.fork({"url": srv.url, "creds": creds, "state_dir": state_dir,
                    "client": "shmnonce", "options": {"rate_limit": None},
                    "calls": CALLS // 4, "start_at": start_at})
        out = kraken_totals(w.results(timeout=300))
    assert out["ok"] == CALLS // 4 * 4 and not out["errors"] and not out["exceptions"], out
    return float(out["ok"] / (out["t1"] - start_at))


def _measure(benchmark: Any, latency: float, row: str, fn: Any) -> float:
    best = 0.0

    def run() -> None:
        nonlocal best
        best = max(best, fn())

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info.update({"latency_s": latency, "calls_per_s": round(best, 2),
                                 "ideal_1_over_L": round(1 / latency, 2)})
    RESULTS.setdefault(str(latency), {})[row] = best
    return best


@pytest.mark.parametrize("latency", LATENCIES)
def test_baseline_plain_ccxt_one_process(benchmark: Any, server: ServerProcess,
                                         state_dir: str, latency: float) -> None:
    """Plain ccxt, one process, one call after the other: the round-trip ceiling."""
    _measure(benchmark, latency, "plain_1p",
             lambda: _ccxt_round(server, state_dir, latency, 1, 0, install=False))


@pytest.mark.parametrize("latency", LATENCIES)
def test_baseline_krakenex_four_processes(benchmark: Any, server: ServerProcess,
                                          state_dir: str, latency: float) -> None:
    _measure(benchmark, latency, "krakenex_4p",
             lambda: _krakenex_round(server, state_dir, latency))


@pytest.mark.parametrize("latency", LATENCIES)
def test_ccxt_sync_four_processes(benchmark: Any, server: ServerProcess, state_dir: str,
                                  latency: float) -> None:
    tput = _measure(benchmark, latency, "sync_4p",
                    lambda: _ccxt_round(server, state_dir, latency, 4, 0))
    assert tput >= FLOOR / latency, f"{tput:.1f}/s < {FLOOR} / L = {FLOOR / latency:.1f}/s"


@pytest.mark.parametrize("latency", LATENCIES)
def test_ccxt_async_one_process(benchmark: Any, server: ServerProcess, state_dir: str,
                                latency: float) -> None:
    tput = _measure(benchmark, latency, "async_20t",
                    lambda: _ccxt_round(server, state_dir, latency, 0, 20))
    assert tput >= FLOOR / latency, f"{tput:.1f}/s < {FLOOR} / L = {FLOOR / latency:.1f}/s"


@pytest.mark.parametrize("latency", LATENCIES)
def test_ccxt_mixed_sync_and_async(benchmark: Any, server: ServerProcess, state_dir: str,
                                   latency: float) -> None:
    tput = _measure(benchmark, latency, "mixed",
                    lambda: _ccxt_round(server, state_dir, latency, 3, 20))
    assert tput >= FLOOR / latency, f"{tput:.1f}/s < {FLOOR} / L = {FLOOR / latency:.1f}/s"


def test_ccxt_table() -> None:
    """Prints the docs/ccxt.md table from this run's figures."""
    if not RESULTS:
        pytest.skip("no measurements in this run")
    cols = (("plain_1p", "plain ccxt, 1 process"), ("sync_4p", "ccxt sync, 4 procs"),
            ("async_20t", "ccxt async, 1 proc x 20 tasks"),
            ("mixed", "ccxt 3 sync + 1 async (20 tasks)"), ("krakenex_4p", "krakenex, 4 procs"))
    print("\n| L | ideal 1/L | " + " | ".join(c[1] for c in cols) + " |")
    print("|---:|---:|" + "---:|" * len(cols))
    for lat, r in RESULTS.items():
        latency = float(lat)
        cells = [f"{r[k]:.1f}/s ({r[k] * latency:.2f}/L)" if k in r else "-" for k, _ in cols]
        print(f"| {latency * 1000:.0f} ms | {1 / latency:.1f}/s | " + " | ".join(cells) + " |")
