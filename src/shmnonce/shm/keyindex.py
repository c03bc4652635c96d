"""Host-wide index of API-key sequences: one API key, one sequence per host.

A key has exactly one nonce state at the exchange, so on one host it must have
exactly one sequence. Sequences are per ``(name, realpath(state_dir))``; without
this index a bot run with ``SHMNONCE_STATE_DIR`` and a cron job without it, or two
users, would get two sequences for one key. The index records, for every key
sequence name (``key-<salted hash>``, never the key), the user and the state
directory that hold it:

* ``for_api_key`` goes to the registered state directory of this user (the one
  live sequence) and refuses one registered to another user;
* ``attach`` of a key sequence name registers its state directory if the name is
  not registered yet, and refuses any other state directory or user.

Layout: one small JSON file per key sequence, ``/var/tmp/shmnonce-key-<hash>``
(``$SHMNONCE_KEY_INDEX`` names another directory), written by its owner
(``{"v": 1, "name", "uid", "state_dir"}``, mode 0644 so that another user's error
can name the holder; no key material: the name is the salted hash). ``/var/tmp``
survives reboots, as the persisted state does, and is root's sticky directory, so
it needs no set-up and nobody can remove or replace another user's entry. Entries
are published atomically (written under a temporary name, fsynced, then
``link``-ed into place, which fails if the name exists) and the directory is
fsynced. Trust: the directory must be owned by root or by this user and writable
by others only with the sticky bit; an entry counts only if its file's owner is
the uid it records. Another user can at worst make attach fail with a clear
error, never redirect a sequence.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from typing import NamedTuple

from .._errors import StateError
from .._paths import check_parents
from .linux import _NOBLOCK, describe_open_error, describe_owner

__all__ = ["DEFAULT_INDEX", "ENV_INDEX", "Holder", "claim", "index_dir", "is_key_name", "lookup", "release"]

ENV_INDEX = "SHMNONCE_KEY_INDEX"
DEFAULT_INDEX = "/var/tmp"
PREFIX = "shmnonce-"
_KEY_NAME = re.compile(r"key-[0-9a-f]{32}")
_MAX_ENTRY = 8192


class Holder(NamedTuple):
    """Who holds a key sequence: the index entry's owner and state directory."""

    uid: int
    state_dir: str
    entry: str  # path of the index entry

    def describe(self) -> str:
        return f"{describe_owner(self.uid)} in state directory {self.state_dir}"


def is_key_name(name: str) -> bool:
    """Whether ``name`` is a sequence name made by ``api_key_name``."""
    return _KEY_NAME.fullmatch(name) is not None


def index_dir() -> str:
    """``$SHMNONCE_KEY_INDEX`` if set (absolute), else ``/var/tmp``."""
    env = os.environ.get(ENV_INDEX)
    if env:
        if not os.path.isabs(env):
            raise StateError(f"{ENV_INDEX}={env!r} must be an absolute path")
        return os.path.normpath(env)
    return DEFAULT_INDEX


def _fix_dir(path: str) -> str:
    return (
        f"have root move it away and create it as 'install -d -m 1777 -o root -g root {path}' "
        f"(every user's API-key sequences register there), or set {ENV_INDEX} for every "
        "process of this host to such a directory"
    )


def _open_index(create: bool) -> int | None:
    """A verified descriptor of the index directory (None if absent and not ``create``)."""
    path = index_dir()
    euid = os.geteuid()
    created = False
    for _attempt in range(3):
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(path, 0o700)
                created = True
            except FileExistsError:
                continue
            except OSError as exc:
                raise StateError(
                    f"cannot create the API-key index {path}: {exc.strerror}; {_fix_dir(path)}"
                ) from None
        except OSError as exc:
            what = "is not a directory" if exc.errno in (errno.ENOTDIR, errno.ELOOP) else exc.strerror
            raise StateError(f"API-key index {path} {what}; {_fix_dir(path)}") from None
    else:
        raise StateError(f"API-key index {path} keeps disappearing; {_fix_dir(path)}")
    try:
        if created:  # root's index serves every user (sticky: nobody removes another's entry)
            os.fchmod(dfd, 0o1777 if euid == 0 else 0o755)
        st = os.fstat(dfd)
        problem = None
        if st.st_uid not in (0, euid):
            problem = (
                f"belongs to {describe_owner(st.st_uid)}, neither root nor this user "
                f"({describe_owner(euid)}): its owner could remove or replace this user's entries"
            )
        elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            problem = (
                f"has mode {stat.S_IMODE(st.st_mode):04o}: others may write it and it has no "
                "sticky bit, so they could remove or replace entries"
            )
        if problem:
            raise StateError(f"API-key index {path} {problem}; {_fix_dir(path)}")
        check_parents(path, f"API-key index {path}")
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def _entry_error(path: str, problem: str) -> StateError:
    return StateError(
        f"API-key index entry {path} {problem}; remove it (as its owner or root: rm {path}) "
        "unless it names the state directory that holds the key's sequence; the sequence "
        "registers again at its next attach"
    )


def _entry(name: str) -> str:
    return PREFIX + name


def _read(dfd: int, name: str) -> Holder | None:
    path = os.path.join(index_dir(), _entry(name))
    try:
        fd = os.open(_entry(name), os.O_RDONLY | _NOBLOCK, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _entry_error(path, describe_open_error(exc, path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _entry_error(path, "is not a regular file")
        data = os.read(fd, _MAX_ENTRY + 1)
    finally:
        os.close(fd)
    try:
        doc = json.loads(data.decode())
        ok = (
            isinstance(doc, dict) and doc.get("v") == 1 and doc.get("name") == name
            and isinstance(doc.get("uid"), int) and isinstance(doc.get("state_dir"), str)
            and os.path.isabs(doc["state_dir"])
        )
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok or len(data) > _MAX_ENTRY:
        raise _entry_error(path, f"(owned by {describe_owner(st.st_uid)}) is not a valid entry")
    if doc["uid"] != st.st_uid:
        raise _entry_error(
            path, f"records uid {doc['uid']} but belongs to {describe_owner(st.st_uid)}"
        )
    return Holder(st.st_uid, doc["state_dir"], path)


def lookup(name: str) -> Holder | None:
    """The registered holder of key sequence ``name``, None if not registered."""
    dfd = _open_index(create=False)
    if dfd is None:
        return None
    try:
        return _read(dfd, name)
    finally:
        os.close(dfd)


def claim(name: str, state_dir: str) -> Holder:
    """Register ``state_dir`` of this user for ``name`` unless registered; return the holder.

    The returned holder is whoever registered first (this call or another); the
    caller compares it with its own user and state directory.
    """
    dfd = _open_index(create=True)
    assert dfd is not None
    try:
        for _attempt in range(10):
            holder = _read(dfd, name)
            if holder is not None:
                if holder.uid == os.geteuid():
                    with contextlib.suppress(OSError):  # keeps it from /var/tmp cleaners
                        os.utime(_entry(name), dir_fd=dfd, follow_symlinks=False)
                return holder
            _publish(dfd, name, state_dir)
        raise StateError(f"API-key index entry {os.path.join(index_dir(), _entry(name))} keeps disappearing")
    finally:
        os.close(dfd)


def _publish(dfd: int, name: str, state_dir: str) -> None:
    body = json.dumps({"v": 1, "name": name, "uid": os.geteuid(), "state_dir": state_dir}).encode()
    tmp = f".{_entry(name)}.{os.getpid()}.{secrets.token_hex(4)}"
    where = os.path.join(index_dir(), _entry(name))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOBLOCK, 0o644, dir_fd=dfd)
    except OSError as exc:
        raise StateError(
            f"cannot register {name} in the API-key index: {os.path.join(index_dir(), tmp)} "
            f"{describe_open_error(exc, os.path.join(index_dir(), tmp))}; {_fix_dir(index_dir())}"
        ) from None
    try:
        try:
            os.fchmod(fd, 0o644)  # readable by all: another user's error names the holder
            if os.write(fd, body) != len(body):
                raise OSError(errno.EIO, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process registered first
            os.link(tmp, _entry(name), src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        os.fsync(dfd)
    except OSError as exc:
        raise StateError(f"cannot register {where}: {exc.strerror or exc}; {_fix_dir(index_dir())}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)


def release(name: str, state_dir: str) -> None:
    """Remove this user's entry for ``name`` if it names ``state_dir`` (after unlink)."""
    dfd = _open_index(create=False)
    if dfd is None:
        return
    try:
        holder = _read(dfd, name)
        if holder is not None and holder.uid == os.geteuid() and holder.state_dir == state_dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_entry(name), dir_fd=dfd)
            os.fsync(dfd)
    finally:
        os.close(dfd)
