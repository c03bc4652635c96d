"""Fork while another thread holds a lock, then check that the child can take it."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Callable

# Python >= 3.12 warns on fork() while threads run; the tests below fork on purpose
FORK_WARNING = "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"

CHILD_OK, CHILD_HUNG, CHILD_RAISED = 0, 3, 4


def fork_while_held(lock: threading.Lock, child_call: Callable[[], object], timeout: float = 10.0) -> int:
    """Fork while a helper thread holds ``lock``; the child runs ``child_call`` in a thread.

    Returns the child's exit code: ``CHILD_OK`` when ``child_call`` returned within
    ``timeout`` seconds, ``CHILD_HUNG`` when it did not (it waits for a lock that no
    thread of the child will release), ``CHILD_RAISED`` when it raised (traceback on
    stderr). The parent's helper thread releases the lock after the fork.
    """
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold, name="lock-holder", daemon=True)
    holder.start()
    try:
        assert held.wait(10), "the helper thread did not take the lock"
        pid = os.fork()
        if pid == 0:  # the child: only this thread exists; `lock` stays held forever
            code = CHILD_HUNG
            try:
                result: list[int] = []

                def run() -> None:
                    try:
                        child_call()
                        result.append(CHILD_OK)
                    except BaseException:
                        traceback.print_exc()
                        result.append(CHILD_RAISED)

                worker = threading.Thread(target=run, daemon=True)
                worker.start()
                worker.join(timeout)
                code = result[0] if result else CHILD_HUNG
            finally:
                os._exit(code)
    finally:
        release.set()
        holder.join(10)
    deadline = time.monotonic() + timeout + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not exit")
        time.sleep(0.01)
