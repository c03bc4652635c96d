"""Name validation, state directory resolution and API-key hashing."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import stat

import platformdirs

from ._errors import StateError
from .shm.linux import describe_owner

__all__ = [
    "api_key_name", "check_parents", "resolve_state_dir", "segment_name", "state_dir_path", "validate_name",
]

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENV_STATE_DIR = "SHMNONCE_STATE_DIR"


def validate_name(name: object) -> str:
    """Return ``name`` if it is 1-64 chars of ``[A-Za-z0-9._-]``, else raise ValueError."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid sequence name {name!r}: use 1-64 characters of [A-Za-z0-9._-]"
        )
    return name


def default_state_dir() -> str:
    """``$SHMNONCE_STATE_DIR``, else ``$XDG_STATE_HOME/shmnonce``, else the platform default."""
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return env
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "shmnonce")
    return platformdirs.user_state_dir("shmnonce", appauthor=False)


def state_dir_path(state_dir: str | os.PathLike[str] | None) -> str:
    """The realpath ``state_dir`` (or the default) designates; creates and checks nothing."""
    raw = default_state_dir() if state_dir is None else os.fspath(state_dir)
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"invalid state_dir {state_dir!r}")
    return os.path.realpath(os.path.expanduser(raw))


def _where(path: str, name: str | None) -> str:
    return f"state directory {path}" + ("" if name is None else f" of sequence {name!r}")


def _how_to_choose(state_dir: object) -> str:
    if state_dir is not None:
        return (
            "it is the state_dir given: pass one this user owns or can create (created 0700 "
            "if absent)"
        )
    return (
        f"it is the default (${ENV_STATE_DIR}, else $XDG_STATE_HOME/shmnonce, else "
        f"~/.local/state/shmnonce): set {ENV_STATE_DIR} or pass state_dir= (CLI: --state-dir) "
        "to a directory this user owns or can create (created 0700 if absent), e.g. "
        "/var/lib/<service>/shmnonce for a system user without a writable home"
    )


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _private_group(gid: int, euid: int) -> bool:
    """Whether only this user belongs to group ``gid`` (a user private group)."""
    try:
        user = pwd.getpwuid(euid)
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        return False
    if user.pw_gid != gid or any(m != user.pw_name for m in members):
        return False
    return not any(p.pw_gid == gid and p.pw_uid != euid for p in pwd.getpwall())


def check_parents(path: str, what: str) -> None:
    """Refuse ``path`` (``what`` names it) if another user could swap it through a parent.

    Every parent must be owned by root or this user and be writable by others only
    with the sticky bit (like /tmp), so that nobody else can rename ``path`` and put
    their own in its place. A parent writable by its group is accepted only when that
    group is this user's private group (no other member, nobody else's primary
    group): with the usual umask 002 ``~/.local`` is group-writable that way. A group
    shared with other users could rename the state directory away after a reboot and
    make the sequence restart from the clock.
    """
    euid = os.geteuid()
    parent = os.path.dirname(path)
    while True:
        st = os.lstat(parent)
        problem = None
        if st.st_uid not in (0, euid):
            problem = (
                f"is owned by {describe_owner(st.st_uid)}, neither root nor this user "
                f"({describe_owner(euid)})"
            )
        elif st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            problem = (
                f"has mode {stat.S_IMODE(st.st_mode):04o}: anyone may write it and it has no "
                "sticky bit"
            )
        elif st.st_mode & 0o020 and not st.st_mode & stat.S_ISVTX and not _private_group(st.st_gid, euid):
            problem = (
                f"has mode {stat.S_IMODE(st.st_mode):04o} and group {_group_name(st.st_gid)}, "
                "which has members other than this user, may write it (no sticky bit)"
            )
        if problem:
            raise StateError(
                f"{what}: its parent directory {parent} {problem}, so another user could "
                "rename it and put their own in its place; use a directory whose parents are "
                "owned by root or by this user and not writable by others (or have the sticky "
                "bit, as /tmp)"
            )
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def resolve_state_dir(
    state_dir: str | os.PathLike[str] | None, name: str | None = None, *, create: bool = True
) -> str:
    """Create the state directory (0700) if needed and ``create``, check it, return its realpath.

    Rule: the directory must be a real directory (its realpath is used, so a
    symlink to it is fine) owned by the effective user and not writable by group or
    others (read and search access for others is allowed: the files in it are
    0600), and its parents must not let another user replace it (see
    ``check_parents``). Checked with ``fstat`` on a descriptor opened with
    O_NOFOLLOW|O_DIRECTORY. Anything else raises StateError naming the path, the
    owner and the fix; FileNotFoundError when absent and not ``create``.
    """
    path = state_dir_path(state_dir)
    where = _where(path, name)
    if create:
        existing = path
        while not os.path.lexists(existing) and existing != os.path.dirname(existing):
            existing = os.path.dirname(existing)
        if existing != path:  # refuse before creating anything under an unsafe parent
            check_parents(os.path.join(existing, "-"), where)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            raise StateError(f"{where} exists and is not a directory; {_how_to_choose(state_dir)}") from None
        except OSError as exc:
            raise StateError(
                f"cannot create {where}: {exc.strerror} ({exc.filename}); {_how_to_choose(state_dir)}"
            ) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:  # removed while we were creating it
            raise StateError(f"{where} was removed while being created; try again") from None
        raise
    except NotADirectoryError:
        raise StateError(f"{where} is not a directory; {_how_to_choose(state_dir)}") from None
    except OSError as exc:
        raise StateError(f"cannot open {where}: {exc.strerror}; {_how_to_choose(state_dir)}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    euid = os.geteuid()
    if st.st_uid != euid:
        raise StateError(
            f"{where} belongs to {describe_owner(st.st_uid)}, not to this user "
            f"({describe_owner(euid)}): another user "
            "created it (a directory pre-created under /tmp, say) and could read or replace the "
            f"sequence's files; {_how_to_choose(state_dir)}, or have root remove {path}"
        )
    if st.st_mode & 0o022:
        raise StateError(
            f"{where} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may write it and "
            f"so replace the sequence's files; if nobody else put files in it, chmod 700 {path}; "
            f"otherwise {_how_to_choose(state_dir)}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(f"{where} is not writable by this user; chmod 700 {path}")
    check_parents(path, where)
    return path


def segment_name(name: str, state_dir: str) -> str:
    """Shared-memory segment name for (name, resolved state_dir).

    A hash keeps it short (macOS allows 31 characters) and unique per state_dir.
    """
    digest = hashlib.sha256(f"{state_dir}\0{name}".encode()).hexdigest()[:20]
    return f"shmnonce_{digest}"


def api_key_name(api_key: str | bytes) -> str:
    """Sequence name for an API key: a salted SHA-256 prefix; the key is not recoverable."""
    if isinstance(api_key, str):
        api_key = api_key.encode()
    if not isinstance(api_key, bytes) or not api_key:
        raise ValueError("api_key must be a non-empty str or bytes")
    return "key-" + hashlib.sha256(b"shmnonce-api-key-v1\0" + api_key).hexdigest()[:32]
