"""The persisted ceiling: a durable upper bound written ahead of every issued value.

Every value handed out is <= the ``limit`` stored here, and the file is replaced
atomically and fsynced (file and directory) before a value above the old limit is
issued. After the shared segment is lost (reboot), the sequence resumes above
``limit`` whatever the wall clock says. Leases are long (seconds of nanoseconds), so
the file is written about once per lease, not per nonce.

Format version 2 (60 bytes, little-endian): magic, version, reserved, limit,
segment_id, written_at, sequence (16 bytes), CRC-32 of everything before it.
``sequence`` names the sequence the file belongs to: a hash of the owner's uid (the
state directory's owner), the state directory's realpath and the name. A file copied
or linked from another sequence is refused, since resuming above another sequence's
bound could go below this one's issued values. Version 1 files (no ``sequence``) are
accepted as this sequence's and rewritten as version 2 by the next attach.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import time
import zlib
from typing import NamedTuple

from .._errors import StateError
from . import linux

__all__ = ["Ceiling", "read_ceiling", "sequence_id", "write_ceiling"]

MAGIC = b"SHMNCEIL"
VERSION = 2
# magic, version, reserved, limit, segment_id, written_at_ns, sequence; then crc32 of all that
_BODY = struct.Struct("<8sIIQQQ16s")
_BODY_V1 = struct.Struct("<8sIIQQQ")
_CRC = struct.Struct("<I")
SIZE = _BODY.size + _CRC.size
SIZE_V1 = _BODY_V1.size + _CRC.size
_SUFFIX = ".ceiling"


class Ceiling(NamedTuple):
    limit: int
    segment_id: int
    written_at: int
    version: int = VERSION


def sequence_id(name: str, state_dir: str, uid: int) -> bytes:
    """The 16-byte identity of a sequence: never key material, only where it lives."""
    text = f"shmnonce-sequence\0{uid}\0{state_dir}\0{name}".encode()
    return hashlib.sha256(text).digest()[:16]


def _identity(path: str) -> tuple[bytes, str]:
    """(sequence id, description) of the sequence whose ceiling lives at ``path``."""
    state_dir = os.path.realpath(os.path.dirname(path) or ".")
    name = os.path.basename(path)
    name = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    uid = os.stat(state_dir).st_uid
    return sequence_id(name, state_dir, uid), f"{name!r} in {state_dir} (uid {uid})"


def _repair_hint(path: str) -> str:
    name = os.path.basename(path)[: -len(_SUFFIX)]
    sd = os.path.dirname(path)
    return (
        f"restore it from a backup; or, while the segment is live, stop its users and run "
        f"'shmnonce drop-segment {name} --state-dir {sd}' (rewrites it from the segment); "
        f"otherwise 'shmnonce unlink {name} --state-dir {sd}' and then 'shmnonce jump {name} NS' "
        "past every value the exchange has seen"
    )


def read_ceiling(path: str) -> Ceiling | None:
    """Read and validate the ceiling file; None if it does not exist, StateError if bad."""
    fix = (
        f"if it is not a regular file of this user (a directory, FIFO, symlink, another "
        f"user's file), remove it (rm -r {path}) and then: {_repair_hint(path)}; if it is "
        f"this user's file with a wrong mode, chmod 600 {path}"
    )
    try:
        seq = os.path.basename(path)[: -len(".ceiling")]
        fd = linux.open_state_file(
            path, f"persisted ceiling {path!r} of sequence {seq!r}", fix, create=False, write=False
        )
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, SIZE + 1)
    except OSError as exc:
        raise StateError(f"cannot read persisted ceiling {path!r}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    version = struct.unpack_from("<I", data, 8)[0] if len(data) >= 12 else None
    expected = SIZE_V1 if version == 1 else SIZE
    if len(data) != expected:
        raise StateError(
            f"persisted ceiling {path!r} has {len(data)} bytes, expected {expected} "
            f"(truncated or foreign file); {_repair_hint(path)}"
        )
    if data[:8] != MAGIC:
        raise StateError(f"{path!r} is not a shmnonce ceiling file (bad magic); {_repair_hint(path)}")
    if version not in (1, VERSION):
        raise StateError(
            f"persisted ceiling {path!r} has format version {version}, this shmnonce "
            f"reads versions 1 and {VERSION}; {_repair_hint(path)}"
        )
    body = _BODY_V1 if version == 1 else _BODY
    (crc,) = _CRC.unpack_from(data, body.size)
    if crc != zlib.crc32(data[: body.size]):
        raise StateError(f"persisted ceiling {path!r} fails its checksum; {_repair_hint(path)}")
    if version == 1:
        _m, _v, _r, limit, segment_id, written_at = _BODY_V1.unpack_from(data)
        return Ceiling(limit, segment_id, written_at, 1)
    _m, _v, _r, limit, segment_id, written_at, seq = _BODY.unpack_from(data)
    mine, who = _identity(path)
    if seq != mine:
        name = os.path.basename(path)[: -len(_SUFFIX)]
        raise StateError(
            f"persisted ceiling {path!r} belongs to another sequence (copied or linked from "
            f"another name, state directory or user), not to {who}: resuming above it could "
            f"repeat values. Restore this sequence's own file from a backup; or remove it and "
            f"raise the sequence past every value the exchange has seen ('shmnonce jump {name} "
            f"NS', or 'shmnonce import-legacy {name} FILE' with the bound {limit} it holds if it "
            "is this sequence's history under another path)"
        )
    return Ceiling(limit, segment_id, written_at, VERSION)


def write_ceiling(path: str, limit: int, segment_id: int) -> None:
    """Atomically replace the ceiling file with ``limit`` and make it durable.

    Writes a temporary file, fsyncs it, renames it over ``path`` and fsyncs the
    directory, so after a crash the file holds either the old or the new value.
    """
    body = _BODY.pack(MAGIC, VERSION, 0, limit, segment_id, time.time_ns(), _identity(path)[0])
    data = body + _CRC.pack(zlib.crc32(body))
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a killed writer (or anything else): never opened, so never blocks
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {tmp!r}")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
