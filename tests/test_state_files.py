"""Issue 8 points 3 and 7: odd things in place of state files never hang and name a repair.

A FIFO, a directory or a symlink in place of NAME.lock, NAME.queue, NAME.ceiling or
/dev/shm/<segment>: ``attach``, ``doctor``, ``status`` and ``drop-segment`` return
promptly (the CLI runs in a subprocess with a deadline) with a StateError naming the
sequence, the path and the repair, and the repair named works. Running out of inodes
or space at attach (a tiny tmpfs mounted for the test; /dev/shm shrunk in a private
mount namespace), a disk quota (injected: no quota-enabled file system here) and
EACCES are StateErrors too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest

from shmnonce import NonceError, ShmNonce, StateError
from shmnonce._paths import segment_name
from shmnonce.shm import linux as backend

from ._users import remove_segments_under

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUR = 3600 * 10**9

@pytest.fixture(autouse=True)
def _no_leftover_segments(tmp_path: object) -> Iterator[None]:
    yield
    remove_segments_under(str(tmp_path))



def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``python -m shmnonce ...``; a hang fails the test (TimeoutExpired), never blocks it."""
    return subprocess.run([sys.executable, "-m", "shmnonce", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def _make(kind: str, path: str, target: str) -> None:
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "dir":
        os.mkdir(path, 0o700)
    else:
        os.symlink(target, path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@pytest.fixture
def seq(state_dir: str) -> Iterator[tuple[str, int, str]]:
    """A sequence jumped an hour ahead, with an intact twin ('other') for symlink targets."""
    with ShmNonce.attach("odd", state_dir) as eng:
        top = eng.jump_forward(HOUR)
        real = eng.state_dir
    with ShmNonce.attach("other", state_dir) as o:
        o.next()
    yield real, top, f"/dev/shm/{eng.segment_name}"


KINDS = ["fifo", "dir", "symlink"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".lock", ".queue", ".ceiling"])
def test_odd_state_file_is_a_state_error_with_a_repair(
    seq: tuple[str, int, str], state_dir: str, suffix: str, kind: str
) -> None:
    real, top, shm = seq
    path = os.path.join(real, "odd" + suffix)
    os.unlink(path)
    _make(kind, path, os.path.join(real, "other" + suffix))
    with pytest.raises(StateError) as info:
        ShmNonce.attach("odd", state_dir)
    msg = str(info.value)
    for part in (path, "'odd'", f"rm -r {path}"):
        assert part in msg, (part, msg)
    # the operator commands return promptly, one line, naming the path
    r = cli("status", "odd", "--state-dir", real)
    assert r.returncode == 1 and path in r.stderr and r.stderr.count("\n") == 1, r
    r = cli("doctor", "odd", "--state-dir", real, "--json")
    assert r.returncode == 2, r
    errors = [c["message"] for c in json.loads(r.stdout)["checks"] if c["status"] == "error"]
    assert any(path in m for m in errors), errors
    # the repair named: remove it, drop the segment (which keeps and raises the ceiling)
    _remove(path)
    r = cli("drop-segment", "odd", "--state-dir", real)
    assert r.returncode == 0, r
    assert not os.path.exists(shm)
    with ShmNonce.attach("odd", state_dir) as eng:
        assert eng.next() > top
        eng.unlink()


@pytest.mark.parametrize("kind", KINDS)
def test_odd_thing_in_place_of_the_segment(seq: tuple[str, int, str], state_dir: str, kind: str) -> None:
    real, top, shm = seq
    os.unlink(shm)  # as at a reboot; then something else takes the name
    other_shm = "/dev/shm/" + segment_name("other", real)
    _make(kind, shm, other_shm)
    try:
        with pytest.raises(StateError) as info:
            ShmNonce.attach("odd", state_dir)
        msg = str(info.value)
        for part in (shm, "'odd'", f"rm -r {shm}"):
            assert part in msg, (part, msg)
        r = cli("status", "odd", "--state-dir", real)
        assert r.returncode == 1 and shm in r.stderr, r
        r = cli("doctor", "odd", "--state-dir", real)
        assert r.returncode == 2 and shm in r.stdout, r
        r = cli("doctor", "--state-dir", real)  # every sequence, and the /dev/shm scan
        assert r.returncode in (0, 2), r
        r = cli("drop-segment", "odd", "--state-dir", real)
        if kind == "dir":  # named in the message: 'rm -r' it
            assert r.returncode == 1 and shm in r.stderr and "rm -r" in r.stderr, r
        else:  # removed without being read or followed
            assert r.returncode == 0 and not os.path.lexists(shm), r
    finally:
        _remove(shm)
    with ShmNonce.attach("odd", state_dir) as eng:
        assert eng.next() > top
        eng.unlink()


def test_fifo_ceiling_does_not_stall_attached_processes(state_dir: str) -> None:
    """The original hang: attach blocked on the FIFO while holding the counter lock."""
    a = ShmNonce.attach("stall", state_dir)
    try:
        v = a.next()
        path = os.path.join(a.state_dir, "stall.ceiling")
        os.unlink(path)
        os.mkfifo(path, 0o600)
        with pytest.raises(StateError, match="FIFO"):
            ShmNonce.attach("stall", state_dir)
        assert a.next() > v  # the counter lock was not left held
        with pytest.raises(StateError, match="FIFO"):  # a lease end reads the ceiling: no hang
            a.jump_forward(HOUR)
        os.unlink(path)
        r = cli("drop-segment", "stall", "--force", "--state-dir", a.state_dir)
        assert r.returncode == 0, r
    finally:
        with contextlib.suppress(NonceError):
            a.close()
    with ShmNonce.attach("stall", state_dir) as eng:
        assert eng.next() > v
        eng.unlink()


def test_fifo_at_the_ceiling_temporary_file_is_not_opened(state_dir: str) -> None:
    with ShmNonce.attach("tmpf", state_dir) as eng:
        eng.next()
        tmp = os.path.join(eng.state_dir, "tmpf.ceiling.tmp")
        os.mkfifo(tmp, 0o600)
        v = eng.jump_forward(HOUR)  # writes the ceiling through the temporary name
        assert v > 0 and not os.path.exists(tmp)
        eng.unlink()


def test_unreadable_own_lock_file_is_a_state_error(state_dir: str) -> None:
    """EACCES: as root every open succeeds, so the owner is an unprivileged user."""
    from ._users import ensure_user, run_as, shared_tmp

    user = ensure_user("shmnonce-t2")
    base = shared_tmp("shmnonce-acc-")
    try:
        sd = os.path.join(base, "state")
        assert run_as(user, os.mkdir, sd, 0o700).ok

        def attach_with_read_only_lock() -> str:
            with ShmNonce.attach("ro", sd) as e:
                e.next()
            os.chmod(os.path.join(sd, "ro.lock"), 0o400)
            try:
                ShmNonce.attach("ro", sd)
            except StateError as exc:
                return str(exc)
            finally:
                os.chmod(os.path.join(sd, "ro.lock"), 0o600)
                ShmNonce.attach("ro", sd).unlink()
            return "attached"

        res = run_as(user, attach_with_read_only_lock)
        assert res.ok, res.value
        path = os.path.join(sd, "ro.lock")
        for part in (path, "'ro'", "not accessible", f"chmod 600 {path}"):
            assert part in res.value, (part, res.value)
    finally:
        remove_segments_under(base)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- no space, no inodes


@contextlib.contextmanager
def tiny_tmpfs(path: str, options: str) -> Iterator[str]:
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); see the injected tests below")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def test_no_inodes_left_at_attach(tmp_path: object) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tiny_tmpfs(os.path.join(str(tmp_path), "full"), "size=1m,nr_inodes=2") as sd:
        with pytest.raises(StateError) as info:  # room for NAME.lock only
            ShmNonce.attach("ino", sd)
        msg = str(info.value)
        for part in (os.path.join(sd, "ino.queue"), "'ino'", "no inodes"):
            assert part in msg, (part, msg)
    with tiny_tmpfs(os.path.join(str(tmp_path), "full2"), "size=1m,nr_inodes=3") as sd:
        eng = ShmNonce.attach("ino", sd)  # lock and queue fit; the ceiling does not
        try:
            with pytest.raises(StateError) as info:
                eng.next()
            msg = str(info.value)
            for part in (os.path.join(sd, "ino.ceiling"), "'ino'", "free space or inodes"):
                assert part in msg, (part, msg)
        finally:
            eng.unlink()


def test_full_dev_shm_at_attach_is_a_state_error_not_sigbus(tmp_path: object) -> None:
    """/dev/shm shrunk to one page in a private mount namespace: the segment cannot fit."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /dev/shm")
    sd = os.path.join(str(tmp_path), "s")
    code = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", "/dev/shm"], check=True)
        from shmnonce import ShmNonce, StateError
        try:
            with ShmNonce.attach("full", {sd!r}) as eng:
                eng.next()
                with eng.serialized():
                    pass
        except StateError as exc:
            print("StateError:", exc)
            sys.exit(0)
        print("attached")
    """)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    if r.returncode != 0 and "mount" in r.stderr and "Traceback" in r.stderr and "tmpfs" in r.stderr:
        pytest.skip(f"cannot mount in a private namespace: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)  # -7: killed by SIGBUS
    assert r.stdout.startswith("StateError:") and "'full'" in r.stdout and "/dev/shm" in r.stdout, r.stdout
    assert "free memory in /dev/shm" in r.stdout, r.stdout


def _inject(monkeypatch: pytest.MonkeyPatch, target: object, attr: str,
            when: Callable[..., bool], err: int) -> None:
    real = getattr(target, attr)

    def fake(*args: object, **kwargs: object) -> object:
        if when(*args, **kwargs):
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, fake)


def test_disk_quota_at_attach_is_a_state_error(state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDQUOT injected at the creation of NAME.queue (no quota-enabled file system here)."""
    _inject(monkeypatch, backend.os, "open",
            lambda path, flags, *a, **k: str(path).endswith("q.queue") and bool(flags & os.O_CREAT),
            errno.EDQUOT)
    with pytest.raises(StateError) as info:
        ShmNonce.attach("q", state_dir)
    msg = str(info.value)
    for part in ("q.queue", "'q'", "quota"):
        assert part in msg, (part, msg)


def test_no_space_for_the_segment_is_a_state_error(state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected at the segment's creation (the real one is the unshare test above)."""
    _inject(monkeypatch, backend._posixshmem, "shm_open",
            lambda name, flags, *a, **k: bool(flags & os.O_CREAT), errno.ENOSPC)
    with pytest.raises(StateError) as info:
        ShmNonce.attach("nospace", state_dir)
    msg = str(info.value)
    for part in ("/dev/shm/shmnonce_", "'nospace'", "free memory in /dev/shm"):
        assert part in msg, (part, msg)
