"""The persisted ceiling: a durable upper bound written ahead of every issued value.

Every value handed out is <= the ``limit`` stored here, and the file is replaced
atomically and fsynced (file and directory) before a value above the old limit is
issued. After the shared segment is lost (reboot), the sequence resumes above
``limit`` whatever the wall clock says. Leases are long (seconds of nanoseconds), so
the file is written about once per lease, not per nonce.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import NamedTuple

from ._errors import StateError

__all__ = ["Ceiling", "read_ceiling", "write_ceiling"]

MAGIC = b"SHMNCEIL"
VERSION = 1
# magic, version, reserved, limit, segment_id, written_at_ns, then crc32 of all that
_BODY = struct.Struct("<8sIIQQQ")
_CRC = struct.Struct("<I")
SIZE = _BODY.size + _CRC.size


class Ceiling(NamedTuple):
    limit: int
    segment_id: int
    written_at: int


def _repair_hint(path: str) -> str:
    name = os.path.basename(path)[: -len(".ceiling")]
    sd = os.path.dirname(path)
    return (
        f"restore it from a backup; or, while the segment is live, stop its users and run "
        f"'shmnonce drop-segment {name} --state-dir {sd}' (rewrites it from the segment); "
        f"otherwise 'shmnonce unlink {name} --state-dir {sd}' and then 'shmnonce jump {name} NS' "
        "past every value the exchange has seen"
    )


def read_ceiling(path: str) -> Ceiling | None:
    """Read and validate the ceiling file; None if it does not exist, StateError if bad."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read persisted ceiling {path!r}: {exc.strerror}") from exc
    if len(data) != SIZE:
        raise StateError(
            f"persisted ceiling {path!r} has {len(data)} bytes, expected {SIZE} "
            f"(truncated or foreign file); {_repair_hint(path)}"
        )
    magic, version, _reserved, limit, segment_id, written_at = _BODY.unpack_from(data)
    if magic != MAGIC:
        raise StateError(f"{path!r} is not a shmnonce ceiling file (bad magic); {_repair_hint(path)}")
    if version != VERSION:
        raise StateError(
            f"persisted ceiling {path!r} has format version {version}, this shmnonce "
            f"reads version {VERSION}; {_repair_hint(path)}"
        )
    (crc,) = _CRC.unpack_from(data, _BODY.size)
    if crc != zlib.crc32(data[: _BODY.size]):
        raise StateError(f"persisted ceiling {path!r} fails its checksum; {_repair_hint(path)}")
    return Ceiling(limit, segment_id, written_at)


def write_ceiling(path: str, limit: int, segment_id: int) -> None:
    """Atomically replace the ceiling file with ``limit`` and make it durable.

    Writes a temporary file, fsyncs it, renames it over ``path`` and fsyncs the
    directory, so after a crash the file holds either the old or the new value.
    """
    body = _BODY.pack(MAGIC, VERSION, 0, limit, segment_id, time.time_ns())
    data = body + _CRC.pack(zlib.crc32(body))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
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
