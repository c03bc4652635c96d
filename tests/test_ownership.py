"""Issue 8 point 2: nobody but the sequence's owner gets in.

Another local user squats the segment (0666, 0600) or pre-creates the state
directory (0777 under /tmp); files of the state directory belong to another user or
are open to group/others. Each is refused with StateError naming the path, the
owner and the fix, never adopted. Runs as root (CI); the other user is created with
``useradd`` (skipped, with the reason in the summary, where that is impossible).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

from shmnonce import ShmNonce, StateError
from shmnonce.ops.doctor import run_doctor
from shmnonce.ops.repair import drop_segment
from shmnonce.shm.segment import SIZE

from ._users import User, ensure_user, remove_segments_under, run_as, shared_tmp, squat_file

pytestmark = pytest.mark.timeout(60)

@pytest.fixture(autouse=True)
def _no_leftover_segments(tmp_path: object) -> Iterator[None]:
    yield
    remove_segments_under(str(tmp_path))


HOUR = 3600 * 10**9


@pytest.fixture
def other() -> User:
    return ensure_user("shmnonce-t1")


@pytest.fixture
def shared() -> Iterator[str]:
    path = shared_tmp("shmnonce-own-")
    yield path
    remove_segments_under(path)
    shutil.rmtree(path, ignore_errors=True)


def _snapshot(seg: str) -> bytes:
    """The segment's bytes now: valid in any format, and lower than what comes next."""
    with open(f"/dev/shm/{seg}", "rb") as fh:
        data = fh.read()
    assert len(data) == SIZE
    return data


def _assert_names(msg: str, *parts: str) -> None:
    for p in parts:
        assert p in msg, (p, msg)


# --------------------------------------------------------------------------- segment


@pytest.mark.parametrize("mode", [0o666, 0o600])
def test_segment_squatted_by_another_user_is_refused(state_dir: str, other: User, mode: int) -> None:
    with ShmNonce.attach("sq", state_dir) as eng:
        eng.next()
        seg = eng.segment_name
        copy = _snapshot(seg)  # the squatter's aim: a valid segment an hour lower
        top = eng.jump_forward(HOUR)
    os.unlink(f"/dev/shm/{seg}")  # a reboot: the name is free
    squat_file(other, f"/dev/shm/{seg}", mode, copy)
    try:
        with pytest.raises(StateError) as info:
            ShmNonce.attach("sq", state_dir)
        _assert_names(str(info.value), f"/dev/shm/{seg}", "'sq'", f"uid {other.uid}", other.name,
                      "rm -r /dev/shm/")
        rep = run_doctor("sq", state_dir)
        assert not rep.ok and any(f"uid {other.uid}" in f.message for f in rep.findings), rep.as_dict()
        # the fix named: drop-segment (as root) removes it without reading it ...
        res = drop_segment("sq", state_dir)
        assert res.segment_found and not res.segment_intact
        assert res.persisted_ceiling is not None and res.persisted_ceiling >= top
        assert not os.path.exists(f"/dev/shm/{seg}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{seg}")
    # ... and the next attach resumes above every value issued
    with ShmNonce.attach("sq", state_dir) as eng:
        assert eng.next() > top
        eng.unlink()


def test_segment_of_another_user_0600_is_refused_for_an_unprivileged_owner(
    other: User, shared: str
) -> None:
    """The owner cannot open it at all: StateError naming the owner, not a bare PermissionError."""
    owner = ensure_user("shmnonce-t2")
    home = os.path.join(shared, "owner")
    os.mkdir(home, 0o700)
    os.chown(home, owner.uid, owner.gid)
    sd = os.path.join(home, "state")

    def first() -> tuple[str, int]:
        with ShmNonce.attach("up", sd) as e:
            return e.segment_name, e.jump_forward(HOUR)

    res = run_as(owner, first)
    assert res.ok, res.value
    seg, top = res.value
    os.unlink(f"/dev/shm/{seg}")
    squat_file(other, f"/dev/shm/{seg}", 0o600, bytes(SIZE))

    def again() -> int:
        with ShmNonce.attach("up", sd) as e:
            return e.next()

    try:
        res = run_as(owner, again)
        assert not res.ok, f"attached a segment another user owns (next() = {res.value})"
        kind, msg, is_state_error = res.value
        assert is_state_error, (kind, msg)
        _assert_names(msg, f"/dev/shm/{seg}", "'up'", f"uid {other.uid}", other.name)

        def doctor() -> list[str]:
            return [f.message for f in run_doctor("up", sd).findings if f.status == "error"]

        res = run_as(owner, doctor)
        assert res.ok and any(f"uid {other.uid}" in m for m in res.value), res.value
    finally:
        os.unlink(f"/dev/shm/{seg}")
    res = run_as(owner, again)
    assert res.ok and res.value > top, res.value

    def cleanup() -> None:
        ShmNonce.attach("up", sd).unlink()

    run_as(owner, cleanup)


def test_own_segment_with_group_access_is_refused(state_dir: str) -> None:
    with ShmNonce.attach("gm", state_dir) as eng:
        seg = eng.segment_name
    os.chmod(f"/dev/shm/{seg}", 0o640)
    with pytest.raises(StateError) as info:
        ShmNonce.attach("gm", state_dir)
    _assert_names(str(info.value), f"/dev/shm/{seg}", "0640", f"chmod 600 /dev/shm/{seg}")
    os.chmod(f"/dev/shm/{seg}", 0o600)
    with ShmNonce.attach("gm", state_dir) as eng:
        eng.unlink()


# --------------------------------------------------------------------------- state directory


def test_state_dir_precreated_0777_by_another_user_under_tmp(other: User, shared: str) -> None:
    trap = os.path.join(shared, "bot-state")

    def precreate() -> None:
        os.mkdir(trap)
        os.chmod(trap, 0o777)

    assert run_as(other, precreate).ok
    with pytest.raises(StateError) as info:
        ShmNonce.attach("pre", trap)
    _assert_names(str(info.value), trap, f"uid {other.uid}", other.name, "'pre'", "state_dir given")
    assert os.listdir(trap) == [], "a file was created in another user's directory"
    # the same through a symlink of ours pointing at it
    link = os.path.join(shared, "link")
    os.symlink(trap, link)
    with pytest.raises(StateError, match=f"uid {other.uid}"):
        ShmNonce.attach("pre", link)


def test_state_dir_of_another_user_0700_is_refused(other: User, shared: str) -> None:
    theirs = os.path.join(shared, "theirs")
    assert run_as(other, os.mkdir, theirs, 0o700).ok
    with pytest.raises(StateError, match=f"uid {other.uid}"):
        ShmNonce.attach("t", theirs)
    assert os.listdir(theirs) == []


def test_own_state_dir_writable_by_others_is_refused(tmp_path: object) -> None:
    sd = os.path.join(str(tmp_path), "open")
    os.mkdir(sd)
    os.chmod(sd, 0o777)
    with pytest.raises(StateError) as info:
        ShmNonce.attach("w", sd)
    _assert_names(str(info.value), sd, "0777", f"chmod 700 {sd}")
    assert os.listdir(sd) == []
    os.chmod(sd, 0o750)  # group read and search only: allowed (the files are 0600)
    with ShmNonce.attach("w", sd) as eng:
        eng.next()
        eng.unlink()


def test_state_dir_under_a_parent_others_may_write_is_refused(tmp_path: object) -> None:
    parent = os.path.join(str(tmp_path), "shared")
    os.mkdir(parent)
    os.chmod(parent, 0o777)  # no sticky bit: anyone could rename 'state' and put their own
    sd = os.path.join(parent, "state")
    with pytest.raises(StateError) as info:
        ShmNonce.attach("p", sd)
    _assert_names(str(info.value), parent, "0777", "sticky")
    os.chmod(parent, 0o1777)  # as /tmp: accepted
    with ShmNonce.attach("p", sd) as eng:
        eng.next()
        eng.unlink()


def test_system_user_without_home_is_told_about_state_dir(other: User) -> None:
    def default_attach() -> int:
        with ShmNonce.attach("svc") as e:
            return e.next()

    res = run_as(other, default_attach,
                 env={"HOME": "/nonexistent", "XDG_STATE_HOME": None, "SHMNONCE_STATE_DIR": None})
    assert not res.ok
    kind, msg, is_state_error = res.value
    assert is_state_error, (kind, msg)
    _assert_names(msg, "/nonexistent/.local/state/shmnonce", "SHMNONCE_STATE_DIR", "state_dir=", "'svc'")
    assert not os.path.exists("/nonexistent")


# --------------------------------------------------------------------------- state files


@pytest.mark.parametrize("suffix", [".lock", ".queue", ".ceiling"])
def test_state_file_of_another_user_is_refused(state_dir: str, other: User, suffix: str) -> None:
    with ShmNonce.attach("of", state_dir) as eng:
        eng.next()
        real = eng.state_dir
    path = os.path.join(real, "of" + suffix)
    os.chown(path, other.uid, other.gid)
    try:
        with pytest.raises(StateError) as info:
            ShmNonce.attach("of", state_dir)
        _assert_names(str(info.value), path, f"uid {other.uid}", other.name, "'of'", "rm -r")
    finally:
        os.chown(path, 0, 0)
    with ShmNonce.attach("of", state_dir) as eng:
        eng.unlink()


@pytest.mark.parametrize("suffix", [".lock", ".queue", ".ceiling"])
def test_state_file_with_group_or_other_access_is_refused(state_dir: str, suffix: str) -> None:
    with ShmNonce.attach("gf", state_dir) as eng:
        eng.next()
        real = eng.state_dir
    path = os.path.join(real, "gf" + suffix)
    os.chmod(path, 0o644)
    with pytest.raises(StateError) as info:
        ShmNonce.attach("gf", state_dir)
    _assert_names(str(info.value), path, "0644", f"chmod 600 {path}", "'gf'")
    os.chmod(path, 0o600)
    with ShmNonce.attach("gf", state_dir) as eng:
        eng.unlink()


def test_files_are_created_exclusively_and_verified(state_dir: str, other: User) -> None:
    """A file another user slips in before the first attach is refused, not adopted."""
    sd = os.path.realpath(state_dir)
    os.makedirs(sd, mode=0o700)
    path = os.path.join(sd, "ex.queue")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.chown(path, other.uid, other.gid)
    with pytest.raises(StateError, match=f"uid {other.uid}"):
        ShmNonce.attach("ex", state_dir)
    os.unlink(path)
    with ShmNonce.attach("ex", state_dir) as eng:
        assert eng.next() > 0
        eng.unlink()



def test_unprivileged_owner_cannot_drop_another_users_segment(other: User, shared: str) -> None:
    """drop-segment then names the owner and 'rm -r' for root, instead of a bare EPERM."""
    owner = ensure_user("shmnonce-t2")
    home = os.path.join(shared, "owner")
    os.mkdir(home, 0o700)
    os.chown(home, owner.uid, owner.gid)
    sd = os.path.join(home, "state")

    def first() -> str:
        with ShmNonce.attach("dp", sd) as e:
            e.next()
            return e.segment_name

    res = run_as(owner, first)
    assert res.ok, res.value
    seg = res.value
    os.unlink(f"/dev/shm/{seg}")
    squat_file(other, f"/dev/shm/{seg}", 0o600, bytes(SIZE))
    try:
        res = run_as(owner, drop_segment, "dp", sd)
        assert not res.ok and res.value[2], res.value
        for part in (f"/dev/shm/{seg}", f"uid {other.uid}", "rm -r"):
            assert part in res.value[1], (part, res.value)
        assert os.path.exists(f"/dev/shm/{seg}")
    finally:
        os.unlink(f"/dev/shm/{seg}")
