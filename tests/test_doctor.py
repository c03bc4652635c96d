"""Operator checks (run_doctor) and process inspection (_procinfo)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from shmnonce import ShmNonce
from shmnonce.ops import procinfo as _procinfo
from shmnonce.ops.doctor import DoctorReport, Finding, run_doctor
from shmnonce.shm.ceiling import write_ceiling
from shmnonce.shm.segment import SIZE

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Attach, optionally enter serialized(), signal readiness, then wait to be killed.
HOLDER = r"""
import os, sys, time
from shmnonce import ShmNonce
name, state_dir, ready, mode = sys.argv[1:5]
eng = ShmNonce.attach(name, state_dir)
if mode == "hold":
    with eng.serialized():
        open(ready, "w").close()
        time.sleep(60)
else:
    open(ready, "w").close()
    time.sleep(60)
"""


@contextlib.contextmanager
def attached_process(name: str, state_dir: str, tmp: str, mode: str) -> Iterator[subprocess.Popen[bytes]]:
    ready = os.path.join(tmp, f"{name}-{mode}.ready")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, name, state_dir, ready, mode], env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            assert proc.poll() is None, "helper died"
            assert time.monotonic() < deadline, "helper did not get ready"
            time.sleep(0.01)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _of(rep: DoctorReport, check: str, sequence: str | None = None) -> list[Finding]:
    return [f for f in rep.findings if f.check == check and (sequence is None or f.sequence == sequence)]


def _statuses(rep: DoctorReport, check: str, sequence: str | None = None) -> set[str]:
    return {f.status for f in _of(rep, check, sequence)}


# --------------------------------------------------------------------------- doctor


def test_healthy_sequence(state_dir: str) -> None:
    with ShmNonce.attach("h", state_dir) as eng:
        eng.next()
        rep = run_doctor("h", state_dir)
    assert rep.sequences == ["h"]
    for check in ("state_dir", "files", "ceiling", "clock"):
        assert _statuses(rep, check) == {"ok"}, (check, rep.as_dict())
    data = rep.as_dict()
    assert data["state_dir"] == os.path.realpath(state_dir)
    assert isinstance(data["counts"], dict) and set(data["counts"]) == {"ok", "warn", "error"}


def test_every_sequence_of_the_directory_is_checked(state_dir: str) -> None:
    for name in ("a", "b"):
        with ShmNonce.attach(name, state_dir) as eng:
            eng.next()
    rep = run_doctor(None, state_dir)
    assert rep.sequences == ["a", "b"]
    assert _statuses(rep, "ceiling", "a") == {"ok"} and _statuses(rep, "ceiling", "b") == {"ok"}


def test_clock_behind_last_value_warns(state_dir: str) -> None:
    with ShmNonce.attach("c", state_dir) as eng:
        eng.jump_forward(60_000_000_000)
        rep = run_doctor("c", state_dir)
    (f,) = _of(rep, "clock", "c")
    assert f.status == "warn" and "behind" in f.message
    behind = f.details["behind_ns"]
    assert isinstance(behind, int) and 59_000_000_000 < behind <= 60_000_000_000
    assert rep.ok  # a warning is not a failure


def test_missing_ceiling_with_live_segment_is_an_error(state_dir: str) -> None:
    eng = ShmNonce.attach("m", state_dir)
    try:
        eng.next()
        os.unlink(os.path.join(eng.state_dir, "m.ceiling"))
        rep = run_doctor("m", state_dir)
        assert "error" in _statuses(rep, "ceiling", "m")
        assert any("missing" in f.message for f in _of(rep, "ceiling", "m"))
        assert not rep.ok
    finally:
        eng.close()


def test_corrupt_ceiling_is_an_error(state_dir: str) -> None:
    with ShmNonce.attach("g", state_dir) as eng:
        eng.next()
        path = os.path.join(eng.state_dir, "g.ceiling")
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    rep = run_doctor("g", state_dir)
    errors = [f for f in _of(rep, "ceiling", "g") if f.status == "error"]
    assert errors and path in errors[0].message


def test_ceiling_below_last_value_is_an_error(state_dir: str) -> None:
    with ShmNonce.attach("low", state_dir) as eng:
        last = eng.next()
        seg_id = eng._seg.header.segment_id
        path = os.path.join(eng.state_dir, "low.ceiling")
    write_ceiling(path, last - 1000, seg_id)
    rep = run_doctor("low", state_dir)
    assert any(f.status == "error" and "below the last value" in f.message for f in _of(rep, "ceiling"))


def test_state_dir_permissions(state_dir: str) -> None:
    with ShmNonce.attach("p", state_dir) as eng:
        real = eng.state_dir
    try:
        os.chmod(real, 0o777)
        assert "error" in _statuses(run_doctor("p", state_dir), "state_dir")
        os.chmod(real, 0o750)
        assert _statuses(run_doctor("p", state_dir), "state_dir") == {"warn"}
        os.chmod(real, 0o700)
        os.chmod(os.path.join(real, "p.lock"), 0o644)
        rep = run_doctor("p", state_dir)
        assert _statuses(rep, "state_dir") == {"ok"}
        assert _statuses(rep, "files", "p") == {"error"}  # attach refuses it
    finally:
        os.chmod(real, 0o700)


def test_missing_state_dir_is_reported_and_not_created(tmp_path: object) -> None:
    missing = os.path.join(str(tmp_path), "nope")
    assert _statuses(run_doctor("x", missing), "state_dir") == {"error"}
    assert _statuses(run_doctor(None, missing), "state_dir") == {"warn"}
    assert not os.path.exists(missing)


def test_doctor_creates_nothing(state_dir: str) -> None:
    os.makedirs(state_dir)
    rep = run_doctor("fresh", state_dir)
    assert os.listdir(state_dir) == []
    assert _statuses(rep, "ceiling", "fresh") == {"ok"}


def test_no_live_segment_compares_the_clock_with_the_ceiling(state_dir: str) -> None:
    with ShmNonce.attach("r", state_dir) as eng:
        eng.jump_forward(120_000_000_000)
        seg = eng.segment_name
    os.unlink(f"/dev/shm/{seg}")  # as after a reboot
    rep = run_doctor("r", state_dir)
    assert _statuses(rep, "ceiling", "r") == {"ok"}
    (clock,) = _of(rep, "clock", "r")
    assert clock.status == "warn" and "ahead" in clock.message


def test_orphan_segments(state_dir: str, tmp_path: object) -> None:
    gone = os.path.join(str(tmp_path), "gone")
    replaced = os.path.join(str(tmp_path), "replaced")
    segs = []
    try:
        for d in (gone, replaced):
            with ShmNonce.attach("o", d) as eng:
                eng.next()
                segs.append(eng.segment_name)
        shutil.rmtree(gone)
        lock = os.path.join(replaced, "o.lock")
        # a new file with another inode than the segment recorded (created before the old
        # one goes, so the file system cannot hand out the same inode number again)
        open(lock + ".new", "w").close()
        os.replace(lock + ".new", lock)
        rep = run_doctor(None, state_dir)
        by_seg = {f.details.get("segment"): f for f in _of(rep, "orphan_segment")}
        assert by_seg[segs[0]].status == "warn" and "gone" in by_seg[segs[0]].message
        assert by_seg[segs[0]].details["attached_pids"] == []
        assert by_seg[segs[1]].status == "error" and "replaced" in by_seg[segs[1]].message
    finally:
        for s in segs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{s}")


def test_orphan_segment_still_mapped_names_the_process(tmp_path: object) -> None:
    gone = os.path.join(str(tmp_path), "gone2")
    with ShmNonce.attach("q", gone) as eng:
        seg = eng.segment_name
    try:
        with attached_process("q", gone, str(tmp_path), "attach") as proc:
            shutil.rmtree(gone)
            rep = run_doctor(None, os.path.join(str(tmp_path), "elsewhere"))
            (f,) = [f for f in _of(rep, "orphan_segment") if f.details.get("segment") == seg]
            assert f.details["attached_pids"] == [proc.pid]
            assert str(proc.pid) in f.message
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{seg}")


# --------------------------------------------------------------------------- procinfo


def _holder(eng: ShmNonce) -> tuple[_procinfo.AttachedScan, _procinfo.Holder | None]:
    base = os.path.join(eng.state_dir, eng.name)
    scan = _procinfo.scan_attached(eng.segment_name, base + ".lock", base + ".queue", exclude_pid=os.getpid())
    view = eng._shared(0, SIZE)
    try:
        return scan, _procinfo.find_holder(view, base + ".queue", scan.processes)
    finally:
        view.release()


def test_attached_processes_and_section_holder(state_dir: str, tmp_path: object) -> None:
    with ShmNonce.attach("s", state_dir) as eng:
        scan, holder = _holder(eng)
        assert scan.processes == [] and holder is None
        with attached_process("s", state_dir, str(tmp_path), "attach") as idle, \
                attached_process("s", state_dir, str(tmp_path), "hold") as busy:
            scan, holder = _holder(eng)
            pids = {p.pid: p for p in scan.processes}
            assert set(pids) == {idle.pid, busy.pid}
            assert {"lock-file", "segment-map"} <= set(pids[idle.pid].via)
            assert "queue-file" in pids[busy.pid].via
            assert holder is not None and holder.determined and holder.pid == busy.pid
            assert holder.ticket >= 0
            # our own section: not reported as another process's, and we are excluded
            busy.send_signal(signal.SIGKILL)
            busy.wait()
            with eng.serialized(timeout=10):
                scan, holder = _holder(eng)
                assert holder is not None and holder.pid is None and not holder.determined
            scan, holder = _holder(eng)
            assert holder is None, "a killed holder is still reported"
            assert [p.pid for p in scan.processes] == [idle.pid]


def test_holder_undetermined_without_access(
    state_dir: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(pid: int, fd: int) -> list[tuple[int, int, int, int, str]]:
        raise PermissionError(13, "Permission denied")

    with ShmNonce.attach("u", state_dir) as eng, attached_process("u", state_dir, str(tmp_path), "hold"):
        monkeypatch.setattr(_procinfo, "_fd_write_locks", denied)
        _scan, holder = _holder(eng)
    assert holder is not None and holder.pid is None and not holder.determined
    assert "held" in holder.note and "root" in holder.note


def test_ceiling_written_through_another_segment_is_an_error(state_dir: str) -> None:
    with ShmNonce.attach("rep", state_dir) as eng:
        last = eng.next()
        other_id = eng._seg.header.segment_id ^ 2
        path = os.path.join(eng.state_dir, "rep.ceiling")
    write_ceiling(path, last + 10**12, other_id)
    rep = run_doctor("rep", state_dir)
    assert any(f.status == "error" and "another segment" in f.message for f in _of(rep, "ceiling", "rep"))
