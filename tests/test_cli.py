"""The command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shmnonce import ShmNonce

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, entry: str = "module") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shmnonce"] if entry == "module" else ["shmnonce"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_next_status_jump_unlink(state_dir: str) -> None:
    r = cli("next", "c1", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    first = int(r.stdout)
    r = cli("jump", "c1", "5000000000", "--state-dir", state_dir)
    assert r.returncode == 0 and int(r.stdout) >= first + 5_000_000_000
    jumped = int(r.stdout)
    r = cli("status", "c1", "--json", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["name"] == "c1" and data["last_nonce"] == jumped and data["total_issued"] == 1
    assert data["persisted_ceiling"] > jumped
    r = cli("status", "c1", "--state-dir", state_dir)
    assert r.returncode == 0 and "last_nonce" in r.stdout and str(jumped) in r.stdout
    with ShmNonce.attach("c1", state_dir) as e:
        assert e.next() > jumped
        seg = e.segment_name
    r = cli("unlink", "c1", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(f"/dev/shm/{seg}")


def test_console_script(state_dir: str) -> None:
    r = cli("next", "c2", "--state-dir", state_dir, entry="script")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0


@pytest.mark.parametrize(
    "args",
    [
        ("next", "bad/name"),
        ("jump", "c3", "-5"),
        ("jump", "c3", "abc"),
        ("jump", "c3", str(2**64)),
        ("status",),
        ("frobnicate", "c3"),
    ],
)
def test_errors_exit_non_zero_with_one_line(state_dir: str, args: tuple[str, ...]) -> None:
    r = cli(*args, "--state-dir", state_dir)
    assert r.returncode != 0
    assert r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(("shmnonce: error:", "usage:")) or "error" in last
    assert "Traceback" not in r.stderr


def test_state_error_is_one_line(state_dir: str) -> None:
    with ShmNonce.attach("c4", state_dir) as e:
        e.next()
        path = os.path.join(e.state_dir, "c4.ceiling")
    with open(path, "wb") as fh:
        fh.write(b"junk")
    r = cli("status", "c4", "--state-dir", state_dir)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and path in r.stderr


@pytest.mark.parametrize("sub", [[], ["status"], ["next"], ["jump"], ["unlink"]])
def test_help(sub: list[str]) -> None:
    r = cli(*sub, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout
