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
Every thread uses its own descriptor (OFD locks of one descriptor do not exclude
each other); descriptors inherited across fork() are closed in the child.
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
from ._segment import QUEUE, QUEUE_OFFSET, SLOT, SLOTS, SLOTS_OFFSET

__all__ = ["SectionQueue"]

WAITING = 1
HELD = 2
DONE = 0
_PHASE = struct.Struct("<Q")
LONG_WAIT_S = 5.0
"""A wait for the section longer than this is logged as a warning."""
log = logging.getLogger("shmnonce")


class _Fd:
    """A descriptor owned by one thread (or one timed waiter) of one process."""

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
        path: str,
        buf: Any,
        counter: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self._path = path
        self._buf = buf
        self._counter = counter
        self._local = threading.local()
        self._fds: weakref.WeakSet[_Fd] = weakref.WeakSet()
        self._gen = 0

    # -- descriptors -----------------------------------------------------------------
    def _thread_fd(self) -> _Fd:
        entry: tuple[int, _Fd] | None = getattr(self._local, "entry", None)
        if entry is not None and entry[0] == self._gen and entry[1].fd >= 0:
            return entry[1]
        fdo = _Fd(backend.open_lock_file(self._path))
        self._fds.add(fdo)
        self._local.entry = (self._gen, fdo)
        return fdo

    def after_fork_child(self) -> None:
        """Close descriptors inherited from the parent (their locks are the parent's)."""
        self._gen += 1
        for fdo in list(self._fds):
            fdo.close()
        self._fds = weakref.WeakSet()

    def close(self) -> None:
        self.after_fork_child()

    # -- shared table ----------------------------------------------------------------
    def _slot(self, ticket: int) -> tuple[int, int]:
        owner, phase = SLOT.unpack_from(self._buf, SLOTS_OFFSET + (ticket % SLOTS) * 16)
        return owner, phase

    def _set_slot(self, ticket: int, phase: int) -> None:
        SLOT.pack_into(self._buf, SLOTS_OFFSET + (ticket % SLOTS) * 16, ticket, phase)

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
        tail, head, entries, waited, torn, res = QUEUE.unpack_from(self._buf, QUEUE_OFFSET)
        while head < t and self._finished(fd, head):
            head += 1
        QUEUE.pack_into(self._buf, QUEUE_OFFSET, tail, head, entries, waited, torn, res)
        for j in range(t - 1, head - 1, -1):
            if not self._finished(fd, j):
                return j
        return None

    def _bump(self, field: int) -> None:
        vals = list(QUEUE.unpack_from(self._buf, QUEUE_OFFSET))
        vals[field] += 1
        QUEUE.pack_into(self._buf, QUEUE_OFFSET, *vals)

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
        fdo_waited = time.monotonic() - start
        if fdo_waited > LONG_WAIT_S:
            log.warning("serialized() waited %.1f s for the section of %s", fdo_waited, self._path)
        return nonce

    def _arrive(self, fdo: _Fd) -> int:
        """Take the next ticket and lock its slot byte (counter lock held)."""
        tail, head, entries, waited, torn, res = QUEUE.unpack_from(self._buf, QUEUE_OFFSET)
        t: int = tail
        if t - head >= SLOTS - 1:
            self._blocker(fdo.fd, t)  # advances head past finished tickets
            head = QUEUE.unpack_from(self._buf, QUEUE_OFFSET)[1]
            if t - head >= SLOTS - 1:
                raise NonceError(f"more than {SLOTS - 1} threads wait for serialized()")
        self._take_slot(fdo.fd, t)
        self._set_slot(t, WAITING)
        QUEUE.pack_into(self._buf, QUEUE_OFFSET, t + 1, head, entries, waited, torn, res)
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
        self._bump(2)
        if waited:
            self._bump(3)
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
        return _timed_wait(self._path, byte, remaining, self._fds)

    def _give_up_locked(self, fdo: _Fd) -> None:
        t, fdo.ticket = fdo.ticket, -1
        if t < 0 or fdo.fd < 0:
            return
        owner, _phase = self._slot(t)
        if owner == t:
            self._set_slot(t, DONE)
        backend.ofd_unlock(fdo.fd, t % SLOTS)

    def _give_up(self, fdo: _Fd) -> None:
        """Withdraw this thread's ticket (timeout, error, or interrupt while waiting)."""
        if fdo.ticket >= 0 and fdo.fd >= 0:
            with self._counter():
                self._give_up_locked(fdo)
        fdo.ticket = -1

    def leave(self) -> None:
        """Leave the section held by this thread (no-op in a forked child).

        Needs no counter lock: the phase word changes in one byte (HELD -> DONE), and
        a reader that still sees HELD finds the byte lock held and waits on it.
        """
        entry: tuple[int, _Fd] | None = getattr(self._local, "entry", None)
        if entry is None or entry[0] != self._gen:
            return
        fdo = entry[1]
        t, fdo.ticket = fdo.ticket, -1
        if t < 0 or fdo.fd < 0:
            return
        _PHASE.pack_into(self._buf, SLOTS_OFFSET + (t % SLOTS) * 16 + 8, DONE)
        backend.ofd_unlock(fdo.fd, t % SLOTS)


def _timed_wait(path: str, byte: int, timeout: float, registry: weakref.WeakSet[_Fd]) -> bool:
    """Wait for a read lock on ``byte`` in a helper thread, up to ``timeout`` seconds.

    fcntl(F_OFD_SETLKW) cannot be interrupted from Python, so a helper thread blocks
    in it on a private descriptor. If the caller times out the helper stays until the
    byte is released, then unlocks and closes its descriptor; its read lock only ever
    exists for an instant and excludes nobody who matters.
    """
    fdo = _Fd(backend.open_lock_file(path))
    registry.add(fdo)
    done = threading.Event()

    def run() -> None:
        try:
            fd = fdo.fd
            if fd >= 0:
                backend.ofd_lock(fd, byte, backend.F_RDLCK, wait=True)
                backend.ofd_unlock(fd, byte)
        except OSError:
            pass
        finally:
            done.set()
            fdo.close()

    threading.Thread(target=run, name="shmnonce-wait", daemon=True).start()
    return done.wait(timeout)
