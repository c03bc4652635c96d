"""Issue 8 point 9: ``status`` never creates; ``jump_forward(0)`` as documented.

(The system user without a writable home is in test_ownership.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from shmnonce import ShmNonce
from shmnonce.shm.ceiling import read_ceiling

from ._users import remove_segments_under

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(autouse=True)
def _no_leftover_segments(tmp_path: object) -> Iterator[None]:
    yield
    remove_segments_under(str(tmp_path))



def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmnonce", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("how", ["drop-segment", "reboot"])
def test_status_of_a_sequence_without_segment_creates_nothing(state_dir: str, how: str) -> None:
    with ShmNonce.attach("st", state_dir) as eng:
        eng.next()
        real, shm = eng.state_dir, f"/dev/shm/{eng.segment_name}"
    if how == "drop-segment":
        assert cli("drop-segment", "st", "--state-dir", real).returncode == 0
    else:
        os.unlink(shm)
    before = sorted(os.listdir(real))
    ceiling = read_ceiling(os.path.join(real, "st.ceiling"))
    assert ceiling is not None
    r = cli("status", "st", "--json", "--state-dir", real)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["segment_live"] is False and data["last_nonce"] is None
    assert data["persisted_ceiling"] == ceiling.limit + 1
    assert data["segment"] == os.path.basename(shm)
    r = cli("status", "st", "--state-dir", real)
    assert r.returncode == 0 and "no live segment" in r.stdout, r
    assert not os.path.exists(shm), "status created the segment"
    assert sorted(os.listdir(real)) == before, "status created a file"
    with ShmNonce.attach("st", state_dir) as eng:  # the next attach resumes above the ceiling
        assert eng.next() > ceiling.limit
        eng.unlink()


def test_status_of_a_live_sequence(state_dir: str) -> None:
    with ShmNonce.attach("lv", state_dir) as eng:
        v = eng.next()
        r = cli("status", "lv", "--json", "--state-dir", eng.state_dir)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["segment_live"] is True and data["last_nonce"] == v
        eng.unlink()


def test_jump_forward_zero_with_the_clock_behind_returns_the_last_value(state_dir: str) -> None:
    """Documented: jump_forward moves, it does not issue; max(last, now) + 0 may be last."""
    with ShmNonce.attach("j0", state_dir) as eng:
        top = eng.jump_forward(3600 * 10**9)  # the clock is now an hour behind
        assert eng.jump_forward(0) == top == eng.peek()
        assert eng.next() > top
        assert eng.jump_forward(1) > top + 1  # delta >= 1: above every value issued
        eng.unlink()


def test_jump_forward_zero_with_the_clock_ahead_moves_to_now(state_dir: str) -> None:
    with ShmNonce.attach("j1", state_dir) as eng:
        eng.next()
        now = 2**62
        eng._clock = lambda: now  # type: ignore[method-assign]
        assert eng.jump_forward(0) == now
        assert eng.next() == now + 1
        eng.unlink()
