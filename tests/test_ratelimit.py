"""The shared Kraken call-counter model and the start-up burst guard.

Unit tests drive the model with a fake clock over an in-memory stand-in of the
engine's segment; the multi-process tests use real engines in forked, spawned
and unrelated processes and check the merged admission times of all processes
against an independent simulation of Kraken's counter.
"""

from __future__ import annotations

import itertools
import random
import struct
import threading
import time
from typing import Any

import pytest

from shmnonce.kraken.ratelimit import (
    DEFAULT_COSTS,
    EVENTS,
    PRESETS,
    CallCounter,
    RateLimit,
    StartupBurstGuard,
    resolve_rate_limit,
)
from shmnonce.shm.segment import RECORDS, SegmentRecord
from tests.kraken_server import Workers

NS = 1_000_000_000
AREA_OFF = 256  # EXT_RATELIMIT_OFFSET
pytestmark = pytest.mark.timeout(90)


class StubEngine:
    """In-memory stand-in for an engine's records (the segment's layout and record class
    over a bytearray); records misuse of the lock."""

    def __init__(self) -> None:
        self.buf = bytearray(1024)
        self.lock = threading.Lock()
        self.created_at = time.time_ns()
        self.stats_calls = 0

    def record(self, name: str, fields: int) -> SegmentRecord:
        offset, capacity = RECORDS[name]
        view = memoryview(self.buf)[offset:offset + 8 * (capacity + 2)]
        return SegmentRecord(name, fields, capacity, view, self.lock)  # type: ignore[arg-type]

    def stats(self) -> dict[str, object]:
        assert not self.lock.locked(), "stats() called while holding the short lock"
        self.stats_calls += 1
        return {"created_at": self.created_at}


class FakeClock:
    """Monotonic and wall clocks that only move when something sleeps."""

    def __init__(self, eng: StubEngine) -> None:
        self.eng = eng
        self.mono = 10**12
        self.wall = eng.created_at
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        assert not self.eng.lock.locked(), "slept while holding the short lock"
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.mono += int(seconds * NS)
        self.wall += int(seconds * NS)


def fake_counter(limit: RateLimit | None) -> tuple[CallCounter, FakeClock, StubEngine]:
    eng = StubEngine()
    clock = FakeClock(eng)
    counter = CallCounter(eng, limit)
    counter._clock = lambda: clock.mono
    counter._sleep = clock.sleep
    return counter, clock, eng


def fake_guard(**kw: float) -> tuple[StartupBurstGuard, FakeClock, StubEngine]:
    eng = StubEngine()
    clock = FakeClock(eng)
    guard = StartupBurstGuard(eng, **kw)
    guard._clock = lambda: clock.mono
    guard._wall = lambda: clock.wall
    guard._sleep = clock.sleep
    return guard, clock, eng


def kraken_counter_violations(
    admissions: list[tuple[float, int]], max_counter: float, decay: float,
    tolerance: float = 1e-6,
) -> list[tuple[float, float]]:
    """Independent emulation of Kraken's counter: calls (time s, cost) that it would reject.

    ``tolerance`` (counter units) absorbs the jitter of timestamps taken after a sleep.
    """
    level, last, bad = 0.0, None, []
    for t, cost in sorted(admissions):
        if last is not None:
            level = max(0.0, level - decay * (t - last))
        last = t
        if level + cost > max_counter + tolerance:
            bad.append((t, level))
        else:
            level += cost
    return bad


# --------------------------------------------------------------------------- parameters


def test_presets_are_krakens_documented_tiers() -> None:
    assert (PRESETS["starter"].max_counter, PRESETS["starter"].decay_per_s) == (15, 0.33)
    assert (PRESETS["intermediate"].max_counter, PRESETS["intermediate"].decay_per_s) == (20, 0.5)
    assert (PRESETS["pro"].max_counter, PRESETS["pro"].decay_per_s) == (20, 1.0)
    assert resolve_rate_limit("pro") is PRESETS["pro"]
    assert resolve_rate_limit(None) is None
    custom = RateLimit(30, 2.0, headroom=0.5)
    assert resolve_rate_limit(custom) is custom
    with pytest.raises(ValueError, match="unknown rate limit"):
        resolve_rate_limit("gold")


def test_costs_follow_kraken_table() -> None:
    lim = PRESETS["starter"]
    for method in ("Ledgers", "QueryLedgers", "TradesHistory", "QueryTrades"):
        assert lim.cost(method) == 2
    assert lim.cost("AddOrder") == 0 and lim.cost("CancelOrder") == 0
    assert lim.cost("Balance") == 1 and lim.cost("EditOrder") == 1
    assert DEFAULT_COSTS["Ledgers"] == 2


@pytest.mark.parametrize(
    "args",
    [(0, 1.0), (10, 0.0), (10, 1.0, -1.0), (1, 1.0, 0.5), (5_000_000, 1.0)],
)
def test_invalid_rate_limits_rejected(args: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        RateLimit(*args)


# --------------------------------------------------------------------------- call counter


def test_burst_up_to_capacity_then_decay_rate() -> None:
    counter, _, _ = fake_counter(PRESETS["starter"])  # capacity 15 - 1 = 14
    waits = [counter.acquire(1) for _ in range(14)]
    assert waits == [0.0] * 14
    w15 = counter.acquire(1)
    assert w15 == pytest.approx(1 / 0.33, rel=1e-6)
    w16 = counter.acquire(1)
    assert w16 == pytest.approx(1 / 0.33, rel=1e-6)
    st = counter.stats()
    assert st["calls"] == 16 and st["waits"] == 2 and st["cost_total"] == 16
    assert st["wait_s_total"] == pytest.approx(2 / 0.33, rel=1e-6)
    assert st["counter_level"] == pytest.approx(14, abs=1e-6)


def test_cost_two_waits_twice_as_long() -> None:
    counter, _, _ = fake_counter(RateLimit(4, 1.0, headroom=0))
    assert counter.acquire(2) == 0.0 and counter.acquire(2) == 0.0
    assert counter.acquire(2) == pytest.approx(2.0)
    assert counter.acquire(1) == pytest.approx(1.0)


def test_cost_above_capacity_waits_for_empty_counter() -> None:
    counter, _, _ = fake_counter(RateLimit(2, 1.0, headroom=1))  # capacity 1
    assert counter.acquire(1) == 0.0
    assert counter.acquire(2) == pytest.approx(1.0)  # waits for level 0, not forever


def test_random_workload_never_exceeds_krakens_counter() -> None:
    """Admissions produced by the model, replayed through an exact emulation of Kraken."""
    lim = RateLimit(15, 0.33, headroom=0)
    counter, clock, _ = fake_counter(lim)
    rng = random.Random(7)
    admissions: list[tuple[float, int]] = []
    for _ in range(300):
        clock.advance(rng.choice([0.0, 0.0, 0.1, 0.5, 2.0, 7.0]))
        cost = rng.choice([1, 1, 1, 2, 0])
        counter.acquire(cost)
        admissions.append((clock.mono / NS, cost))
    assert kraken_counter_violations(admissions, lim.max_counter, lim.decay_per_s) == []
    # and the limiter is not needlessly slow: it waited, but only when it had to
    assert counter.stats()["waits"] > 0


def test_without_limit_counts_but_never_waits() -> None:
    counter, clock, _ = fake_counter(None)
    assert [counter.acquire(1) for _ in range(100)] == [0.0] * 100
    st = counter.stats()
    assert st["calls"] == 100 and st["waits"] == 0 and st["rate_limit"] is None
    assert clock.sleeps == []


def test_events_are_counted() -> None:
    counter, _, _ = fake_counter(PRESETS["pro"])
    for i, ev in enumerate(EVENTS):
        counter.count(ev, i + 1)
    st = counter.stats()
    assert [st[ev] for ev in EVENTS] == list(range(1, len(EVENTS) + 1))
    with pytest.raises(ValueError):
        counter.count("no-such-event")


def test_fresh_area_is_an_empty_counter() -> None:
    counter, _, eng = fake_counter(PRESETS["starter"])
    assert bytes(eng.buf) == bytes(1024)
    assert counter.level() == 0.0
    assert counter.acquire(1) == 0.0


def test_torn_counter_record_resets_to_full() -> None:
    """A writer killed mid-record leaves mismatched generations: assume the counter is full."""
    lim = RateLimit(10, 2.0, headroom=1)
    counter, _, eng = fake_counter(lim)
    counter.acquire(1)
    struct.pack_into("<Q", eng.buf, AREA_OFF, 999)  # front generation only: torn
    wait = counter.acquire(1)
    # full (10) + 1 must decay to capacity 9: (10 + 1 - 9) / 2 s
    assert wait == pytest.approx(1.0)
    st = counter.stats()
    assert st["area_resets"] == 1 and st["calls"] == 1  # stats restarted with the record


def test_implausible_time_resets_to_full() -> None:
    counter, clock, eng = fake_counter(RateLimit(5, 1.0, headroom=0))
    counter.acquire(1)
    struct.pack_into("<Q", eng.buf, AREA_OFF + 8, clock.mono + 10**6 * NS)  # tat far ahead
    assert counter.acquire(1) == pytest.approx(1.0)
    assert counter.stats()["area_resets"] == 1


def test_generation_brackets_written() -> None:
    counter, _, eng = fake_counter(PRESETS["pro"])
    for expected in (1, 2, 3):
        counter.acquire(1)
        front, back = struct.unpack_from("<Q", eng.buf, AREA_OFF)[0], struct.unpack_from(
            "<Q", eng.buf, AREA_OFF + 120)[0]
        assert front == back == expected


# --------------------------------------------------------------------------- burst guard


def test_burst_guard_spaces_calls_in_window() -> None:
    guard, _, eng = fake_guard()
    assert guard.in_window()
    # four callers arriving at the same instant (no sleeping between reservations)
    waits = [guard.reserve() / NS for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.5, 1.0, 1.5])
    st = guard.stats()
    assert st["acquired"] == 4 and st["waits"] == 3 and st["in_window"] is True
    assert eng.stats_calls == 1  # creation time read once, outside the lock


def test_burst_guard_queue_is_kept_past_window_then_free() -> None:
    guard, clock, _ = fake_guard(min_spacing_s=1.0, window_s=2.0)
    assert guard.acquire() == 0.0
    clock.advance(1.5)  # still inside the window
    assert guard.acquire() == pytest.approx(0.0)  # next slot was at 1.0
    clock.advance(0.1)  # t = 1.6, slot reserved at 2.5 (past the window end): kept
    assert guard.acquire() == pytest.approx(0.9)
    assert not guard.in_window()
    assert [guard.acquire() for _ in range(5)] == [0.0] * 5  # after the window: never waits
    assert guard.stats()["acquired"] == 3


def test_burst_guard_rate_cap() -> None:
    guard, _, _ = fake_guard(min_spacing_s=0.0, max_per_s=20.0)
    assert guard.spacing_s == pytest.approx(0.05)
    assert sum(guard.acquire() for _ in range(21)) == pytest.approx(1.0)


def test_burst_guard_torn_record_keeps_spacing() -> None:
    guard, _, eng = fake_guard(min_spacing_s=0.25)
    guard.acquire()
    struct.pack_into("<Q", eng.buf, AREA_OFF + 128, 77)  # torn burst record
    assert guard.acquire() == pytest.approx(0.25)


def test_burst_guard_and_counter_records_independent() -> None:
    eng = StubEngine()
    counter = CallCounter(eng, RateLimit(3, 1.0, headroom=0))
    guard = StartupBurstGuard(eng, min_spacing_s=0.0, max_per_s=0.0)
    for _ in range(3):
        counter.reserve(1)
        guard.acquire()
    assert counter.stats()["calls"] == 3 and counter.stats()["area_resets"] == 0
    assert guard.stats()["acquired"] == 3


def test_burst_guard_rejects_negative() -> None:
    with pytest.raises(ValueError):
        StartupBurstGuard(StubEngine(), min_spacing_s=-1)


# --------------------------------------------------------------------------- real engines


@pytest.fixture
def seq(state_dir: str) -> tuple[str, str]:
    """A fresh sequence (name, state_dir); conftest removes its segment afterwards."""
    return "rl-test", state_dir


def test_sleep_happens_outside_short_lock_real_engine(seq: tuple[str, str]) -> None:
    """While one thread waits for its slot, next() of the same sequence is not blocked."""
    from shmnonce import ShmNonce

    name, state_dir = seq
    with ShmNonce.attach(name, state_dir=state_dir) as eng:
        counter = CallCounter(eng, RateLimit(2, 2.0, headroom=0))
        counter.acquire()
        counter.acquire()
        t = threading.Thread(target=counter.acquire)  # waits 0.5 s
        t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        eng.next()
        assert time.monotonic() - t0 < 0.1
        t.join()


def _spec(seq: tuple[str, str], **kw: Any) -> dict[str, Any]:
    name, state_dir = seq
    return {"task": "limiter", "name": name, "state_dir": state_dir,
            "start_at": time.time() + 1.5, **kw}


def test_counter_shared_by_fork_spawn_and_unrelated(seq: tuple[str, str]) -> None:
    """Four processes of three kinds share one counter: merged admissions obey Kraken's rule.

    Per-process counters would let each process burst on its own: 4 x 3 calls
    at once, and the emulation below would report violations.
    """
    from shmnonce import ShmNonce

    limit = (3, 20.0, 0.0)  # max 3, decay 20/s, no headroom: exact
    spec = _spec(seq, kind="counter", limit=list(limit), n=10)
    with ShmNonce.attach(*seq):  # create the segment before forking
        pass
    with Workers() as w:
        w.fork(spec)
        w.fork(spec)
        w.spawn(spec)
        w.unrelated(spec)
        results = w.results(timeout=60)
    admissions = [(t / NS, 1) for r in results for t in r["times"]]
    assert len(admissions) == 40
    # Stamps are taken after each sleep, so allow 25 ms of scheduling jitter (0.5 units);
    # unshared counters would admit 12 calls at once, 9 units over.
    assert kraken_counter_violations(admissions, limit[0], limit[1], tolerance=0.5) == []
    span = max(a[0] for a in admissions) - min(a[0] for a in admissions)
    assert span >= (40 - 3) / 20.0 * 0.97
    with ShmNonce.attach(*seq) as eng:
        st = CallCounter(eng, RateLimit(*limit)).stats()
    assert st["calls"] == 40 and st["waits"] >= 36


def spaced_but_one(times: list[int], min_gap_s: float) -> bool:
    """True if the sorted ``times`` (ns) are ``min_gap_s`` apart once at most one is dropped."""
    def spaced(ts: list[int]) -> bool:
        return all((b - a) / NS >= min_gap_s for a, b in itertools.pairwise(ts))

    return spaced(times) or any(spaced(times[:i] + times[i + 1:]) for i in range(len(times)))


def test_spaced_but_one() -> None:
    s = NS // 10  # 0.1 s slots
    assert spaced_but_one([0, s, 2 * s, 3 * s], 0.07)
    assert spaced_but_one([0, s, s + s // 2, 2 * s, 3 * s], 0.07)  # one stamp late by half a slot
    assert spaced_but_one([0, 2 * s, 2 * s + 1, 3 * s], 0.07)  # slot s's stamp late by a slot
    assert not spaced_but_one([0, 1, s, s + 1, 2 * s], 0.07)  # two late stamps
    assert not spaced_but_one([0] * 4 + [s] * 4 + [2 * s] * 4, 0.07)  # an unshared guard
    assert not spaced_but_one([0] * 12, 0.07)  # no guard


def test_burst_guard_shared_by_fork_spawn_and_unrelated(seq: tuple[str, str]) -> None:
    from shmnonce import ShmNonce

    spacing = 0.1
    spec = _spec(seq, kind="burst", guard={"min_spacing_s": spacing, "window_s": 30.0}, n=3)
    with ShmNonce.attach(*seq):
        pass
    with Workers() as w:
        w.fork(spec)
        w.spawn(spec)
        w.unrelated(spec)
        w.fork(spec)
        results = w.results(timeout=60)
    times = sorted(t for r in results for t in r["times"])
    assert len(times) == 12
    # Stamps are taken after each sleep: allow 30 ms of jitter. Under load one worker
    # may be descheduled past its slot; its late stamp then falls close to the next
    # slot's, so one stamp may be dropped before checking the spacing. An unshared or
    # disabled guard puts several workers' stamps together at each slot (~0 gaps), far
    # more than one stamp can hide.
    assert spaced_but_one(times, spacing - 0.03), [(b - a) / NS for a, b in itertools.pairwise(times)]
    assert (times[-1] - times[0]) / NS >= 11 * spacing - 0.03, times
    with ShmNonce.attach(*seq) as eng:
        st = StartupBurstGuard(eng, min_spacing_s=spacing, window_s=30.0).stats()
    assert st["acquired"] == 12 and st["in_window"] is True


def test_shared_memory_records_use_the_hosts_clocks(seq: tuple[str, str]) -> None:
    from shmnonce import ShmNonce
    from shmnonce.kraken.ratelimit import record_clocks

    with ShmNonce.attach(*seq) as eng:
        assert record_clocks(eng) == (time.monotonic_ns, time.time_ns)
        assert CallCounter(eng, None)._clock is time.monotonic_ns


def test_burst_window_follows_segment_creation(seq: tuple[str, str]) -> None:
    from shmnonce import ShmNonce

    with ShmNonce.attach(*seq) as eng:
        guard = StartupBurstGuard(eng, min_spacing_s=0.2, window_s=0.3)
        assert guard.in_window()
        assert guard.acquire() == 0.0
        assert guard.acquire() == pytest.approx(0.2, abs=0.05)
        time.sleep(0.35)
        assert not guard.in_window()
        t0 = time.monotonic()
        assert guard.acquire() == 0.0
        assert time.monotonic() - t0 < 0.05
