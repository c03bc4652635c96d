"""The shared-memory segment: layout, creation, validation.

Layout (little-endian, version 1)::

    0     header: magic, version, size, created_at, segment_id, lock_dev, lock_ino, flags,
          queue_ino
    64    sequence name (64 bytes, NUL padded)
    128   record: gen, last, limit, total, prev_clock, regressions, gen
    192   queue: gen, tail, head, entries, waited, torn_recoveries, gen
    256   extension area of the Kraken rate limiter (256 bytes)
    512   extension area of the compat module (256 bytes)
    1024  state_dir (u16 length + UTF-8 bytes), for operators' tools
    4096  section queue slots: SLOTS x (ticket, phase)

The record is bracketed by a generation number written at both ends. Writers bump
it on every update; ``struct.pack_into`` writes bytes in order, so a writer killed
half-way leaves the two copies different, which readers detect ("torn") and repair
from the persisted ceiling. The segment is never registered with multiprocessing's
resource tracker (CPython gh-82300), so no unrelated process's exit removes it.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from . import _posix as backend
from ._errors import StateError

MAGIC = b"SHMNONCE"
VERSION = 1
SLOTS = 4096
SLOTS_OFFSET = 4096
SIZE = SLOTS_OFFSET + SLOTS * 16

HEADER = struct.Struct("<8sIIQQQQQQ")
NAME_OFFSET = 64
RECORD_OFFSET = 128
RECORD = struct.Struct("<7Q")
QUEUE_OFFSET = 192
EXT_RATELIMIT_OFFSET = 256
EXT_RATELIMIT_SIZE = 256
EXT_COMPAT_OFFSET = 512
EXT_COMPAT_SIZE = 256
STATEDIR_OFFSET = 1024
STATEDIR_MAX = SLOTS_OFFSET - STATEDIR_OFFSET - 2
SLOT = struct.Struct("<QQ")

FLAG_UNLINKED = 1
U64_MAX = 2**64 - 1


class Header(NamedTuple):
    magic: bytes
    version: int
    size: int
    created_at: int
    segment_id: int
    lock_dev: int
    lock_ino: int
    flags: int
    queue_ino: int


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
            fd = backend.shm_open(self.name)
        except FileNotFoundError:
            return False
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


def mark_unlinked(buf: mmap.mmap) -> None:
    """Flag a segment as unlinked and zero its lease, so attached users stop issuing.

    With the lease at 0 every user's next call takes the slow path, which sees the flag.
    """
    h = Header(*HEADER.unpack_from(buf, 0))
    HEADER.pack_into(buf, 0, *h._replace(flags=h.flags | FLAG_UNLINKED))
    g = RECORD.unpack_from(buf, RECORD_OFFSET)[0]
    g = (g + 1) & U64_MAX
    RECORD.pack_into(buf, RECORD_OFFSET, g, 0, 0, 0, 0, 0, g)


def _init(
    buf: mmap.mmap, seq: str, state_dir: str, lock_stat: os.stat_result, queue_stat: os.stat_result
) -> Header:
    """Fill a zeroed (or abandoned half-initialised) segment; the magic goes in last."""
    buf[:SLOTS_OFFSET] = bytes(SLOTS_OFFSET)
    header = Header(
        MAGIC, VERSION, SIZE, time.time_ns(), secrets.randbits(63) | 1,
        lock_stat.st_dev, lock_stat.st_ino, 0, queue_stat.st_ino,
    )
    HEADER.pack_into(buf, 0, b"\0" * 8, *header[1:])
    name_b = seq.encode()
    buf[NAME_OFFSET : NAME_OFFSET + len(name_b)] = name_b
    sd = state_dir.encode()
    if len(sd) <= STATEDIR_MAX:
        struct.pack_into("<H", buf, STATEDIR_OFFSET, len(sd))
        buf[STATEDIR_OFFSET + 2 : STATEDIR_OFFSET + 2 + len(sd)] = sd
    buf[0:8] = MAGIC
    return header


def open_segment(
    shm_name: str,
    seq: str,
    state_dir: str,
    lock_stat: os.stat_result,
    queue_stat: os.stat_result,
    before_create: Callable[[], None],
) -> Segment:
    """Create or attach the segment. Call with the sequence's counter lock held.

    ``before_create`` runs before a segment is created or initialised and may refuse
    by raising. A segment left all-zero by a creator that died before writing the
    magic is initialised again; any other mismatch raises StateError naming it.
    """
    created = False
    try:
        fd = backend.shm_open(shm_name)
    except FileNotFoundError:
        before_create()
        try:
            fd = backend.shm_create(shm_name, SIZE)
            created = True
        except FileExistsError:  # created by a process that does not hold our lock file
            fd = backend.shm_open(shm_name)
    try:
        st = os.fstat(fd)
        size, identity = st.st_size, (st.st_dev, st.st_ino)
        where = f"shared-memory segment /dev/shm/{shm_name} of sequence {seq!r}"
        if size == 0:  # creator died between shm_open and ftruncate
            os.ftruncate(fd, SIZE)
            size = SIZE
        if size != SIZE:
            raise StateError(f"{where} has {size} bytes, expected {SIZE}; {_repair(seq, state_dir)}")
        buf = backend.shm_map(fd, SIZE)
    finally:
        os.close(fd)
    header = Header(*HEADER.unpack_from(buf, 0))
    if header.magic == b"\0" * 8:
        if not created:
            before_create()
        header = _init(buf, seq, state_dir, lock_stat, queue_stat)
        created = True
    problem = None
    if header.magic != MAGIC:
        problem = "has a foreign magic number"
    elif header.version != VERSION:
        problem = f"has format version {header.version}, this shmnonce uses {VERSION}"
    elif header.size != SIZE:
        problem = f"declares {header.size} bytes, expected {SIZE}"
    elif (header.lock_dev, header.lock_ino, header.queue_ino) != (
        lock_stat.st_dev, lock_stat.st_ino, queue_stat.st_ino
    ) or queue_stat.st_dev != lock_stat.st_dev:
        problem = (
            "was created with another lock or queue file: the state directory or a file in "
            "it was removed or replaced while the segment existed, so processes attached "
            "before that would not be excluded"
        )
    if problem:
        buf.close()
        raise StateError(f"{where} {problem}; {_repair(seq, state_dir)}")
    return Segment(shm_name, buf, header, created, identity)


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
