"""The shared-memory segment: layout, creation, validation.

Layout (little-endian, version 2)::

    0     header: magic "SHMNONCE", version u32, size u32, created_at, segment_id,
          lock_dev, lock_ino, queue_ino (u64 each), check u32, flags u32
    64    record: last, limit, total, prev_clock, regressions (u64 each)
    104   mirror: the same five fields again
    144   (unused)
    192   queue: gen, tail, head, entries, waited, torn_recoveries, gen
    248   queue check word: XOR of gen .. torn_recoveries (see _queue.py)
    256   extension area of the Kraken rate limiter (256 bytes): records
          "kraken.counter" (256) and "kraken.burst" (384)
    512   extension area of the compat module (256 bytes): record "compat.counters"
    768   (unused)
    1024  sequence name (64 bytes, NUL padded)
    1088  state_dir (u16 length + UTF-8 bytes), for operators' tools
    4096  section queue slots: SLOTS x (ticket, phase)

Integrity. The header ``check`` is the CRC-32 of bytes 0-55 and of the name; it is
written once, at creation, and verified by every attach. ``flags`` (only
FLAG_UNLINKED) is outside it because it is set later. The record is written together
with its mirror by one ``pack_into``, and a reader trusts it only when the two are
equal: a writer killed half-way, or a flipped bit in either copy, makes them differ,
and readers then resume above the persisted ceiling instead of trusting the record.
The mirror costs one ``memoryview`` comparison per ``next()``; a CRC-32 cost several
times more (docs/design.md has the figures).

Creation. A segment is built complete (header, name, state_dir, and a record that
resumes above the persisted ceiling) under the temporary name ``<segment>.new`` and
then hard-linked to its real name, which fails if the name exists. So the real name
never refers to a half-built segment, whatever system call a creator is killed at; a
``.new`` left behind is removed by the next creator. A segment marked unlinked (a
``drop-segment`` or ``unlink`` killed before its ``shm_unlink``), or one left
all-zero by an older creator, is replaced by the next attach. All of this runs under
the sequence's counter lock. The segment is never registered with multiprocessing's
resource tracker (CPython gh-82300), so no unrelated process's exit removes it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, TypeVar

from .._errors import StateError
from . import linux

MAGIC = b"SHMNONCE"
VERSION = 2
SLOTS = 4096
SLOTS_OFFSET = 4096
SIZE = SLOTS_OFFSET + SLOTS * 16
TMP_SUFFIX = ".new"
"""Suffix of the name a segment is built under before it is linked into place."""

HEADER = struct.Struct("<8sIIQQQQQII")
HEADER_CHECKED = 56
"""The header check covers bytes 0 .. HEADER_CHECKED and the name."""
FLAGS_OFFSET = 60
FLAGS = struct.Struct("<I")
RECORD_OFFSET = 64
RECORD = struct.Struct("<5Q")
"""last, limit, total, prev_clock, regressions."""
MIRROR_OFFSET = RECORD_OFFSET + RECORD.size
MIRRORED = struct.Struct("<10Q")
"""The record followed by its mirror: what one write stores."""
QUEUE_OFFSET = 192
EXT_RATELIMIT_OFFSET = 256
EXT_RATELIMIT_SIZE = 256
EXT_COMPAT_OFFSET = 512
EXT_COMPAT_SIZE = 256
NAME_OFFSET = 1024
NAME_SIZE = 64
STATEDIR_OFFSET = NAME_OFFSET + NAME_SIZE
STATEDIR_MAX = SLOTS_OFFSET - STATEDIR_OFFSET - 2
SLOT = struct.Struct("<QQ")

FLAG_UNLINKED = 1
U64_MAX = 2**64 - 1

RECORDS: Mapping[str, tuple[int, int]] = {
    "kraken.counter": (EXT_RATELIMIT_OFFSET, 14),
    "kraken.burst": (EXT_RATELIMIT_OFFSET + 128, 14),
    "compat.counters": (EXT_COMPAT_OFFSET, 24),
}
"""Named shared records (``ShmNonce.record``): segment offset and capacity in u64 fields.

Each is a :class:`Bracketed` record of exactly ``capacity`` fields, so its trailing
generation word has a fixed place whatever number of fields a caller asks for.
"""


class Header(NamedTuple):
    magic: bytes
    version: int
    size: int
    created_at: int
    segment_id: int
    lock_dev: int
    lock_ino: int
    queue_ino: int
    check: int
    flags: int


class Record(NamedTuple):
    last: int
    limit: int
    total: int
    prev_clock: int
    regressions: int


def header_check(buf: Any) -> int:
    """CRC-32 of the header's fixed fields and the name."""
    mv = memoryview(buf)
    try:
        return zlib.crc32(mv[NAME_OFFSET : NAME_OFFSET + NAME_SIZE], zlib.crc32(mv[:HEADER_CHECKED]))
    finally:
        mv.release()


def record_views(buf: mmap.mmap) -> tuple[memoryview, memoryview]:
    """The record and its mirror as arrays of u64, for the hot path to compare.

    Release both before closing ``buf``.
    """
    mv = memoryview(buf)
    try:
        return (
            mv[RECORD_OFFSET:MIRROR_OFFSET].cast("Q"),
            mv[MIRROR_OFFSET : MIRROR_OFFSET + RECORD.size].cast("Q"),
        )
    finally:
        mv.release()


def read_record(buf: Any) -> Record | None:
    """The record, or None if it differs from its mirror (torn write, flipped bit)."""
    vals = MIRRORED.unpack_from(buf, RECORD_OFFSET)
    if vals[:5] != vals[5:]:
        return None
    return Record(*vals[:5])


def write_record(buf: Any, last: int, limit: int, total: int, prev_clock: int, regressions: int) -> None:
    """Write the record and its mirror (one ``pack_into``)."""
    MIRRORED.pack_into(
        buf, RECORD_OFFSET, last, limit, total, prev_clock, regressions,
        last, limit, total, prev_clock, regressions,
    )


class Segment:
    """A mapped segment plus the facts read from its header at attach time."""

    __slots__ = ("buf", "created", "header", "identity", "name")

    def __init__(
        self, name: str, buf: mmap.mmap, header: Header, created: bool, identity: tuple[int, int]
    ) -> None:
        self.name = name
        self.buf = buf
        self.header = header
        self.created = created
        self.identity = identity

    def is_linked(self) -> bool:
        """Whether the name still refers to this mapping (not removed or replaced)."""
        try:
            fd = linux.shm_open(self.name)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EISDIR, errno.ELOOP, errno.EACCES):
                return False  # the name is gone or taken by something else
            raise
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino) == self.identity

    def read_header(self) -> Header:
        return Header(*HEADER.unpack_from(self.buf, 0))


def _repair(seq: str, state_dir: str) -> str:
    return (
        f"stop the processes using {seq!r}, then run 'shmnonce drop-segment {seq} "
        f"--state-dir {state_dir}': it removes the segment and keeps the persisted ceiling "
        "(raised to the segment's bound when the segment is readable), so the next attach "
        "resumes above every value issued"
    )


def owner_fix(shm_name: str, seq: str, state_dir: str) -> str:
    """The repair for a segment that is not this user's private regular file."""
    return (
        f"if it is this user's segment with a wrong mode, chmod 600 /dev/shm/{shm_name}; "
        f"otherwise it was put there by someone else (another user can create it while the "
        f"sequence has no segment, e.g. after a reboot): find out who made it, then remove it "
        f"without reading it ('shmnonce drop-segment {seq} --state-dir {state_dir}' as root "
        f"or its owner, or 'rm -r /dev/shm/{shm_name}') and attach again: the sequence "
        "resumes above its persisted ceiling"
    )


def mark_unlinked(buf: mmap.mmap) -> None:
    """Flag a segment as unlinked and zero its lease, so attached users stop issuing.

    With the lease at 0 every user's next call takes the slow path, which sees the flag.
    The flag goes first: a kill between the two writes leaves a flagged segment, which
    the next attach replaces.
    """
    (flags,) = FLAGS.unpack_from(buf, FLAGS_OFFSET)
    FLAGS.pack_into(buf, FLAGS_OFFSET, flags | FLAG_UNLINKED)
    rec = read_record(buf)
    write_record(buf, 0, 0, 0 if rec is None else rec.total, 0, 0 if rec is None else rec.regressions)


def _build(
    buf: mmap.mmap, seq: str, state_dir: str, lock_stat: os.stat_result,
    queue_stat: os.stat_result, resume_above: int,
) -> Header:
    """Fill a new zero-filled segment: header, name, state_dir, record."""
    HEADER.pack_into(
        buf, 0, MAGIC, VERSION, SIZE, time.time_ns(), secrets.randbits(63) | 1,
        lock_stat.st_dev, lock_stat.st_ino, queue_stat.st_ino, 0, 0,
    )
    name_b = seq.encode()
    buf[NAME_OFFSET : NAME_OFFSET + len(name_b)] = name_b
    struct.pack_into("<I", buf, HEADER_CHECKED, header_check(buf))
    sd = state_dir.encode()
    if len(sd) <= STATEDIR_MAX:
        struct.pack_into("<H", buf, STATEDIR_OFFSET, len(sd))
        buf[STATEDIR_OFFSET + 2 : STATEDIR_OFFSET + 2 + len(sd)] = sd
    write_record(buf, resume_above, resume_above, 0, 0, 0)
    return Header(*HEADER.unpack_from(buf, 0))


def _where(shm_name: str, seq: str) -> str:
    return f"shared-memory segment /dev/shm/{shm_name} of sequence {seq!r}"


def _owned_fix(shm_name: str, seq: str, state_dir: str) -> str:
    return owner_fix(shm_name, seq, state_dir)


def _create(
    shm_name: str, seq: str, state_dir: str, lock_stat: os.stat_result,
    queue_stat: os.stat_result, resume_above: int,
) -> Segment | None:
    """Build a segment under the temporary name and link it into place.

    None if the real or the temporary name appeared meanwhile (made by a process that
    does not hold our lock file): the caller tries again, and validates what it finds.
    """
    tmp = shm_name + TMP_SUFFIX
    try:
        linux.shm_unlink(tmp)  # left by a creator killed before it finished
    except FileNotFoundError:
        pass
    except PermissionError:
        raise StateError(
            f"{_where(tmp, seq)} (where new segments are built) belongs to another user; "
            f"{_owned_fix(tmp, seq, state_dir)}"
        ) from None
    try:
        fd = linux.shm_create(tmp, SIZE)
    except FileExistsError:  # made again since: by a process that does not hold our lock
        return None
    try:
        st = linux.verify_owned(fd, _where(tmp, seq), _owned_fix(tmp, seq, state_dir))
        buf = linux.shm_map(fd, SIZE)
    finally:
        os.close(fd)
    try:
        header = _build(buf, seq, state_dir, lock_stat, queue_stat, resume_above)
        linux.shm_link(tmp, shm_name)  # the segment becomes visible here, complete
    except BaseException as exc:
        buf.close()
        with contextlib.suppress(OSError):
            linux.shm_unlink(tmp)
        if isinstance(exc, FileExistsError):
            return None
        raise
    with contextlib.suppress(FileNotFoundError):
        linux.shm_unlink(tmp)
    return Segment(shm_name, buf, header, True, (st.st_dev, st.st_ino))


def _adopt(
    fd: int, shm_name: str, seq: str, state_dir: str, lock_stat: os.stat_result,
    queue_stat: os.stat_result,
) -> Segment | str:
    """Map and validate an existing segment; a string says why it must be replaced.

    StateError if it is damaged or foreign (an operator must look at it).
    """
    where = _where(shm_name, seq)
    try:
        st = linux.verify_owned(fd, where, _owned_fix(shm_name, seq, state_dir))
        if st.st_size == 0:
            return "is empty (its creator was killed)"
        if st.st_size != SIZE:
            raise StateError(
                f"{where} has {st.st_size} bytes, expected {SIZE}; {_repair(seq, state_dir)}"
            )
        buf = linux.shm_map(fd, SIZE)
    finally:
        os.close(fd)
    header = Header(*HEADER.unpack_from(buf, 0))
    problem = None
    stale = None
    if header.magic == b"\0" * 8:
        stale = "has no magic number (its creator was killed before finishing it)"
    elif header.magic != MAGIC:
        problem = "has a foreign magic number"
    elif header.version != VERSION:
        problem = f"has format version {header.version}, this shmnonce uses {VERSION}"
    elif header.size != SIZE:
        problem = f"declares {header.size} bytes, expected {SIZE}"
    elif header.check != header_check(buf):
        problem = "fails its header checksum (corrupted)"
    elif header.flags & ~FLAG_UNLINKED:
        problem = f"has unknown flags {header.flags:#x} (corrupted)"
    elif header.flags & FLAG_UNLINKED:
        stale = "is marked unlinked (a drop-segment or unlink was interrupted)"
    elif (header.lock_dev, header.lock_ino, header.queue_ino) != (
        lock_stat.st_dev, lock_stat.st_ino, queue_stat.st_ino
    ) or queue_stat.st_dev != lock_stat.st_dev:
        problem = (
            "was created with another lock or queue file: the state directory or a file in "
            "it was removed or replaced while the segment existed, so processes attached "
            "before that would not be excluded"
        )
    if problem or stale:
        buf.close()
    if problem:
        raise StateError(f"{where} {problem}; {_repair(seq, state_dir)}")
    if stale:
        return stale
    return Segment(shm_name, buf, header, False, (st.st_dev, st.st_ino))


def open_segment(
    shm_name: str,
    seq: str,
    state_dir: str,
    lock_stat: os.stat_result,
    queue_stat: os.stat_result,
    resume_above: int,
    before_create: Callable[[str], None],
) -> Segment:
    """Create or attach the segment. Call with the sequence's counter lock held.

    A new segment's record resumes above ``resume_above`` (the persisted ceiling).
    ``before_create(why)`` runs before a segment is created or a stale one replaced,
    and may refuse by raising. A damaged or foreign segment raises StateError naming it.
    """
    for _attempt in range(3):
        try:
            fd = linux.shm_open(shm_name)
        except FileNotFoundError:
            before_create("is gone")
        else:
            found = _adopt(fd, shm_name, seq, state_dir, lock_stat, queue_stat)
            if isinstance(found, Segment):
                return found
            before_create(found)
            with contextlib.suppress(FileNotFoundError):
                linux.shm_unlink(shm_name)
        seg = _create(shm_name, seq, state_dir, lock_stat, queue_stat, resume_above)
        if seg is not None:
            return seg
    raise StateError(
        f"{_where(shm_name, seq)} keeps being created by a process that does not hold "
        f"{seq}.lock in {state_dir}; {_repair(seq, state_dir)}"
    )


class Bracketed:
    """A record of u64 fields written with a generation number at both ends.

    ``struct.pack_into`` writes bytes in order, so a writer killed half-way leaves
    the two generation words different; readers then get None and repair the record.
    """

    __slots__ = ("_gen", "offset", "struct")

    def __init__(self, offset: int, fields: int) -> None:
        self.offset = offset
        self.struct = struct.Struct(f"<{fields + 2}Q")
        self._gen = struct.Struct("<Q")

    def read(self, buf: Any) -> list[int] | None:
        vals = self.struct.unpack_from(buf, self.offset)
        if vals[0] != vals[-1]:
            return None
        return list(vals[1:-1])

    def write(self, buf: Any, values: Sequence[int]) -> None:
        (g,) = self._gen.unpack_from(buf, self.offset)
        g = (g + 1) & U64_MAX
        self.struct.pack_into(buf, self.offset, g, *values, g)


def read_state_dir(buf: mmap.mmap) -> str | None:
    """The state_dir recorded in a segment (None if it did not fit)."""
    (n,) = struct.unpack_from("<H", buf, STATEDIR_OFFSET)
    if n == 0 or n > STATEDIR_MAX:
        return None
    return bytes(buf[STATEDIR_OFFSET + 2 : STATEDIR_OFFSET + 2 + n]).decode(errors="replace")


def read_name(buf: mmap.mmap) -> str:
    raw = bytes(buf[NAME_OFFSET : NAME_OFFSET + 64])
    return raw.split(b"\0", 1)[0].decode(errors="replace")


QUEUE = Bracketed(QUEUE_OFFSET, 5)
"""The section queue's header: tail, head, entries, waited, torn_recoveries."""
Q_TAIL, Q_HEAD, Q_ENTRIES, Q_WAITED, Q_TORN = range(5)


R = TypeVar("R")


class SegmentRecord:
    """A named record of the segment (a ``_protocol.SharedRecord``).

    Read and replaced under the sequence's counter lock, with the torn-write
    detection of :class:`Bracketed`. A caller asking for fewer fields than the
    record holds sees a prefix; the other fields are kept on update. A record never
    written reads as zeros; a torn one as None.
    """

    __slots__ = ("_capacity", "_fields", "_layout", "_lock", "_name", "_view")

    def __init__(
        self, name: str, fields: int, capacity: int, view: memoryview,
        lock: AbstractContextManager[None],
    ) -> None:
        self._name = name
        self._fields = fields
        self._capacity = capacity
        self._layout = Bracketed(0, capacity)
        if view.nbytes < self._layout.struct.size:  # pragma: no cover - layout guard
            raise ValueError(f"record {name!r} does not fit its view")
        self._view = view
        self._lock = lock

    @property
    def name(self) -> str:
        return self._name

    @property
    def fields(self) -> int:
        return self._fields

    def read(self) -> list[int] | None:
        """The current values (zeros if never written, None if torn)."""
        with self._lock:
            values = self._layout.read(self._view)
        return None if values is None else values[: self._fields]

    def update(self, fn: Callable[[list[int] | None], tuple[Sequence[int], R]]) -> R:
        """Replace the values with ``fn(values)[0]`` under the counter lock; return ``[1]``.

        ``fn`` runs with the lock held: it must not call the engine.
        """
        with self._lock:
            stored = self._layout.read(self._view)
            new, result = fn(None if stored is None else stored[: self._fields])
            values = list(new)
            if len(values) != self._fields or not all(
                type(v) is int and 0 <= v <= U64_MAX for v in values
            ):
                raise ValueError(
                    f"record {self._name!r}: update must give {self._fields} ints in 0..2**64-1"
                )
            rest = stored[self._fields :] if stored is not None else [0] * (
                self._capacity - self._fields
            )
            self._layout.write(self._view, values + rest)
        return result

    def __repr__(self) -> str:
        return f"<SegmentRecord {self._name!r} fields={self._fields}>"
