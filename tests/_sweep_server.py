"""Fork server for the crash sweeps (tests/test_crash_sweep.py).

Started once per test with everything imported; for each request it forks a child
that stops itself (SIGSTOP) before the operation, so that the test can attach strace
to it and kill it at an exact system call, or kill it after a chosen delay.

Protocol, one line per message. Request on stdin: ``OP NAME STATE_DIR OUT``. Replies
on stdout: the child's pid once it is stopped (the test attaches its tracer, then
sends SIGCONT), then its exit code (``-9``: killed by SIGKILL). Operations:

``attach``   attach (creating the segment if absent) and issue one value
``drop``     ``shmnonce drop-segment`` (``_repair.drop_segment``)
``destroy``  ``shmnonce unlink`` (``_repair.destroy``)
``unlink``   attach before stopping, then ``ShmNonce.unlink()``
``extend``   attach before stopping, then issue one value with the clock two hours
             ahead, so that ``next()`` must persist a new ceiling first
``jump``     attach before stopping, then ``jump_forward`` by two hours

A value the child issued is appended to OUT; an exception's traceback goes to
OUT.err and the exit code is 3.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback

from shmnonce import ShmNonce
from shmnonce.ops.repair import destroy, drop_segment

_PR_SET_PTRACER, _PR_SET_PTRACER_ANY = 0x59616D61, -1


def _allow_tracer() -> None:
    """Let strace attach although it is not our ancestor (Yama ptrace_scope 1); a no-op
    (EINVAL) without Yama."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)


def _child(op: str, name: str, state_dir: str, out: str) -> None:
    eng = ShmNonce.attach(name, state_dir) if op in ("unlink", "extend", "jump") else None
    _allow_tracer()
    os.kill(os.getpid(), signal.SIGSTOP)
    if op == "attach":
        value = ShmNonce.attach(name, state_dir).next()
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, b"%d\n" % value)
    elif op == "drop":
        drop_segment(name, state_dir)
    elif op == "destroy":
        destroy(name, state_dir)
    elif op == "unlink":
        assert eng is not None
        eng.unlink()
    elif op in ("extend", "jump"):
        assert eng is not None
        if op == "extend":
            ahead = eng.peek() - time.time_ns() + 2 * 3600 * 10**9  # two hours past the last value
            eng._clock = lambda: time.time_ns() + ahead  # type: ignore[method-assign]
            value = eng.next()
        else:
            value = eng.jump_forward(2 * 3600 * 10**9)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, b"%d\n" % value)
    else:
        raise ValueError(op)


def main() -> None:
    for line in sys.stdin:
        op, name, state_dir, out = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(op, name, state_dir, out)
            except BaseException:
                with open(out + ".err", "a") as fh:
                    fh.write(traceback.format_exc())
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            print(f"{pid}\n{os.waitstatus_to_exitcode(status)}", flush=True)
            continue
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
