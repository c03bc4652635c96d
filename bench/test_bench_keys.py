"""Many keys in one process: attach time per key, serialized() sections per second and
descriptors per key at 1, 10, 100 and 1,000 keys (issue 9: descriptors O(keys)).

Sections are entered round-robin over the keys by one thread, and by 8 threads each
going round-robin from its own starting key (so threads meet on keys now and then).
Floors, same run: one thread's sections/s at 1,000 keys >= 0.5 x at 1 key, and at
most 4 descriptors per key (lock file, queue file, the segment mapping's descriptor
that CPython's mmap keeps, the waiter's description).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any

import pytest

from shmnonce import ShmNonce

from .conftest import QUICK

pytestmark = pytest.mark.timeout(900)
KEYS = [1, 10, 100, 1000]
SECTIONS = 4000 if QUICK else 10_000
RESULTS: dict[int, dict[str, float]] = {}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module", autouse=True)
def _nofile() -> Any:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * sum(KEYS) + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _round_robin(engines: list[ShmNonce], n: int, start: int = 0) -> None:
    k = len(engines)
    for i in range(start, start + n):
        with engines[i % k].serialized():
            pass


def _eight_threads(engines: list[ShmNonce], n: int) -> float:
    per = n // 8
    k = len(engines)
    threads = [threading.Thread(target=_round_robin, args=(engines, per, i * k // 8))
               for i in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * 8 / (time.perf_counter() - t0)


def test_keys(tmp_path: Any) -> None:
    """Attach every set (1, 10, 100, 1,000 keys), then measure them in alternating
    rounds, so that all sets see the same machine load."""
    sets: dict[int, list[ShmNonce]] = {}
    for nkeys in KEYS:
        state_dir = os.path.join(str(tmp_path), f"s{nkeys}")
        base = _fds()
        t0 = time.perf_counter()
        engines = [ShmNonce.attach(f"k{i}", state_dir) for i in range(nkeys)]
        create_s = (time.perf_counter() - t0) / nkeys
        _round_robin(engines, nkeys)  # first issue of each key persists its ceiling
        for e in engines:
            e.close()
        t0 = time.perf_counter()
        engines = sets[nkeys] = [ShmNonce.attach(f"k{i}", state_dir) for i in range(nkeys)]
        attach_s = (time.perf_counter() - t0) / nkeys
        RESULTS[nkeys] = {"create_us": create_s * 1e6, "attach_us": attach_s * 1e6,
                          "one_thread": 0.0, "eight_threads": 0.0,
                          "fds_per_key": (_fds() - base) / nkeys}
        _round_robin(engines, nkeys)
    for _ in range(5 if QUICK else 8):
        for nkeys, engines in sets.items():
            r = RESULTS[nkeys]
            t0 = time.perf_counter()
            _round_robin(engines, SECTIONS)
            r["one_thread"] = max(r["one_thread"], SECTIONS / (time.perf_counter() - t0))
            r["eight_threads"] = max(r["eight_threads"], _eight_threads(engines, SECTIONS))
    for nkeys, engines in sets.items():
        for e in engines:
            e.unlink()
        assert RESULTS[nkeys]["fds_per_key"] <= 4, RESULTS[nkeys]
    print("\n| keys | create, us/key | attach, us/key | sections/s, 1 thread | "
          "sections/s, 8 threads | descriptors/key |\n|---:|---:|---:|---:|---:|---:|")
    for k in KEYS:
        r = RESULTS[k]
        print(f"| {k:,} | {r['create_us']:,.0f} | {r['attach_us']:,.0f} | {r['one_thread']:,.0f} | "
              f"{r['eight_threads']:,.0f} | {r['fds_per_key']:.2f} |")
    ratio = RESULTS[1000]["one_thread"] / RESULTS[1]["one_thread"]
    print(f"sections/s at 1,000 keys / at 1 key (1 thread): {ratio:.2f} (floor 0.5)")
    assert ratio >= 0.5
