"""Named shared records of the shared-memory engine (``ShmNonce.record``).

The records sit at the fixed places of the segment's extension areas that the
rate limiter and the compat counters used before records existed: these tests
pin the bytes (read back through a raw snapshot of ``/dev/shm``), the torn-write
detection, the validation of names, fields and values, and atomicity of
``update()`` across forked, spawned and unrelated processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from shmnonce import NonceError, ShmNonce
from shmnonce._protocol import SharedRecord
from shmnonce.shm.segment import (
    EXT_COMPAT_OFFSET,
    EXT_RATELIMIT_OFFSET,
    RECORDS,
    U64_MAX,
    Bracketed,
)

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_segment(eng: ShmNonce) -> bytes:
    """A snapshot of the segment's bytes as another process would read them."""
    with open(f"/dev/shm/{eng.segment_name}", "rb") as fh:
        return fh.read()


@pytest.fixture
def eng(state_dir: str) -> Iterator[ShmNonce]:
    e = ShmNonce.attach("records", state_dir)
    yield e
    e.close()


def test_known_records_are_the_old_fixed_areas() -> None:
    assert RECORDS == {
        "kraken.counter": (EXT_RATELIMIT_OFFSET, 14),
        "kraken.burst": (EXT_RATELIMIT_OFFSET + 128, 14),
        "compat.counters": (EXT_COMPAT_OFFSET, 24),
    }


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_record_bytes_are_the_bracketed_layout(eng: ShmNonce, name: str) -> None:
    """Values written through a record are where the pre-record code wrote them, and back."""
    offset, capacity = RECORDS[name]
    rec = eng.record(name, capacity)
    assert isinstance(rec, SharedRecord)
    assert rec.name == name and rec.fields == capacity
    assert rec.read() == [0] * capacity  # never written: zeros, not None
    values = [(i + 1) * 1_000_003 for i in range(capacity)]
    assert rec.update(lambda old: (values, "done")) == "done"
    layout = Bracketed(offset, capacity)  # what _ratelimit/compat used before records
    assert layout.read(raw_segment(eng)) == values
    gen = struct.unpack_from("<Q", raw_segment(eng), offset)[0]
    assert gen == 1 and struct.unpack_from("<Q", raw_segment(eng), offset + 8 * (capacity + 1))[0] == 1
    # and a record written the old way (through the mapping) reads back through record()
    old_values = [7] * capacity
    layout.write(eng._shared(0, 8192), old_values)  # type: ignore[attr-defined]
    assert rec.read() == old_values


def test_records_do_not_overlap(eng: ShmNonce) -> None:
    recs = {name: eng.record(name, cap) for name, (_off, cap) in RECORDS.items()}
    for i, rec in enumerate(recs.values()):
        rec.update(lambda old, i=i, n=rec.fields: ([i + 1] * n, None))
    for i, (name, rec) in enumerate(recs.items()):
        assert rec.read() == [i + 1] * RECORDS[name][1], name


def test_unknown_name_and_bad_fields_are_value_errors(eng: ShmNonce) -> None:
    with pytest.raises(ValueError, match=r"unknown shared record 'kraken\.other'"):
        eng.record("kraken.other", 1)
    with pytest.raises(ValueError, match="1 to 14 fields"):
        eng.record("kraken.counter", 15)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError):
            eng.record("kraken.counter", bad)  # type: ignore[arg-type]


def test_fewer_fields_see_a_prefix_and_keep_the_rest(eng: ShmNonce) -> None:
    full = eng.record("compat.counters", 24)
    full.update(lambda old: (list(range(1, 25)), None))
    short = eng.record("compat.counters", 3)
    assert short.read() == [1, 2, 3]
    short.update(lambda old: ([v * 10 for v in old or [0, 0, 0]], None))
    assert full.read() == [10, 20, 30, *range(4, 25)]


def test_torn_record_reads_none_and_update_restarts_it(eng: ShmNonce) -> None:
    rec = eng.record("kraken.burst", 14)
    rec.update(lambda old: ([5] * 14, None))
    offset = RECORDS["kraken.burst"][0]
    view = eng._shared(offset, 8)  # type: ignore[attr-defined]
    struct.pack_into("<Q", view, 0, 999)  # front generation only: a writer killed mid-record
    assert rec.read() is None
    seen: list[object] = []

    def fn(old: list[int] | None) -> tuple[list[int], None]:
        seen.append(old)
        return [1] * 14, None

    rec.update(fn)
    assert seen == [None]
    assert rec.read() == [1] * 14


def test_invalid_update_writes_nothing(eng: ShmNonce) -> None:
    rec = eng.record("kraken.counter", 14)
    rec.update(lambda old: ([3] * 14, None))
    before = raw_segment(eng)
    for bad in ([1] * 13, [-1] + [0] * 13, [U64_MAX + 1] + [0] * 13, [1.5] + [0] * 13,
                [True] + [0] * 13):
        with pytest.raises(ValueError, match="14 ints"):
            rec.update(lambda old, bad=bad: (bad, None))
    with pytest.raises(ZeroDivisionError):
        rec.update(lambda old: (1 // 0, None))  # type: ignore[arg-type]
    assert raw_segment(eng)[256:768] == before[256:768]
    assert rec.read() == [3] * 14
    assert eng.next() > 0  # the counter lock was released after each failure


def test_update_runs_under_the_counter_lock(eng: ShmNonce) -> None:
    """While fn runs, next() of another thread waits: the update is atomic with the engine."""
    rec = eng.record("kraken.counter", 1)
    done = threading.Event()
    blocked_for: list[float] = []

    def fn(old: list[int] | None) -> tuple[list[int], None]:
        t = threading.Thread(target=lambda: (eng.next(), done.set()))
        t.start()
        time.sleep(0.2)
        blocked_for.append(0.0 if done.is_set() else 0.2)
        return [1], None

    rec.update(fn)
    assert done.wait(5)
    assert blocked_for == [0.2]


def test_record_of_a_closed_handle(state_dir: str) -> None:
    eng = ShmNonce.attach("records", state_dir)
    rec = eng.record("kraken.counter", 14)
    eng.close()
    with pytest.raises(NonceError, match="closed"):
        rec.read()
    with pytest.raises(NonceError, match="closed"):
        rec.update(lambda old: ([0] * 14, None))
    with pytest.raises(NonceError, match="closed"):
        eng.record("kraken.counter", 14)


# --------------------------------------------------------------------------- processes

N_UPDATES = 3000


def _increment(name: str, state_dir: str, n: int, start_at: float = 0.0) -> None:
    with ShmNonce.attach(name, state_dir) as e:
        rec = e.record("compat.counters", 2)
        delay = start_at - time.time()
        if delay > 0:  # line the processes up so that their updates overlap
            time.sleep(delay)
        for _ in range(n):
            # two fields that must always move together: a lost update or a torn
            # read shows as a difference
            rec.update(lambda old: ([old[0] + 1, old[1] + 1] if old else [1, 1], None))
            e.next()


_UNRELATED = textwrap.dedent("""
    import sys
    from tests.test_records import _increment
    _increment(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
""")


def test_update_is_atomic_across_fork_spawn_and_unrelated(state_dir: str) -> None:
    name = "records-mp"
    with ShmNonce.attach(name, state_dir) as e:
        rec = e.record("compat.counters", 2)
        start_at = time.time() + 1.5
        procs = [multiprocessing.get_context(m).Process(
            target=_increment, args=(name, state_dir, N_UPDATES, start_at))
            for m in ("fork", "fork", "spawn")]
        for p in procs:
            p.start()
        env = dict(os.environ, PYTHONPATH=ROOT)
        sub = subprocess.Popen(
            [sys.executable, "-c", _UNRELATED, name, state_dir, str(N_UPDATES), str(start_at)],
            env=env, cwd=ROOT)
        _increment(name, state_dir, N_UPDATES, start_at)  # and this process
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert sub.wait(60) == 0
        assert rec.read() == [5 * N_UPDATES, 5 * N_UPDATES]


def _die_inside(name: str, state_dir: str, ready: str) -> None:
    with ShmNonce.attach(name, state_dir) as e:
        rec = e.record("kraken.counter", 1)

        def fn(old: list[int] | None) -> tuple[list[int], None]:
            with open(ready, "w"):
                pass
            os.kill(os.getpid(), signal.SIGKILL)  # holding the counter lock
            return [123], None

        rec.update(fn)


def test_sigkill_inside_update_leaves_record_and_lock_usable(state_dir: str, tmp_path: object) -> None:
    name = "records-kill"
    ready = os.path.join(str(tmp_path), "ready")
    with ShmNonce.attach(name, state_dir) as e:
        rec = e.record("kraken.counter", 1)
        rec.update(lambda old: ([41], None))
        p = multiprocessing.get_context("fork").Process(target=_die_inside, args=(name, state_dir, ready))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL and os.path.exists(ready)
        assert rec.read() == [41]  # fn never wrote; the kernel released the dead holder's lock
        rec.update(lambda old: ([old[0] + 1] if old else [0], None))
        assert rec.read() == [42]
