"""Corrupted state: flipped bits in the segment, a ceiling from another sequence.

Every outcome must be an error naming what is wrong, or a recovery above the
persisted ceiling; never a lower value, never a hang (pytest-timeout). The sequence
is an hour ahead of the clock first, so a value taken from the clock alone would be
lower than the ones issued before.
"""

from __future__ import annotations

import os
import struct
import time
import zlib

import pytest

from shmnonce import ShmNonce, StateError
from shmnonce.ops.doctor import DoctorReport, Finding, _check_sequence
from shmnonce.shm.ceiling import read_ceiling
from shmnonce.shm.segment import FLAGS_OFFSET, HEADER, MIRRORED, NAME_OFFSET, RECORD_OFFSET, mark_unlinked

pytestmark = pytest.mark.timeout(180)
HOUR = 3600 * 10**9
RECORD_SPAN = (RECORD_OFFSET, MIRRORED.size)
"""Where the live record is: the record and its mirror (80 bytes)."""
HEADER_SPANS = ((0, HEADER.size), (NAME_OFFSET, 64))
"""The header and the sequence name, which its checksum covers."""


def _flip(buf: object, bit: int) -> None:
    mv = memoryview(buf)  # type: ignore[arg-type]
    mv[bit // 8] ^= 1 << (bit % 8)
    mv.release()


def _doctor(name: str, state_dir: str) -> list[Finding]:
    """The findings of ``shmnonce doctor NAME`` about the sequence (not the /dev/shm scan)."""
    rep = DoctorReport(os.path.realpath(state_dir))
    _check_sequence(rep, name, time.time_ns())
    return rep.findings


def _reboot(eng: ShmNonce) -> None:
    os.unlink(f"/dev/shm/{eng.segment_name}")


def test_every_record_bit_flip_is_detected_and_recovered_above_the_ceiling(state_dir: str) -> None:
    eng = ShmNonce.attach("bf", state_dir)
    top = eng.jump_forward(HOUR)
    offset, size = RECORD_SPAN
    recoveries = eng.stats()["torn_recoveries"]
    for bit in range(size * 8):
        for fresh in (False, True):  # the process that finds it: attached, or attaching
            _flip(eng._buf, offset * 8 + bit)
            if fresh:
                with ShmNonce.attach("bf", state_dir) as other:
                    v = other.next()
            else:
                v = eng.next()
            assert v > top, f"bit {bit} ({'attach' if fresh else 'next'}): {v} <= {top}"
            top = v
            recoveries += 1
            assert eng.stats()["torn_recoveries"] == recoveries, f"bit {bit} was not detected"
    eng.unlink()


def test_every_header_bit_flip_is_refused_at_attach(state_dir: str) -> None:
    eng = ShmNonce.attach("hf", state_dir)
    top = eng.jump_forward(HOUR)
    seg = eng.segment_name
    flags_bits = range(FLAGS_OFFSET * 8, FLAGS_OFFSET * 8 + 32)
    for offset, size in HEADER_SPANS:
        for bit in range(offset * 8, (offset + size) * 8):
            _flip(eng._buf, bit)
            try:
                with pytest.raises(StateError) as info:
                    ShmNonce.attach("hf", state_dir)
                assert f"/dev/shm/{seg}" in str(info.value), (bit, str(info.value))
                try:
                    v = eng.next()  # the attached process goes on, or stops
                except StateError:
                    assert bit in flags_bits, bit
                else:
                    assert v > top, bit
                    top = v
            finally:
                _flip(eng._buf, bit)
    eng.unlink()


def test_segment_marked_unlinked_is_replaced_by_the_next_attach(state_dir: str) -> None:
    """A drop-segment or unlink killed between marking the segment and removing it."""
    with ShmNonce.attach("mu", state_dir) as eng:
        top = eng.jump_forward(HOUR)
        mark_unlinked(eng._buf)
        with pytest.raises(StateError, match="unlinked"):
            eng.next()  # its users stop ...
    with ShmNonce.attach("mu", state_dir) as eng:  # ... and the next attach starts a new one
        assert eng.next() > top
        assert eng.stats()["total_issued"] == 1
        eng.unlink()


def _sequence(state_dir: str, name: str, jump: int) -> tuple[str, int]:
    """A sequence whose segment is gone (reboot): its ceiling path and its last value."""
    with ShmNonce.attach(name, state_dir) as eng:
        top = eng.jump_forward(jump) if jump else eng.next()
        path = os.path.join(eng.state_dir, f"{name}.ceiling")
    _reboot(eng)
    return path, top


@pytest.mark.parametrize("how", ["copied", "symlinked"])
@pytest.mark.parametrize("other", ["same name, other state_dir", "other name, same state_dir"])
def test_ceiling_of_another_sequence_is_refused(state_dir: str, tmp_path: object, how: str,
                                                other: str) -> None:
    mine, top = _sequence(state_dir, "own", 2 * HOUR)
    other_dir = os.path.join(str(tmp_path), "other") if other.startswith("same") else state_dir
    theirs, _ = _sequence(other_dir, "own" if other.startswith("same") else "theirs", 0)
    os.unlink(mine)
    if how == "copied":
        with open(theirs, "rb") as src, open(mine, "wb") as dst:
            dst.write(src.read())
        os.chmod(mine, 0o600)
    else:
        os.symlink(theirs, mine)
    with pytest.raises(StateError) as info:
        with ShmNonce.attach("own", state_dir) as eng:
            v = eng.next()
            assert v > top, f"resumed at {v}, below {top}"  # what accepting it leads to
    assert mine in str(info.value)
    if how == "copied":
        assert "another sequence" in str(info.value)
    assert any(f.status == "error" and mine in f.message for f in _doctor("own", state_dir))


def test_version_1_ceiling_of_this_sequence_is_accepted_and_upgraded(state_dir: str) -> None:
    path, _ = _sequence(state_dir, "v1", 0)
    limit = time.time_ns() + 2 * HOUR
    body = struct.pack("<8sIIQQQ", b"SHMNCEIL", 1, 0, limit, 0, time.time_ns())
    with open(path, "wb") as fh:
        fh.write(body + struct.pack("<I", zlib.crc32(body)))
    with ShmNonce.attach("v1", state_dir) as eng:
        assert eng.next() > limit
    with open(path, "rb") as fh:
        data = fh.read()
    assert struct.unpack_from("<I", data, 8)[0] == 2
    ceiling = read_ceiling(path)
    assert ceiling is not None and ceiling.limit > limit
    ShmNonce.attach("v1", state_dir).unlink()


def test_doctor_reports_a_record_that_differs_from_its_mirror(state_dir: str) -> None:
    with ShmNonce.attach("dr", state_dir) as eng:
        eng.jump_forward(HOUR)
        offset, size = RECORD_SPAN
        _flip(eng._buf, (offset + size - 1) * 8 + 3)  # a high bit of the last word
        found = [f for f in _doctor("dr", state_dir) if f.check == "ceiling" and f.status != "ok"]
        assert found and all(f.status == "warn" for f in found), found
        os.unlink(eng._ceiling_path)
        assert any(f.status == "error" and eng.segment_name in f.message for f in _doctor("dr", state_dir))


def test_doctor_reports_a_header_that_fails_its_checksum(state_dir: str) -> None:
    with ShmNonce.attach("dh", state_dir) as eng:
        eng.next()
        _flip(eng._buf, 16 * 8 + 5)  # created_at
        assert any(f.status == "error" and eng.segment_name in f.message for f in _doctor("dh", state_dir))
