"""The command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import shmnonce
from shmnonce import ShmNonce
from shmnonce._paths import segment_name

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The console script that pip installed for this interpreter: next to it, whether or not
# the virtualenv is activated (a bare "shmnonce" could be another installation's on PATH).
SCRIPT = os.path.join(os.path.dirname(sys.executable), "shmnonce")


def cli(*args: str, entry: str = "module", env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shmnonce"] if entry == "module" else [SCRIPT]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )


def one_line(r: subprocess.CompletedProcess[str], status: int) -> str:
    """The single stderr line of a failed command (nothing on stdout)."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), r.stderr
    assert lines[0].startswith("shmnonce") and ": error: " in lines[0], r.stderr
    return lines[0]


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
    assert os.access(SCRIPT, os.X_OK), f"no console script {SCRIPT}: pip install -e '.[test]'"
    r = cli("next", "c2", "--state-dir", state_dir, entry="script")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0
    # it runs this checkout's code, with this interpreter
    r = cli("--version", entry="script")
    assert r.stdout == f"shmnonce {shmnonce.__version__}\n", r
    with open(SCRIPT) as fh:  # "#!PYTHON"; for a long path "#!/bin/sh", then "exec PYTHON"
        head = fh.readline() + fh.readline()
    assert head.startswith("#!") and os.path.dirname(sys.executable) in head, head


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
    line = one_line(r, r.returncode)
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr
    if r.returncode == 2:  # a usage error: points to the help
        assert "--help" in line


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ((), "required: COMMAND"),
        (("frobnicate", "x"), "invalid choice: 'frobnicate'"),
        (("jump", "x", "-5"), "must be >= 0"),
        (("next", "x", "--bogus"), "unrecognized arguments: --bogus"),
        (("import-legacy", "x"), "required: FILE"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: tuple[str, ...], expect: str) -> None:
    line = one_line(cli(*args), 2)
    assert expect in line and "--help" in line, line


def test_status_of_unknown_sequence_creates_nothing(state_dir: str) -> None:
    line = one_line(cli("status", "typo", "--state-dir", state_dir), 1)
    assert "typo" in line
    assert not os.path.exists(state_dir), "status created the state directory"
    # default state dir (from the environment), not created either
    one_line(cli("status", "typo", "--json", env={"SHMNONCE_STATE_DIR": state_dir}), 1)
    assert not os.path.exists(state_dir)
    # another sequence exists in the directory: still no lock file, ceiling or segment
    assert cli("next", "other", "--state-dir", state_dir).returncode == 0
    real = os.path.realpath(state_dir)
    before = sorted(os.listdir(real))
    one_line(cli("status", "typo", "--state-dir", state_dir), 1)
    assert sorted(os.listdir(real)) == before and not any(f.startswith("typo") for f in before)
    assert not os.path.exists(f"/dev/shm/{segment_name('typo', real)}")
    one_line(cli("status", "bad/name", "--state-dir", state_dir), 1)
    # next and jump still start a sequence; status then works
    assert cli("jump", "typo", "0", "--state-dir", state_dir).returncode == 0
    r = cli("status", "typo", "--json", "--state-dir", state_dir)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "typo", r.stderr
    # a sequence known only by its ceiling (lock file and segment removed) is still found
    os.unlink(os.path.join(real, "typo.lock"))
    os.unlink(f"/dev/shm/{segment_name('typo', real)}")
    r = cli("status", "typo", "--json", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    assert cli("unlink", "typo", "--state-dir", state_dir).returncode == 0
    one_line(cli("status", "typo", "--state-dir", state_dir), 1)


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
    assert r.returncode == 0 and "usage:" in r.stdout and r.stderr == ""
