"""Operator commands run as a subprocess: status (attached processes, lock holder),
doctor and import-legacy, in text and JSON."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from shmnonce import ShmNonce

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = r"""
import sys, time
from shmnonce import ShmNonce
name, state_dir, ready = sys.argv[1:4]
eng = ShmNonce.attach(name, state_dir)
with eng.serialized():
    open(ready, "w").close()
    time.sleep(60)
"""

# The keys `status --json` had before the operator extensions; they must stay.
BASE_KEYS = {
    "name", "state_dir", "segment", "last_nonce", "total_issued", "created_at",
    "clock_regressions", "persisted_ceiling",
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmnonce", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmnonce: error:"), r.stderr
    return lines[0]


@contextlib.contextmanager
def holder(name: str, state_dir: str, tmp: str) -> Iterator[subprocess.Popen[bytes]]:
    ready = os.path.join(tmp, f"{name}.ready")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, state_dir, ready], env=dict(os.environ, PYTHONPATH=ROOT)
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            assert proc.poll() is None and time.monotonic() < deadline, "holder did not start"
            time.sleep(0.01)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- status


def test_status_shows_attached_processes_and_lock_holder(state_dir: str, tmp_path: object) -> None:
    with ShmNonce.attach("st", state_dir) as eng:
        eng.next()
    r = cli("status", "st", "--json", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    idle = json.loads(r.stdout)
    assert set(idle) >= BASE_KEYS
    assert idle["attached"] == [] and idle["lock_holder"] is None
    r = cli("status", "st", "--state-dir", state_dir)
    assert r.returncode == 0 and any(
        line.split()[:2] == ["lock_holder", "none"] for line in r.stdout.splitlines()
    ), r.stdout

    with holder("st", state_dir, str(tmp_path)) as proc:
        r = cli("status", "st", "--json", "--state-dir", state_dir)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert set(data) >= BASE_KEYS
        assert data["last_nonce"] > idle["last_nonce"]
        assert [p["pid"] for p in data["attached"]] == [proc.pid]
        assert "queue-file" in data["attached"][0]["via"]
        assert isinstance(data["attached_uninspectable"], int)
        h = data["lock_holder"]
        assert h["pid"] == proc.pid and h["determined"] is True
        assert isinstance(h["ticket"], int) and h["note"]
        r = cli("status", "st", "--state-dir", state_dir)
        assert r.returncode == 0, r.stderr
        lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
        assert set(lines) >= BASE_KEYS
        assert str(proc.pid) in lines["lock_holder"] and "ticket" in lines["lock_holder"]
        assert str(proc.pid) in lines["attached"]
        proc.kill()
        proc.wait()
        r = cli("status", "st", "--json", "--state-dir", state_dir)
        data = json.loads(r.stdout)
        assert data["lock_holder"] is None and data["attached"] == []


# --------------------------------------------------------------------------- doctor


def test_doctor_json_and_text(state_dir: str) -> None:
    with ShmNonce.attach("d", state_dir) as eng:
        eng.next()
    r = cli("doctor", "d", "--json", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] is True and data["sequences"] == ["d"]
    checks = {(c["check"], c["sequence"]): c for c in data["checks"]}
    for key in [("state_dir", None), ("files", "d"), ("ceiling", "d"), ("clock", "d")]:
        assert checks[key]["status"] == "ok", checks[key]
    assert all(set(c) == {"check", "status", "sequence", "message", "details"} for c in data["checks"])
    r = cli("doctor", "--state-dir", state_dir)  # NAME optional: every sequence in the directory
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("OK") and "ceiling" in line and "[d]" in line for line in lines)
    assert lines[-1].startswith("summary:")


def test_doctor_exit_status_on_failure(state_dir: str) -> None:
    with ShmNonce.attach("bad", state_dir) as eng:
        eng.next()
        path = os.path.join(eng.state_dir, "bad.ceiling")
    with open(path, "wb") as fh:
        fh.write(b"junk")
    r = cli("doctor", "bad", "--json", "--state-dir", state_dir)
    assert r.returncode == 2
    data = json.loads(r.stdout)
    assert data["ok"] is False and data["counts"]["error"] >= 1
    r = cli("doctor", "bad", "--state-dir", state_dir)
    assert r.returncode == 2
    assert any(line.startswith("ERROR") and path in line for line in r.stdout.splitlines())


def test_doctor_warns_when_clock_is_behind(state_dir: str) -> None:
    with ShmNonce.attach("ahead", state_dir) as eng:
        eng.jump_forward(30_000_000_000)
    r = cli("doctor", "ahead", "--json", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    (clock,) = [c for c in json.loads(r.stdout)["checks"] if c["check"] == "clock"]
    assert clock["status"] == "warn" and clock["details"]["behind_ns"] > 29_000_000_000


def test_doctor_invalid_name_is_one_line(state_dir: str) -> None:
    one_line_error(cli("doctor", "bad/name", "--state-dir", state_dir))


# --------------------------------------------------------------------------- import-legacy


def _legacy(tmp: str, name: str, content: str) -> str:
    path = os.path.join(tmp, name)
    with open(path, "w") as fh:
        fh.write(content)
    return path


def test_import_legacy_good_files(state_dir: str, tmp_path: object) -> None:
    target_ms = time.time_ns() // 1_000_000 + 3_600_000
    ms = _legacy(str(tmp_path), "kraken_nonce_alice.txt", f"{target_ms}\n")
    ns = _legacy(str(tmp_path), "kraken_global_nonce.txt", str(time.time_ns()))
    r = cli("import-legacy", "mig", ms, ns, "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    assert f"ok   {ms}: {target_ms} (ms) = {target_ms * 1_000_000} ns" in r.stdout
    assert f"ok   {ns}:" in r.stdout and "raised" in r.stdout
    r = cli("next", "mig", "--state-dir", state_dir)
    assert int(r.stdout) > target_ms * 1_000_000
    r = cli("import-legacy", "mig", ms, "--json", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["applied"] is True and data["raised"] is False
    assert data["files"][0]["path"] == ms and data["files"][0]["unit"] == "ms"


def test_import_legacy_bad_files_change_nothing(state_dir: str, tmp_path: object) -> None:
    target = time.time_ns() + 3_600_000_000_000
    good = _legacy(str(tmp_path), "good.txt", str(target))
    bad = _legacy(str(tmp_path), "bad.txt", "not a nonce")
    neg = _legacy(str(tmp_path), "neg.txt", "-1")
    missing = os.path.join(str(tmp_path), "missing.txt")
    before = cli("jump", "legacy", "0", "--state-dir", state_dir)
    assert before.returncode == 0, before.stderr
    r = cli("import-legacy", "legacy", good, bad, neg, missing, "--state-dir", state_dir)
    line = one_line_error(r)
    assert "3 of 4" in line and bad in line and neg in line and missing in line
    assert f"BAD  {bad}: not an integer" in r.stdout
    assert f"BAD  {neg}: negative" in r.stdout
    assert f"BAD  {missing}: unreadable" in r.stdout
    status = json.loads(cli("status", "legacy", "--json", "--state-dir", state_dir).stdout)
    assert status["last_nonce"] == int(before.stdout), "bad files must leave the sequence untouched"
    r = cli("import-legacy", "legacy", good, bad, "--skip-bad", "--state-dir", state_dir)
    assert r.returncode == 0, r.stderr
    assert f"BAD  {bad}" in r.stdout and "raised" in r.stdout
    status = json.loads(cli("status", "legacy", "--json", "--state-dir", state_dir).stdout)
    assert status["last_nonce"] >= target


def test_import_legacy_needs_files(state_dir: str) -> None:
    r = cli("import-legacy", "x", "--state-dir", state_dir)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "required: FILE" in lines[0] and "--help" in lines[0], r.stderr


@pytest.mark.parametrize("sub", [["import-legacy"], ["doctor"]])
def test_help(sub: list[str]) -> None:
    r = cli(*sub, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout
