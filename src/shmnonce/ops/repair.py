"""Operator repairs that work without attaching, for state that attach refuses.

``destroy`` removes a sequence completely (what ``ShmNonce.unlink`` does), even when
its segment or ceiling file is damaged. ``drop_segment`` removes only the segment, as
a reboot does: the sequence resumes above the persisted ceiling, which is first
raised to the segment's own bound when the segment is intact. Both run under the
sequence's counter lock, and mark an intact segment unlinked so that processes still
attached to it raise StateError instead of issuing values.

Killed at any point, they leave state the next attach handles without help: the
ceiling file is replaced atomically and only ever raised; a segment is marked
unlinked only after the ceiling covers it, and the next attach replaces a marked
segment (when no process is attached to it) as if it had been removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Iterator
from typing import NamedTuple

from .._errors import StateError
from .._paths import resolve_state_dir, segment_name, validate_name
from ..shm import linux
from ..shm.ceiling import read_ceiling, write_ceiling
from ..shm.keyindex import is_key_name, release
from ..shm.queue import others_attached
from ..shm.segment import (
    HEADER,
    MAGIC,
    SIZE,
    TMP_SUFFIX,
    VERSION,
    mark_unlinked,
    owner_fix,
    read_record,
)

__all__ = ["DropResult", "destroy", "drop_segment", "remove_state"]

log = logging.getLogger("shmnonce")


class DropResult(NamedTuple):
    segment_found: bool
    segment_intact: bool
    persisted_ceiling: int | None  # the limit now on disk (every future value is above it)


def _paths(name: str, state_dir: str) -> tuple[str, str, str]:
    base = os.path.join(state_dir, name)
    return base + ".lock", base + ".queue", base + ".ceiling"


def _file_fix(path: str) -> str:
    return (
        f"if it is this user's regular file, chmod 600 {path}; otherwise stop the processes "
        f"of the sequence, remove it (rm -r {path}) and run this command again"
    )


@contextlib.contextmanager
def _locked(lock_path: str, name: str) -> Iterator[None]:
    fd = linux.open_lock_file(lock_path, f"lock file {lock_path} of sequence {name!r}",
                                _file_fix(lock_path))
    try:
        linux.flock_ex(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _map_intact(shm: str, name: str, state_dir: str) -> tuple[bool, mmap.mmap | None]:
    """(found, mapping if it is a shmnonce segment of this version and size).

    Something at the name that is not this user's private regular file (another
    user's squatted segment, a FIFO, a symlink) is found but never read: the caller
    removes the name. A directory there raises StateError (``rm -r`` it).
    """
    path = f"/dev/shm/{shm}"
    where = f"shared-memory segment {path} of sequence {name!r}"
    try:
        fd = linux.shm_open(shm)
    except FileNotFoundError:
        return False, None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EACCES, errno.EPERM):
            log.warning("%s %s: removing the name without reading it", where,
                        linux.describe_open_error(exc, path))
            return True, None
        raise StateError(
            f"{where} {linux.describe_open_error(exc, path)}; {owner_fix(shm, name, state_dir)}"
        ) from None
    try:
        try:
            linux.verify_owned(fd, where, "")
        except StateError as exc:
            log.warning("%s: removing the name without reading it", str(exc).rstrip("; "))
            return True, None
        if os.fstat(fd).st_size != SIZE:
            return True, None
        buf = linux.shm_map(fd, SIZE)
    finally:
        os.close(fd)
    magic, version, size = HEADER.unpack_from(buf, 0)[:3]
    if (magic, version, size) != (MAGIC, VERSION, SIZE):
        buf.close()
        return True, None
    return True, buf


def destroy(name: str, state_dir: str | None = None) -> bool:
    """Remove the segment and every state file of ``name``; True if anything existed."""
    validate_name(name)
    sd = resolve_state_dir(state_dir, name)
    lock_path, queue_path, ceiling_path = _paths(name, sd)
    shm = segment_name(name, sd)
    existed = os.path.lexists(lock_path) or os.path.lexists(ceiling_path)
    with _locked(lock_path, name):
        found, buf = _map_intact(shm, name, sd)
        remove_state(buf, shm, lock_path, queue_path, ceiling_path)
        if buf is not None:
            buf.close()
    if is_key_name(name):
        with contextlib.suppress(StateError, OSError):  # the sequence is gone either way
            release(name, sd)
    return existed or found


def _unlink_segment(shm: str) -> None:
    """Remove the segment's name; StateError naming the owner if this user may not."""
    try:
        linux.shm_unlink(shm)
    except FileNotFoundError:
        pass
    except OSError as exc:
        path = f"/dev/shm/{shm}"
        try:
            owner = linux.describe_owner(os.lstat(path).st_uid)
        except OSError:
            owner = "another user"
        raise StateError(
            f"cannot remove {path}: {exc.strerror}; it belongs to {owner}: have that user or "
            f"root remove it (rm -r {path}), then run this command again"
        ) from None


def remove_state(
    buf: mmap.mmap | None, shm: str, lock_path: str, queue_path: str, ceiling_path: str
) -> None:
    """Mark an intact segment unlinked, remove its name and the state files (lock held).

    Processes still attached then raise StateError at their next call.
    """
    if buf is not None:
        mark_unlinked(buf)
    for seg in (shm, shm + TMP_SUFFIX):
        _unlink_segment(seg)
    for path in (ceiling_path, ceiling_path + ".tmp", queue_path, lock_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def drop_segment(name: str, state_dir: str | None = None, force: bool = False) -> DropResult:
    """Remove only the segment of ``name``, keeping (and if needed raising) the ceiling.

    Refuses while processes are attached (their handles would stop working and no new
    segment could be created until they exit) unless ``force``.
    """
    validate_name(name)
    sd = resolve_state_dir(state_dir, name)
    lock_path, queue_path, ceiling_path = _paths(name, sd)
    shm = segment_name(name, sd)
    if not force:
        try:
            qfd = linux.open_state_file(
                queue_path, f"queue file {queue_path} of sequence {name!r}", _file_fix(queue_path),
                create=False,
            )
        except FileNotFoundError:
            qfd = -1
        try:
            if qfd >= 0 and others_attached(qfd):
                raise StateError(
                    f"processes are attached to {name!r} (they hold {queue_path}); stop them "
                    "first, or pass force (--force) to make their handles fail"
                )
        finally:
            if qfd >= 0:
                os.close(qfd)
    with _locked(lock_path, name):
        found, buf = _map_intact(shm, name, sd)
        try:
            ceiling = read_ceiling(ceiling_path)
        except StateError:
            if buf is None:
                raise  # nothing to rewrite it from
            ceiling = None
        limit = None if ceiling is None else ceiling.limit
        if buf is not None:
            rec = read_record(buf)
            if rec is not None and rec.limit > 0 and (limit is None or rec.limit > limit):
                try:
                    write_ceiling(ceiling_path, rec.limit, HEADER.unpack_from(buf, 0)[4])
                except OSError as exc:
                    buf.close()
                    raise StateError(
                        f"cannot rewrite the persisted ceiling {ceiling_path!r} of {name!r} from "
                        f"its segment: {exc}; remove whatever is in its place (rm -r "
                        f"{ceiling_path}) or free space on its file system, then run "
                        "'shmnonce drop-segment' again (the segment is kept until then)"
                    ) from exc
                log.warning("sequence %r: persisted ceiling rewritten from its segment (%d)",
                            name, rec.limit)
                limit = rec.limit
            elif rec is None and limit is None:
                buf.close()
                raise StateError(
                    f"segment /dev/shm/{shm} of {name!r} holds a record that differs from its mirror "
                    f"copy (torn or corrupted) and no intact persisted ceiling exists in "
                    f"{ceiling_path!r}: the last value cannot be recovered. Run 'shmnonce unlink "
                    f"{name}', then 'shmnonce jump {name} NS' past every value the exchange has seen"
                )
            # Only now that the ceiling covers it: a kill from here on leaves a marked
            # segment, which the next attach replaces.
            mark_unlinked(buf)
            buf.close()
        for seg in (shm, shm + TMP_SUFFIX):
            _unlink_segment(seg)
    return DropResult(found, buf is not None, limit)
