"""Single-process behaviour, bad input, security of files and names."""

from __future__ import annotations

import io
import itertools
import logging
import os
import stat
import threading
import time

import pytest

from shmnonce import LockTimeout, NonceError, ShmNonce, StateError
from shmnonce._paths import api_key_name

from ._workers import held_by_thread

pytestmark = pytest.mark.timeout(60)


def test_values_are_strictly_increasing_and_near_the_clock(eng: ShmNonce) -> None:
    before = time.time_ns()
    values = [eng.next() for _ in range(10_000)]
    after = time.time_ns()
    assert all(a < b for a, b in itertools.pairwise(values))
    assert before <= values[0] and values[-1] <= after + 10_000
    assert eng.peek() == values[-1]
    assert eng.stats()["total_issued"] == 10_000


def test_peek_issues_nothing(eng: ShmNonce) -> None:
    v = eng.next()
    assert eng.peek() == v
    assert eng.peek() == v
    assert eng.stats()["total_issued"] == 1


def test_threads_share_one_sequence(eng: ShmNonce) -> None:
    results: list[list[int]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        results[i] = [eng.next() for _ in range(5000)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = [v for r in results for v in r]
    assert len(set(merged)) == 20_000
    for r in results:
        assert all(a < b for a, b in itertools.pairwise(r))


def test_jump_forward(eng: ShmNonce) -> None:
    v = eng.next()
    j = eng.jump_forward(60_000_000_000)
    assert j >= v + 60_000_000_000
    assert eng.peek() == j
    assert eng.next() == j + 1 or eng.next() > j
    assert eng.stats()["persisted_ceiling"] > j  # type: ignore[operator]


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True, None])
def test_jump_forward_rejects_bad_delta(eng: ShmNonce, bad: object) -> None:
    with pytest.raises(ValueError):
        eng.jump_forward(bad)  # type: ignore[arg-type]


def test_jump_forward_rejects_overflow_and_keeps_state(eng: ShmNonce) -> None:
    v = eng.next()
    with pytest.raises(ValueError, match="2\\*\\*64-1"):
        eng.jump_forward(2**64)
    assert eng.peek() == v


def test_top_of_range_raises_instead_of_wrapping(eng: ShmNonce) -> None:
    top = 2**64 - 1
    fixed = time.time_ns()
    eng._clock = lambda: fixed  # type: ignore[method-assign]
    j = eng.jump_forward(top - 3 - fixed)
    assert j == top - 3
    values = []
    with pytest.raises(NonceError, match="2\\*\\*64-1"):
        while True:
            values.append(eng.next())
    assert values[-1] == top
    assert eng.stats()["persisted_ceiling"] == 2**64
    with pytest.raises(NonceError):
        eng.next()
    with pytest.raises(NonceError), eng.serialized(timeout=1):
        pass
    with pytest.raises(ValueError):
        eng.jump_forward(1)
    assert eng.peek() == top


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "a/b", "../x", "a b", "ключ", "x\n", None, 5, "a\x00"]
)
def test_invalid_names(state_dir: str, name: object) -> None:
    with pytest.raises(ValueError):
        ShmNonce.attach(name, state_dir)  # type: ignore[arg-type]


def test_valid_name_chars(state_dir: str) -> None:
    for name in ["a", "A.b-c_9", "x" * 64, "..", "."]:
        with ShmNonce.attach(name, state_dir) as e:
            assert e.next() > 0
            e.unlink()


def test_state_dir_that_cannot_be_created_names_the_path(tmp_path: object) -> None:
    blocker = os.path.join(str(tmp_path), "file")
    with open(blocker, "w"):
        pass
    target = os.path.join(blocker, "state")
    with pytest.raises(StateError) as info:
        ShmNonce.attach("x", target)
    assert target in str(info.value)


def test_state_dir_that_is_a_file(tmp_path: object) -> None:
    blocker = os.path.join(str(tmp_path), "file")
    with open(blocker, "w"):
        pass
    with pytest.raises(StateError, match=r"file.*not a directory"):
        ShmNonce.attach("x", blocker)


def test_default_state_dir_from_environment(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = os.path.join(str(tmp_path), "env")
    monkeypatch.setenv("SHMNONCE_STATE_DIR", env_dir)
    with ShmNonce.attach("envseq") as e:
        assert e.state_dir == os.path.realpath(env_dir)
        e.unlink()
    monkeypatch.delenv("SHMNONCE_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with ShmNonce.attach("xdgseq") as e:
        assert e.state_dir == os.path.join(os.path.realpath(str(tmp_path)), "shmnonce")
        e.unlink()


def test_same_name_and_realpath_share_a_sequence(tmp_path: object) -> None:
    real = os.path.join(str(tmp_path), "real")
    link = os.path.join(str(tmp_path), "link")
    os.makedirs(real)
    os.symlink(real, link)
    with ShmNonce.attach("s", real) as a, ShmNonce.attach("s", link) as b, \
            ShmNonce.attach("s", os.path.join(str(tmp_path), "other")) as c:
        x = a.next()
        assert b.peek() == x
        assert c.peek() != x
        assert b.segment_name == a.segment_name != c.segment_name
        c.unlink()
        a.unlink()


def test_permissions_are_owner_only(eng: ShmNonce) -> None:
    eng.next()
    with eng.serialized():
        pass
    assert stat.S_IMODE(os.stat(eng.state_dir).st_mode) == 0o700
    files = os.listdir(eng.state_dir)
    assert {"t.lock", "t.queue", "t.ceiling"} <= set(files)
    for f in files:
        assert stat.S_IMODE(os.stat(os.path.join(eng.state_dir, f)).st_mode) == 0o600, f
    assert stat.S_IMODE(os.stat(f"/dev/shm/{eng.segment_name}").st_mode) == 0o600


def test_permissions_under_a_permissive_umask(state_dir: str) -> None:
    old = os.umask(0)
    try:
        with ShmNonce.attach("u", state_dir) as e:
            e.next()
            for f in os.listdir(e.state_dir):
                assert stat.S_IMODE(os.stat(os.path.join(e.state_dir, f)).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(f"/dev/shm/{e.segment_name}").st_mode) == 0o600
            e.unlink()
    finally:
        os.umask(old)


def test_api_key_never_written_or_shown(state_dir: str) -> None:
    key = "K3yMaterialThatMustNotLeak+/=="
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("shmnonce")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        e = ShmNonce.for_api_key(key, state_dir)
        e.next()
        e.jump_forward(5)
        with e.serialized():
            pass
        text = repr(e) + repr(dict(e.stats())) + stream.getvalue() + e.segment_name + e.name
        with open(f"/dev/shm/{e.segment_name}", "rb") as fh:
            seg = fh.read()
        blobs = [seg]
        for f in os.listdir(e.state_dir):
            text += f
            with open(os.path.join(e.state_dir, f), "rb") as fh:
                blobs.append(fh.read())
        assert key not in text
        assert key[:12] not in text
        for blob in blobs:
            assert key.encode() not in blob
        assert e.name == api_key_name(key)
        assert ShmNonce.for_api_key(key, state_dir).segment_name == e.segment_name
        assert ShmNonce.for_api_key(key + "x", state_dir).name != e.name
        e.unlink()
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("key", ["", b"", None, 5])
def test_for_api_key_rejects_empty(state_dir: str, key: object) -> None:
    with pytest.raises(ValueError):
        ShmNonce.for_api_key(key, state_dir)  # type: ignore[arg-type]


def test_next_inside_serialized_same_thread(eng: ShmNonce) -> None:
    with eng.serialized(timeout=1) as n:
        inner = [eng.next() for _ in range(3)]
        assert n < inner[0] < inner[1] < inner[2]
    assert eng.next() > inner[-1]


def test_serialized_is_not_reentrant(eng: ShmNonce) -> None:
    with eng.serialized(timeout=1), pytest.raises(NonceError, match="re-entrant"):
        with eng.serialized(timeout=0.1):
            pass
    with eng.serialized(timeout=0):
        pass


def test_serialized_excludes_threads_and_times_out(eng: ShmNonce) -> None:
    with held_by_thread(eng):
        start = time.monotonic()
        with pytest.raises(LockTimeout) as info, eng.serialized(timeout=0.3):
            pass
        took = time.monotonic() - start
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, NonceError)
        assert 0.25 <= took < 2.0
        with pytest.raises(LockTimeout), eng.serialized(timeout=0):
            pass
        # next() is not blocked by the section held elsewhere
        t0 = time.monotonic()
        eng.next()
        assert time.monotonic() - t0 < 0.5
    with eng.serialized(timeout=1) as n:
        assert n > 0


def test_negative_timeout(eng: ShmNonce) -> None:
    with pytest.raises(ValueError), eng.serialized(timeout=-1):
        pass


def test_exception_inside_section_releases_it(eng: ShmNonce) -> None:
    with pytest.raises(KeyError), eng.serialized(timeout=1):
        raise KeyError("x")
    with eng.serialized(timeout=0):
        pass


def test_close_then_use_raises_and_sequence_lives_on(state_dir: str) -> None:
    e = ShmNonce.attach("c", state_dir)
    v = e.next()
    e.close()
    e.close()  # idempotent
    with pytest.raises(NonceError, match="closed"):
        e.next()
    with pytest.raises(NonceError, match="closed"):
        e.peek()
    with pytest.raises(NonceError, match="closed"), e.serialized():
        pass
    assert os.path.exists(f"/dev/shm/{e.segment_name}")
    with ShmNonce.attach("c", state_dir) as e2:
        assert e2.peek() == v
        assert e2.next() > v
        e2.unlink()


def test_context_manager_closes(state_dir: str) -> None:
    with ShmNonce.attach("cm", state_dir) as e:
        e.next()
    with pytest.raises(NonceError):
        e.next()
    ShmNonce.attach("cm", state_dir).unlink()


def test_unlink_destroys_everything_and_stops_other_handles(state_dir: str) -> None:
    a = ShmNonce.attach("u", state_dir)
    b = ShmNonce.attach("u", state_dir)
    a.next()
    seg = a.segment_name
    a.unlink()
    assert not os.path.exists(f"/dev/shm/{seg}")
    assert os.listdir(os.path.realpath(state_dir)) == []
    with pytest.raises(StateError, match="unlinked"):
        b.next()
    with pytest.raises(StateError, match="unlinked"):
        b.jump_forward(1)
    b.close()
    with ShmNonce.attach("u", state_dir) as c:  # a new sequence starts
        assert c.stats()["total_issued"] == 0
        c.unlink()


def test_stats_keys(eng: ShmNonce) -> None:
    eng.next()
    s = eng.stats()
    for key in ["name", "last_nonce", "total_issued", "created_at", "clock_regressions",
                "persisted_ceiling"]:
        assert key in s
    assert s["name"] == "t"
    assert s["persisted_ceiling"] > s["last_nonce"]  # type: ignore[operator]
    assert abs(s["created_at"] - time.time_ns()) < 60 * 10**9  # type: ignore[operator]


def test_constructor_is_not_public(state_dir: str) -> None:
    with pytest.raises(TypeError):
        ShmNonce("x", state_dir)
