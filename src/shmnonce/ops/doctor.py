"""Operator checks (``shmnonce doctor``): read-only, never creates or attaches anything.

Checks, each reported as ``ok``, ``warn`` or ``error``:

``state_dir``
    The state directory exists, is a directory owned by this user, writable by it and
    by nobody else, and its parents do not let another user replace it (each an
    error: attach refuses them); group/world-readable: warning.
``files``
    The sequence's ``.lock``, ``.queue`` and ``.ceiling`` files are regular files (not
    symlinks, FIFOs or directories) owned by this user with no group/other
    permissions (error: attach refuses anything else).
``ceiling``
    The persisted ceiling is intact (magic, version, checksum) and not below the
    live segment's last value or lease; a live segment without ceiling is an error
    (attach refuses it). The segment itself is checked: size, magic, version, header
    checksum, the lock file it was created with, and the record against its mirror (a
    record that differs from it is a warning when the ceiling is intact, since the
    next user resumes above the ceiling, and an error otherwise).
``clock``
    The wall clock against the last value: a clock more than 1 ms behind it is a
    warning (values then run ahead of the clock, at last + 1, until it catches up),
    as are clock regressions counted since the segment was created. Without a live
    segment the clock is compared with the ceiling, where a restart resumes.
``key_index``
    For an API-key sequence (``key-<hash>``): the host-wide key index names this
    state directory and user (error if it names another: one key, two sequences;
    warning if the sequence is not registered yet).
``orphan_segment``
    Segments ``/dev/shm/shmnonce_*`` whose state is gone: the recorded state
    directory or its lock file no longer exists (warning, with the processes that
    still map it), or the lock file was replaced (error: attach refuses it). A
    ``shmnonce_*.new`` left by a creator that was killed is a warning (the next
    creation of that sequence removes it).
    Segments of other users that cannot be read are listed as skipped.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import time
from dataclasses import dataclass, field

from .._errors import StateError
from .._paths import check_parents, default_state_dir, segment_name, validate_name
from ..shm import linux
from ..shm.ceiling import Ceiling, read_ceiling
from ..shm.engine import LEASE_NS, REGRESSION_NS
from ..shm.keyindex import index_dir, is_key_name, lookup
from ..shm.segment import (
    FLAG_UNLINKED,
    HEADER,
    MAGIC,
    RECORD,
    RECORD_OFFSET,
    SIZE,
    TMP_SUFFIX,
    VERSION,
    Header,
    Record,
    header_check,
    owner_fix,
    read_name,
    read_record,
    read_state_dir,
)
from .procinfo import scan_attached

__all__ = ["DoctorReport", "Finding", "run_doctor"]

OK, WARN, ERROR = "ok", "warn", "error"
_SEQ_SUFFIXES = (".lock", ".queue", ".ceiling")


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    message: str
    sequence: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "check": self.check, "status": self.status, "sequence": self.sequence,
            "message": self.message, "details": self.details,
        }


@dataclass
class DoctorReport:
    state_dir: str
    sequences: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, status: str, message: str, sequence: str | None = None, /,
            **details: object) -> None:
        self.findings.append(Finding(check, status, message, sequence, dict(details)))

    def count(self, status: str) -> int:
        return sum(1 for f in self.findings if f.status == status)

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return self.count(ERROR) == 0

    def as_dict(self) -> dict[str, object]:
        return {
            "state_dir": self.state_dir,
            "sequences": self.sequences,
            "ok": self.ok,
            "counts": {s: self.count(s) for s in (OK, WARN, ERROR)},
            "checks": [f.as_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class _Snapshot:
    """A live segment read from /dev/shm (no mapping kept)."""

    header: Header
    name: str
    state_dir: str | None
    record: Record | None  # None: differs from its mirror
    raw_last: int  # the record's last value as stored, checked or not
    uid: int
    mode: int


def _read_snapshot(shm: str) -> _Snapshot | str | None:
    """The segment's header, or a problem description, or None if absent.

    PermissionError propagates (another user's segment). Opened non-blocking and
    type-checked, so a FIFO in its place cannot hang the doctor.
    """
    path = f"/dev/shm/{shm}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise
        return linux.describe_open_error(exc, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file (a FIFO, device or socket in place of a segment)"
        size = st.st_size
        if size != SIZE:
            return f"has {size} bytes, expected {SIZE}"
        with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as buf:
            header = Header(*HEADER.unpack_from(buf, 0))
            if header.magic != MAGIC:
                return "has no shmnonce magic number (half-initialised or foreign)"
            if header.version != VERSION:
                return f"has format version {header.version}, this shmnonce uses {VERSION}"
            if header.check != header_check(buf):
                return "fails its header checksum (corrupted)"
            record = _stable_record(buf)
            raw_last = Record(*RECORD.unpack_from(buf, RECORD_OFFSET)).last
            return _Snapshot(header, read_name(buf), read_state_dir(buf), record, raw_last,
                             st.st_uid, stat.S_IMODE(st.st_mode))
    finally:
        os.close(fd)


def _stable_record(buf: mmap.mmap) -> Record | None:
    """The record, read without the lock: a writer may be half-way through writing the
    record and its mirror, so a failing read is retried for a few milliseconds."""
    for _ in range(20):
        rec = read_record(buf)
        if rec is not None:
            return rec
        time.sleep(0.001)
    return None


def _mode(st: os.stat_result) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def _check_state_dir(rep: DoctorReport, must_exist: bool) -> bool:
    path = rep.state_dir
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        rep.add("state_dir", ERROR if must_exist else WARN,
                f"state directory {path} does not exist (no sequence was created there)", path=path)
        return False
    except OSError as exc:
        rep.add("state_dir", ERROR, f"cannot inspect state directory {path}: {exc.strerror}", path=path)
        return False
    if not stat.S_ISDIR(st.st_mode):
        rep.add("state_dir", ERROR, f"{path} is not a directory", path=path)
        return False
    mode = stat.S_IMODE(st.st_mode)
    details: dict[str, object] = {"path": path, "mode": _mode(st), "uid": st.st_uid}
    if st.st_uid != os.geteuid():
        rep.add("state_dir", ERROR, f"state directory {path} is owned by uid {st.st_uid}, not by this "
                f"user (uid {os.geteuid()}): attach refuses it; use a directory of your own "
                "(SHMNONCE_STATE_DIR or state_dir=)", **details)
    if mode & 0o022:
        rep.add("state_dir", ERROR, f"state directory {path} is writable by group or others (mode "
                f"{_mode(st)}): another user could replace the persisted ceiling, and attach "
                f"refuses it; chmod 700 {path}", **details)
    elif mode & 0o055:
        rep.add("state_dir", WARN, f"state directory {path} is readable by group or others (mode "
                f"{_mode(st)}); chmod 700 {path}", **details)
    if not os.access(path, os.W_OK | os.X_OK):
        rep.add("state_dir", ERROR, f"state directory {path} is not writable by this user: attach "
                "fails", **details)
    try:
        check_parents(path, f"state directory {path}")
    except StateError as exc:
        rep.add("state_dir", ERROR, f"{exc} (attach refuses it)", **details)
    if not any(f.check == "state_dir" for f in rep.findings):
        rep.add("state_dir", OK, f"state directory {path} is a directory owned by this user, mode "
                f"{_mode(st)}", **details)
    return True


def _check_files(rep: DoctorReport, name: str) -> None:
    problems = []
    seen = []
    for suffix in _SEQ_SUFFIXES:
        path = os.path.join(rep.state_dir, name + suffix)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        seen.append(path)
        if stat.S_ISLNK(st.st_mode):
            rep.add("files", ERROR, f"{path} is a symbolic link; shmnonce refuses to follow it: "
                    f"remove it (rm {path}) and run 'shmnonce drop-segment {name}'", name, path=path)
            problems.append(path)
        elif not stat.S_ISREG(st.st_mode):
            rep.add("files", ERROR, f"{path} is not a regular file (a directory, FIFO or device): "
                    f"remove it (rm -r {path}) and run 'shmnonce drop-segment {name}'", name, path=path)
            problems.append(path)
        elif st.st_uid != os.geteuid():
            rep.add("files", ERROR, f"{path} is owned by uid {st.st_uid}, not by this user: attach "
                    f"refuses it; stop the sequence's processes, remove it (rm {path}) and run "
                    f"'shmnonce drop-segment {name}'", name, path=path, uid=st.st_uid)
            problems.append(path)
        elif stat.S_IMODE(st.st_mode) & 0o077:
            rep.add("files", ERROR, f"{path} has mode {_mode(st)}: attach refuses it; chmod 600 {path}",
                    name, path=path, mode=_mode(st))
            problems.append(path)
    if not problems:
        rep.add("files", OK, f"files of {name!r} are private to this user", name, paths=seen)


def _check_key_index(rep: DoctorReport, name: str) -> None:
    """An API-key sequence must be the one the host-wide key index names."""
    if not is_key_name(name):
        return
    try:
        holder = lookup(name)
    except StateError as exc:
        rep.add("key_index", ERROR, str(exc), name)
        return
    if holder is None:
        rep.add("key_index", WARN, f"API-key sequence {name} is not registered in the key index "
                f"({index_dir()}); the next attach registers it", name)
    elif holder.uid != os.geteuid() or holder.state_dir != rep.state_dir:
        rep.add("key_index", ERROR, f"this state directory holds a sequence of API key {name}, but "
                f"the key index ({holder.entry}) gives the key to {holder.describe()}: one key has "
                "two sequences on this host; attach refuses this one. Keep one: 'shmnonce jump' the "
                f"kept one past the other's last value, then 'shmnonce unlink {name} --state-dir "
                f"{rep.state_dir}'", name, entry=holder.entry, uid=holder.uid,
                holder_state_dir=holder.state_dir)
    else:
        rep.add("key_index", OK, f"API-key sequence {name} is the one registered in {holder.entry}",
                name, entry=holder.entry)


def _check_sequence(rep: DoctorReport, name: str, now: int) -> None:
    _check_files(rep, name)
    _check_key_index(rep, name)
    ceiling_path = os.path.join(rep.state_dir, name + ".ceiling")
    lock_path = os.path.join(rep.state_dir, name + ".lock")
    shm = segment_name(name, rep.state_dir)
    try:
        ceiling = read_ceiling(ceiling_path)
        ceiling_error = None
    except StateError as exc:
        ceiling, ceiling_error = None, str(exc)
    try:
        snap = _read_snapshot(shm)
    except PermissionError as exc:
        rep.add("ceiling", ERROR, f"segment /dev/shm/{shm} of {name!r} "
                f"{linux.describe_open_error(exc, '/dev/shm/' + shm)}: attach refuses it; "
                f"{owner_fix(shm, name, rep.state_dir)}", name, segment=shm)
        return
    if isinstance(snap, _Snapshot) and (snap.uid != os.geteuid() or snap.mode & 0o077):
        rep.add("ceiling", ERROR, f"segment /dev/shm/{shm} of {name!r} belongs to uid {snap.uid} with "
                f"mode {snap.mode:04o}, not privately to this user: attach refuses it; "
                f"{owner_fix(shm, name, rep.state_dir)}", name, segment=shm, uid=snap.uid)
        return
    if isinstance(snap, str):
        rep.add("ceiling", ERROR, f"segment /dev/shm/{shm} of {name!r} {snap}; stop its users and run "
                f"'shmnonce drop-segment {name} --state-dir {rep.state_dir}'", name, segment=shm)
        snap = None
    if ceiling_error is not None:
        rep.add("ceiling", ERROR, ceiling_error, name, path=ceiling_path)
    if snap is not None:
        _check_live(rep, name, snap, ceiling, ceiling_error is not None, lock_path, shm, now)
    elif ceiling is not None:
        rep.add("ceiling", OK, f"{name!r} has no live segment; the next attach resumes above the "
                f"persisted ceiling {ceiling.limit}", name, persisted_ceiling=ceiling.limit + 1,
                segment=None)
        ahead = ceiling.limit - now
        if ahead > LEASE_NS:
            rep.add("clock", WARN, f"{name!r}: the persisted ceiling is {ahead / 1e9:.3f} s ahead of the "
                    "wall clock (more than one lease): after the next attach values run ahead of "
                    "the clock until it catches up; check the clock", name, ahead_ns=ahead)
        else:
            rep.add("clock", OK, f"{name!r}: the wall clock is not behind the persisted ceiling by more "
                    "than one lease", name, ahead_ns=ahead)
    elif ceiling_error is None:
        rep.add("ceiling", OK, f"{name!r} has never issued a value (no ceiling, no segment)", name)


def _check_live(
    rep: DoctorReport, name: str, snap: _Snapshot, ceiling: Ceiling | None, ceiling_bad: bool,
    lock_path: str, shm: str, now: int,
) -> None:
    rec = snap.record
    last, limit, total, reg = (snap.raw_last, 0, 0, 0) if rec is None else (
        rec.last, rec.limit, rec.total, rec.regressions)
    details: dict[str, object] = {"segment": shm, "last_nonce": last, "segment_limit": limit}
    try:
        lst = os.stat(lock_path)
        lock_ok = (lst.st_dev, lst.st_ino) == (snap.header.lock_dev, snap.header.lock_ino)
    except FileNotFoundError:
        lock_ok = False
    if snap.header.flags & FLAG_UNLINKED:
        rep.add("ceiling", WARN, f"segment /dev/shm/{shm} of {name!r} is marked unlinked (an interrupted "
                "drop-segment or unlink); the next attach replaces it once no process uses it", name,
                **details)
    if not lock_ok:
        rep.add("ceiling", ERROR, f"segment /dev/shm/{shm} of {name!r} was created with another lock "
                f"file than {lock_path} (the state was removed or replaced); attach refuses it: stop "
                f"its users and run 'shmnonce drop-segment {name} --state-dir {rep.state_dir}'",
                name, **details)
    if rec is None:
        if ceiling is None or ceiling_bad:
            rep.add("ceiling", ERROR, f"segment /dev/shm/{shm} of {name!r} holds a record that differs "
                    "from its mirror copy (torn or corrupted) and the persisted ceiling is not intact: the "
                    f"last value cannot be recovered; run 'shmnonce unlink {name}', then 'shmnonce "
                    f"jump {name} NS' past every value the exchange has seen", name, **details)
        else:
            rep.add("ceiling", WARN, f"segment /dev/shm/{shm} of {name!r} holds a record that differs "
                    "from its mirror copy (a writer was killed mid-update, or memory was corrupted); the "
                    "next user resumes above the persisted ceiling", name, **details)
    if ceiling_bad:
        return
    if ceiling is None:
        if rec is not None and limit > 0:
            rep.add("ceiling", ERROR, f"persisted ceiling of {name!r} is missing while its segment is "
                    f"live (last value {last}); attach refuses it: restore the file or stop the users "
                    f"and run 'shmnonce drop-segment {name}' (rewrites it from the segment)", name, **details)
        return
    details["persisted_ceiling"] = ceiling.limit + 1
    if rec is not None and ceiling.limit < last:
        rep.add("ceiling", ERROR, f"persisted ceiling of {name!r} ({ceiling.limit}) is below the last "
                f"value {last}: after a reboot values could repeat; the next attach rewrites it from the "
                f"segment (or run 'shmnonce drop-segment {name}')", name, **details)
    elif rec is not None and ceiling.segment_id not in (0, snap.header.segment_id) and ceiling.limit > limit:
        rep.add("ceiling", ERROR, f"persisted ceiling of {name!r} was last written through another "
                f"segment than /dev/shm/{shm} (the sequence was unlinked and re-created while "
                "processes still used the old one); its users get StateError at the next lease: "
                "restart them", name, **details)
    elif rec is not None and ceiling.limit < limit:
        rep.add("ceiling", WARN, f"persisted ceiling of {name!r} ({ceiling.limit}) is below the "
                f"segment's lease {limit} (restored from a backup?); the next attach rewrites it "
                "from the segment",
                name, **details)
    elif rec is not None and lock_ok and not snap.header.flags & FLAG_UNLINKED:
        rep.add("ceiling", OK, f"persisted ceiling of {name!r} is intact and above the last value "
                f"({ceiling.limit - last} ns of lease left)", name, **details)
    if rec is None:
        return
    behind = last - now
    cdetails = {"last_nonce": last, "clock_ns": now, "behind_ns": max(0, behind),
                "clock_regressions": reg, "total_issued": total}
    if behind > REGRESSION_NS:
        rep.add("clock", WARN, f"{name!r}: the wall clock is {behind / 1e9:.3f} s behind the last value; "
                "values continue at last + 1 until it catches up (normal after 'jump'; otherwise "
                "check NTP)", name, **cdetails)
    elif reg:
        rep.add("clock", WARN, f"{name!r}: {reg} clock regression(s) seen since the segment was "
                "created; check NTP", name, **cdetails)
    else:
        rep.add("clock", OK, f"{name!r}: the wall clock is not behind the last value", name, **cdetails)


def _check_orphans(rep: DoctorReport) -> None:
    try:
        entries = sorted(e for e in os.listdir("/dev/shm") if e.startswith("shmnonce_"))
    except OSError as exc:
        rep.add("orphan_segment", WARN, f"cannot list /dev/shm: {exc.strerror}")
        return
    skipped: list[str] = []
    orphans = 0
    for shm in entries:
        if shm.endswith(TMP_SUFFIX):
            rep.add("orphan_segment", WARN, f"/dev/shm/{shm} was left by a process killed while "
                    "creating a segment (or one is being created right now); the next creation of "
                    f"that sequence removes it, or: rm /dev/shm/{shm}", segment=shm)
            orphans += 1
            continue
        try:
            snap = _read_snapshot(shm)
        except PermissionError:
            skipped.append(shm)
            continue
        if snap is None:
            continue
        if isinstance(snap, str):
            users = scan_attached(shm, "", "", exclude_pid=os.getpid())
            pids = [p.pid for p in users.processes]
            hint = (f"still mapped by pid(s) {pids}" if pids
                    else f"no process maps it: rm /dev/shm/{shm}")
            rep.add("orphan_segment", WARN, f"/dev/shm/{shm} {snap}; {hint}", segment=shm,
                    attached_pids=pids)
            orphans += 1
            continue
        sd, name = snap.state_dir, snap.name
        if sd is None or segment_name(name, sd) != shm:
            rep.add("orphan_segment", WARN, f"/dev/shm/{shm} records sequence {name!r} in {sd!r}, which "
                    "does not match its name", segment=shm, name=name, state_dir=sd)
            orphans += 1
            continue
        lock_path = os.path.join(sd, name + ".lock")
        try:
            lst = os.stat(lock_path)
        except FileNotFoundError:
            lst = None
        if lst is not None and (lst.st_dev, lst.st_ino) == (snap.header.lock_dev, snap.header.lock_ino):
            continue  # its state is there: checked per sequence
        users = scan_attached(shm, lock_path, os.path.join(sd, name + ".queue"), exclude_pid=os.getpid())
        pids = [p.pid for p in users.processes]
        if lst is None:
            what = "its state directory is gone" if not os.path.isdir(sd) else "its lock file is gone"
            hint = (f"still mapped by pid(s) {pids}: stop them, then rm /dev/shm/{shm}" if pids
                    else f"no process maps it: rm /dev/shm/{shm}")
            rep.add("orphan_segment", WARN, f"/dev/shm/{shm} belongs to sequence {name!r} in {sd}, but "
                    f"{what}; {hint}", name, segment=shm, state_dir=sd, attached_pids=pids,
                    last_nonce=snap.raw_last)
        else:
            rep.add("orphan_segment", ERROR, f"/dev/shm/{shm} of sequence {name!r} in {sd} was created "
                    f"with a lock file that was since replaced; attach refuses it: stop pid(s) {pids} "
                    f"and run 'shmnonce drop-segment {name} --state-dir {sd}'", name, segment=shm,
                    state_dir=sd, attached_pids=pids)
        orphans += 1
    if not orphans:
        rep.add("orphan_segment", OK, f"no leftover segments among {len(entries)} in /dev/shm",
                segments=len(entries), skipped_other_users=skipped)
    elif skipped:
        rep.add("orphan_segment", OK, f"{len(skipped)} segment(s) of other users not inspected",
                skipped_other_users=skipped)


def _sequences_in(state_dir: str) -> list[str]:
    names = set()
    try:
        entries = os.listdir(state_dir)
    except OSError:
        return []
    for entry in entries:
        for suffix in _SEQ_SUFFIXES:
            if entry.endswith(suffix):
                stem = entry[: -len(suffix)]
                with contextlib.suppress(ValueError):
                    names.add(validate_name(stem))
    return sorted(names)


def run_doctor(name: str | None = None, state_dir: str | os.PathLike[str] | None = None) -> DoctorReport:
    """Run every check for ``name`` (or every sequence found in the state directory)."""
    if name is not None:
        validate_name(name)
    raw = default_state_dir() if state_dir is None else os.fspath(state_dir)
    path = os.path.realpath(os.path.expanduser(raw))
    rep = DoctorReport(path)
    exists = _check_state_dir(rep, must_exist=name is not None)
    now = time.time_ns()
    if exists:
        rep.sequences = [name] if name is not None else _sequences_in(path)
        for seq in rep.sequences:
            _check_sequence(rep, seq, now)
    _check_orphans(rep)
    return rep
