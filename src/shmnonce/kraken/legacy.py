"""Migration of legacy nonce files into a sequence (``shmnonce import-legacy``).

Process-global nonce managers kept the last nonce in a text file holding one integer,
e.g. ``data/kraken_global_nonce.txt`` or ``data/kraken_nonce_<user>.txt``. After the
switch, no nonce may fall at or below what those files record, so the import raises
the sequence until its last value is at least the highest of them.

Units: a value of exactly 13 digits is a Unix time in milliseconds and is converted
to nanoseconds (``ms * 1_000_000``), so that it compares with the engine's
nanosecond values; any other value (19 or 20 digits: nanoseconds; other widths:
plain counters) is used as it is. Kraken compares nonces as plain integers, and the
converted value of a millisecond nonce is larger than the raw one, so raising the
sequence above the converted value also puts it above the raw value Kraken saw.

A file is bad when it cannot be read or decoded, is empty, holds anything but one
non-negative decimal integer (surrounding whitespace allowed), or holds a value of
2**64-1 or more (no later nonce could exceed it). With any bad file the sequence is
left untouched (not even attached) and :class:`LegacyImportError` lists every bad
path, unless ``skip_bad=True``, which imports the good files and reports the bad.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .._errors import NonceError
from .._paths import validate_name
from ..shm.engine import ShmNonce
from ..shm.segment import U64_MAX

__all__ = ["LegacyFile", "LegacyImport", "LegacyImportError", "import_legacy", "read_legacy_file"]

MS_DIGITS = 13
MS_TO_NS = 1_000_000
_MAX_BYTES = 4096
_INT_RE = re.compile(r"[0-9]+")
_NEG_RE = re.compile(r"-[0-9]+")


@dataclass(frozen=True)
class LegacyFile:
    """What one legacy file holds."""

    path: str
    ok: bool
    raw: int | None = None
    """The integer in the file, as written."""
    unit: str | None = None
    """"ms" (13 digits, converted), "ns" (19-20 digits) or "raw" (other widths); only "ms" is converted."""
    value_ns: int | None = None
    """The value the sequence must exceed: ``raw * 1_000_000`` for "ms", else ``raw``."""
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path, "ok": self.ok, "raw": self.raw, "unit": self.unit,
            "value_ns": self.value_ns, "error": self.error,
        }


@dataclass(frozen=True)
class LegacyImport:
    """The outcome of :func:`import_legacy`."""

    name: str
    files: list[LegacyFile] = field(default_factory=list)
    applied: bool = False
    """True when the sequence was raised or already above every good value."""
    highest_ns: int | None = None
    before: int | None = None
    """Last value of the sequence before the import (None: not attached)."""
    after: int | None = None
    """Last value after the import; every later nonce is greater."""

    @property
    def bad(self) -> list[LegacyFile]:
        return [f for f in self.files if not f.ok]

    @property
    def good(self) -> list[LegacyFile]:
        return [f for f in self.files if f.ok]

    @property
    def raised(self) -> bool:
        return self.before is not None and self.after is not None and self.after > self.before

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "applied": self.applied,
            "raised": self.raised,
            "highest_ns": self.highest_ns,
            "before": self.before,
            "after": self.after,
            "files": [f.as_dict() for f in self.files],
        }


class LegacyImportError(NonceError, ValueError):
    """Some legacy files are bad; the sequence was not changed. ``report`` has the details."""

    def __init__(self, message: str, report: LegacyImport) -> None:
        super().__init__(message)
        self.report = report


def read_legacy_file(path: str | os.PathLike[str]) -> LegacyFile:
    """Read and classify one legacy nonce file (never raises for a bad file)."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read(_MAX_BYTES + 1)
    except OSError as exc:
        return LegacyFile(p, False, error=f"unreadable: {exc.strerror or exc}")
    if len(data) > _MAX_BYTES:
        return LegacyFile(p, False, error=f"not a nonce file: more than {_MAX_BYTES} bytes")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return LegacyFile(p, False, error="not an integer: the file is not ASCII text")
    if not text:
        return LegacyFile(p, False, error="not an integer: the file is empty")
    if _NEG_RE.fullmatch(text):
        return LegacyFile(p, False, error=f"negative value {text}")
    if not _INT_RE.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        return LegacyFile(p, False, error=f"not an integer: {shown!r}")
    raw = int(text)
    if raw > U64_MAX:
        return LegacyFile(p, False, raw=raw, error="larger than 2**64-1")
    digits = len(str(raw))
    if digits == MS_DIGITS:
        unit, value = "ms", raw * MS_TO_NS
    else:
        unit, value = ("ns" if digits >= 19 else "raw"), raw
    if value >= U64_MAX:
        return LegacyFile(
            p, False, raw=raw, unit=unit, value_ns=value,
            error="equals 2**64-1: no later nonce can exceed it",
        )
    return LegacyFile(p, True, raw=raw, unit=unit, value_ns=value)


def _raise_to(eng: ShmNonce, target: int) -> int:
    """Raise the sequence's last value to at least ``target``; return the last value.

    Uses ``jump_forward``, which sets ``max(last, now) + delta``: with ``delta =
    target - now`` read just before, the result is at least ``target`` unless the
    clock stepped back in between, which the loop catches.
    """
    for _ in range(100):
        last = eng.peek()
        if last >= target:
            return last
        delta = max(0, target - time.time_ns())
        after = eng.jump_forward(delta)
        if after >= target:
            return after
    raise NonceError(f"could not raise sequence {eng.name!r} to {target} (the clock keeps stepping back)")


def import_legacy(
    name: str,
    files: Iterable[str | os.PathLike[str]],
    state_dir: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
) -> LegacyImport:
    """Raise sequence ``name`` above every value in the legacy nonce ``files``.

    Returns a :class:`LegacyImport` with one :class:`LegacyFile` per path (in the
    given order). Raises :class:`LegacyImportError` (the sequence untouched) if any
    file is bad and ``skip_bad`` is false, and ``ValueError`` for an empty ``files``
    or an invalid ``name``. Importing the same files again changes nothing.
    """
    validate_name(name)
    paths = [os.fspath(f) for f in files]
    if not paths:
        raise ValueError("import_legacy needs at least one file")
    results = [read_legacy_file(p) for p in paths]
    bad = [r for r in results if not r.ok]
    good = [r for r in results if r.ok]
    highest = max((r.value_ns for r in good if r.value_ns is not None), default=None)
    if bad and not skip_bad:
        report = LegacyImport(name, results, applied=False, highest_ns=highest)
        listing = "; ".join(f"{r.path}: {r.error}" for r in bad)
        raise LegacyImportError(
            f"{len(bad)} of {len(results)} legacy file(s) are bad, sequence {name!r} not changed "
            f"(fix them or pass skip_bad / --skip-bad): {listing}",
            report,
        )
    if highest is None:
        return LegacyImport(name, results, applied=False)
    with ShmNonce.attach(name, state_dir) as eng:
        before = eng.peek()
        after = _raise_to(eng, highest)
    return LegacyImport(name, results, applied=True, highest_ns=highest, before=before, after=after)
