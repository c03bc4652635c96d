"""Migration of legacy nonce files (import_legacy)."""

from __future__ import annotations

import os
import time

import pytest

from shmnonce import ShmNonce
from shmnonce.kraken.legacy import LegacyImportError, import_legacy, read_legacy_file

pytestmark = pytest.mark.timeout(60)

HOUR_NS = 3_600_000_000_000


def _write(tmp: str, name: str, content: bytes | str) -> str:
    path = os.path.join(tmp, name)
    with open(path, "wb") as fh:
        fh.write(content.encode() if isinstance(content, str) else content)
    return path


@pytest.fixture
def legacy_dir(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "data")
    os.makedirs(path)
    return path


def test_good_files_raise_the_sequence_above_all(state_dir: str, legacy_dir: str) -> None:
    now_ns = time.time_ns()
    ms_future = now_ns // 1_000_000 + 2 * 3_600_000  # a 13-digit ms nonce two hours ahead
    ns_future = now_ns + HOUR_NS  # a 19-digit ns nonce one hour ahead
    files = [
        _write(legacy_dir, "kraken_global_nonce.txt", f"{ns_future}\n"),
        _write(legacy_dir, "kraken_nonce_alice.txt", f"  {ms_future}  \n"),
        _write(legacy_dir, "kraken_nonce_bob.txt", "12345"),  # old counter: used as is
    ]
    report = import_legacy("orders", files, state_dir)
    assert report.applied and report.raised
    assert [f.unit for f in report.files] == ["ns", "ms", "raw"]
    assert [f.path for f in report.files] == files
    assert report.files[1].value_ns == ms_future * 1_000_000
    assert report.highest_ns == ms_future * 1_000_000
    assert report.after is not None and report.after >= ms_future * 1_000_000
    with ShmNonce.attach("orders", state_dir) as eng:
        n = eng.next()
    assert n > ms_future * 1_000_000 > ns_future > ms_future
    # importing again changes nothing: the sequence is already above every value
    again = import_legacy("orders", files, state_dir)
    assert again.applied and not again.raised and again.before == again.after == n


def test_old_values_still_leave_the_sequence_at_or_above_them(state_dir: str, legacy_dir: str) -> None:
    old = time.time_ns() - HOUR_NS
    f = _write(legacy_dir, "n.txt", str(old))
    report = import_legacy("old", [f], state_dir)
    assert report.applied
    assert report.after is not None and report.after >= old
    with ShmNonce.attach("old", state_dir) as eng:
        assert eng.next() > old


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("abc", "not an integer"),
        ("", "empty"),
        ("12 34", "not an integer"),
        ("1.5e18", "not an integer"),
        ("-5", "negative"),
        (str(2**64), "larger than 2**64-1"),
        (str(2**64 - 1), "2**64-1"),
        (b"\xff\xfe123", "not ASCII"),
        ("\u0661\u0662\u0663", "not ASCII"),
        ("1_000", "not an integer"),
    ],
)
def test_bad_file_is_reported_and_sequence_untouched(
    state_dir: str, legacy_dir: str, content: str | bytes, reason: str
) -> None:
    good = _write(legacy_dir, "good.txt", str(time.time_ns() + HOUR_NS))
    bad = _write(legacy_dir, "bad.txt", content)
    with ShmNonce.attach("seq", state_dir) as eng:
        before = eng.jump_forward(0)
    with pytest.raises(LegacyImportError) as info:
        import_legacy("seq", [good, bad], state_dir)
    assert bad in str(info.value) and reason in str(info.value)
    report = info.value.report
    assert not report.applied
    assert [f.ok for f in report.files] == [True, False]
    assert report.files[1].error is not None and reason in report.files[1].error
    with ShmNonce.attach("seq", state_dir) as eng:
        assert eng.peek() == before, "the sequence changed although a file was bad"


def test_unreadable_paths_are_reported(state_dir: str, legacy_dir: str) -> None:
    missing = os.path.join(legacy_dir, "missing.txt")
    directory = os.path.join(legacy_dir, "subdir")
    os.mkdir(directory)
    with pytest.raises(LegacyImportError) as info:
        import_legacy("u", [missing, directory], state_dir)
    errors = {f.path: f.error for f in info.value.report.files}
    assert errors[missing] is not None and "unreadable" in errors[missing]
    assert errors[directory] is not None and "unreadable" in errors[directory]
    # nothing was attached, so nothing was created for the sequence
    assert not os.path.exists(os.path.join(state_dir, "u.lock"))


def test_skip_bad_imports_the_good_files(state_dir: str, legacy_dir: str) -> None:
    target = time.time_ns() + HOUR_NS
    good = _write(legacy_dir, "good.txt", str(target))
    bad = _write(legacy_dir, "bad.txt", "garbage")
    report = import_legacy("s", [bad, good], state_dir, skip_bad=True)
    assert report.applied and report.raised
    assert [f.path for f in report.bad] == [bad]
    assert [f.path for f in report.good] == [good]
    with ShmNonce.attach("s", state_dir) as eng:
        assert eng.next() > target
    only_bad = import_legacy("s2", [bad], state_dir, skip_bad=True)
    assert not only_bad.applied and only_bad.after is None


def test_invalid_arguments(state_dir: str) -> None:
    with pytest.raises(ValueError):
        import_legacy("s", [], state_dir)
    with pytest.raises(ValueError):
        import_legacy("bad/name", ["x"], state_dir)


def test_read_legacy_file_units(legacy_dir: str) -> None:
    ms = read_legacy_file(_write(legacy_dir, "ms", "1737159471234"))
    assert (ms.ok, ms.unit, ms.value_ns) == (True, "ms", 1737159471234 * 1_000_000)
    ns = read_legacy_file(_write(legacy_dir, "ns", "1737159471234567890\n"))
    assert (ns.ok, ns.unit, ns.value_ns) == (True, "ns", 1737159471234567890)
    big = read_legacy_file(_write(legacy_dir, "big", str(2**64 - 2)))
    assert (big.ok, big.unit, big.value_ns) == (True, "ns", 2**64 - 2)
    counter = read_legacy_file(_write(legacy_dir, "counter", "0"))
    assert (counter.ok, counter.unit, counter.value_ns) == (True, "raw", 0)
    huge = read_legacy_file(_write(legacy_dir, "huge", "1" * 5000))
    assert not huge.ok
