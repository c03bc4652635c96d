"""Worker functions run in child processes (fork, spawn, or as a separate program)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
import time
from collections.abc import Iterator

from shmnonce import ShmNonce


def issue_many(name: str, state_dir: str, count: int, out: str, eng: ShmNonce | None = None) -> None:
    """Issue ``count`` values and write them, one per line, to ``out``."""
    own = eng is None
    e = ShmNonce.attach(name, state_dir) if eng is None else eng
    values = [e.next() for _ in range(count)]
    with open(out, "w") as fh:
        fh.write("\n".join(map(str, values)) + "\n")
    if own:
        e.close()


def issue_forever(name: str, state_dir: str, out: str) -> None:
    """Issue values until killed, flushing each one so a SIGKILL loses at most one line."""
    e = ShmNonce.attach(name, state_dir)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, b"ready\n")
    while True:
        os.write(fd, b"%d\n" % e.next())


def sections(
    name: str, state_dir: str, count: int, marker: str, log: str, hold: float,
    eng: ShmNonce | None = None,
) -> None:
    """Enter serialized() ``count`` times; an O_EXCL marker file detects any overlap.

    Each entry appends its nonce to ``log`` inside the section, so the file's order
    is the entry order; a violation is appended as the line ``OVERLAP``.
    """
    e = ShmNonce.attach(name, state_dir) if eng is None else eng
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for _ in range(count):
        with e.serialized(timeout=60) as nonce:
            try:
                mfd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                os.write(logfd, b"OVERLAP\n")
                continue
            os.write(logfd, b"%d %d\n" % (nonce, os.getpid()))
            if hold:
                time.sleep(hold)
            os.close(mfd)
            os.unlink(marker)
    os.close(logfd)


def hold_section(name: str, state_dir: str, ready: str, seconds: float) -> None:
    """Enter serialized(), create ``ready``, then sleep inside the section."""
    e = ShmNonce.attach(name, state_dir)
    with e.serialized():
        with open(ready, "w") as fh:
            fh.write(str(time.time()))
        time.sleep(seconds)
        with open(ready + ".left", "w") as fh:
            fh.write(repr(time.time()))


def wait_for_file(path: str, timeout: float = 30.0) -> None:
    """Poll (test helper only) until ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


@contextlib.contextmanager
def held_by_thread(eng: ShmNonce) -> Iterator[None]:
    """Run the body while another thread of this process holds ``eng.serialized()``."""
    inside = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with eng.serialized():
            inside.set()
            release.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    try:
        if not inside.wait(5):
            raise TimeoutError("the holder thread did not enter")
        yield
    finally:
        release.set()
        t.join()


def main(argv: list[str]) -> None:
    cmd, *args = argv
    if cmd == "issue":
        issue_many(args[0], args[1], int(args[2]), args[3])
    elif cmd == "forever":
        issue_forever(args[0], args[1], args[2])
    elif cmd == "sections":
        sections(args[0], args[1], int(args[2]), args[3], args[4], float(args[5]))
    elif cmd == "hold":
        hold_section(args[0], args[1], args[2], float(args[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
