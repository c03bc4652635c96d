"""Issue 8 point 8: one API key, one sequence per host.

``for_api_key`` reaches the one sequence of a key wherever this user created it
(another state directory: a bot with SHMNONCE_STATE_DIR and a cron job without), and
fails with StateError naming the user and state directory when another user holds
it. The host-wide key index that records this cannot be redirected by another user
(at worst: a clear error). Each test has its own index (``SHMNONCE_KEY_INDEX``, set
by conftest) so that tests do not see each other's keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from shmnonce import ShmNonce, StateError
from shmnonce._paths import api_key_name

from ._users import User, ensure_user, remove_segments_under, run_as, shared_tmp

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-api-key-0123456789"

@pytest.fixture(autouse=True)
def _no_leftover_segments(tmp_path: object) -> Iterator[None]:
    yield
    remove_segments_under(str(tmp_path))



def index_dir() -> str:
    return os.environ["SHMNONCE_KEY_INDEX"]  # set per test by conftest


def _dirs(tmp: object, *names: str) -> list[str]:
    return [os.path.join(str(tmp), n) for n in names]


def test_two_state_dirs_of_one_user_reach_one_sequence(tmp_path: object) -> None:
    a, b = _dirs(tmp_path, "bot", "cron")
    with ShmNonce.for_api_key(KEY, a) as bot:
        v = bot.next()
        with ShmNonce.for_api_key(KEY, b) as cron:
            assert cron.state_dir == bot.state_dir == os.path.realpath(a)
            assert cron.segment_name == bot.segment_name
            w = cron.next()
            assert w > v and bot.next() > w
    assert not os.path.exists(b), "the second state directory was created"
    # a separate process configured only through the environment (the cron job)
    code = (
        "import logging; logging.basicConfig()  # the library only adds a NullHandler\n"
        "from shmnonce import ShmNonce; import sys\n"
        f"e = ShmNonce.for_api_key({KEY!r}); print(e.state_dir, e.next())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=dict(os.environ, SHMNONCE_STATE_DIR=b, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    sd, value = r.stdout.split()
    assert sd == os.path.realpath(a) and int(value) > w
    assert "lives in" in r.stderr  # logged as a warning: the configuration disagrees
    ShmNonce.for_api_key(KEY, b).unlink()


def test_attach_by_name_in_another_state_dir_is_refused(tmp_path: object) -> None:
    a, b = _dirs(tmp_path, "a", "b")
    name = api_key_name(KEY)
    with ShmNonce.for_api_key(KEY, a) as eng:
        eng.next()
        with pytest.raises(StateError) as info:
            ShmNonce.attach(name, b)
        msg = str(info.value)
        for part in (name, os.path.realpath(a), os.path.realpath(b), "state_dir="):
            assert part in msg, (part, msg)
        # the CLI, as an operator would type it
        r = subprocess.run([sys.executable, "-m", "shmnonce", "jump", name, "1", "--state-dir", b],
                           capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert r.returncode == 1 and os.path.realpath(a) in r.stderr, r
        eng.unlink()


def test_a_second_sequence_made_before_the_index_is_an_error_with_a_merge_repair(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both state directories already hold the key (e.g. made by an older shmnonce)."""
    a, b = _dirs(tmp_path, "a", "b")
    name = api_key_name(KEY)
    with ShmNonce.for_api_key(KEY, a) as eng:
        eng.next()
    index = os.environ["SHMNONCE_KEY_INDEX"]
    # the old state: b got its own sequence where the index did not hold a's
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", os.path.join(str(tmp_path), "old-index"))
    with ShmNonce.for_api_key(KEY, b) as old:
        old.next()
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", index)
    with pytest.raises(StateError) as info:
        ShmNonce.for_api_key(KEY, b)
    msg = str(info.value)
    for part in ("two sequences", os.path.realpath(a), os.path.realpath(b), f"shmnonce unlink {name}"):
        assert part in msg, (part, msg)
    ShmNonce.attach(name, a).unlink()
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", os.path.join(str(tmp_path), "old-index"))
    ShmNonce.attach(name, b).unlink()


def test_unlink_releases_the_key(tmp_path: object) -> None:
    a, b = _dirs(tmp_path, "a", "b")
    eng = ShmNonce.for_api_key(KEY, a)
    eng.next()
    eng.unlink()
    assert os.listdir(index_dir()) == []
    with ShmNonce.for_api_key(KEY, b) as e2:  # a new sequence may now live elsewhere
        assert e2.state_dir == os.path.realpath(b)
        e2.next()
    # so does 'shmnonce unlink' (which works on damaged state too)
    r = subprocess.run([sys.executable, "-m", "shmnonce", "unlink", api_key_name(KEY), "--state-dir", b],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r
    assert os.listdir(index_dir()) == []


def test_the_index_survives_a_reboot(tmp_path: object) -> None:
    """The index is on disk like the ceiling: after the segment is gone, still one sequence."""
    a, b = _dirs(tmp_path, "a", "b")
    with ShmNonce.for_api_key(KEY, a) as eng:
        top = eng.jump_forward(3600 * 10**9)
        seg = eng.segment_name
    os.unlink(f"/dev/shm/{seg}")
    with ShmNonce.for_api_key(KEY, b) as eng:  # the cron job runs first after the reboot
        assert eng.state_dir == os.path.realpath(a)
        assert eng.next() > top
        eng.unlink()


def test_index_entries_hold_no_key_material(tmp_path: object) -> None:
    (a,) = _dirs(tmp_path, "a")
    with ShmNonce.for_api_key(KEY, a) as eng:
        eng.next()
        entries = os.listdir(index_dir())
        assert entries == ["shmnonce-" + api_key_name(KEY)]
        with open(os.path.join(index_dir(), entries[0]), "rb") as fh:
            raw = fh.read()
        assert KEY.encode() not in raw
        doc = json.loads(raw)
        assert doc == {"v": 1, "name": api_key_name(KEY), "uid": os.geteuid(),
                       "state_dir": os.path.realpath(a)}
        eng.unlink()


# --------------------------------------------------------------------------- two users


@pytest.fixture
def two_user_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[User, str]]:
    """Another user, and an index both can reach: a root-owned 1777 directory, as /var/tmp."""
    user = ensure_user("shmnonce-t1")
    base = shared_tmp("shmnonce-idx-")
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", base)
    home = os.path.join(base, "user")
    os.mkdir(home, 0o700)
    os.chown(home, user.uid, user.gid)
    yield user, base
    remove_segments_under(base)
    shutil.rmtree(base, ignore_errors=True)


def _user_sequence(sd: str, key: str) -> tuple[str, int]:
    with ShmNonce.for_api_key(key, sd) as e:
        return e.state_dir, e.next()


def test_two_users_one_key_root_first(tmp_path: object, two_user_host: tuple[User, str]) -> None:
    user, base = two_user_host
    (mine,) = _dirs(tmp_path, "root-state")
    with ShmNonce.for_api_key(KEY, mine) as eng:
        eng.next()
        res = run_as(user, _user_sequence, os.path.join(base, "user", "state"), KEY)
        assert not res.ok, f"the other user got a second sequence of the key: {res.value}"
        kind, msg, is_state_error = res.value
        assert is_state_error, (kind, msg)
        for part in ("uid 0 (root)", os.path.realpath(mine), api_key_name(KEY)):
            assert part in msg, (part, msg)
        assert not os.path.exists(os.path.join(base, "user", "state"))
        eng.unlink()


def test_two_users_one_key_user_first(tmp_path: object, two_user_host: tuple[User, str]) -> None:
    user, base = two_user_host
    theirs = os.path.join(base, "user", "state")
    res = run_as(user, _user_sequence, theirs, KEY)
    assert res.ok, res.value
    (mine,) = _dirs(tmp_path, "root-state")
    with pytest.raises(StateError) as info:
        ShmNonce.for_api_key(KEY, mine)
    msg = str(info.value)
    for part in (f"uid {user.uid} ({user.name})", theirs, api_key_name(KEY)):
        assert part in msg, (part, msg)
    with pytest.raises(StateError, match=user.name):
        ShmNonce.attach(api_key_name(KEY), mine)
    assert not os.path.exists(mine)

    def cleanup() -> None:
        ShmNonce.for_api_key(KEY, theirs).unlink()

    assert run_as(user, cleanup).ok
    with ShmNonce.for_api_key(KEY, mine) as eng:  # released: root may take the key now
        eng.unlink()


def test_another_user_cannot_redirect_or_squat_the_index(
    two_user_host: tuple[User, str], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, base = two_user_host
    name = api_key_name(KEY)
    (mine,) = _dirs(tmp_path, "root-state")

    # 1. an index directory pre-created by the other user: refused, naming its owner
    idx = os.path.join(base, "index")
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", idx)

    def precreate() -> None:
        os.mkdir(idx)
        os.chmod(idx, 0o1777)

    assert run_as(user, precreate).ok
    with pytest.raises(StateError) as info:
        ShmNonce.for_api_key(KEY, mine)
    msg = str(info.value)
    for part in (idx, f"uid {user.uid} ({user.name})", "install -d -m 1777 -o root"):
        assert part in msg, (part, msg)
    shutil.rmtree(idx)

    # 2. root creates it (1777); the other user forges an entry saying root holds the key elsewhere
    ShmNonce.for_api_key("another-key", mine).close()
    assert oct(os.stat(idx).st_mode & 0o7777) == "0o1777"
    evil = os.path.join(base, "user", "evil")
    entry = os.path.join(idx, "shmnonce-" + name)

    def forge() -> None:
        with open(entry, "x") as fh:
            json.dump({"v": 1, "name": name, "uid": 0, "state_dir": evil}, fh)

    assert run_as(user, forge).ok
    with pytest.raises(StateError) as info:
        ShmNonce.for_api_key(KEY, mine)
    assert f"belongs to uid {user.uid}" in str(info.value), info.value
    assert not os.path.exists(evil)

    # 3. the other user cannot remove root's entry (sticky, root-owned index)
    os.unlink(entry)
    with ShmNonce.for_api_key(KEY, mine) as eng:
        eng.next()

        def remove() -> None:
            os.unlink(entry)

        res = run_as(user, remove)
        assert not res.ok and res.value[0] == "PermissionError", res.value
        eng.unlink()
    ShmNonce.for_api_key("another-key", mine).unlink()


def test_doctor_reports_a_second_sequence_of_a_key(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from shmnonce.ops.doctor import run_doctor

    a, b = _dirs(tmp_path, "a", "b")
    name = api_key_name(KEY)
    with ShmNonce.for_api_key(KEY, a) as eng:
        eng.next()
    assert {f.status for f in run_doctor(name, a).findings if f.check == "key_index"} == {"ok"}
    index = os.environ["SHMNONCE_KEY_INDEX"]
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", os.path.join(str(tmp_path), "old-index"))
    ShmNonce.for_api_key(KEY, b).close()
    monkeypatch.setenv("SHMNONCE_KEY_INDEX", index)
    rep = run_doctor(name, b)
    errors = [f.message for f in rep.findings if f.check == "key_index" and f.status == "error"]
    assert errors and os.path.realpath(a) in errors[0] and "two sequences" in errors[0], rep.as_dict()
