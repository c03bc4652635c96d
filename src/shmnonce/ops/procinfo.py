"""Which processes use a sequence, and which one holds its section (Linux, via /proc).

Attached processes
    A process that attached a sequence keeps three things open: the lock file
    ``<state_dir>/<name>.lock`` (the counter lock), a descriptor of the segment
    ``/dev/shm/<segment>`` (CPython's ``mmap`` keeps a duplicate of it) and the mapping
    itself, and ``<name>.queue`` (one open file description carries all of the process's
    section tickets; a second one is opened once it waits for another process). The
    scan lists, with ``psutil``, every process with one of those files open, plus every
    process whose ``/proc/<pid>/maps`` shows the segment.

Section holder
    The holder of ``serialized()`` is the ticket whose slot in the segment is HELD; its
    process write-locks byte ``ticket % 4096`` of ``<name>.queue`` with an
    open-file-description (OFD) lock. ``F_OFD_GETLK`` cannot name that process (it
    reports ``l_pid = -1`` for OFD locks, as does ``/proc/locks``), so the kernel is
    asked only whether the byte is still locked, and the process is found through the
    ``lock:`` lines of ``/proc/<pid>/fdinfo/<fd>``, which list the locks owned by each
    open file description, for the descriptors of the queue file found above.

Limits
    Without privileges (root or ``CAP_SYS_PTRACE``) the descriptors, maps and fdinfo
    of other users' processes cannot be read; such processes are counted in
    ``uninspectable`` and a holder among them is reported as held but undetermined.
    The same applies to processes in another PID namespace (another container). The
    snapshot is not atomic: a section may change hands while it is taken.
    Process command lines are never read: they may hold API keys.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

from ..shm import linux
from ..shm.queue import HELD
from ..shm.segment import Q_HEAD, Q_TAIL, QUEUE, SIZE, SLOT, SLOTS, SLOTS_OFFSET

__all__ = [
    "Attached",
    "AttachedScan",
    "Holder",
    "find_holder",
    "held_tickets",
    "read_segment",
    "scan_attached",
]



@dataclass(frozen=True)
class Attached:
    """One process that has the sequence open or mapped."""

    pid: int
    name: str | None
    username: str | None
    via: tuple[str, ...]
    """Any of "lock-file", "queue-file", "segment-fd", "segment-map"."""
    queue_fds: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "name": self.name, "username": self.username, "via": list(self.via)}


@dataclass(frozen=True)
class AttachedScan:
    processes: list[Attached] = field(default_factory=list)
    uninspectable: int = 0
    """Processes whose descriptors or maps could not be read (other users, no privileges)."""

    def by_pid(self) -> dict[int, Attached]:
        return {p.pid: p for p in self.processes}


@dataclass(frozen=True)
class Holder:
    """The ticket inside ``serialized()`` and, when it can be determined, its process."""

    ticket: int
    pid: int | None
    name: str | None
    username: str | None
    determined: bool
    note: str
    pids: tuple[int, ...] = ()
    """Every process sharing the locking open file description (normally one)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "ticket": self.ticket,
            "pid": self.pid,
            "name": self.name,
            "username": self.username,
            "determined": self.determined,
            "note": self.note,
        }


def _maps_segment(pid: int, shm_path: str) -> bool:
    """True if ``/proc/<pid>/maps`` maps ``shm_path``; PermissionError if unreadable."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.rstrip("\n").endswith(shm_path):
                return True
    return False


def scan_attached(
    segment: str, lock_path: str, queue_path: str, *, exclude_pid: int | None = None
) -> AttachedScan:
    """Processes that have the sequence's files open or its segment mapped."""
    shm_path = f"/dev/shm/{segment}"
    wanted = {lock_path: "lock-file", queue_path: "queue-file", shm_path: "segment-fd"}
    found: list[Attached] = []
    uninspectable = 0
    for proc in psutil.process_iter(["name", "username"]):
        pid = proc.pid
        if pid == exclude_pid:
            continue
        via: list[str] = []
        queue_fds: list[int] = []
        denied = False
        try:
            for of in proc.open_files():
                kind = wanted.get(of.path)
                if kind is None:
                    continue
                if kind not in via:
                    via.append(kind)
                if kind == "queue-file":
                    queue_fds.append(of.fd)
        except (psutil.AccessDenied, PermissionError):
            denied = True
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        try:
            if _maps_segment(pid, shm_path):
                via.append("segment-map")
        except PermissionError:
            denied = True
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError as exc:
            if exc.errno not in (errno.ESRCH, errno.EACCES):
                raise
            denied = True
        if via:
            info = proc.info
            found.append(
                Attached(pid, info.get("name"), info.get("username"), tuple(via), tuple(queue_fds))
            )
        elif denied:
            uninspectable += 1
    found.sort(key=lambda a: a.pid)
    return AttachedScan(found, uninspectable)


def held_tickets(seg: bytes | memoryview) -> list[int]:
    """Tickets whose slot says HELD, among the unfinished ones (``head <= t < tail``).

    ``seg`` is the segment (at least ``SLOTS_OFFSET + SLOTS * 16`` bytes), read without
    the counter lock: a snapshot for operators, not a synchronisation primitive.
    """
    raw = QUEUE.struct.unpack_from(seg, QUEUE.offset)  # unlocked snapshot, may be mid-update
    tail, head = raw[1 + Q_TAIL], raw[1 + Q_HEAD]
    lo = max(head, tail - SLOTS)
    held = []
    for t in range(lo, tail):
        owner, phase = SLOT.unpack_from(seg, SLOTS_OFFSET + (t % SLOTS) * SLOT.size)
        if owner == t and phase == HELD:
            held.append(t)
    return held


def _parse_lock_line(line: str) -> tuple[str, str, int, int, int, int, str] | None:
    """``1: OFDLCK ADVISORY  WRITE -1 fe:00:2147266 5 5`` -> (kind, mode, major, minor, ino, start, end)."""
    parts = line.split()
    if len(parts) < 8 or "->" in parts:
        return None
    kind, _advisory, mode, _pid, dev, start, end = parts[1:8]
    try:
        major_s, minor_s, ino_s = dev.split(":")
        return kind, mode, int(major_s, 16), int(minor_s, 16), int(ino_s), int(start), end
    except ValueError:
        return None


def _fd_write_locks(pid: int, fd: int) -> list[tuple[int, int, int, int, str]]:
    """OFD write locks owned by descriptor ``fd`` of ``pid``: (major, minor, ino, start, end)."""
    locks = []
    with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if not line.startswith("lock:"):
                continue
            parsed = _parse_lock_line(line[len("lock:"):])
            if parsed is None:
                continue
            kind, mode, major, minor, ino, start, end = parsed
            if kind == "OFDLCK" and mode == "WRITE":
                locks.append((major, minor, ino, start, end))
    return locks


def _byte_locked(queue_path: str, byte: int) -> bool | None:
    """Whether some open file description write-locks ``byte`` (None: no queue file)."""
    try:  # O_NONBLOCK: a FIFO in its place must not hang the caller
        fd = os.open(queue_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return linux.ofd_test(fd, byte) == linux.F_WRLCK
    finally:
        os.close(fd)


def find_holder(
    seg: bytes | memoryview, queue_path: str, candidates: Iterable[Attached]
) -> Holder | None:
    """The holder of the section, or None when no ticket is HELD by a live process.

    ``candidates`` are the attached processes found by :func:`scan_attached`; only
    their descriptors of the queue file are examined.
    """
    tickets = held_tickets(seg)
    try:
        st = os.stat(queue_path)
    except FileNotFoundError:
        return None
    major, minor, ino = os.major(st.st_dev), os.minor(st.st_dev), st.st_ino
    cands = [c for c in candidates if c.queue_fds]
    for t in reversed(tickets):  # the latest HELD ticket is the current holder
        byte = t % SLOTS
        if not _byte_locked(queue_path, byte):
            continue  # stale slot: its holder left or died; the next entrant tidies it
        pids: list[Attached] = []
        unreadable = False
        for cand in cands:
            for fd in cand.queue_fds:
                try:
                    locks = _fd_write_locks(cand.pid, fd)
                except (FileNotFoundError, ProcessLookupError):
                    continue
                except PermissionError:
                    unreadable = True
                    continue
                if (major, minor, ino, byte, str(byte)) in locks:
                    pids.append(cand)
                    break
        if pids:
            first = pids[0]
            note = (
                "found through the OFD lock on byte "
                f"{byte} of {queue_path} in /proc/{first.pid}/fdinfo"
            )
            return Holder(t, first.pid, first.name, first.username, True, note,
                          tuple(p.pid for p in pids))
        reason = (
            "some descriptors could not be read" if unreadable
            else "no process this user can inspect owns it"
        )
        return Holder(
            t, None, None, None, False,
            f"the section is held (byte {byte} of {queue_path} is write-locked) but {reason}: "
            "the holder runs as another user or in another PID namespace; run as root "
            "to see it",
        )
    return None


def read_segment(segment: str, size: int = SIZE) -> bytes | None:
    """A snapshot of the first ``size`` bytes of ``/dev/shm/<segment>`` (None if absent)."""
    try:  # O_NONBLOCK and a type check: a FIFO in its place must not hang the caller
        fd = os.open(f"/dev/shm/{segment}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(size)
    finally:
        os.close(fd)
