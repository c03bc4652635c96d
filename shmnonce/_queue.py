"""The section lock of ``serialized()``: a FIFO queue over OFD byte-range locks.

Each entrant takes a ticket (under the counter lock) and write-locks the byte of its
ticket's slot in the queue file for as long as it waits or holds the section. It
enters when every earlier ticket is finished; otherwise it blocks on a read lock of
the byte of the latest unfinished earlier ticket, so the kernel wakes exactly the
successor when that ticket leaves, gives up or dies (the kernel drops a dead
process's locks). Tickets are served in order, so no waiter starves, and waking
needs no polling.

A ticket ``j`` is finished when its slot was reused by a later ticket, its phase is
DONE, or nobody holds the write lock on its byte any more (its holder died).

Descriptors: every thread uses its own open file description (OFD locks of one
description do not exclude each other), made from the process's base descriptor
through ``/proc/self/fd`` so that all of them refer to the same inode even if the
file is deleted and recreated by path. The base descriptor also holds a read lock
on the PRESENCE byte for as long as the process is attached, which tells a process
about to create a segment that others still use one. A forked child closes what
it inherited and makes its own descriptors.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from . import _posix as backend
from ._errors import LockTimeout, NonceError
from ._segment import Q_ENTRIES, Q_HEAD, Q_TAIL, Q_TORN, Q_WAITED, QUEUE, SLOT, SLOTS, SLOTS_OFFSET

__all__ = ["DONE", "HELD", "PRESENCE", "WAITING", "SectionQueue"]

WAITING = 1
HELD = 2
DONE = 0
PRESENCE = SLOTS + 1
"""Byte read-locked by every attached process (see ``others_attached``)."""
_PHASE = struct.Struct("<Q")
LONG_WAIT_S = 5.0
"""A wait for the section longer than this is logged as a warning."""
log = logging.getLogger("shmnonce")


class _Fd:
    """A descriptor owned by one thread of one process."""

    __slots__ = ("__weakref__", "fd", "ticket")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ticket = -1

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class SectionQueue:
    """FIFO cross-process exclusive section of one sequence."""

    def __init__(
        self,
        base_fd: int,
        path: str,
        buf: Any,
        counter: Callable[[], AbstractContextManager[None]],
        deferred_log: Callable[..., None],
    ) -> None:
        self._base = base_fd  # owned: closed by detach()
        self._path = path
        self._buf = buf
        self._counter = counter
        self._log = deferred_log  # emits after the counter lock is released
        self._local = threading.local()
        self._fds: weakref.WeakSet[_Fd] = weakref.WeakSet()
        self._gen = 0
        self._mutex = threading.Lock()  # guards _active, _waiters, _orphans
        self._active = 0  # tickets of this process's threads (waiting or held)
        self._waiters: dict[int, threading.Event] = {}
        self._orphans: set[int] = set()  # descriptors of helper threads
        backend.ofd_lock(self._base, PRESENCE, backend.F_RDLCK, wait=True)

    # -- descriptors -----------------------------------------------------------------
    def _thread_fd(self) -> _Fd:
        entry: tuple[int, _Fd] | None = getattr(self._local, "entry", None)
        if entry is not None and entry[0] == self._gen and entry[1].fd >= 0:
            return entry[1]
        with self._mutex:  # the fork hook takes it: no descriptor escapes its bookkeeping
            if self._base < 0:
                raise NonceError("serialized(): this handle is closed or lost its descriptors")
            fdo = _Fd(backend.reopen(self._base, self._path))
            self._fds.add(fdo)
        self._local.entry = (self._gen, fdo)
        return fdo

    def after_fork_child(self) -> None:
        """Drop the parent's descriptors (their locks are the parent's); make our own."""
        self._gen += 1
        self._mutex = threading.Lock()
        self._active = 0
        self._waiters = {}
        for fdo in list(self._fds):
            fdo.close()
        self._fds = weakref.WeakSet()
        for fd in self._orphans:  # their helper threads do not exist in the child
            os.close(fd)
        self._orphans = set()
        old, self._base = self._base, -1
        if old < 0:
            return
        try:
            self._base = backend.reopen(old, self._path)
            backend.ofd_lock(self._base, PRESENCE, backend.F_RDLCK, wait=True)
        finally:
            os.close(old)

    def detach(self) -> None:
        """Close this process's descriptors; refuses while a thread waits or holds."""
        with self._mutex:
            if self._active:
                raise NonceError(
                    "close() while a thread of this process waits for or holds serialized()"
                )
            self.release_descriptors()

    def release_descriptors(self) -> None:
        """Close the base and thread descriptors (helpers close their own)."""
        self._gen += 1
        for fdo in list(self._fds):
            fdo.close()
        self._fds = weakref.WeakSet()
        base, self._base = self._base, -1
        if base >= 0:
            os.close(base)

    # -- shared table ----------------------------------------------------------------
    def _slot(self, ticket: int) -> tuple[int, int]:
        owner, phase = SLOT.unpack_from(self._buf, SLOTS_OFFSET + (ticket % SLOTS) * 16)
        return owner, phase

    def _set_slot(self, ticket: int, phase: int) -> None:
        SLOT.pack_into(self._buf, SLOTS_OFFSET + (ticket % SLOTS) * 16, ticket, phase)

    def _header(self) -> list[int]:
        """The queue header; a torn one (writer killed mid-write) is rebuilt from the slots."""
        q = QUEUE.read(self._buf)
        if q is not None:
            return q
        slots = [SLOT.unpack_from(self._buf, SLOTS_OFFSET + i * 16) for i in range(SLOTS)]
        tail = max(owner for owner, _ in slots) + 1
        live = [owner for owner, phase in slots if phase != DONE]
        raw = QUEUE.struct.unpack_from(self._buf, QUEUE.offset)
        q = [tail, min(live, default=tail), raw[1 + Q_ENTRIES], raw[1 + Q_WAITED], raw[1 + Q_TORN] + 1]
        QUEUE.write(self._buf, q)
        self._log(logging.WARNING, "section queue header was torn (a writer was killed mid-update); "
                  "rebuilt from the slots")
        return q

    def _finished(self, fd: int, j: int) -> bool:
        owner, phase = self._slot(j)
        if owner != j or phase == DONE:
            return True
        if backend.ofd_test(fd, j % SLOTS) == backend.F_WRLCK:
            return False
        self._set_slot(j, DONE)  # its holder died: record it for the next reader
        return True

    def _blocker(self, fd: int, t: int) -> int | None:
        """Latest unfinished ticket before ``t`` (None: ``t``'s turn). Counter lock held."""
        q = self._header()
        head = q[Q_HEAD]
        while head < t and self._finished(fd, head):
            head += 1
        if head != q[Q_HEAD]:
            q[Q_HEAD] = head
            QUEUE.write(self._buf, q)
        for j in range(t - 1, head - 1, -1):
            if not self._finished(fd, j):
                return j
        return None

    def bump(self, field: int) -> None:
        """Add one to a counter of the queue header (counter lock held)."""
        q = self._header()
        q[field] += 1
        QUEUE.write(self._buf, q)

    def counters(self) -> list[int]:
        """The queue header (counter lock held)."""
        return self._header()

    # -- enter / leave -----------------------------------------------------------------
    def enter(self, timeout: float | None, issue: Callable[[], int]) -> int:
        """Wait for the section; return ``issue()`` called inside it (counter lock held)."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        fdo = self._thread_fd()
        if fdo.ticket >= 0:
            raise NonceError("serialized() is not re-entrant: this thread already holds it")
        fd = fdo.fd
        try:
            with self._counter():
                t = self._arrive(fdo)
                blocker = self._blocker(fd, t)
                if blocker is None:
                    return self._start(t, issue, waited=False)
            while True:
                if not self._wait_for(fd, blocker, deadline):
                    raise LockTimeout(
                        f"serialized() timed out after {timeout} s waiting for the section"
                    )
                with self._counter():
                    blocker = self._blocker(fd, t)
                    if blocker is None:
                        nonce = self._start(t, issue, waited=True)
                        break
        except BaseException:
            self._give_up(fdo)
            raise
        waited_s = time.monotonic() - start
        if waited_s > LONG_WAIT_S:
            log.warning("serialized() waited %.1f s for the section", waited_s)
        return nonce

    def _arrive(self, fdo: _Fd) -> int:
        """Take the next ticket and lock its slot byte (counter lock held)."""
        q = self._header()
        t = q[Q_TAIL]
        if t - q[Q_HEAD] >= SLOTS - 1:
            self._blocker(fdo.fd, t)  # advances head past finished tickets
            q = self._header()
            if t - q[Q_HEAD] >= SLOTS - 1:
                raise NonceError(f"more than {SLOTS - 1} threads wait for serialized()")
        self._take_slot(fdo.fd, t)
        self._set_slot(t, WAITING)
        q[Q_TAIL] = t + 1
        QUEUE.write(self._buf, q)
        with self._mutex:
            self._active += 1
        fdo.ticket = t
        return t

    def _take_slot(self, fd: int, t: int) -> None:
        byte = t % SLOTS
        for _ in range(1000):
            if backend.ofd_lock(fd, byte, backend.F_WRLCK, wait=False):
                return
            if backend.ofd_test(fd, byte) == backend.F_WRLCK:
                raise NonceError(f"queue slot {byte} is still held by ticket {t - SLOTS}")
            # a waiter of an old ticket holds a read lock for a few microseconds
            time.sleep(0)
        raise NonceError(f"queue slot {byte} stays locked")

    def _start(self, t: int, issue: Callable[[], int], waited: bool) -> int:
        nonce = issue()  # on error the caller gives the ticket up
        self._set_slot(t, HELD)
        q = self._header()
        q[Q_ENTRIES] += 1
        q[Q_WAITED] += waited
        QUEUE.write(self._buf, q)
        return nonce

    def _wait_for(self, fd: int, blocker: int, deadline: float | None) -> bool:
        """Block until ticket ``blocker`` releases its byte; False on timeout."""
        byte = blocker % SLOTS
        if deadline is None:
            backend.ofd_lock(fd, byte, backend.F_RDLCK, wait=True)
            backend.ofd_unlock(fd, byte)
            return True
        if backend.ofd_lock(fd, byte, backend.F_RDLCK, wait=False):
            backend.ofd_unlock(fd, byte)
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        return self._timed_wait(byte).wait(remaining)

    def _timed_wait(self, byte: int) -> threading.Event:
        """An event set once ``byte`` has no write lock, from a helper thread.

        fcntl(F_OFD_SETLKW) cannot be interrupted from Python, so a helper thread
        blocks in it on a descriptor of its own and outlives a caller that times out.
        Later waits for the same byte reuse a pending helper instead of starting
        another, so repeated timeouts against one long holder cost one thread.
        """
        with self._mutex:
            event = self._waiters.get(byte)
            if event is not None and not event.is_set():
                return event
            event = self._waiters[byte] = threading.Event()
            fd = backend.reopen(self._base, self._path)
            self._orphans.add(fd)
        def run() -> None:
            try:
                backend.ofd_lock(fd, byte, backend.F_RDLCK, wait=True)
                backend.ofd_unlock(fd, byte)
            except OSError:
                pass
            finally:
                event.set()
                with self._mutex:
                    if fd in self._orphans:  # not already closed by a fork child's hook
                        self._orphans.discard(fd)
                        os.close(fd)

        threading.Thread(target=run, name="shmnonce-wait", daemon=True).start()
        return event

    def _give_up_locked(self, fdo: _Fd) -> None:
        t, fdo.ticket = fdo.ticket, -1
        if t < 0:
            return
        with self._mutex:
            self._active -= 1
        if fdo.fd < 0:
            return
        owner, _phase = self._slot(t)
        if owner == t:
            self._set_slot(t, DONE)
        backend.ofd_unlock(fdo.fd, t % SLOTS)

    def _give_up(self, fdo: _Fd) -> None:
        """Withdraw this thread's ticket (timeout, error, or interrupt while waiting)."""
        if fdo.ticket >= 0:
            with self._counter():
                self._give_up_locked(fdo)

    def leave(self) -> None:
        """Leave the section held by this thread (no-op in a forked child).

        Needs no counter lock: the phase word changes in one byte (HELD -> DONE), and
        a reader that still sees HELD finds the byte lock held and waits on it.
        """
        entry: tuple[int, _Fd] | None = getattr(self._local, "entry", None)
        if entry is not None and entry[0] != self._gen:
            return  # entered by the parent before fork(): the section is the parent's
        if entry is None or entry[1].ticket < 0:
            raise NonceError("serialized() must be left by the thread that entered it")
        fdo = entry[1]
        t, fdo.ticket = fdo.ticket, -1
        _PHASE.pack_into(self._buf, SLOTS_OFFSET + (t % SLOTS) * 16 + 8, DONE)
        backend.ofd_unlock(fdo.fd, t % SLOTS)
        with self._mutex:
            self._active -= 1


def others_attached(fd: int) -> bool:
    """Whether another open file description holds the PRESENCE byte of this queue file."""
    return backend.ofd_test(fd, PRESENCE) != backend.F_UNLCK
