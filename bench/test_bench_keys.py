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
SECTIONS = 4000 if QUICK else 20_000
RESULTS: dict[int, dict[str, float]] = {}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module", autouse=True)
def _nofile() -> Any:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * max(KEYS) + 200
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


@pytest.mark.parametrize("nkeys", KEYS)
def test_keys(tmp_path: Any, nkeys: int) -> None:
    state_dir = str(tmp_path)
    base = _fds()
    t0 = time.perf_counter()
    engines = [ShmNonce.attach(f"k{i}", state_dir) for i in range(nkeys)]
    create_s = (time.perf_counter() - t0) / nkeys
    _round_robin(engines, nkeys)  # first issue of each key persists its ceiling
    for e in engines:
        e.close()
    t0 = time.perf_counter()
    engines = [ShmNonce.attach(f"k{i}", state_dir) for i in range(nkeys)]
    attach_s = (time.perf_counter() - t0) / nkeys
    _round_robin(engines, nkeys)
    best1 = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        _round_robin(engines, SECTIONS)
        best1 = max(best1, SECTIONS / (time.perf_counter() - t0))
    per = SECTIONS // 8
    threads = [threading.Thread(target=_round_robin, args=(engines, per, i * nkeys // 8))
               for i in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    best8 = per * 8 / (time.perf_counter() - t0)
    fds_per_key = (_fds() - base) / nkeys
    RESULTS[nkeys] = {"create_us": create_s * 1e6, "attach_us": attach_s * 1e6,
                      "one_thread": best1, "eight_threads": best8, "fds_per_key": fds_per_key}
    for e in engines:
        e.unlink()
    assert fds_per_key <= 4, fds_per_key


def test_keys_table_and_floor() -> None:
    missing = [k for k in KEYS if k not in RESULTS]
    assert not missing, f"run the whole module; missing {missing}"
    print("\n| keys | create, us/key | attach, us/key | sections/s, 1 thread | "
          "sections/s, 8 threads | descriptors/key |\n|---:|---:|---:|---:|---:|---:|")
    for k in KEYS:
        r = RESULTS[k]
        print(f"| {k:,} | {r['create_us']:,.0f} | {r['attach_us']:,.0f} | {r['one_thread']:,.0f} | "
              f"{r['eight_threads']:,.0f} | {r['fds_per_key']:.2f} |")
    ratio = RESULTS[1000]["one_thread"] / RESULTS[1]["one_thread"]
    print(f"sections/s at 1,000 keys / at 1 key: {ratio:.2f} (floor 0.5)")
    assert ratio >= 0.5
