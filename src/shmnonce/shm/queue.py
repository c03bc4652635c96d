"""The section of ``serialized()``: a FIFO ticket queue over OFD byte-range locks.

Across processes
----------------
Each entrant takes a ticket (under the counter lock) and write-locks the byte of its
ticket's slot in the queue file for as long as it waits or holds the section. It
enters when every earlier ticket is finished; otherwise it waits for the byte of the
latest unfinished earlier ticket, so the kernel wakes exactly the successor when that
ticket leaves, gives up or dies (the kernel drops a dead process's locks). Tickets are
served in order, so no waiter starves, and waking needs no polling.

A ticket ``j`` is finished when its slot says DONE, or nobody holds the write lock on
its byte any more (its holder died). The phase codes differ from one another in at
least four bits, and a slot whose phase is not exactly DONE (or whose owner is not
``j``) is decided by the byte lock, so one flipped bit in a slot never lets a second
entrant in.

Inside one process
------------------
Every entrant (a thread or an asyncio task) has its own ticket, hence its own place
in the cross-process line, but all tickets of the process are write-locked through
ONE open file description (the base descriptor, which also holds the PRESENCE byte).
Its locks on distinct bytes coexist. Because a description never conflicts with its
own locks, the process tracks its own tickets itself (``_mine``) and asks the kernel
only about other processes' tickets, through a second description (``_wfd``).

Only the process's earliest waiting entrant (the *lead*) can be next, so only the lead
waits across processes: a thread waiting without a timeout blocks in ``F_OFD_SETLKW``
(a read lock of the byte of the ticket ahead) on ``_wfd`` itself; every other lead (a
timed wait, an asyncio task) is woken by the queue's waiter thread, which blocks there
on its behalf and then releases a lock the thread waits on, or resolves the task's
future through ``loop.call_soon_threadsafe``. The waiter thread exits as soon as
nothing is left to wait for. Waiting in memory, timeouts and cancellation act at once:
the entrant withdraws its ticket (phase DONE, byte unlocked) and the next local
entrant becomes the lead. A read lock never shares a description with the process's
write locks (locks of one description on one byte replace each other).

Descriptors per attached sequence and process: the base descriptor and ``_wfd``
(opened at the first contention), whatever the number of threads or tasks.

The queue header (tail, head, counters) is bracketed by generation words and covered
by an XOR check word after it; a header that is torn, fails the check or has a
tail-head gap outside ``0 .. SLOTS - 1`` is rebuilt from the slots and the byte locks.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._errors import LockTimeout, NonceError
from . import linux
from .segment import (
    EXT_RATELIMIT_OFFSET,
    Q_ENTRIES,
    Q_HEAD,
    Q_TAIL,
    Q_WAITED,
    QUEUE,
    SLOT,
    SLOTS,
    SLOTS_OFFSET,
)

if TYPE_CHECKING:
    import asyncio

__all__ = ["DONE", "HELD", "PRESENCE", "WAITING", "SectionQueue", "ShmSection", "others_attached"]

DONE = 0
WAITING = 0x0F
HELD = 0xF0
"""Slot phases: pairwise at least four bits apart, DONE is the zeroed slot."""
PRESENCE = SLOTS + 1
"""Byte read-locked by every attached process (see ``others_attached``)."""
CHECK_OFFSET = QUEUE.offset + QUEUE.struct.size
"""The queue header's check word: XOR of the header's words (gen .. torn)."""
assert CHECK_OFFSET + 8 <= EXT_RATELIMIT_OFFSET
LONG_WAIT_S = 5.0
"""A wait for the section longer than this is logged (INFO)."""
_U64 = struct.Struct("<Q")
_PHASE_AT = 8  # offset of the phase word inside a slot
log = logging.getLogger("shmnonce")


def _check_word(raw: tuple[int, ...]) -> int:
    g, tail, head, entries, waited, torn = raw[:6]
    return int(g ^ tail ^ head ^ entries ^ waited ^ torn)


class _Entrant:
    """One thread's or task's place in line (a ticket of this process)."""

    __slots__ = ("direct", "fut", "held", "lock", "loop", "owner", "task", "thread", "ticket",
                 "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, task: object) -> None:
        self.ticket = -1
        self.thread = threading.get_ident()
        # The Thread object, not the ident (idents are reused after a thread ends): a
        # ticket handed to another thread must not make a new thread look re-entrant.
        self.owner = threading.current_thread()
        self.loop = loop
        self.task = task
        self.held = False
        self.woken = False
        self.lock: Any = None  # a locked _thread lock a waiting thread blocks on
        self.fut: asyncio.Future[None] | None = None  # what a waiting task awaits
        self.direct = -1  # byte a thread waiting without timeout blocks on in the kernel

    def signal(self) -> None:
        """Make the entrant re-examine the queue (queue mutex held)."""
        self.woken = True
        lock = self.lock
        if lock is not None:
            with contextlib.suppress(RuntimeError):  # already released by an earlier signal
                lock.release()
            return
        fut, loop = self.fut, self.loop
        if fut is None or loop is None:
            return
        try:
            if threading.get_ident() == self.thread:
                loop.call_soon(_resolve, fut)
            else:
                loop.call_soon_threadsafe(_resolve, fut)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ShmSection:
    """A ticket of the section, held until :meth:`leave` (see ``_protocol.Section``).

    Owned by whoever entered (a thread or an asyncio task); any thread may leave it.
    """

    __slots__ = ("_ent", "_gen", "_queue", "nonce")

    def __init__(self, queue: SectionQueue, ent: _Entrant, nonce: int) -> None:
        self._queue = queue
        self._ent = ent
        self._gen = queue._gen
        self.nonce = nonce

    @property
    def ticket(self) -> int:
        """This entrant's place in the sequence's line (tickets are taken in arrival order)."""
        return self._ent.ticket

    @property
    def held(self) -> bool:
        """Whether this ticket still holds the section (in this process)."""
        return self._ent.held and self._gen == self._queue._gen

    def leave(self) -> None:
        """Give the section to the next entrant. Idempotent; a no-op in a forked child."""
        self._queue.leave(self)

    def __enter__(self) -> ShmSection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.leave()

    def __repr__(self) -> str:
        state = "held" if self.held else "left"
        return f"<ShmSection ticket={self._ent.ticket} nonce={self.nonce} {state}>"


class SectionQueue:
    """FIFO cross-process exclusive section of one sequence, for one process."""

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
        self._gen = 0
        self._qgen = 0  # generation word of the header last read (counter lock held)
        self._init_local()
        linux.ofd_lock(self._base, PRESENCE, linux.F_RDLCK, wait=True)

    def _init_local(self) -> None:
        self._mutex = threading.Lock()  # guards everything below; the fork hook takes it
        self._mine: dict[int, _Entrant] = {}  # this process's tickets, waiting or held
        self._waiting: dict[int, _Entrant] = {}  # the waiting ones, in ticket order
        self._wfd = -1  # second description: the waiter's read locks and lock tests
        self._want = -1  # byte the lead asked the waiter thread to wait for
        self._busy = -1  # byte the waiter thread is blocked on
        self._waiter: object = None  # token of the running waiter thread
        self._stop = False
        self._orphans: set[int] = set()  # descriptors a blocked waiter closes when it returns

    # -- descriptors -----------------------------------------------------------------
    def _probe(self) -> int:
        """The second description, opened on first need (counter lock held)."""
        fd = self._wfd
        if fd < 0:
            if self._base < 0:
                raise NonceError("serialized(): this handle is closed or lost its descriptors")
            fd = self._wfd = linux.reopen(self._base, self._path)
        return fd

    def after_fork_child(self) -> None:
        """Drop the parent's descriptors and entrants (their locks are the parent's)."""
        self._gen += 1
        inherited = [fd for fd in (self._wfd, *self._orphans) if fd >= 0]
        self._init_local()
        for fd in inherited:
            os.close(fd)
        old, self._base = self._base, -1
        if old < 0:
            return
        try:
            self._base = linux.reopen(old, self._path)
            linux.ofd_lock(self._base, PRESENCE, linux.F_RDLCK, wait=True)
        finally:
            os.close(old)

    def detach(self) -> None:
        """Close this process's descriptors; refuses while a thread or task waits or holds."""
        with self._mutex:
            if self._mine:
                raise NonceError(
                    "close() while a thread or task of this process waits for or holds "
                    "serialized()"
                )
            self._release_locked()

    def release_descriptors(self) -> None:
        """Close the descriptors (a handle dropped without close(), or a failed attach)."""
        if self._mutex.acquire(blocking=False):
            try:
                self._release_locked()
            finally:
                self._mutex.release()
        else:  # only in a dying handle whose mutex was copied locked by fork()
            self._release_locked()

    def _release_locked(self) -> None:
        self._gen += 1
        self._stop = True
        wfd, self._wfd = self._wfd, -1
        if wfd >= 0:
            if self._busy >= 0:
                self._orphans.add(wfd)  # the blocked waiter closes it when it returns
            else:
                os.close(wfd)
        base, self._base = self._base, -1
        if base >= 0:
            os.close(base)

    # -- shared table ----------------------------------------------------------------
    def _set_slot(self, ticket: int, phase: int) -> None:
        SLOT.pack_into(self._buf, SLOTS_OFFSET + (ticket % SLOTS) * 16, ticket, phase)

    def _header(self) -> list[int]:
        """The queue header [tail, head, entries, waited, torn] (counter lock held).

        A header that is torn (a writer was killed mid-write), fails its check word
        (a flipped bit) or has an impossible tail-head gap is rebuilt from the slots.
        """
        raw = QUEUE.struct.unpack_from(self._buf, QUEUE.offset)
        g, tail, head = raw[0], raw[1], raw[2]
        if (
            g == raw[6]
            and 0 <= tail - head < SLOTS
            and _U64.unpack_from(self._buf, CHECK_OFFSET)[0] == _check_word(raw)
        ):
            self._qgen = g
            return [tail, head, raw[3], raw[4], raw[5]]
        if g != raw[6]:
            why = "torn (a writer was killed mid-update)"
        elif not 0 <= tail - head < SLOTS:
            why = f"inconsistent (tail {tail}, head {head})"
        else:
            why = "corrupt (its check word does not match)"
        return self._rebuild(raw, why)

    def _write_header(self, q: list[int]) -> None:
        g = (self._qgen + 1) & 0xFFFFFFFFFFFFFFFF
        self._qgen = g
        raw = (g, *q, g)
        QUEUE.struct.pack_into(self._buf, QUEUE.offset, *raw)
        _U64.pack_into(self._buf, CHECK_OFFSET, _check_word(raw))

    def _locked(self, byte: int) -> bool:
        """Whether another description write-locks ``byte`` (the test sees our base's locks)."""
        return linux.ofd_test(self._probe(), byte) == linux.F_WRLCK

    def _rebuild(self, raw: tuple[int, ...], why: str) -> list[int]:
        """Rebuild the header from the slots and the byte locks (counter lock held).

        The tail is one past the newest ticket in the window of SLOTS consecutive
        tickets that holds the most slot owners, so one slot whose owner had a bit
        flipped cannot drag it away; the byte locks decide which tickets live.
        """
        buf = self._buf
        slots = [SLOT.unpack_from(buf, SLOTS_OFFSET + i * 16) for i in range(SLOTS)]
        owners = sorted(o for i, (o, _p) in enumerate(slots) if o % SLOTS == i)
        best_n, top, lo = 0, -1, 0
        for hi, o in enumerate(owners):
            while o - owners[lo] >= SLOTS:
                lo += 1
            if hi - lo + 1 >= best_n:
                best_n, top = hi - lo + 1, o
        tail = top + 1
        live = []
        for j in range(max(0, tail - SLOTS), tail):
            owner, phase = slots[j % SLOTS]
            if j in self._mine or self._locked(j % SLOTS):
                live.append(j)
                if owner != j or phase not in (WAITING, HELD):
                    self._set_slot(j, WAITING)
            elif owner != j or phase != DONE:
                self._set_slot(j, DONE)
        self._qgen = max(raw[0], raw[6])
        q = [tail, min(live, default=tail), raw[3], raw[4], raw[5] + 1]
        self._write_header(q)
        self._log(logging.WARNING, "section queue header was %s; rebuilt from the slots", why)
        return q

    def _finished(self, j: int) -> bool:
        """Whether ticket ``j`` no longer waits or holds (counter lock held)."""
        if j in self._mine:
            return False
        off = SLOTS_OFFSET + (j % SLOTS) * 16
        owner, phase = SLOT.unpack_from(self._buf, off)
        if owner == j and phase == DONE:
            return True
        if self._locked(j % SLOTS):
            return False
        SLOT.pack_into(self._buf, off, j, DONE)  # its holder died: record it for the next reader
        return True

    def _blocker(self, q: list[int], t: int) -> int | None:
        """Latest unfinished ticket before ``t`` (None: ``t``'s turn); advances q's head."""
        head = q[Q_HEAD]
        while head < t and self._finished(head):
            head += 1
        q[Q_HEAD] = head
        for j in range(t - 1, head - 1, -1):
            if not self._finished(j):
                return j
        return None

    def bump(self, field: int) -> None:
        """Add one to a counter of the queue header (counter lock held)."""
        q = self._header()
        q[field] += 1
        self._write_header(q)

    def counters(self) -> list[int]:
        """The queue header (counter lock held)."""
        return self._header()

    # -- enter / leave -----------------------------------------------------------------
    def enter(self, timeout: float | None, issue: Callable[[], int]) -> ShmSection:
        """Wait (blocking this thread) for the section; ``issue()`` is called inside it."""
        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be >= 0 or None")
        loop = task = None
        aio = sys.modules.get("asyncio")
        if aio is not None:
            loop = aio._get_running_loop()
            if loop is not None:
                task = aio.current_task(loop)
        ent = _Entrant(None, task)
        if self._mine:
            self._refuse_blocking_reentry(ent, loop)
        # Without a timeout the thread itself blocks in the kernel when it waits for
        # another process (no waiter thread, one wake-up less); with one it waits on an
        # in-process lock that the waiter thread releases.
        direct = timeout is None
        nonce = self._try_enter(ent, issue, False, direct)
        if nonce is not None:
            return ShmSection(self, ent, nonce)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        try:
            while True:
                with self._mutex:
                    byte, ent.direct = ent.direct, -1
                    if ent.woken or byte >= 0:
                        lock = None
                    else:
                        lock = ent.lock = _thread.allocate_lock()
                        lock.acquire()
                    ent.woken = False
                if byte >= 0:
                    linux.ofd_lock(self._wfd, byte, linux.F_RDLCK, wait=True)
                    linux.ofd_unlock(self._wfd, byte)
                elif lock is not None:
                    if deadline is None:
                        lock.acquire()
                    else:
                        lock.acquire(timeout=min(max(0.0, deadline - time.monotonic()),
                                                 threading.TIMEOUT_MAX))
                    with self._mutex:
                        ent.lock = None
                        ent.woken = False
                nonce = self._try_enter(ent, issue, True, direct)
                if nonce is not None:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"serialized() timed out after {timeout} s waiting for the section"
                    )
        except BaseException:
            self._withdraw(ent)
            raise
        waited_s = time.monotonic() - start
        if waited_s > LONG_WAIT_S:
            log.info("serialized() waited %.1f s for the section", waited_s)
        return ShmSection(self, ent, nonce)

    async def aenter(self, timeout: float | None, issue: Callable[[], int]) -> ShmSection:
        """Wait for the section without blocking the event loop; each task is an entrant."""
        import asyncio

        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be >= 0 or None")
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if self._mine:
            for other in list(self._mine.values()):
                if task is not None and other.task is task:
                    raise NonceError(
                        "aserialized() is not re-entrant: this task already holds or waits "
                        "for the section"
                    )
        ent = _Entrant(loop, task)
        nonce = self._try_enter(ent, issue, False)
        if nonce is not None:
            return ShmSection(self, ent, nonce)
        start = loop.time()
        deadline = None if timeout is None else start + timeout
        try:
            while True:
                with self._mutex:
                    fut = None if ent.woken else loop.create_future()
                    ent.fut = fut
                    ent.woken = False
                if fut is not None:
                    timer = None if deadline is None else loop.call_at(deadline, _resolve, fut)
                    try:
                        await fut
                    finally:
                        if timer is not None:
                            timer.cancel()
                        with self._mutex:
                            ent.fut = None
                            ent.woken = False
                nonce = self._try_enter(ent, issue, True)
                if nonce is not None:
                    break
                if deadline is not None and loop.time() >= deadline:
                    raise LockTimeout(
                        f"aserialized() timed out after {timeout} s waiting for the section"
                    )
        except BaseException:
            self._withdraw(ent)
            raise
        waited_s = loop.time() - start
        if waited_s > LONG_WAIT_S:
            log.info("aserialized() waited %.1f s for the section", waited_s)
        return ShmSection(self, ent, nonce)

    def _refuse_blocking_reentry(self, ent: _Entrant, loop: object) -> None:
        """A blocking enter from a thread that already waits or holds would never return."""
        for other in list(self._mine.values()):
            if other.owner is not ent.owner:
                continue
            if loop is not None:
                raise NonceError(
                    "serialized() called in an asyncio event loop while another task of the "
                    "same loop holds or waits for the section: blocking here would deadlock "
                    "the loop. Use 'async with engine.aserialized(timeout=...)' in tasks"
                )
            raise NonceError(
                "serialized() is not re-entrant: this thread already holds (or waits for) it"
            )

    def _try_enter(
        self, ent: _Entrant, issue: Callable[[], int], waited: bool, direct: bool = False
    ) -> int | None:
        """Take a ticket if ``ent`` has none; enter if it is its turn and return the nonce,
        else arrange to be woken and return None.

        ``direct``: if ``ent`` is the lead and waits for another process, set
        ``ent.direct`` to the byte to block on instead of asking the waiter thread.
        """
        start_waiter = False
        wfd = -1
        with self._counter():
            q = self._header()
            try:
                if ent.ticket < 0:
                    self._arrive(q, ent)
                t = ent.ticket
                blocker = self._blocker(q, t)
                if blocker is None:
                    nonce = issue()
                    self._set_slot(t, HELD)
                    q[Q_ENTRIES] += 1
                    q[Q_WAITED] += waited
                    with self._mutex:
                        ent.held = True
                        waiting = self._waiting
                        lead = next(iter(waiting)) == t
                        del waiting[t]
                        if lead and waiting:
                            waiting[next(iter(waiting))].signal()  # the new lead looks again
                    return nonce
                with self._mutex:
                    if next(iter(self._waiting)) == t and blocker not in self._mine:
                        if direct:
                            ent.direct = blocker % SLOTS
                        else:
                            start_waiter = self._request_locked(blocker % SLOTS)
                if start_waiter or ent.direct >= 0:
                    wfd = self._probe()
            except BaseException:
                if ent.ticket >= 0 and not ent.held:
                    self._withdraw(ent)
                raise
            finally:
                self._write_header(q)
        if start_waiter:
            self._start_waiter(wfd)
        return None

    def _arrive(self, q: list[int], ent: _Entrant) -> None:
        """Take the next ticket and lock its slot byte (counter lock held)."""
        t = q[Q_TAIL]
        if t - q[Q_HEAD] >= SLOTS - 1:
            self._blocker(q, t)  # advances head past finished tickets
            if t - q[Q_HEAD] >= SLOTS - 1:
                raise NonceError(f"more than {SLOTS - 1} threads or tasks wait for serialized()")
        self._take_slot(t)
        self._set_slot(t, WAITING)
        q[Q_TAIL] = t + 1
        ent.ticket = t
        with self._mutex:
            self._mine[t] = ent
            self._waiting[t] = ent

    def _take_slot(self, t: int) -> None:
        byte = t % SLOTS
        for _ in range(1000):
            if linux.ofd_lock(self._base, byte, linux.F_WRLCK, wait=False):
                return
            if linux.ofd_test(self._base, byte) == linux.F_WRLCK:
                raise NonceError(f"queue slot {byte} is still held by ticket {t - SLOTS}")
            # a waiter of an old ticket holds a read lock for a few microseconds
            time.sleep(0)
        raise NonceError(f"queue slot {byte} stays locked")

    def _withdraw(self, ent: _Entrant) -> None:
        """Give up ``ent``'s place (timeout, cancellation, error); wakes the next lead.

        Needs no counter lock: the phase word changes in one write and the byte lock
        decides for any reader that still sees the old phase.
        """
        with self._mutex:
            t = ent.ticket
            if ent.held or self._mine.get(t) is not ent:
                return
            del self._mine[t]
            lead = next(iter(self._waiting)) == t
            del self._waiting[t]
            if self._base >= 0:
                off = SLOTS_OFFSET + (t % SLOTS) * 16
                if SLOT.unpack_from(self._buf, off)[0] == t:
                    _U64.pack_into(self._buf, off + _PHASE_AT, DONE)
                linux.ofd_unlock(self._base, t % SLOTS)
            if lead and self._waiting:
                self._waiting[next(iter(self._waiting))].signal()

    def leave(self, section: ShmSection) -> None:
        """Leave the section held by ``section`` (idempotent; no-op in a forked child).

        Needs no counter lock: the phase word changes in one write (HELD -> DONE), and
        a reader that still sees HELD finds the byte lock held and waits on it.
        """
        ent = section._ent
        with self._mutex:
            if not ent.held:
                return
            ent.held = False
            if section._gen != self._gen:
                return  # entered before fork() (the section is the parent's) or closed
            t = ent.ticket
            _U64.pack_into(self._buf, SLOTS_OFFSET + (t % SLOTS) * 16 + _PHASE_AT, DONE)
            linux.ofd_unlock(self._base, t % SLOTS)
            del self._mine[t]
            if self._waiting:
                self._waiting[next(iter(self._waiting))].signal()

    # -- the waiter thread -------------------------------------------------------------
    def _request_locked(self, byte: int) -> bool:
        """Ask the waiter thread to wait for ``byte`` (mutex held); True: start the thread.

        A request replaces an older one: the lead's blocker is never earlier than a
        byte an earlier lead asked for while that byte's ticket is unfinished.
        """
        if byte == self._busy:
            self._want = -1
            return False
        self._want = byte
        return self._waiter is None  # a running waiter takes the request after its wait

    def _start_waiter(self, fd: int) -> None:
        """Start the waiter thread on description ``fd`` unless one runs already.

        Started with ``_thread`` rather than ``threading.Thread.start()``, which waits
        until the new thread is scheduled: on a busy machine that wait can last tens of
        milliseconds, and the caller may be an event loop.
        """
        with self._mutex:
            if self._waiter is not None or self._stop or self._want < 0:
                return
            token = self._waiter = object()
        try:
            _thread.start_new_thread(self._waiter_main, (fd, token))
        except BaseException:
            with self._mutex:
                self._waiter = None
            raise

    def _waiter_main(self, fd: int, token: object) -> None:
        """Block in the kernel for the byte the lead needs, then wake the lead."""
        try:
            self._waiter_loop(fd, token)
        except BaseException:  # never expected; the lead's own wait still times out
            log.exception("shmnonce section waiter thread failed")
            with self._mutex:
                if self._waiter is token:
                    self._waiter = None
                if self._waiting:
                    self._waiting[next(iter(self._waiting))].signal()

    def _waiter_loop(self, fd: int, token: object) -> None:
        while True:
            with self._mutex:
                # Exit as soon as there is nothing to wait for: no thread lingers (a
                # process that forks later is not multi-threaded because of us).
                if self._want < 0 or self._stop or self._waiter is not token:
                    if self._waiter is token:
                        self._waiter = None
                    return
                byte, self._want = self._want, -1
                self._busy = byte
            try:
                linux.ofd_lock(fd, byte, linux.F_RDLCK, wait=True)
                linux.ofd_unlock(fd, byte)
            except OSError as exc:  # not expected: the lead looks again and asks again
                log.debug("section waiter: %s", exc)
            with self._mutex:
                self._busy = -1
                if fd in self._orphans:  # the handle was closed while we were blocked
                    self._orphans.discard(fd)
                    os.close(fd)
                    if self._waiter is token:
                        self._waiter = None
                    return
                if self._waiting:
                    self._waiting[next(iter(self._waiting))].signal()


def others_attached(fd: int) -> bool:
    """Whether another open file description holds the PRESENCE byte of this queue file."""
    return linux.ofd_test(fd, PRESENCE) != linux.F_UNLCK
