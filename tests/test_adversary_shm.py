"""Adversarial findings on the shared-memory engine (each xfail(strict) until fixed).

Each test reproduces a defect found by an adversarial review; the ``reason`` names
the mechanism. See the review report for severity.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from shmnonce import ShmNonce, StateError
from tests._users import ensure_user

HOUR = 3600 * 10**9


@pytest.mark.timeout(60)
def test_parent_writable_by_a_shared_group_is_refused() -> None:
    """A member of a group that may write the parent could rename the state directory away
    after a reboot, and the owner's next attach would restart from the clock (values an
    hour below those issued, before the fix): such a parent is refused up front."""
    other = ensure_user("shmnonce-t1")
    top = tempfile.mkdtemp(prefix="adv-grp-")
    os.chmod(top, 0o755)
    parent = os.path.join(top, "srv")
    os.mkdir(parent)
    os.chown(parent, 0, other.gid)  # root-owned, group-writable by the other user's group
    os.chmod(parent, 0o775)
    sd = os.path.join(parent, "state")
    with pytest.raises(StateError, match=r"srv .*group .*members other than this user"):
        ShmNonce.attach("adv-grp", sd)
    assert not os.path.exists(sd)
    # The same mode with this user's own private group (root's "root" here) is accepted,
    # and so is a shared group with the sticky bit (nobody can rename others' entries).
    os.chown(parent, 0, 0)
    with ShmNonce.attach("adv-grp", sd) as eng:
        eng.next()
    os.chown(parent, 0, other.gid)
    os.chmod(parent, 0o1775)
    with ShmNonce.attach("adv-grp", sd) as eng:
        eng.unlink()


_EMFILE_CHILD = r"""
import os, resource, sys, tempfile
from shmnonce import ShmNonce
sd = sys.argv[1]
engs = []
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
try:
    for i in range(100):
        engs.append(ShmNonce.attach(f"k{i}", sd))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.timeout(60)
def test_too_many_open_files_is_not_reported_as_damaged_state(tmp_path: object) -> None:
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sd = os.path.join(str(tmp_path), "state")
    out = subprocess.run(
        [sys.executable, "-c", _EMFILE_CHILD, sd], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=root),
    ).stdout
    assert "Too many open files" in out, out
    assert "rm -r" not in out and "backup" not in out, out
