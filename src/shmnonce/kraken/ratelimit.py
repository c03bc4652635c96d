"""Kraken's REST call counter and a start-up burst guard, shared by every process.

Both are named shared records of the sequence's engine (``engine.record()``), so
all processes using a sequence (for Kraken: one sequence per API key) see one
counter instead of each guessing alone. Fields (u64):

* ``kraken.counter`` (14): ``tat_ns, calls, cost, waits, wait_ns, max_wait_ns,
  <6 event counters>, resets, config``;
* ``kraken.burst`` (14): ``created_at_ns, next_slot_ns, acquired, waits,
  wait_ns, max_wait_ns, <8 spare>``.

A torn record (a writer was killed half-way; the engine detects it) is reset,
the counter conservatively to "full"; a record never written is all zeros, an
empty counter. Every user of a record must read the same clock (see
:func:`record_clocks`): on one host ``time.monotonic_ns()`` (CLOCK_MONOTONIC, the
same for all processes; the shared-memory records are reset with the segment at
reboot), on an engine whose users span hosts the engine's ``server_time_ns()``.

The counter is kept as a "theoretical empty time" (GCRA): the level at time t is
``max(0, tat - t) * decay``. A call of cost c moves ``tat`` to
``max(tat, now) + c / decay`` and may start once the level is at most
``max_counter - headroom``. ``reserve()`` takes the slot in one atomic update
and returns how long to wait; the caller sleeps (``time.sleep`` or
``asyncio.sleep``) with no lock held.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import cast

__all__ = [
    "BURST_RECORD",
    "COUNTER_RECORD",
    "DEFAULT_COSTS",
    "EVENTS",
    "PRESETS",
    "CallCounter",
    "RateLimit",
    "StartupBurstGuard",
    "resolve_rate_limit",
]

from .._protocol import NonceEngine

_NS = 1_000_000_000
_U64 = (1 << 64) - 1

COUNTER_RECORD = "kraken.counter"
"""Name of the shared record of the call counter (see ``NonceEngine.record``)."""
BURST_RECORD = "kraken.burst"
"""Name of the shared record of the start-up burst guard."""
_FIELDS = 14  # u64 fields of each record

# Event counters kept in the call-counter record (indices into the body).
EVENTS: tuple[str, ...] = (
    "rate_limit_errors",
    "lockouts",
    "invalid_nonce",
    "retries",
    "invalid_nonce_raised",
    "transport_errors",
)
_C_TAT, _C_CALLS, _C_COST, _C_WAITS, _C_WAIT_NS, _C_MAX_WAIT = range(6)
_C_EVENT0 = 6
_C_RESETS = _C_EVENT0 + len(EVENTS)  # 12
_C_CONFIG = _C_RESETS + 1  # 13: max_counter*1000 (high 32 bits) | decay*1e6 (low 32 bits)

_B_CREATED, _B_NEXT, _B_ACQUIRED, _B_WAITS, _B_WAIT_NS, _B_MAX_WAIT = range(6)

# Longest plausible distance of a stored time from now; beyond it the record is garbage.
_SANE_NS = 86_400 * _NS

DEFAULT_COSTS: Mapping[str, int] = MappingProxyType(
    {
        "Ledgers": 2,
        "QueryLedgers": 2,
        "TradesHistory": 2,
        "QueryTrades": 2,
        "AddOrder": 0,
        "CancelOrder": 0,
    }
)
"""Call-counter cost per private method; every method not listed costs 1.

From Kraken's "Spot REST rate limits": ledger and trade history calls cost 2,
AddOrder and CancelOrder are on the separate trading-engine limiter. Other order
methods (AddOrderBatch, EditOrder, CancelAll, ...) are charged 1: charging a call
Kraken does not count only costs a little waiting, the reverse costs errors.
"""


@dataclass(frozen=True)
class RateLimit:
    """Parameters of Kraken's REST call counter for one API key.

    ``max_counter`` and ``decay_per_s`` are Kraken's values for the account tier.
    ``headroom`` counter units are kept free: Kraken decays the counter in steps
    "every couple of seconds" and requests arrive with network jitter, so
    running exactly at the maximum would be rejected now and then.
    """

    max_counter: float
    decay_per_s: float
    headroom: float = 1.0
    name: str = "custom"
    costs: Mapping[str, int] = field(default_factory=lambda: DEFAULT_COSTS, hash=False)

    def __post_init__(self) -> None:
        if not (self.max_counter > 0 and self.decay_per_s > 0 and self.headroom >= 0):
            raise ValueError("RateLimit needs max_counter > 0, decay_per_s > 0, headroom >= 0")
        if self.max_counter - self.headroom < 1:
            raise ValueError("RateLimit: max_counter - headroom must leave room for one call")
        if self.max_counter >= 4_000_000 or self.decay_per_s >= 4_000:
            raise ValueError("RateLimit: max_counter or decay_per_s out of range")
        if any(not isinstance(c, int) or c < 0 for c in self.costs.values()):
            raise ValueError("RateLimit: costs must be non-negative ints")

    def cost(self, method: str) -> int:
        """Counter cost of a private method (1 unless listed in ``costs``)."""
        return self.costs.get(method, 1)

    @property
    def capacity(self) -> float:
        """Counter level the limiter lets calls reach: ``max_counter - headroom``."""
        return self.max_counter - self.headroom

    def with_headroom(self, headroom: float) -> RateLimit:
        """The same limit with another headroom."""
        return RateLimit(self.max_counter, self.decay_per_s, headroom, self.name, self.costs)


PRESETS: Mapping[str, RateLimit] = MappingProxyType(
    {
        "starter": RateLimit(15, 0.33, name="starter"),
        "intermediate": RateLimit(20, 0.5, name="intermediate"),
        "pro": RateLimit(20, 1.0, name="pro"),
    }
)
"""Kraken's documented verification tiers (max counter, decay per second)."""


def resolve_rate_limit(value: str | RateLimit | None) -> RateLimit | None:
    """Accept a preset name, a RateLimit, or None (no limiting)."""
    if value is None or isinstance(value, RateLimit):
        return value
    if isinstance(value, str) and value in PRESETS:
        return PRESETS[value]
    raise ValueError(f"unknown rate limit {value!r}: use one of {sorted(PRESETS)}, "
                     "a RateLimit(...) or None")


# --------------------------------------------------------------------------- records


def record_clocks(engine: NonceEngine) -> tuple[Callable[[], int], Callable[[], int]]:
    """(interval clock, wall clock) in ns for the records of ``engine``'s sequence.

    The stored times are compared with the clock of whoever reads them next, so all
    users must read one clock. Processes of one host share CLOCK_MONOTONIC and the
    wall clock. The monotonic clocks of two hosts are unrelated (each counts from its
    own boot), so an engine whose users span hosts offers ``server_time_ns()`` (the
    Redis engine: the server's ``TIME``), used for both.
    """
    server = getattr(engine, "server_time_ns", None)
    if callable(server):
        clock = cast(Callable[[], int], server)
        return clock, clock
    return time.monotonic_ns, time.time_ns


def _clamped(body: list[int]) -> list[int]:
    """The fields clamped to the u64 range a record holds."""
    return [min(max(int(v), 0), _U64) for v in body]


# --------------------------------------------------------------------------- call counter


class CallCounter:
    """Kraken's per-key REST call counter, shared by every user of the key's sequence.

    ``reserve(cost)`` takes the next slot at which the counter stays within
    ``limit.capacity`` and returns the nanoseconds to wait for it; ``acquire(cost)``
    also sleeps that long (no lock held). With ``limit=None`` nothing waits, but
    calls and events are still counted.
    """

    def __init__(self, engine: NonceEngine, limit: RateLimit | None) -> None:
        self.limit = limit
        self._record = engine.record(COUNTER_RECORD, _FIELDS)
        self._clock: Callable[[], int] = record_clocks(engine)[0]
        self._sleep: Callable[[float], None] = time.sleep

    def _load(self, body: list[int] | None, now: int) -> list[int]:
        """The counter fields; a torn or implausible record is reset to a full counter."""
        if body is not None and (body[_C_TAT] == 0 or abs(body[_C_TAT] - now) < _SANE_NS):
            return list(body)  # tat == 0: never written (fresh segment), an empty counter
        resets = body[_C_RESETS] + 1 if body is not None else 1
        body = [0] * _FIELDS
        body[_C_RESETS] = resets
        body[_C_TAT] = now
        if self.limit is not None:
            body[_C_TAT] += int(self.limit.max_counter / self.limit.decay_per_s * _NS)
        return body

    def _config_word(self) -> int:
        if self.limit is None:
            return 0
        return (int(self.limit.max_counter * 1000) << 32) | int(self.limit.decay_per_s * 1e6)

    def _snapshot(self) -> tuple[list[int], int]:
        """(fields, now) read without writing; a torn record reads as reset."""
        stored = self._record.read()
        now = self._clock()
        return self._load(stored, now), now

    def reserve(self, cost: int) -> int:
        """Reserve a slot for a call of ``cost``; return the nanoseconds to wait before it."""
        if cost < 0:
            raise ValueError("cost must be >= 0")
        limit = self.limit
        config = self._config_word()

        def take(stored: list[int] | None) -> tuple[list[int], int]:
            now = self._clock()
            body = self._load(stored, now)
            wait_ns = 0
            if limit is not None:
                cost_ns = int(cost / limit.decay_per_s * _NS)
                ahead_ns = int(limit.capacity / limit.decay_per_s * _NS)
                new_tat = max(body[_C_TAT], now) + cost_ns
                # A call dearer than the capacity waits for an empty counter.
                wait_ns = max(0, new_tat - now - max(ahead_ns, cost_ns))
                body[_C_TAT] = new_tat
                body[_C_CONFIG] = config
            body[_C_CALLS] += 1
            body[_C_COST] += cost
            if wait_ns:
                body[_C_WAITS] += 1
                body[_C_WAIT_NS] += wait_ns
                body[_C_MAX_WAIT] = max(body[_C_MAX_WAIT], wait_ns)
            return _clamped(body), wait_ns

        return self._record.update(take)

    def acquire(self, cost: int = 1) -> float:
        """Reserve a slot, then sleep until it (no lock held). Returns seconds waited."""
        wait_ns = self.reserve(cost)
        if wait_ns:
            self._sleep(wait_ns / _NS)
        return wait_ns / _NS

    def count(self, event: str, n: int = 1) -> None:
        """Add ``n`` to one of the shared ``EVENTS`` counters."""
        idx = _C_EVENT0 + EVENTS.index(event)

        def add(stored: list[int] | None) -> tuple[list[int], None]:
            body = self._load(stored, self._clock())
            body[idx] += n
            return _clamped(body), None

        self._record.update(add)

    def level(self) -> float:
        """The modelled counter level now (0.0 when no limit is set)."""
        body, now = self._snapshot()
        if self.limit is None:
            return 0.0
        return max(0, body[_C_TAT] - now) / _NS * self.limit.decay_per_s

    def stats(self) -> dict[str, object]:
        """Shared counts of this key's calls, waits and Kraken errors (all processes)."""
        body, now = self._snapshot()
        lim = self.limit
        level = 0.0 if lim is None else max(0, body[_C_TAT] - now) / _NS * lim.decay_per_s
        out: dict[str, object] = {
            "rate_limit": None if lim is None else lim.name,
            "rate_limit_max": None if lim is None else lim.max_counter,
            "rate_limit_decay_per_s": None if lim is None else lim.decay_per_s,
            "rate_limit_headroom": None if lim is None else lim.headroom,
            "counter_level": round(level, 6),
            "calls": body[_C_CALLS],
            "cost_total": body[_C_COST],
            "waits": body[_C_WAITS],
            "wait_s_total": body[_C_WAIT_NS] / _NS,
            "max_wait_s": body[_C_MAX_WAIT] / _NS,
            "area_resets": body[_C_RESETS],
        }
        for i, name in enumerate(EVENTS):
            out[name] = body[_C_EVENT0 + i]
        return out


# --------------------------------------------------------------------------- burst guard


class StartupBurstGuard:
    """Spaces calls during the first seconds after the sequence's segment was created.

    When many workers start at once (a pool boots, a host reboots) they all make
    their first private call together. During ``window_s`` seconds after the
    segment's creation, calls across all processes are spaced at least
    ``max(min_spacing_s, 1 / max_per_s)`` apart (``max_per_s=0``: no rate cap).
    A call that asks during the window keeps its place even if its slot falls
    after the window; calls that ask after the window never wait.
    """

    def __init__(
        self,
        engine: NonceEngine,
        min_spacing_s: float = 0.5,
        window_s: float = 10.0,
        max_per_s: float = 20.0,
    ) -> None:
        if min_spacing_s < 0 or window_s < 0 or max_per_s < 0:
            raise ValueError("StartupBurstGuard parameters must be >= 0")
        self.engine = engine
        self.min_spacing_s = float(min_spacing_s)
        self.window_s = float(window_s)
        self.max_per_s = float(max_per_s)
        self.spacing_s = max(self.min_spacing_s, 1.0 / self.max_per_s if self.max_per_s else 0.0)
        self._spacing_ns = int(self.spacing_s * _NS)
        self._window_ns = int(self.window_s * _NS)
        self._record = engine.record(BURST_RECORD, _FIELDS)
        self._created: int | None = None
        self._clock, self._wall = record_clocks(engine)
        self._sleep: Callable[[float], None] = time.sleep

    def _created_at(self) -> int:
        """Sequence creation time (wall ns) from the engine's stats, read once per guard.

        Read with no lock held (``stats()`` takes the engine's lock); the value is
        fixed for the life of the attached sequence.
        """
        if self._created is None:
            value = self.engine.stats()["created_at"]
            if not isinstance(value, int):
                raise TypeError("engine stats()['created_at'] must be an int (ns)")
            self._created = value
        return self._created

    def _update(self, reserve: bool) -> tuple[list[int], int]:
        """Read (and with ``reserve``, take a slot in) the burst record; return (body, wait_ns).

        A fresh or torn record is initialised from the sequence's creation time,
        which is read before the update.
        """
        if not reserve:
            stored = self._record.read()
            if stored is not None and stored[_B_CREATED] != 0:
                return stored, 0  # nothing to initialise: no write
        created_at = self._created_at()

        def take(stored: list[int] | None) -> tuple[list[int], tuple[list[int], int]]:
            if stored is not None and stored[_B_CREATED] != 0:
                body = list(stored)
            else:
                body = [0] * _FIELDS
                body[_B_CREATED] = created_at
                if stored is None:  # torn by a killed writer: space from now on
                    body[_B_NEXT] = self._clock() + self._spacing_ns
            wait_ns = 0
            now = self._clock()
            if reserve and self._wall() < body[_B_CREATED] + self._window_ns:
                slot = max(now, body[_B_NEXT])
                wait_ns = slot - now
                body[_B_NEXT] = slot + self._spacing_ns
                body[_B_ACQUIRED] += 1
                if wait_ns:
                    body[_B_WAITS] += 1
                    body[_B_WAIT_NS] += wait_ns
                    body[_B_MAX_WAIT] = max(body[_B_MAX_WAIT], wait_ns)
            body = _clamped(body)
            return body, (body, wait_ns)

        return self._record.update(take)

    def reserve(self) -> int:
        """Take this call's slot if inside the start-up window; return the nanoseconds to wait."""
        return self._update(reserve=True)[1]

    def acquire(self) -> float:
        """Wait for this call's slot if inside the start-up window; return seconds waited."""
        wait_ns = self.reserve()
        if wait_ns:
            self._sleep(wait_ns / _NS)
        return wait_ns / _NS

    def in_window(self) -> bool:
        """True while the start-up window of the sequence's segment is open."""
        return self._wall() < self._update(reserve=False)[0][_B_CREATED] + self._window_ns

    def stats(self) -> dict[str, object]:
        """Shared counts of the guard (all processes) and its parameters."""
        body = self._update(reserve=False)[0]
        remaining = (body[_B_CREATED] + self._window_ns - self._wall()) / _NS
        return {
            "in_window": remaining > 0,
            "window_remaining_s": max(0.0, remaining),
            "window_s": self.window_s,
            "min_spacing_s": self.min_spacing_s,
            "max_per_s": self.max_per_s,
            "spacing_s": self.spacing_s,
            "acquired": body[_B_ACQUIRED],
            "waits": body[_B_WAITS],
            "wait_s_total": body[_B_WAIT_NS] / _NS,
            "max_wait_s": body[_B_MAX_WAIT] / _NS,
        }
