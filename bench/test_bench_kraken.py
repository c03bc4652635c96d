"""Throughput of serialized Kraken private calls against the local test server (issue 3).

With server latency L, one key driven by 4 processes must reach >= 0.9 / L
calls per second (the serialized ideal is 1 / L), and two keys together
>= 1.7 x one key. A baseline holds one global lock around every call of every
key (what single-lock managers do), which caps two keys at about 1 / L; another
is plain krakenex in one process, one call after the other (the round-trip
ceiling for one key, without any lock).
The rate limiter is off here (Kraken's real limits are far below 1 / L); the
call counter is still updated on every call. Quick mode (SHMNONCE_BENCH_QUICK=1)
makes fewer calls and asserts the same floors.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmnonce import ShmNonce
from tests.kraken_server import ServerProcess, Workers, totals

from .conftest import QUICK

LATENCIES = (0.05,) if QUICK else (0.05, 0.1)
CALLS = 10 if QUICK else 25  # per process
ROUNDS = 1 if QUICK else 3
PROCS = 4
START_DELAY = 1.0  # seconds for forked workers to build their clients before the start
RESULTS: dict[str, dict[str, float]] = {}
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: Any) -> Iterator[str]:
    """One state directory for the module; every sequence in it is unlinked afterwards."""
    path = str(tmp_path_factory.mktemp("kraken-bench"))
    yield path
    for entry in os.listdir(path):
        if entry.endswith(".lock"):
            with contextlib.suppress(Exception):
                ShmNonce.attach(entry[: -len(".lock")], path).unlink()


def _round(srv: ServerProcess, state_dir: str, latency: float, keys: int,
           global_lock: bool, procs: int = PROCS, client: str = "shmnonce") -> float:
    """One measured round: ``procs`` forked workers, calls spread over ``keys`` keys.

    Throughput is calls / (last finish - common start), from the workers' clocks.
    """
    srv.configure(latency_s=latency)
    creds = [srv.register(f"k{i}") for i in range(keys)]
    calls = CALLS * PROCS // procs
    start_at = time.time() + START_DELAY
    with Workers() as w:
        for p in range(procs):
            spec = {"url": srv.url, "creds": [creds[p % keys]], "state_dir": state_dir,
                    "client": client, "options": {"rate_limit": None}, "calls": calls,
                    "start_at": start_at}
            if global_lock:
                spec["global_lock"] = "bench-global-lock"
            w.fork(spec)
        out = totals(w.results(timeout=300))
    assert out["ok"] == procs * calls and not out["errors"] and not out["exceptions"], out
    return float(out["ok"] / (out["t1"] - start_at))


def _measure(benchmark: Any, srv: ServerProcess, state_dir: str, latency: float,
             keys: int, global_lock: bool = False, procs: int = PROCS,
             client: str = "shmnonce") -> float:
    best = 0.0

    def run() -> None:
        nonlocal best
        best = max(best, _round(srv, state_dir, latency, keys, global_lock, procs, client))

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info.update({"latency_s": latency, "calls_per_s": round(best, 2),
                                 "ideal_1_over_L": round(1 / latency, 2)})
    return best


@pytest.mark.parametrize("latency", LATENCIES)
def test_baseline_plain_krakenex_one_process(benchmark: Any, server: ServerProcess,
                                             state_dir: str, latency: float) -> None:
    """One process, plain krakenex, one call after the other: the HTTP round-trip ceiling."""
    tput = _measure(benchmark, server, state_dir, latency, keys=1, procs=1, client="plain")
    RESULTS.setdefault(str(latency), {})["plain_1p"] = tput


@pytest.mark.parametrize("latency", LATENCIES)
def test_one_key_four_processes(benchmark: Any, server: ServerProcess, state_dir: str,
                                latency: float) -> None:
    tput = _measure(benchmark, server, state_dir, latency, keys=1)
    RESULTS.setdefault(str(latency), {})["one_key"] = tput
    assert tput >= 0.9 / latency, f"{tput:.1f}/s < 0.9 / L = {0.9 / latency:.1f}/s"


@pytest.mark.parametrize("latency", LATENCIES)
def test_two_keys_four_processes(benchmark: Any, server: ServerProcess, state_dir: str,
                                 latency: float) -> None:
    tput = _measure(benchmark, server, state_dir, latency, keys=2)
    RESULTS.setdefault(str(latency), {})["two_keys"] = tput
    one = RESULTS[str(latency)].get("one_key")
    if one is None:
        pytest.skip("needs test_one_key_four_processes in the same run")
    assert tput >= 1.7 * one, f"two keys {tput:.1f}/s < 1.7 x one key {one:.1f}/s"


@pytest.mark.parametrize("latency", LATENCIES)
def test_baseline_global_lock_two_keys(benchmark: Any, server: ServerProcess,
                                       state_dir: str, latency: float) -> None:
    tput = _measure(benchmark, server, state_dir, latency, keys=2, global_lock=True)
    RESULTS.setdefault(str(latency), {})["global_lock"] = tput
    assert tput <= 1.1 / latency  # one call at a time across both keys


class _Client:
    key = "bench-guard-overhead-key"


def test_guard_overhead_per_call(benchmark: Any, state_dir: str) -> None:
    """The guard's own cost per private call, without HTTP, against bare serialized().

    ``guard.call`` with a no-op request does everything a real call does around the
    request (the key's section, a call-counter reservation in the shared record, the
    policy, a context variable for the nonce). Baseline in the same run: entering and
    leaving ``serialized()`` alone. Floor: the guard adds < 0.5 ms per call, 1% of the
    50 ms round trip of the throughput rows.
    """
    import timeit

    from shmnonce.kraken import KrakenGuard, RateLimit

    client = _Client()
    # a limit that is updated on every call but never waits in this loop
    guard = KrakenGuard(client, state_dir=state_dir, rate_limit=RateLimit(3_000_000, 3_000.0))
    eng = guard.engine
    ok = {"error": []}

    def call() -> None:
        guard.call("Balance", lambda: ok, lambda r: [], lambda e: None)

    def bare() -> None:
        with eng.serialized():
            pass

    n = 500 if QUICK else 2000
    try:
        benchmark.pedantic(call, rounds=5, iterations=n, warmup_rounds=1)
        guard_s = benchmark.stats.stats.min
        bare_s = min(timeit.repeat(bare, number=n, repeat=5)) / n
    finally:
        guard.close()
    benchmark.extra_info.update({"guard_call_us": round(guard_s * 1e6, 1),
                                 "bare_serialized_us": round(bare_s * 1e6, 1),
                                 "ratio": round(guard_s / bare_s, 2)})
    print(f"\nguard.call {guard_s * 1e6:.1f} us, serialized() {bare_s * 1e6:.1f} us, "
          f"ratio {guard_s / bare_s:.2f}")
    assert guard_s - bare_s < 0.5e-3


def test_async_guard_overhead_per_call(benchmark: Any, state_dir: str) -> None:
    """``guard.acall`` with a no-op request against bare ``aserialized()``, same run and loop.

    Floor: the guard adds < 0.5 ms per call (as for the sync driver).
    """
    import asyncio

    from shmnonce.kraken import KrakenGuard, RateLimit

    client = _Client()
    guard = KrakenGuard(client, state_dir=state_dir, rate_limit=RateLimit(3_000_000, 3_000.0))
    eng = guard.engine
    ok = {"error": []}
    n = 500 if QUICK else 2000

    async def send() -> Any:
        return ok

    async def no_errors(result: Any) -> list[str]:
        return []

    async def calls() -> None:
        for _ in range(n):
            await guard.acall("Balance", send, no_errors, lambda e: None)

    async def bare() -> None:
        for _ in range(n):
            async with eng.aserialized():
                pass

    async def best_of(fn: Any, rounds: int = 5) -> float:
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            await fn()
            best = min(best, (time.perf_counter() - t) / n)
        return best

    async def both() -> tuple[float, float]:
        return await best_of(calls), await best_of(bare)

    try:
        guard_s, bare_s = benchmark.pedantic(lambda: asyncio.run(both()), rounds=1, iterations=1)
    finally:
        guard.close()
    benchmark.extra_info.update({"acall_us": round(guard_s * 1e6, 1),
                                 "bare_aserialized_us": round(bare_s * 1e6, 1),
                                 "ratio": round(guard_s / bare_s, 2)})
    print(f"\nguard.acall {guard_s * 1e6:.1f} us, aserialized() {bare_s * 1e6:.1f} us, "
          f"ratio {guard_s / bare_s:.2f}")
    assert guard_s - bare_s < 0.5e-3


def test_kraken_table() -> None:
    """Prints the README table from this run's figures."""
    if not RESULTS:
        pytest.skip("no measurements in this run")
    print("\n| L | ideal 1/L | plain krakenex, 1 process | 1 key, 4 procs "
          "| 2 keys, 4 procs | 2 keys, one global lock |")
    print("|---:|---:|---:|---:|---:|---:|")
    for lat, r in RESULTS.items():
        latency = float(lat)
        cells = [f"{r[k]:.1f}/s ({r[k] * latency:.2f}/L)" if k in r else "-"
                 for k in ("plain_1p", "one_key", "two_keys", "global_lock")]
        print(f"| {latency * 1000:.0f} ms | {1 / latency:.1f}/s | " + " | ".join(cells) + " |")
