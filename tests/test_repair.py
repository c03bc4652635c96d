"""Every StateError names a repair; the repair commands work on the state attach refuses."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest

from shmnonce import ShmNonce, StateError
from shmnonce.shm.ceiling import read_ceiling
from shmnonce.shm.segment import RECORD_OFFSET

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmnonce", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def _issue(state_dir: str, name: str, n: int = 100) -> tuple[ShmNonce, list[int]]:
    eng = ShmNonce.attach(name, state_dir)
    return eng, [eng.next() for _ in range(n)]


def test_state_dir_removed_under_live_segment(state_dir: str) -> None:
    live, vals = _issue(state_dir, "sd")
    vals.append(live.jump_forward(30 * 10**9))  # ahead of the clock: only the segment knows
    seg = live.segment_name
    shutil.rmtree(live.state_dir)
    with pytest.raises(StateError, match="drop-segment sd") as info:
        ShmNonce.attach("sd", state_dir)
    assert "drop-segment" in str(info.value)
    r = cli("drop-segment", "sd", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(f"/dev/shm/{seg}")
    with pytest.raises(StateError, match="unlinked"):
        live.next()  # the old handle stops instead of issuing from a dead segment
    live.close()
    with ShmNonce.attach("sd", state_dir) as eng:
        assert eng.next() > max(vals)
        eng.unlink()


def test_unlink_works_when_attach_refuses(state_dir: str) -> None:
    """The repro from the pools work: rm -rf state_dir, then 'shmnonce unlink' failed."""
    live, _ = _issue(state_dir, "x", 1)
    seg = live.segment_name
    live.close()
    shutil.rmtree(os.path.realpath(state_dir))
    r = cli("unlink", "x", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(f"/dev/shm/{seg}")
    r = cli("unlink", "x", "--state-dir", state_dir)
    assert r.returncode == 0 and "nothing to unlink" in r.stdout


def test_corrupt_ceiling_with_live_segment_is_rewritten_by_drop_segment(state_dir: str) -> None:
    live, vals = _issue(state_dir, "cc")
    vals.append(live.jump_forward(3600 * 10**9))  # ahead of the clock: only the segment knows
    path = os.path.join(live.state_dir, "cc.ceiling")
    live.close()
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    with pytest.raises(StateError, match="drop-segment"):
        ShmNonce.attach("cc", state_dir)
    r = cli("drop-segment", "cc", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    ceiling = read_ceiling(path)
    assert ceiling is not None and ceiling.limit >= max(vals)
    with ShmNonce.attach("cc", state_dir) as eng:
        assert eng.next() > max(vals)
        eng.unlink()


def test_corrupt_ceiling_without_segment_unlink_then_jump(state_dir: str) -> None:
    live, _vals = _issue(state_dir, "cn")
    path = os.path.join(live.state_dir, "cn.ceiling")
    live.close()
    os.unlink(f"/dev/shm/{live.segment_name}")
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    r = cli("drop-segment", "cn", "--state-dir", state_dir)  # nothing to rewrite from
    assert r.returncode == 1 and path in r.stderr and r.stderr.count("\n") == 1
    assert cli("unlink", "cn", "--state-dir", state_dir).returncode == 0
    r = cli("jump", "cn", str(3600 * 10**9), "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr


def test_foreign_segment_dropped_keeps_the_ceiling(state_dir: str) -> None:
    live, vals = _issue(state_dir, "fs")
    vals.append(live.jump_forward(3600 * 10**9))  # ahead of the clock: only the ceiling knows
    path = os.path.join(live.state_dir, "fs.ceiling")
    before = read_ceiling(path)
    live.close()
    with open(f"/dev/shm/{live.segment_name}", "r+b") as fh:
        fh.write(b"NOTMINE!")
    with pytest.raises(StateError, match="drop-segment"):
        ShmNonce.attach("fs", state_dir)
    r = cli("drop-segment", "fs", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    assert read_ceiling(path) == before
    with ShmNonce.attach("fs", state_dir) as eng:
        assert eng.next() > max(vals)
        eng.unlink()


def test_torn_segment_without_ceiling_cannot_be_dropped(state_dir: str) -> None:
    live, _ = _issue(state_dir, "tn")
    struct.pack_into("<Q", live._buf, RECORD_OFFSET, 12345)  # torn
    os.unlink(os.path.join(live.state_dir, "tn.ceiling"))
    live.close()
    r = cli("drop-segment", "tn", "--state-dir", state_dir)
    assert r.returncode == 1 and "shmnonce unlink tn" in r.stderr
    assert os.path.exists(f"/dev/shm/{live.segment_name}")  # nothing destroyed


def test_ceiling_restored_from_an_old_backup_is_raised_at_attach(state_dir: str) -> None:
    live, _ = _issue(state_dir, "bk")
    path = os.path.join(live.state_dir, "bk.ceiling")
    with open(path, "rb") as fh:
        old = fh.read()
    far = live.jump_forward(60 * 10**9)  # moves the ceiling past the backup
    with open(path, "wb") as fh:
        fh.write(old)  # "restore" the backup
    os.chmod(path, 0o600)
    with ShmNonce.attach("bk", state_dir) as other:
        ceiling = read_ceiling(path)
        assert ceiling is not None and ceiling.limit >= far
        other.close()
    live.close()
    os.unlink(f"/dev/shm/{live.segment_name}")  # reboot: the file alone must suffice
    with ShmNonce.attach("bk", state_dir) as eng:
        assert eng.next() > far
        eng.unlink()


def test_drop_segment_refuses_while_processes_are_attached(state_dir: str) -> None:
    live, vals = _issue(state_dir, "at")
    r = cli("drop-segment", "at", "--state-dir", state_dir)
    assert r.returncode == 1 and "attached" in r.stderr
    assert live.next() > max(vals)  # untouched
    r = cli("drop-segment", "at", "--force", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    with pytest.raises(StateError, match="unlinked"):
        live.next()
    with pytest.raises(StateError, match="this process still has a handle"):
        ShmNonce.attach("at", state_dir)
    live.close()
    with ShmNonce.attach("at", state_dir) as eng:
        assert eng.next() > max(vals)
        eng.unlink()
