"""POSIX (Linux) primitives: lock files, OFD byte-range locks, shared-memory segments.

Two kinds of OS lock are used, both released by the kernel when their holder dies:

* ``flock`` on a descriptor kept open (the short "counter" lock);
* Linux open-file-description (OFD) byte-range locks (the fair section queue). Unlike
  classic POSIX record locks they belong to the open file description, so a thread that
  opens its own descriptor excludes the other threads of its process, and closing an
  unrelated descriptor of the same file does not drop them.
"""

from __future__ import annotations

import sys

if not sys.platform.startswith("linux"):  # pragma: no cover - checked at import
    raise ImportError(
        "shmnonce supports Linux only: serialized() relies on open-file-description "
        f"locks (F_OFD_SETLKW), which {sys.platform} does not provide"
    )

import _posixshmem  # type: ignore[import-not-found]
import contextlib
import errno
import fcntl
import mmap
import os
import pwd
import stat
import struct

from .._errors import StateError

__all__ = [
    "describe_open_error",
    "describe_owner",
    "flock_ex",
    "flock_un",
    "ofd_lock",
    "ofd_test",
    "ofd_unlock",
    "open_lock_file",
    "open_state_file",
    "reopen",
    "shm_create",
    "shm_link",
    "shm_map",
    "shm_open",
    "shm_unlink",
    "verify_owned",
]

# struct flock on Linux (x86_64, aarch64): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, then padding to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")
_F_OFD_SETLK: int = fcntl.F_OFD_SETLK
_F_OFD_SETLKW: int = fcntl.F_OFD_SETLKW
_F_OFD_GETLK: int = fcntl.F_OFD_GETLK
F_RDLCK: int = fcntl.F_RDLCK
F_WRLCK: int = fcntl.F_WRLCK
F_UNLCK: int = fcntl.F_UNLCK

flock_ex = fcntl.flock


def flock_un(fd: int) -> None:
    """Release a ``flock``."""
    fcntl.flock(fd, fcntl.LOCK_UN)


_NOBLOCK = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
"""Flags of every state-file open: never follow a symlink, never block on a FIFO or device.

O_NONBLOCK has no effect on a regular file (the only kind accepted after ``fstat``), so
the descriptor is used as it is."""


def describe_owner(uid: int) -> str:
    """``uid N (name)`` for messages."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def describe_open_error(exc: OSError, path: str) -> str:
    """What an ``open`` of a state file failing with ``exc`` says about ``path``."""
    e = exc.errno
    if e == errno.ELOOP:
        return "is a symbolic link (shmnonce never follows one)"
    if e == errno.EISDIR:
        return "is a directory"
    if e in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"cannot be created: {exc.strerror} (no space or no inodes left, or the disk quota "
            "is exhausted, on its file system)"
        )
    if e == errno.EROFS:
        return "cannot be created or written: read-only file system"
    if e in (errno.EACCES, errno.EPERM):
        try:
            st = os.lstat(path)
        except OSError:
            return f"is not accessible by this user ({describe_owner(os.geteuid())}): {exc.strerror}"
        return (
            f"is not accessible by this user ({describe_owner(os.geteuid())}): it is "
            f"{_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a file'} owned by "
            f"{describe_owner(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}"
        )
    if e == errno.ENXIO:
        return "is a device or socket, not a shmnonce file"
    return f"cannot be opened: {exc.strerror or exc}"


def _open_failure(exc: OSError, path: str, what: str, fix: str) -> Exception:
    """The error for a failed open: StateError for the file, OSError for the process.

    Running out of descriptors or kernel memory says nothing about the file: the
    state is intact, and the "damaged file" repairs (which remove files) must not be
    suggested for it.
    """
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        limit = "this process's descriptor limit (RLIMIT_NOFILE, 'ulimit -n')"
        if exc.errno == errno.ENFILE:
            limit = "the system's file table (fs.file-max)"
        elif exc.errno == errno.ENOMEM:
            limit = "kernel memory"
        return type(exc)(
            exc.errno, f"{exc.strerror} opening {what}: {limit} is exhausted; raise the limit "
            "or close other handles (each attached sequence keeps 3 descriptors). The "
            "sequence's state is intact", path,
        )
    return StateError(f"{what} {describe_open_error(exc, path)}; {fix}")


def open_state_file(path: str, what: str, fix: str, *, create: bool, write: bool = True) -> int:
    """Open a state file of this user safely and return a close-on-exec descriptor.

    Never follows a symlink and never blocks (a FIFO or device in its place is
    opened non-blocking, then refused by the ``fstat`` type check). When ``create``,
    an absent file is created 0600 with ``O_EXCL``; without it FileNotFoundError
    propagates. Anything else that is wrong (another owner, group/other access, a
    directory, symlink, FIFO, no space or inodes, no permission) raises StateError
    naming ``what`` and ``fix``. Verified on the descriptor, never by path alone.
    """
    flags = (os.O_RDWR if write else os.O_RDONLY) | _NOBLOCK
    fd = -1
    for _attempt in range(10):
        try:
            fd = os.open(path, flags)  # the common case: it exists
            break
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            raise _open_failure(exc, path, what, fix) from None
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue  # created (or something put there) since: open and check it
        except OSError as exc:
            raise _open_failure(exc, path, what, fix) from None
        try:
            os.fchmod(fd, 0o600)  # a restrictive umask must not leave it unwritable
        except OSError:
            os.close(fd)
            raise
        return fd  # ours, new, 0600: nothing to verify
    else:
        raise StateError(f"{what} keeps being created and removed by another process; {fix}")
    try:
        verify_owned(fd, what, fix)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_lock_file(path: str, what: str | None = None, fix: str | None = None) -> int:
    """Open (create 0600) a lock or queue file and return a close-on-exec descriptor.

    Refuses (StateError) what :func:`open_state_file` refuses.
    """
    return open_state_file(
        path, what or f"lock file {path}",
        fix or f"remove it (rm -r {path}) once no process uses it; it is created again",
        create=True,
    )


def reopen(fd: int, path: str) -> int:
    """A new open file description of the inode behind ``fd``.

    Through /proc/self/fd, so that it cannot land on another file if the original was
    deleted and recreated. Without /proc, ``path`` is opened and must be that inode.
    """
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.isdir("/proc/self/fd"):
            raise
    new = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    a, b = os.fstat(fd), os.fstat(new)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        os.close(new)
        raise FileNotFoundError(f"{path!r} was replaced and /proc is not mounted")
    return new


def ofd_lock(fd: int, start: int, kind: int, wait: bool) -> bool:
    """Lock byte ``start`` with an OFD lock of ``kind``; False if busy and not ``wait``."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLKW if wait else _F_OFD_SETLK, arg)
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def ofd_unlock(fd: int, start: int) -> None:
    """Release the OFD lock on byte ``start``."""
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(F_UNLCK, os.SEEK_SET, start, 1, 0))


def ofd_test(fd: int, start: int) -> int:
    """Type of a lock another descriptor holds on byte ``start`` (F_UNLCK if none)."""
    res = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(F_WRLCK, os.SEEK_SET, start, 1, 0))
    kind: int = _FLOCK.unpack(res)[0]
    return kind


def shm_open(name: str) -> int:
    """Open an existing segment read-write; FileNotFoundError if absent."""
    fd: int = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    return fd


def shm_create(name: str, size: int) -> int:
    """Create a new zero-filled 0600 segment of ``size`` bytes; FileExistsError if present.

    Its memory is allocated here (``posix_fallocate``): on a full ``/dev/shm`` this
    raises ENOSPC instead of a later write into the mapping killing the process with
    SIGBUS. The name is removed again if that fails.
    """
    fd: int = _posixshmem.shm_open("/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            _posixshmem.shm_unlink("/" + name)
        raise
    return fd


def shm_map(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of a segment shared; the caller may close ``fd`` afterwards."""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


SHM_DIR = "/dev/shm"
"""Where glibc keeps POSIX shared-memory objects (a tmpfs)."""


def shm_link(name: str, new_name: str) -> None:
    """Give segment ``name`` the additional name ``new_name``; FileExistsError if taken.

    A hard link in the shared-memory directory: atomic, and it never replaces an
    existing segment (unlike rename).
    """
    os.link(f"{SHM_DIR}/{name}", f"{SHM_DIR}/{new_name}", follow_symlinks=False)


def shm_unlink(name: str) -> None:
    """Remove a segment's name; processes that mapped it keep their mapping."""
    _posixshmem.shm_unlink("/" + name)


def verify_owned(fd: int, what: str, fix: str) -> os.stat_result:
    """``fstat`` an open descriptor and refuse what this user must not trust.

    Accepts only a regular file owned by the effective user with no group or other
    access bits; anything else raises StateError naming ``what``, the owner, the
    mode and ``fix``. Checked on the descriptor, never by path, so a file swapped
    in after the check cannot slip through.
    """
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"is {_kind(st.st_mode)}, not a regular file"
    elif st.st_uid != os.geteuid():
        problem = (
            f"belongs to {describe_owner(st.st_uid)}, not to this user "
            f"({describe_owner(os.geteuid())})"
        )
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}: group or others may access it"
    if problem is not None:
        raise StateError(f"{what} {problem}; {fix}")
    return st
