"""ShmNonce: one strictly increasing nonce sequence per (name, state_dir) on a host."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import TracebackType
from typing import Any

from .. import _fork
from .._errors import NonceError, StateError
from .._paths import api_key_name, resolve_state_dir, segment_name, state_dir_path, validate_name
from ..ops.repair import remove_state
from . import linux
from .ceiling import Ceiling, read_ceiling, write_ceiling
from .keyindex import Holder, claim, is_key_name, lookup, release
from .queue import SectionQueue, ShmSection, others_attached
from .segment import (
    FLAG_UNLINKED,
    MIRRORED,
    Q_ENTRIES,
    Q_TORN,
    Q_WAITED,
    RECORD,
    RECORD_OFFSET,
    RECORDS,
    SIZE,
    U64_MAX,
    Record,
    Segment,
    SegmentRecord,
    open_segment,
    owner_fix,
    read_record,
    record_views,
    write_record,
)

__all__ = ["LEASE_NS", "ShmNonce"]

log = logging.getLogger("shmnonce")

LEASE_NS = 10_000_000_000
"""How far ahead of the value being issued the persisted ceiling is moved (10 s)."""
REGRESSION_NS = 1_000_000
"""A clock reading this far behind the previous one counts as a regression (1 ms)."""

_LOCK_EX = 2  # fcntl.LOCK_EX
# The hot path's struct calls, bound once (see ShmNonce._issue).
_unpack_record = RECORD.unpack_from
_pack_mirrored = MIRRORED.pack_into
_engines: weakref.WeakSet[ShmNonce] = weakref.WeakSet()
_registry = threading.Lock()  # guards _engines; held from before fork() to after it
_forking: list[ShmNonce] = []


def _before_fork() -> None:
    # Hold every engine's in-process lock across fork() so that no thread is half-way
    # through an update; snapshot the engines so both after-hooks see the same set.
    _registry.acquire()
    _forking[:] = list(_engines)
    for eng in _forking:
        eng._tlock.acquire()
        eng._queue._mutex.acquire()  # no thread is between opening and recording a descriptor


def _after_fork_parent() -> None:
    for eng in _forking:
        eng._queue._mutex.release()
        eng._tlock.release()
    _forking.clear()
    _registry.release()


def _after_fork_child() -> None:
    global _registry
    _registry = threading.Lock()
    try:
        for eng in _forking:
            try:
                eng._after_fork_child()
            except Exception:  # its descriptors are gone: calls raise StateError
                eng._tlock = threading.Lock()
    finally:
        _forking.clear()


def _is_at(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


_fork.register(
    _fork.ENGINES,
    before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child,
)


class ShmNonce:
    """A handle on one host-wide nonce sequence. See the README for the guarantees.

    Create with :meth:`attach` or :meth:`for_api_key`. Handles are thread-safe and
    remain valid in children forked after attach.
    """

    _clock = staticmethod(time.time_ns)  # tests replace it to step the clock

    def __init__(
        self, name: str, state_dir: str, *, _token: object = None, _create: bool = True
    ) -> None:
        if _token is not _ATTACH:
            raise TypeError("use ShmNonce.attach(name) or ShmNonce.for_api_key(key)")
        self.name = name
        self.state_dir = state_dir
        self.segment_name = segment_name(name, state_dir)
        base = os.path.join(state_dir, name)
        self._lock_path = base + ".lock"
        self._queue_path = base + ".queue"
        self._ceiling_path = base + ".ceiling"
        self._tlock = threading.Lock()
        self._closed = False
        self._views: dict[tuple[int, int], memoryview] = {}
        # The record and its mirror as u64 arrays (set at attach; compared by _issue).
        self._rec = self._mirror = memoryview(b"")
        self._deferred: list[tuple[Any, ...]] = []
        self._counter = _CounterLock(self)
        self._create = _create
        # Under the registry lock: a fork() now would copy descriptors no hook knows about.
        with _registry:
            for _attempt in range(10):
                if self._open_and_attach():
                    break
            else:
                raise StateError(
                    f"sequence {name!r}: its lock files in {state_dir!r} keep being removed "
                    "while attaching (a concurrent 'shmnonce unlink'?)"
                )
            _engines.add(self)
        self._flush_log()

    def _open_and_attach(self) -> bool:
        """Open the files, lock, then create or attach the segment (registry lock held).

        Returns False, having closed everything, if a concurrent unlink removed a file
        between opening it and locking it: a segment bound to a removed file would
        refuse every later attacher.
        """
        self._fd = self._open_state(self._lock_path)
        qfd = -1
        attached = False
        try:
            qfd = self._open_state(self._queue_path)
            with self._short_lock():
                if not (_is_at(self._fd, self._lock_path) and _is_at(qfd, self._queue_path)):
                    return False
                # Read the ceiling first: never create a segment over unreadable state.
                ceiling = read_ceiling(self._ceiling_path)
                self._seg = self._open_segment(qfd, 0 if ceiling is None else ceiling.limit)
                self._buf = self._seg.buf
                try:
                    self._queue = SectionQueue(
                        qfd, self._queue_path, self._buf, self._short_lock, self._log
                    )
                    qfd = -1  # owned by the queue now
                    self._rec, self._mirror = record_views(self._buf)
                    self._check_ceiling(ceiling)
                except BaseException:
                    if qfd < 0:
                        self._queue.detach()
                    self._rec.release()
                    self._mirror.release()
                    self._buf.close()
                    raise
            attached = True
            return True
        finally:
            if not attached:
                if qfd >= 0:
                    os.close(qfd)
                os.close(self._fd)
                self._fd = -1

    def _open_segment(self, qfd: int, resume_above: int) -> Segment:
        """``open_segment``, with a failure to open or create the name as StateError."""
        def before_create(why: str) -> None:
            if not self._create:
                raise NoSegment(
                    f"sequence {self.name!r} has no usable segment (/dev/shm/{self.segment_name} "
                    f"{why})"
                )
            self._refuse_if_others_attached(qfd, why)

        try:
            return open_segment(
                self.segment_name, self.name, self.state_dir, os.fstat(self._fd), os.fstat(qfd),
                resume_above, before_create,
            )
        except OSError as exc:
            path = f"/dev/shm/{self.segment_name}"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                fix = (
                    "free memory in /dev/shm (a tmpfs: see 'df /dev/shm'; remove leftover "
                    "segments with 'shmnonce doctor'), then attach again"
                )
            else:
                fix = owner_fix(self.segment_name, self.name, self.state_dir)
            raise StateError(
                f"shared-memory segment {path} of sequence {self.name!r} "
                f"{linux.describe_open_error(exc, path)}; {fix}"
            ) from None

    def _refuse_if_others_attached(self, qfd: int, why: str) -> None:
        """Before creating or replacing a segment: nobody may still use the old one.

        ``why`` says what happened to the old one ("is gone", "is marked unlinked ...").
        """
        if not others_attached(qfd):
            return
        if any(e.segment_name == self.segment_name and not e._closed for e in _engines):
            raise StateError(
                f"segment /dev/shm/{self.segment_name} of sequence {self.name!r} {why} while "
                "this process still has a handle of it open: close() that handle first"
            )
        from ..ops.procinfo import scan_attached  # psutil scan: only on this error path

        scan = scan_attached(self.segment_name, self._lock_path, self._queue_path,
                             exclude_pid=os.getpid())
        pids = [p.pid for p in scan.processes]
        who = (f"pid(s) {pids}" if pids else
               f"processes this user cannot inspect (try: fuser -v {self._queue_path})")
        raise StateError(
            f"segment /dev/shm/{self.segment_name} of sequence {self.name!r} {why} while "
            f"{who} still use it (removed by systemd-logind RemoveIPC or by hand, or an "
            "interrupted drop-segment or unlink); a new segment would diverge from theirs. "
            "Stop them, then attach again"
        )

    # -- construction ----------------------------------------------------------------
    @classmethod
    def attach(cls, name: str, state_dir: str | os.PathLike[str] | None = None) -> ShmNonce:
        """Create or attach the sequence ``name`` in ``state_dir`` (see the contract).

        A name made from an API key (``key-<hash>``) is also registered in the host-wide
        key index, and refused (StateError) if the index gives it to another state
        directory or user: one key, one sequence per host.
        """
        return cls._attach(name, state_dir, looked_up=False)

    @classmethod
    def _attach(
        cls, name: str, state_dir: str | os.PathLike[str] | None, looked_up: bool
    ) -> ShmNonce:
        validate_name(name)
        if is_key_name(name) and not looked_up:
            holder = lookup(name)  # before creating a state directory that would be refused
            if holder is not None:
                _refuse_elsewhere(name, state_dir_path(state_dir), holder)
        sd = resolve_state_dir(state_dir, name)
        if is_key_name(name):
            _refuse_elsewhere(name, sd, claim(name, sd))
        return cls(name, sd, _token=_ATTACH)

    @classmethod
    def for_api_key(
        cls, api_key: str | bytes, state_dir: str | os.PathLike[str] | None = None
    ) -> ShmNonce:
        """The one sequence of an API key on this host, named from a salted hash of the key.

        If this user's sequence of the key lives in another state directory (the
        host-wide key index says where), that one is attached, whatever ``state_dir``
        says; if it is another user's, StateError names that user and directory.
        """
        name = api_key_name(api_key)
        wanted = state_dir_path(state_dir)
        holder = lookup(name)
        if holder is not None and holder.uid != os.geteuid():
            _refuse_elsewhere(name, wanted, holder)
        if holder is not None and holder.state_dir != wanted:
            if _has_state(wanted, name):
                raise StateError(_two_sequences(name, wanted, holder))
            log.warning(
                "API-key sequence %s lives in %s (host-wide key index %s); using it instead of "
                "%s: set the same state directory everywhere to silence this",
                name, holder.state_dir, holder.entry, wanted,
            )
            wanted = holder.state_dir
        return cls._attach(name, wanted, looked_up=True)

    @classmethod
    def inspect(cls, name: str, state_dir: str | os.PathLike[str] | None = None) -> ShmNonce:
        """Attach an existing live segment without creating anything (``shmnonce status``).

        Raises NoSegment when the sequence has no segment, FileNotFoundError when the
        state directory or a lock file is missing.
        """
        validate_name(name)
        return cls(name, resolve_state_dir(state_dir, name, create=False), _token=_ATTACH,
                   _create=False)

    @staticmethod
    def _lock_file_text(path: str) -> tuple[str, str]:
        """(what, fix) for a refused lock or queue file ``<state_dir>/<name>.<kind>``."""
        sd, base = os.path.split(path)
        name, kind = os.path.splitext(base)
        what = f"{kind[1:]} file {path} of sequence {name!r}"
        fix = (
            f"if it is this user's regular file, chmod 600 {path}; otherwise stop the "
            f"processes of {name!r}, remove it (rm -r {path}) and run 'shmnonce drop-segment "
            f"{name} --state-dir {sd}' (keeps the persisted ceiling; the next attach creates "
            "the file again)"
        )
        return what, fix

    @staticmethod
    def _open_lock(path: str) -> int:
        """Open (create if absent) the lock or queue file ``path``; StateError if refused."""
        return linux.open_lock_file(path, *ShmNonce._lock_file_text(path))

    def _open_state(self, path: str) -> int:
        if self._create:
            return self._open_lock(path)
        return linux.open_state_file(path, *self._lock_file_text(path), create=False)

    def _log(self, level: int, msg: str, *args: object) -> None:
        """Queue a log record; emitted after the locks are released (handlers may block)."""
        self._deferred.append((level, msg, *args))

    def _flush_log(self) -> None:
        pending, self._deferred = self._deferred, []
        for level, msg, *args in pending:
            log.log(level, msg, *args)

    def _check_ceiling(self, ceiling: Ceiling | None) -> None:
        """Reconcile the persisted ceiling with the segment (counter lock held)."""
        if ceiling is not None and ceiling.version == 1:
            # Written before ceilings named their sequence: adopt it as ours, once.
            write_ceiling(self._ceiling_path, ceiling.limit, ceiling.segment_id)
            self._log(
                logging.INFO, "sequence %r: persisted ceiling upgraded to format version 2",
                self.name,
            )
        if self._seg.created:
            self._log(
                logging.INFO, "created segment %s for sequence %r (resuming above %d)",
                self.segment_name, self.name, 0 if ceiling is None else ceiling.limit,
            )
            return
        rec = read_record(self._buf)
        limit = 1 if rec is None else rec.limit  # a failing record may hide a live lease
        if ceiling is None and limit > 0:
            raise StateError(
                f"persisted ceiling {self._ceiling_path!r} is missing while segment "
                f"{self.segment_name} of sequence {self.name!r} is live; restore the file, or "
                f"stop every user of {self.name!r} and run 'shmnonce drop-segment {self.name} "
                f"--state-dir {self.state_dir}' (it rewrites the file from the segment)"
            )
        if rec is None:
            self._recover_torn()
        elif ceiling is not None and ceiling.limit < limit:
            # The file went back (restored from a backup?): the live segment knows better.
            write_ceiling(self._ceiling_path, limit, self._seg.header.segment_id)
            self._log(
                logging.WARNING, "sequence %r: persisted ceiling %d was below the segment's %d; "
                "rewritten", self.name, ceiling.limit, limit,
            )

    # -- the hot path ------------------------------------------------------------------
    def next(self) -> int:
        """Issue the next value: ``max(last + 1, time.time_ns())``, unique host-wide."""
        tlock = self._tlock
        tlock.acquire()
        try:
            fd = self._fd
            linux.flock_ex(fd, _LOCK_EX)
            try:
                v = self._issue()
            finally:
                linux.flock_un(fd)
        except (OSError, ValueError) as exc:
            raise self._unusable(exc) from exc
        finally:
            tlock.release()
        if self._deferred:
            self._flush_log()
        return v

    def _issue(self) -> int:
        """Issue one value (counter lock held).

        The common case: one unpack, the record compared with its mirror, one pack of
        both. A record that differs from its mirror (torn write, flipped bit), a lease
        end or a clock step takes the slow path.
        """
        buf = self._buf
        last, limit, total, prev, reg = _unpack_record(buf, RECORD_OFFSET)
        now = self._clock()
        v: int = last + 1
        if now > v:
            v = now
        if self._rec != self._mirror or v > limit or now < prev - REGRESSION_NS:
            return self._issue_slow()
        total += 1
        _pack_mirrored(buf, RECORD_OFFSET, v, limit, total, now, reg, v, limit, total, now, reg)
        return v

    def _unusable(self, exc: BaseException) -> BaseException:
        """Map a failure of the closed or broken handle to our errors; others pass."""
        if self._closed:
            return NonceError(f"sequence {self.name!r}: this handle is closed")
        if self._fd < 0:
            return StateError(
                f"sequence {self.name!r}: the lock file {self._lock_path!r} could not be "
                "reopened in this forked process; attach again"
            )
        return exc

    def _issue_slow(self) -> int:
        """Issue one value handling torn records, clock steps and lease ends (lock held)."""
        return self._move(lambda last, now: max(last + 1, now), issuing=True)

    def _move(self, target: Callable[[int, int], int], issuing: bool) -> int:
        """Set the last value to ``target(last, now)`` and return it (lock held).

        Counts clock regressions, refuses to pass 2**64-1, and persists a new ceiling
        before the value is visible whenever it would reach the current one.
        """
        last, limit, total, prev, reg = self._record()
        now = self._clock()
        if now < prev - REGRESSION_NS:
            reg += 1
            self._log(
                logging.WARNING, "clock regression on sequence %r: wall clock %d ns behind the "
                "previous reading; values continue from the last one", self.name, prev - now,
            )
        new = target(last, now)
        if new > limit:
            self._check_linked()
            persisted = self._persisted_limit()
            if persisted > limit:
                # The record's lease is below the durable bound: a writer died between
                # persisting and updating the record, or the record was lost. Values up
                # to the bound may have been issued, so resume above it.
                last = max(last, persisted)
                new = target(last, now)
        if new > U64_MAX:
            if issuing:
                raise NonceError(f"sequence {self.name!r} reached 2**64-1; nonces cannot go higher")
            raise ValueError(f"the new last value would pass 2**64-1 (last value {last})")
        if new > limit:
            limit = self._extend(new)
        write_record(self._buf, new, limit, min(U64_MAX, total + (1 if issuing else 0)), now, reg)
        return new

    def _record(self) -> Record:
        """Read the record, first repairing it if it differs from its mirror; refuse if
        the segment is marked unlinked (counter lock held)."""
        if self._seg.read_header().flags & FLAG_UNLINKED:
            raise StateError(
                f"sequence {self.name!r} was unlinked; close this handle and attach again"
            )
        rec = read_record(self._buf)
        if rec is None:
            rec = self._recover_torn()
        return rec

    def _recover_torn(self) -> Record:
        """The record differs from its mirror: restart above the persisted ceiling.

        A writer was killed while writing them, or a bit flipped. The counters are kept
        as found (they may be off after a corruption); the previous clock reading is
        dropped, since a corrupted one could count every call as a clock regression.
        Counter lock held.
        """
        ceiling = read_ceiling(self._ceiling_path)
        if ceiling is None:
            raise StateError(
                f"segment {self.segment_name} of sequence {self.name!r} holds a record that "
                "differs from its mirror copy (torn or corrupted) and the persisted ceiling "
                f"{self._ceiling_path!r} is missing; the last value cannot be recovered. Run "
                f"'shmnonce unlink {self.name}', then 'shmnonce jump {self.name} NS' past every "
                "value the exchange has seen"
            )
        _last, _limit, total, _prev, reg = RECORD.unpack_from(self._buf, RECORD_OFFSET)
        base = ceiling.limit
        write_record(self._buf, base, base, total, 0, reg)
        self._queue.bump(Q_TORN)
        self._log(
            logging.WARNING, "sequence %r: the record in segment %s differs from its mirror (a "
            "writer was killed mid-update, or memory was corrupted); resuming above the "
            "persisted ceiling %d", self.name, self.segment_name, base,
        )
        return Record(base, base, total, 0, reg)

    def _check_linked(self) -> None:
        """Refuse to move the ceiling through a segment that was removed (lock held)."""
        if not self._seg.is_linked():
            # Someone removed the segment while we had it mapped; processes attaching
            # now use a new one that starts above the ceiling we were given. Moving the
            # ceiling from here could hand out values the new segment also issues.
            raise StateError(
                f"segment {self.segment_name} of sequence {self.name!r} was removed or "
                "replaced while this process had it attached; close this handle and attach "
                "again"
            )

    def _persisted_limit(self) -> int:
        """The persisted ceiling's limit, 0 if there is none (lock held)."""
        ceiling = read_ceiling(self._ceiling_path)
        return 0 if ceiling is None else ceiling.limit

    def _extend(self, value: int) -> int:
        """Persist a new ceiling above ``value`` before it is issued (lock held)."""
        new_limit = min(U64_MAX, value + LEASE_NS)
        try:
            write_ceiling(self._ceiling_path, new_limit, self._seg.header.segment_id)
        except OSError as exc:
            hint = (
                "free space or inodes (or quota) on the file system of the state directory"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
                f"make {self.state_dir} writable by this user and remove anything that is not "
                f"a regular file at {self._ceiling_path} or {self._ceiling_path}.tmp"
            )
            raise StateError(
                f"cannot persist the ceiling of sequence {self.name!r} to "
                f"{self._ceiling_path!r}: {exc}; nothing above the persisted ceiling is issued "
                f"until it can be: {hint}"
            ) from exc
        return new_limit

    # -- other operations ----------------------------------------------------------------
    def _short_lock(self) -> _CounterLock:
        """The counter lock: excludes other next() calls host-wide for microseconds."""
        return self._counter

    def _shared(self, offset: int, size: int) -> memoryview:
        """A view of ``size`` bytes of the segment at ``offset`` (extension areas).

        One view per area and handle, released by close().
        """
        if offset < 0 or size < 0 or offset + size > SIZE:
            raise ValueError("area outside the segment")
        view = self._views.get((offset, size))
        try:
            if view is not None and view.nbytes == size:
                return view
        except ValueError:  # released by its user
            pass
        view = self._views[(offset, size)] = memoryview(self._buf)[offset : offset + size]
        return view

    def record(self, name: str, fields: int) -> SegmentRecord:
        """The shared record ``name`` of this sequence, at its fixed place in the segment.

        Known names and their capacity: ``_segment.RECORDS`` ("kraken.counter",
        "kraken.burst", "compat.counters"); an unknown name, or more fields than the
        record holds, is a ValueError. Updates take the counter lock (microseconds).
        """
        place = RECORDS.get(name)
        if place is None:
            raise ValueError(
                f"unknown shared record {name!r} for the shared-memory engine; "
                f"known: {', '.join(sorted(RECORDS))}"
            )
        offset, capacity = place
        if isinstance(fields, bool) or not isinstance(fields, int) or not 1 <= fields <= capacity:
            raise ValueError(f"shared record {name!r} holds 1 to {capacity} fields, not {fields!r}")
        if self._closed:
            raise NonceError(f"sequence {self.name!r}: this handle is closed")
        view = self._shared(offset, 8 * (capacity + 2))
        return SegmentRecord(name, fields, capacity, view, self._counter)

    def peek(self) -> int:
        """The last value issued (or the recovered bound after a restart); issues nothing."""
        with self._short_lock():
            return self._record().last

    def enter(self, timeout: float | None = None) -> ShmSection:
        """Wait for the exclusive section and return its ticket; ``leave()`` it when done.

        The ticket belongs to whoever entered (any thread may leave it). ``nonce`` on
        the ticket was issued inside the section. Blocks the calling thread while it
        waits; in asyncio code use :meth:`aenter` / :meth:`aserialized`.
        """
        if self._closed or self._fd < 0:
            raise self._unusable(NonceError("unusable handle"))
        return self._queue.enter(timeout, self._issue)

    def serialized(self, timeout: float | None = None) -> AbstractContextManager[int]:
        """Exclusive section across threads and processes; yields a nonce issued inside.

        Entrants are served in arrival order; a waiter wakes as soon as the holder
        leaves or dies. ``next()`` elsewhere does not wait for the section.
        """
        return _Serialized(self, timeout)

    async def aenter(self, timeout: float | None = None) -> ShmSection:
        """:meth:`enter` for asyncio: waits without blocking the event loop.

        Each task is its own entrant. Cancelling the waiting task gives its place up.
        """
        if self._closed or self._fd < 0:
            raise self._unusable(NonceError("unusable handle"))
        return await self._queue.aenter(timeout, self._issue)

    def aserialized(self, timeout: float | None = None) -> AbstractAsyncContextManager[int]:
        """:meth:`serialized` for asyncio: ``async with eng.aserialized(5) as nonce:``."""
        return _ASerialized(self, timeout)

    def jump_forward(self, delta_ns: int) -> int:
        """Set the last value to ``max(last, now) + delta_ns`` and return it.

        It moves the sequence, it does not issue a value: with ``delta_ns == 0`` and
        the clock behind the last value it returns that last value unchanged (the
        next ``next()`` is still above it). Use ``delta_ns >= 1`` for a result above
        every value issued before.
        """
        if isinstance(delta_ns, bool) or not isinstance(delta_ns, int) or delta_ns < 0:
            raise ValueError(f"delta_ns must be a non-negative int, got {delta_ns!r}")
        with self._short_lock():
            return self._move(lambda last, now: max(last, now) + delta_ns, issuing=False)

    def stats(self) -> Mapping[str, object]:
        """Host-wide counters of the sequence (no key material)."""
        with self._short_lock():
            last, limit, total, _prev, reg = self._record()
            queue = self._queue.counters()
            header = self._seg.read_header()
        return {
            "name": self.name,
            "state_dir": self.state_dir,
            "segment": self.segment_name,
            "last_nonce": last,
            "total_issued": total,
            "created_at": header.created_at,
            "clock_regressions": reg,
            "persisted_ceiling": limit + 1,
            "lease_ns": LEASE_NS,
            "section_entries": queue[Q_ENTRIES],
            "section_waits": queue[Q_WAITED],
            "torn_recoveries": queue[Q_TORN],
        }

    # -- lifetime ----------------------------------------------------------------------
    def _after_fork_child(self) -> None:
        """In a forked child: fresh in-process lock and descriptors of its own.

        The inherited lock descriptor is closed first: if anything below fails, this
        handle must not go on sharing the parent's lock (it raises StateError instead).
        """
        self._tlock = threading.Lock()
        self._deferred = []
        if self._closed:
            return
        old, self._fd = self._fd, -1
        try:
            self._fd = linux.reopen(old, self._lock_path)
        finally:
            os.close(old)
            self._queue.after_fork_child()

    def __del__(self) -> None:
        # A handle dropped without close(): give back its descriptors and its presence.
        fd = getattr(self, "_fd", -1)
        if not getattr(self, "_closed", True) and fd >= 0:
            self._fd = -1
            os.close(fd)
            queue = getattr(self, "_queue", None)
            if queue is not None:
                queue.release_descriptors()

    def close(self) -> None:
        """Detach this process; the sequence and its values live on.

        Raises NonceError while a thread or task of this process waits for or holds
        the section through this handle (closing would release it).
        """
        with self._tlock:
            if self._closed:
                return
            self._queue.detach()
            self._closed = True
            for view in self._views.values():
                view.release()
            self._views.clear()
            self._rec.release()
            self._mirror.release()
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)
            self._buf.close()
        with _registry:
            _engines.discard(self)

    def unlink(self) -> None:
        """Destroy the segment and the persisted state, then close this handle.

        Processes still attached get StateError at their next call instead of
        issuing values from a sequence that no longer exists.
        """
        with self._short_lock():
            self._queue.detach()  # refuses while a thread of ours is in a section
            remove_state(self._buf, self.segment_name, self._lock_path, self._queue_path,
                         self._ceiling_path)
        self.close()
        if is_key_name(self.name):
            release_key(self.name, self.state_dir)

    def __enter__(self) -> ShmNonce:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "attached"
        return f"<ShmNonce {self.name!r} state_dir={self.state_dir!r} {state}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Spawned children re-attach by name instead of copying a mapping.
        return (_reattach, (self.name, self.state_dir))


class _Serialized:
    """The context manager of ``serialized()``: enter() on entry, leave() on exit."""

    __slots__ = ("_eng", "_section", "_timeout")

    def __init__(self, eng: ShmNonce, timeout: float | None) -> None:
        self._eng = eng
        self._timeout = timeout
        self._section: ShmSection | None = None

    def __enter__(self) -> int:
        section = self._section = self._eng.enter(self._timeout)
        return section.nonce

    def __exit__(self, *exc: object) -> None:
        section, self._section = self._section, None
        if section is not None:
            section.leave()


class _ASerialized:
    """The async context manager of ``aserialized()``."""

    __slots__ = ("_eng", "_section", "_timeout")

    def __init__(self, eng: ShmNonce, timeout: float | None) -> None:
        self._eng = eng
        self._timeout = timeout
        self._section: ShmSection | None = None

    async def __aenter__(self) -> int:
        section = self._section = await self._eng.aenter(self._timeout)
        return section.nonce

    async def __aexit__(self, *exc: object) -> None:
        section, self._section = self._section, None
        if section is not None:
            section.leave()


class _CounterLock:
    """Context manager for the counter lock: in-process lock, then ``flock``."""

    __slots__ = ("_eng",)

    def __init__(self, eng: ShmNonce) -> None:
        self._eng = eng

    def __enter__(self) -> None:
        eng = self._eng
        eng._tlock.acquire()
        if eng._closed:
            eng._tlock.release()
            raise NonceError(f"sequence {eng.name!r}: this handle is closed")
        try:
            linux.flock_ex(eng._fd, _LOCK_EX)
        except BaseException:
            eng._tlock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        eng = self._eng
        try:
            linux.flock_un(eng._fd)
        finally:
            eng._tlock.release()
        if eng._deferred:
            eng._flush_log()


class NoSegment(StateError):
    """The sequence has no segment and the caller asked not to create one."""


def _has_state(state_dir: str, name: str) -> bool:
    """Whether ``state_dir`` holds files of sequence ``name`` (by lstat: nothing is opened)."""
    for suffix in (".lock", ".ceiling"):
        try:
            os.lstat(os.path.join(state_dir, name + suffix))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            return False
        return True
    return False


def _two_sequences(name: str, here: str, holder: Holder) -> str:
    return (
        f"API-key sequence {name} has state in {here} but the host-wide key index "
        f"({holder.entry}) gives the key to {holder.describe()}: one key has two sequences on "
        f"this host. Keep one: raise it past the other with 'shmnonce jump {name} NS "
        f"--state-dir {holder.state_dir}' (NS: how far the other's last value is ahead, "
        f"see 'shmnonce status'), then 'shmnonce unlink {name} --state-dir {here}'"
    )


def _refuse_elsewhere(name: str, state_dir: str, holder: Holder) -> None:
    """Refuse to attach key sequence ``name`` in ``state_dir`` unless the index agrees."""
    if holder.uid != os.geteuid():
        raise StateError(
            f"API-key sequence {name} is held by {holder.describe()} (host-wide key index entry "
            f"{holder.entry}): one API key has one nonce sequence per host, and it belongs to "
            "that user. Run this process as that user with that state directory, use another "
            f"API key here, or, if that sequence is gone for good, have that user or root "
            f"remove {holder.entry}"
        )
    if holder.state_dir != state_dir:
        if _has_state(state_dir, name):
            raise StateError(_two_sequences(name, state_dir, holder))
        raise StateError(
            f"API-key sequence {name} lives in {holder.state_dir} (host-wide key index entry "
            f"{holder.entry}), not in {state_dir}: one API key has one nonce sequence per "
            f"host. Use state_dir={holder.state_dir!r} (CLI: --state-dir "
            f"{holder.state_dir}); ShmNonce.for_api_key() goes there by itself"
        )


def release_key(name: str, state_dir: str) -> None:
    """After the key sequence was destroyed: drop its index entry (failures only logged)."""
    try:
        release(name, state_dir)
    except (StateError, OSError) as exc:
        log.warning("sequence %s was unlinked but its key index entry stays: %s", name, exc)


def _reattach(name: str, state_dir: str) -> ShmNonce:
    return ShmNonce.attach(name, state_dir)


_ATTACH = object()
