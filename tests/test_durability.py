"""Reboots (segment gone), clocks behind, torn records, corrupt or foreign state."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import pytest

from shmnonce import ShmNonce, StateError
from shmnonce._paths import segment_name
from shmnonce.shm.ceiling import SIZE as CEILING_SIZE
from shmnonce.shm.engine import LEASE_NS
from shmnonce.shm.segment import MIRRORED, RECORD, RECORD_OFFSET

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUR = 3600 * 10**9


def _reboot(eng: ShmNonce) -> None:
    """What a reboot does to a sequence: /dev/shm is emptied."""
    os.unlink(f"/dev/shm/{eng.segment_name}")


def test_reboot_with_clock_one_hour_behind(state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = ShmNonce.attach("r", state_dir)
    before = [eng.next() for _ in range(1000)]
    eng.close()
    _reboot(eng)
    behind = time.time_ns() - HOUR
    monkeypatch.setattr(ShmNonce, "_clock", staticmethod(lambda: behind))
    with ShmNonce.attach("r", state_dir) as eng2:
        assert eng2.stats()["total_issued"] == 0  # a new segment
        after = [eng2.next() for _ in range(1000)]
        assert min(after) > max(before)
        assert after == sorted(set(after))
        eng2.unlink()


def test_reboot_after_jump_forward(state_dir: str) -> None:
    eng = ShmNonce.attach("rj", state_dir)
    far = eng.jump_forward(2 * HOUR)
    eng.close()
    _reboot(eng)
    with ShmNonce.attach("rj", state_dir) as eng2:
        assert eng2.next() > far
        eng2.unlink()


def test_ceiling_is_written_ahead_and_rarely(state_dir: str) -> None:
    eng = ShmNonce.attach("lease", state_dir)
    eng.next()
    path = os.path.join(eng.state_dir, "lease.ceiling")
    st = os.stat(path)
    ceiling = eng.stats()["persisted_ceiling"]
    values = [eng.next() for _ in range(20_000)]
    assert max(values) < ceiling  # type: ignore[operator]
    # one lease covers all of them: the file was not rewritten
    assert os.stat(path).st_ino == st.st_ino
    eng.unlink()


def test_clock_regressions_counted_and_values_keep_rising(eng: ShmNonce) -> None:
    base = time.time_ns()
    clock = [base]
    eng._clock = lambda: clock[0]  # type: ignore[method-assign]
    a = eng.next()
    clock[0] = base - 500_000  # 0.5 ms back: jitter, not counted
    b = eng.next()
    clock[0] = base - 2_000_000  # 2 ms back: counted
    c = eng.next()
    clock[0] = base - HOUR
    d = eng.next()
    e = eng.jump_forward(0)
    assert a < b < c < d <= e
    assert eng.stats()["clock_regressions"] == 2


def test_torn_record_is_detected_and_recovered_from_the_ceiling(state_dir: str) -> None:
    eng = ShmNonce.attach("torn", state_dir)
    vals = [eng.next() for _ in range(100)]
    last, limit, total, prev, reg = RECORD.unpack_from(eng._buf, RECORD_OFFSET)
    # a writer killed half-way: the record written, half of the mirror's `last` not
    torn = bytearray(MIRRORED.pack(2**63 + 5, limit, total, prev, reg, 2**63 + 5, limit, total, prev, reg))
    torn[RECORD.size + 4 : RECORD.size + 8] = struct.pack("<Q", last)[4:8]
    eng._buf[RECORD_OFFSET : RECORD_OFFSET + MIRRORED.size] = torn
    v = eng.next()
    assert v > max(vals)
    assert v < 2**63, "trusted a half-written value"
    assert v > limit, "recovery must restart above the persisted ceiling"
    assert eng.stats()["torn_recoveries"] == 1
    eng.unlink()


def test_torn_record_found_at_attach(state_dir: str) -> None:
    eng = ShmNonce.attach("torn2", state_dir)
    v = eng.jump_forward(HOUR)  # ahead of the clock, so only a correct recovery is above it
    last = RECORD.unpack_from(eng._buf, RECORD_OFFSET)[0]
    struct.pack_into("<Q", eng._buf, RECORD_OFFSET, last + 7)  # record written, mirror not
    eng.close()
    with ShmNonce.attach("torn2", state_dir) as e2:
        assert e2.stats()["torn_recoveries"] == 1
        assert e2.next() > v
        e2.unlink()


def _good_ceiling(state_dir: str, name: str) -> bytes:
    with ShmNonce.attach(name, state_dir) as e:
        e.next()
        path = os.path.join(e.state_dir, f"{name}.ceiling")
        with open(path, "rb") as fh:
            data = fh.read()
        e.close()
        _reboot(e)
    return data


def _corruptions(good: bytes) -> dict[str, bytes]:
    body = bytearray(good)
    body[8] = 99  # version 99, checksum fixed up
    body[-4:] = struct.pack("<I", zlib.crc32(bytes(body[:-4])))
    flipped = bytearray(good)
    flipped[20] ^= 0xFF
    return {
        "empty": b"",
        "truncated": good[:10],
        "garbage": os.urandom(CEILING_SIZE),
        "version": bytes(body),
        "checksum": bytes(flipped),
        "longer": good + b"x",
        "text": b"1790000000000000000\n",
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "version", "checksum", "longer", "text"])
def test_bad_ceiling_is_a_state_error_naming_the_file(state_dir: str, kind: str) -> None:
    good = _good_ceiling(state_dir, "cz")
    path = os.path.join(os.path.realpath(state_dir), "cz.ceiling")
    with open(path, "wb") as fh:
        fh.write(_corruptions(good)[kind])
    with pytest.raises(StateError) as info:
        ShmNonce.attach("cz", state_dir)
    assert path in str(info.value)
    # nothing was silently restarted: no segment was created over the unreadable state
    assert not os.path.exists(f"/dev/shm/{segment_name('cz', os.path.realpath(state_dir))}")
    with pytest.raises(StateError):
        ShmNonce.attach("cz", state_dir)


def test_bad_ceiling_with_live_segment_fails_at_attach(state_dir: str) -> None:
    a = ShmNonce.attach("cl", state_dir)
    a.next()
    path = os.path.join(a.state_dir, "cl.ceiling")
    with open(path, "wb") as fh:
        fh.write(b"\0" * CEILING_SIZE)
    with pytest.raises(StateError, match=r"cl\.ceiling"):
        ShmNonce.attach("cl", state_dir)
    a.close()


def test_missing_ceiling_with_live_segment(state_dir: str) -> None:
    a = ShmNonce.attach("mc", state_dir)
    a.next()
    os.unlink(os.path.join(a.state_dir, "mc.ceiling"))
    with pytest.raises(StateError, match="missing"):
        ShmNonce.attach("mc", state_dir)
    a.close()


def _segment_path(state_dir: str, name: str) -> str:
    with ShmNonce.attach(name, state_dir) as e:
        e.next()
        return f"/dev/shm/{e.segment_name}"


@pytest.mark.parametrize("damage", ["magic", "version", "size", "short"])
def test_foreign_or_damaged_segment_is_a_state_error(state_dir: str, damage: str) -> None:
    seg = _segment_path(state_dir, "sg")
    with open(seg, "r+b") as fh:
        if damage == "magic":
            fh.write(b"NOTMINE!")
        elif damage == "version":
            fh.seek(8)
            fh.write(struct.pack("<I", 7))
        elif damage == "size":
            fh.truncate(os.path.getsize(seg) * 2)
        else:
            fh.truncate(100)
    with pytest.raises(StateError, match=seg.rsplit("/", 1)[1]):
        ShmNonce.attach("sg", state_dir)


def test_half_initialised_segment_is_initialised_again(state_dir: str) -> None:
    """A creator killed before writing the magic leaves zeros: safe to redo."""
    seg = _segment_path(state_dir, "hz")
    with ShmNonce.attach("hz", state_dir) as e:
        last = e.jump_forward(HOUR)  # ahead of the clock: the clock alone cannot pass it
    size = os.path.getsize(seg)
    with open(seg, "r+b") as fh:
        fh.write(b"\0" * size)
    with ShmNonce.attach("hz", state_dir) as e:
        assert e.next() > last
        e.unlink()


def test_state_dir_replaced_under_a_live_segment(state_dir: str) -> None:
    a = ShmNonce.attach("sd", state_dir)
    a.next()
    shutil.rmtree(a.state_dir)
    with pytest.raises(StateError, match="another lock or queue file"):
        ShmNonce.attach("sd", state_dir)
    a.close()


def test_unrelated_process_exit_keeps_the_segment(state_dir: str) -> None:
    """CPython gh-82300: an attaching process's resource tracker must not unlink it."""
    with ShmNonce.attach("rt", state_dir) as eng:
        v = eng.next()
        seg = f"/dev/shm/{eng.segment_name}"
    code = (
        "import sys; from multiprocessing import shared_memory, resource_tracker\n"
        "from shmnonce import ShmNonce\n"
        "own = shared_memory.SharedMemory(create=True, size=64)  # starts the tracker\n"
        "e = ShmNonce.attach('rt', sys.argv[1]); print(e.next())\n"
        "own.close(); own.unlink()\n"
    )
    for _ in range(2):
        res = subprocess.run([sys.executable, "-W", "error", "-c", code, state_dir],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert "leaked" not in res.stderr and res.stderr == ""
        assert os.path.exists(seg)
    with ShmNonce.attach("rt", state_dir) as eng:
        assert eng.stats()["total_issued"] == 3
        assert eng.next() > v
        eng.unlink()


def test_reboot_end_to_end_under_faketime(state_dir: str) -> None:
    """Separate processes; the second one after a 'reboot' with the clock 1 h behind."""
    code = (
        "import sys, time; from shmnonce import ShmNonce\n"
        "e = ShmNonce.attach('ft', sys.argv[1])\n"
        "print(max(e.next() for _ in range(1000)), time.time_ns(), e.segment_name)\n"
    )

    def run(*prefix: str) -> tuple[int, int, str]:
        res = subprocess.run([*prefix, sys.executable, "-c", code, state_dir],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
        a, b, c = res.stdout.split()
        return int(a), int(b), c

    first, _, seg = run()
    os.unlink(f"/dev/shm/{seg}")
    second, clock, _ = run("faketime", "-f", "-1h")
    assert clock < time.time_ns() - HOUR + 60 * 10**9, "faketime did not move the clock"
    assert second > first
    # control: without the persisted ceiling the same run would go backwards
    os.unlink(f"/dev/shm/{seg}")
    os.unlink(os.path.join(os.path.realpath(state_dir), "ft.ceiling"))
    third, _, _ = run("faketime", "-f", "-1h")
    assert third < first


def test_segment_removed_while_attached(state_dir: str) -> None:
    """While a process still uses a removed segment, nobody may start a second one.

    (systemd-logind's RemoveIPC wipes a user's /dev/shm while a bot keeps running.)
    Two live segments would hand out values from two records: decreasing across
    processes, and two holders of serialized() at once.
    """
    a = ShmNonce.attach("rm", state_dir)
    va = [a.next() for _ in range(10)]
    va.append(a.jump_forward(HOUR))  # ahead of the clock: only the state knows it
    _reboot(a)  # removed under a live process
    with pytest.raises(StateError, match="this process still has a handle"):
        ShmNonce.attach("rm", state_dir)
    va += [a.next() for _ in range(10)]  # the survivor goes on, increasing
    assert va == sorted(set(va))
    with pytest.raises(StateError, match="removed or replaced"):
        a.jump_forward(3 * LEASE_NS)  # but it cannot move the ceiling any more
    a.close()
    with ShmNonce.attach("rm", state_dir) as b:  # once it is gone, a new segment starts
        assert b.next() > max(va)
        b.unlink()


def test_presence_is_per_process_and_survives_fork_of_others(state_dir: str) -> None:
    """A forked child that exits does not clear the parent's presence (own descriptors)."""
    a = ShmNonce.attach("pr", state_dir)
    a.next()
    pid = os.fork()
    if pid == 0:
        a.next()
        os._exit(0)
    os.waitpid(pid, 0)
    _reboot(a)
    with pytest.raises(StateError, match="this process still has a handle"):
        ShmNonce.attach("pr", state_dir)
    a.close()
    ShmNonce.attach("pr", state_dir).unlink()


def test_refusal_names_the_processes_still_attached(state_dir: str, tmp_path: object) -> None:
    ready = os.path.join(str(tmp_path), "ready")
    code = (
        "import sys, time; from shmnonce import ShmNonce\n"
        "e = ShmNonce.attach('nm', sys.argv[1]); e.next()\n"
        "open(sys.argv[2], 'w').close(); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, state_dir, ready], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.unlink(f"/dev/shm/{segment_name('nm', os.path.realpath(state_dir))}")
        with pytest.raises(StateError, match=f"pid\\(s\\) \\[{proc.pid}\\]"):
            ShmNonce.attach("nm", state_dir)
    finally:
        proc.kill()
        proc.wait()
    with ShmNonce.attach("nm", state_dir) as eng:  # its holder is gone: a new segment
        eng.unlink()
