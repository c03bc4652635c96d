"""Name validation, state directory resolution and API-key hashing."""

from __future__ import annotations

import hashlib
import os
import re

import platformdirs

__all__ = ["api_key_name", "resolve_state_dir", "segment_name", "validate_name"]

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


def resolve_state_dir(state_dir: str | os.PathLike[str] | None) -> str:
    """Create the state directory (0700) if needed and return its realpath.

    Raises ``PermissionError``/``NotADirectoryError``/``OSError`` naming the path when
    it cannot be created or written.
    """
    raw = default_state_dir() if state_dir is None else os.fspath(state_dir)
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"invalid state_dir {state_dir!r}")
    path = os.path.realpath(os.path.expanduser(raw))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"state_dir {path!r} exists and is not a directory") from None
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot create state_dir: {exc.strerror}", path) from None
    if not os.path.isdir(path):
        raise NotADirectoryError(f"state_dir {path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"state_dir {path!r} is not writable by this user")
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
