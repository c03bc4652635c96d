"""Another local user for the tests: created with ``useradd``, acted as in a forked child.

CI runs as root; these helpers create unprivileged system users (idempotent: an
existing user is reused, nothing is ever removed) and run a function as one of
them in a forked child (``setgroups([])``, ``setgid``, ``setuid``), returning its
result or the exception's type name and message.
"""

from __future__ import annotations

import os
import pickle
import pwd
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest


class User(NamedTuple):
    name: str
    uid: int
    gid: int


class ChildResult(NamedTuple):
    ok: bool
    value: Any  # the return value, or (exception type name, message, is StateError)


def _lookup(name: str) -> User | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(name, pw.pw_uid, pw.pw_gid)


def ensure_user(name: str) -> User:
    """The unprivileged user ``name``, created if absent; skips the test if impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create another user and act as it (CI runs as root)")
    user = _lookup(name)
    if user is not None:
        return user
    if shutil.which("useradd") is None:
        pytest.skip("useradd is unavailable: cannot create an unprivileged user to act as another user")
    last = ""
    for _attempt in range(50):
        r = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, timeout=60,
        )
        user = _lookup(name)
        if user is not None:
            return user
        last = r.stderr.strip()
        time.sleep(0.1)  # /etc/passwd locked by a concurrent useradd
    pytest.fail(f"useradd {name} failed: {last}")


def run_as(user: User, fn: Callable[..., Any], *args: Any, env: dict[str, str | None] | None = None,
           timeout: float = 60.0) -> ChildResult:
    """Run ``fn(*args)`` as ``user`` in a forked child; its result or its exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            for k, v in (env or {}).items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            from shmnonce import StateError

            try:
                res = ChildResult(True, fn(*args))
            except BaseException as exc:
                res = ChildResult(False, (type(exc).__name__, str(exc), isinstance(exc, StateError)))
            os.write(w, pickle.dumps(tuple(res)))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child acting as {user.name} hung for {timeout} s")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert chunks, f"the child acting as {user.name} died (wait status {status})"
    return ChildResult(*pickle.loads(b"".join(chunks)))


def squat_file(user: User, path: str, mode: int, data: bytes = b"") -> None:
    """Create ``path`` as ``user`` with ``mode`` (O_EXCL) holding ``data``."""

    def create() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)

    res = run_as(user, create)
    assert res.ok, res.value


def shared_tmp(prefix: str) -> str:
    """A fresh root-owned 1777 directory under /tmp: a private /tmp for other users too."""
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o1777)
    return path


def remove_segments_under(*prefixes: str) -> None:
    """Remove every shmnonce segment whose recorded state directory is under a prefix.

    For tests whose sequences live outside the ``state_dir`` fixture (which conftest
    cleans): other state directories, other users, refused attaches.
    """
    import contextlib
    import struct

    reals = tuple(os.path.realpath(p) + os.sep for p in prefixes)
    for entry in os.listdir("/dev/shm"):
        if not entry.startswith("shmnonce_"):
            continue
        try:
            with open(f"/dev/shm/{entry}", "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as fh:
                head = fh.read(4096)
        except OSError:
            continue
        if len(head) < 4096:
            continue
        (n,) = struct.unpack_from("<H", head, 1024)
        sd = head[1026 : 1026 + n].decode(errors="replace") + os.sep
        if sd.startswith(reals):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{entry}")
