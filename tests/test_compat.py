"""shmnonce.compat used the way bots use a process-global nonce manager, across processes."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from shmnonce import NonceError, ShmNonce, compat
from shmnonce.shm.segment import EXT_COMPAT_OFFSET
from tests._fork_helpers import CHILD_HUNG, CHILD_OK, FORK_WARNING, fork_while_held

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = 4

# A bot module written against the process-global API; only the import changed.
BOT = r"""
import json, os, sys, threading, time
from shmnonce.compat import (
    get_global_kraken_nonce, get_global_nonce_manager, get_global_nonce_stats,
    get_kraken_api_lock, get_kraken_nonce,
)

mode, out, marker, count, go = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
mgr = get_global_nonce_manager()
local_lock = threading.RLock()  # the single-process original's lock, for the control run
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
if mode == "nonces":
    getters = [get_global_kraken_nonce, get_kraken_nonce, lambda: mgr.get_nonce(apply_rate_limiting=False)]
    vals = [getters[i % 3]() for i in range(count)]
    os.write(fd, "".join(f"{v}\n" for v in vals).encode())
elif mode == "spaced":
    vals = [get_global_kraken_nonce() for _ in range(count)]
    os.write(fd, "".join(f"{v}\n" for v in vals).encode())
else:
    lock = get_kraken_api_lock() if mode == "locked" else local_lock
    for _ in range(count):
        with lock:
            try:
                m = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                os.write(fd, b"OVERLAP\n")
                continue
            with lock:  # nested, as code written for the RLock does
                nonce = get_global_kraken_nonce()
            os.write(fd, b"%d %d\n" % (nonce, os.getpid()))
            time.sleep(0.003)
            os.close(m)
            os.unlink(marker)
os.close(fd)
with open(out + ".stats", "w") as fh:
    json.dump(get_global_nonce_stats(), fh)
"""


@pytest.fixture
def compat_env(state_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point compat at a fresh sequence in the test's state_dir, no start-up window."""
    monkeypatch.setenv(compat.ENV_NAME, "bot")
    monkeypatch.setenv(compat.ENV_STATE_DIR, state_dir)
    monkeypatch.setenv(compat.ENV_STARTUP_WINDOW, "0")
    monkeypatch.delenv(compat.ENV_KEY_ENV, raising=False)
    compat.close_global_nonce_manager()
    compat.configure()
    yield state_dir
    compat.close_global_nonce_manager()
    compat.configure()


@contextlib.contextmanager
def bots(
    mode: str, tmp: str, count: int, n: int = P, env: dict[str, str] | None = None
) -> Iterator[list[str]]:
    """Run ``n`` bot processes released together; yield their output paths once all exited 0."""
    go = os.path.join(tmp, f"{mode}.go")
    marker = os.path.join(tmp, f"{mode}.marker")
    outs = [os.path.join(tmp, f"{mode}{i}.out") for i in range(n)]
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    procs = [
        subprocess.Popen([sys.executable, "-c", BOT, mode, out, marker, str(count), go], env=full_env)
        for out in outs
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(o + ".ready") for o in outs):
            assert time.monotonic() < deadline, "bots did not start"
            assert all(p.poll() is None for p in procs), "a bot died at start"
            time.sleep(0.01)
        open(go, "w").close()
        assert [p.wait(timeout=90) for p in procs] == [0] * n
        yield outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _values(path: str) -> list[int]:
    with open(path) as fh:
        return [int(line.split()[0]) for line in fh if line.strip()]


def _stats(path: str) -> dict[str, object]:
    with open(path + ".stats") as fh:
        data: dict[str, object] = json.load(fh)
    return data


def test_zero_duplicates_and_stats_add_up_across_processes(compat_env: str, tmp_path: object) -> None:
    count = 600
    parent_before = compat.get_global_kraken_nonce()
    with bots("nonces", str(tmp_path), count) as outs:
        parent_after = compat.get_global_kraken_nonce()
        merged: list[int] = []
        for out in outs:
            vals = _values(out)
            assert len(vals) == count
            assert all(a < b for a, b in itertools.pairwise(vals)), "not increasing within a process"
            merged += vals
            assert _stats(out)["process_nonces_issued"] == count
        assert len(set(merged)) == P * count, "duplicate nonces across processes"
        assert parent_before < min(merged) and max(merged) < parent_after
        stats = compat.get_global_nonce_stats()
    # host-wide: the parent's two nonces plus every bot's
    assert stats["total_nonces_issued"] == P * count + 2
    assert stats["process_nonces_issued"] == 2
    assert stats["sequence_total_issued"] == P * count + 2
    assert stats["last_nonce"] == parent_after
    assert isinstance(stats["uptime_seconds"], float) and stats["uptime_seconds"] > 0
    assert stats["nonces_per_second"] == pytest.approx(
        stats["total_nonces_issued"] / stats["uptime_seconds"], rel=0.5
    )
    assert isinstance(stats["recent_burst_rate"], float) and stats["recent_burst_rate"] > 0
    assert stats["in_startup_window"] is False
    assert stats["rate_limit_config"] == {
        "startup_rate_limit_seconds": 0.5, "max_burst_rate": 20.0, "startup_window_seconds": 0.0,
    }
    assert stats["api_serialization_enabled"] is True
    assert stats["sequence"] == "bot" and stats["state_dir"] == os.path.realpath(compat_env)
    assert stats["persistence_file"] == os.path.join(os.path.realpath(compat_env), "bot.ceiling")


def test_api_lock_excludes_processes(compat_env: str, tmp_path: object) -> None:
    count = 25
    with bots("locked", str(tmp_path), count) as outs:
        lines: list[str] = []
        for out in outs:
            with open(out) as fh:
                lines += fh.read().split("\n")
        stats = compat.get_global_nonce_stats()
    lines = [ln for ln in lines if ln]
    assert "OVERLAP" not in lines, "two processes were inside the lock at once"
    assert len(lines) == P * count
    assert len({int(ln.split()[0]) for ln in lines}) == P * count
    assert len({ln.split()[1] for ln in lines}) == P
    # entries counted host-wide; each entry also issued the section's own nonce
    assert stats["api_lock_entries"] == P * count
    assert stats["total_nonces_issued"] == P * count
    assert stats["sequence_total_issued"] == 2 * P * count
    assert isinstance(stats["api_lock_waits"], int) and stats["api_lock_waits"] > 0


def test_control_process_local_rlock_lets_processes_overlap(compat_env: str, tmp_path: object) -> None:
    """The same observer detects overlap when the lock is the original's threading.RLock."""
    with bots("rlock", str(tmp_path), 25) as outs:
        text = ""
        for o in outs:
            with open(o) as fh:
                text += fh.read()
    assert "OVERLAP" in text


def test_api_lock_in_process_semantics(compat_env: str) -> None:
    lock = compat.get_kraken_api_lock()
    mgr = compat.get_global_nonce_manager()
    assert lock is mgr.get_api_call_lock()
    assert lock.nonce is None
    with lock as acquired:
        assert acquired is True
        entry = lock.nonce
        assert isinstance(entry, int)
        with lock:  # re-entrant in the same thread
            inner = compat.get_global_kraken_nonce()
            assert inner > entry
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.2)))
        t.start()
        t.join()
        assert got == [False], "another thread entered while this one held the lock"
        t = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False)))
        t.start()
        t.join()
        assert got == [False, False]
    assert lock.nonce is None
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(ValueError):
        lock.acquire(blocking=False, timeout=1)
    # released by the outermost exit: another thread gets it now
    done: list[bool] = []

    def other() -> None:
        done.append(lock.acquire(timeout=5))
        lock.release()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert done == [True]


def _child_try_lock(q: mp.Queue[object]) -> None:
    lock = compat.get_kraken_api_lock()
    q.put(lock.acquire(blocking=False))
    q.put(compat.get_global_kraken_nonce())


def test_forked_child_does_not_inherit_the_lock(compat_env: str) -> None:
    lock = compat.get_kraken_api_lock()
    ctx = mp.get_context("fork")
    q: mp.Queue[object] = ctx.Queue()
    with lock:
        parent_nonce = compat.get_global_kraken_nonce()
        p = ctx.Process(target=_child_try_lock, args=(q,))
        p.start()
        try:
            got = q.get(timeout=30)
            child_nonce = q.get(timeout=30)
        finally:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    assert got is False, "a forked child believed it held the parent's lock"
    assert isinstance(child_nonce, int) and child_nonce > parent_nonce
    assert p.exitcode == 0


def test_rate_limiting_spaces_nonces_across_processes(
    compat_env: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    spacing = 0.15
    env = {compat.ENV_STARTUP_WINDOW: "60", compat.ENV_MIN_SPACING: str(spacing)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    compat.get_global_nonce_manager()  # creates the segment: the window starts now
    # without rate limiting nothing waits, even inside the window
    t0 = time.monotonic()
    for _ in range(20):
        compat.get_global_nonce_manager().get_nonce(apply_rate_limiting=False)
    assert time.monotonic() - t0 < 0.5 * spacing * 20
    with bots("spaced", str(tmp_path), 4, n=2, env=env) as outs:
        vals = sorted(v for o in outs for v in _values(o))
        stats = compat.get_global_nonce_stats()
    assert len(vals) == 8
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(vals)]
    # slots are exactly `spacing` apart; allow for late wake-ups on a loaded machine
    assert min(gaps) > spacing * 0.3, gaps
    assert (vals[-1] - vals[0]) / 1e9 >= 7 * spacing * 0.7
    assert stats["in_startup_window"] is True
    assert isinstance(stats["rate_limited_nonces"], int) and stats["rate_limited_nonces"] >= 6
    assert stats["rate_limit_config"] == {
        "startup_rate_limit_seconds": spacing, "max_burst_rate": 20.0, "startup_window_seconds": 60.0,
    }


def test_manager_identity_and_configuration(compat_env: str, tmp_path: object) -> None:
    mgr = compat.get_global_nonce_manager()
    assert compat.GlobalKrakenNonceManager() is mgr
    assert mgr.engine.name == "bot"
    # the same settings again are fine; other ones after first use are refused
    compat.configure(name="bot", state_dir=compat_env)
    with pytest.raises(NonceError):
        compat.configure(name="other")
    other_dir = os.path.join(str(tmp_path), "other-state")
    other = compat.GlobalKrakenNonceManager("orders", other_dir)
    try:
        assert other is compat.GlobalKrakenNonceManager("orders", other_dir)
        assert other is not mgr and other.engine.name == "orders"
        assert other.get_api_call_lock() is not mgr.get_api_call_lock()
    finally:
        compat.close_global_nonce_manager()
        with ShmNonce.attach("orders", other_dir) as e:
            e.unlink()
    # configure() before first use selects the sequence
    compat.configure(name="second")
    try:
        assert compat.get_global_nonce_manager().engine.name == "second"
    finally:
        compat.close_global_nonce_manager()
        compat.configure()
    with pytest.raises(ValueError):
        compat.configure(name="bad/name")
    with pytest.raises(ValueError):
        compat.configure(name="x", api_key="k")
    with pytest.raises(ValueError):
        compat.configure(min_spacing_s=-1)


def test_api_key_selects_the_keys_sequence_and_is_never_kept(
    compat_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "K3Y-" + "s3cr3t" * 8
    monkeypatch.delenv(compat.ENV_NAME)
    monkeypatch.setenv("MY_KRAKEN_KEY", key)
    monkeypatch.setenv(compat.ENV_KEY_ENV, "MY_KRAKEN_KEY")
    mgr = compat.get_global_nonce_manager()
    with ShmNonce.for_api_key(key, compat_env) as key_eng:
        assert mgr.engine.name == key_eng.name
        n = compat.get_global_kraken_nonce()
        assert key_eng.next() > n  # one sequence shared with shmnonce.kraken's engine
    texts = [repr(mgr), repr(mgr.get_api_call_lock()), json.dumps(mgr.get_stats()), repr(compat._settings)]
    assert not any(key in t for t in texts)
    compat.close_global_nonce_manager()
    compat.configure(api_key=key)
    assert key not in repr(compat._settings)
    assert compat.get_global_nonce_manager().engine.name == mgr.engine.name
    for entry in os.listdir(compat_env):
        with open(os.path.join(compat_env, entry), "rb") as fh:
            assert key.encode() not in fh.read()
    monkeypatch.setenv("MY_KRAKEN_KEY", "")
    compat.close_global_nonce_manager()
    compat.configure()
    with pytest.raises(ValueError, match="MY_KRAKEN_KEY"):
        compat.get_global_nonce_manager()


def test_jump_forward_and_flags(compat_env: str) -> None:
    mgr = compat.get_global_nonce_manager()
    before = compat.get_global_kraken_nonce()
    jumped = mgr.jump_forward(60_000_000_000)
    assert jumped >= before + 60_000_000_000
    assert compat.get_kraken_nonce() > jumped
    jumped2 = compat.jump_global_kraken_nonce_forward(1000)
    assert jumped2 >= jumped + 1_000_000_000
    with pytest.raises(ValueError):
        mgr.jump_forward(-1)
    with pytest.raises(ValueError):
        compat.jump_global_kraken_nonce_forward(-5)
    assert mgr.is_api_serialization_enabled() is True
    mgr.disable_api_serialization()
    assert mgr.is_api_serialization_enabled() is False
    assert mgr.get_stats()["api_serialization_enabled"] is False
    with compat.get_kraken_api_lock():  # the lock keeps working: the flag is advisory
        pass
    mgr.enable_api_serialization()
    assert mgr.is_api_serialization_enabled() is True


def test_torn_compat_counters_are_reset_and_logged(
    compat_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = compat.get_global_nonce_manager()
    for _ in range(5):
        compat.get_global_kraken_nonce()
    assert mgr.get_stats()["total_nonces_issued"] == 5
    view = mgr.engine._shared(EXT_COMPAT_OFFSET, 8)
    (gen,) = struct.unpack_from("<Q", view)
    struct.pack_into("<Q", view, 0, gen + 7)  # as if a writer died after the first field
    view.release()
    with caplog.at_level(logging.WARNING, logger="shmnonce"):
        stats = mgr.get_stats()
    assert stats["total_nonces_issued"] == 0
    assert any("torn" in r.getMessage() for r in caplog.records)
    compat.get_global_kraken_nonce()
    assert mgr.get_stats()["total_nonces_issued"] == 1


def test_reset_for_testing_never_moves_the_sequence_back(compat_env: str) -> None:
    mgr = compat.get_global_nonce_manager()
    high = mgr.jump_forward(3_600_000_000_000)
    mgr.reset_for_testing()
    assert mgr.get_stats()["total_nonces_issued"] == 0
    assert compat.get_global_kraken_nonce() > high
    mgr.reset_burst_tracking()
    assert mgr.get_stats()["recent_burst_rate"] == 0.0


def test_closed_manager_refuses(compat_env: str) -> None:
    mgr = compat.get_global_nonce_manager()
    lock = mgr.get_api_call_lock()
    compat.close_global_nonce_manager()
    with pytest.raises(NonceError):
        mgr.get_nonce(apply_rate_limiting=False)
    with pytest.raises(NonceError):
        lock.acquire()
    assert compat.get_global_nonce_manager() is not mgr  # attaches again


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings(FORK_WARNING)
def test_forked_child_can_take_the_flag_lock(compat_env: str) -> None:
    """A manager's flag lock held by another thread at fork() is free in the child."""
    mgr = compat.get_global_nonce_manager()
    code = fork_while_held(mgr._flag_lock, lambda: mgr.get_nonce(apply_rate_limiting=False))
    assert code == CHILD_OK, f"child exit code {code} ({CHILD_HUNG}: hung on the flag lock)"
    assert mgr.is_api_serialization_enabled()
