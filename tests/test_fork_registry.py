"""One at-fork registry: hooks run by layer, not by import order."""

from __future__ import annotations

import os

import pytest

from shmnonce import _fork

pytestmark = pytest.mark.timeout(30)


def test_child_hooks_run_engines_first_and_before_hooks_adapters_first() -> None:
    order: list[str] = []
    saved = list(_fork._hooks)
    # Registered in the "wrong" order, as an import order could do.
    _fork.register(_fork.ADAPTERS, before=lambda: order.append("before adapter"),
                   after_in_child=lambda: order.append("child adapter"),
                   after_in_parent=lambda: order.append("parent adapter"))
    _fork.register(_fork.ENGINES, before=lambda: order.append("before engine"),
                   after_in_child=lambda: order.append("child engine"),
                   after_in_parent=lambda: order.append("parent engine"))
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.write(w, ",".join(order).encode())
            os._exit(0)
        os.close(w)
        child = os.read(r, 4096).decode().split(",")
        os.close(r)
        os.waitpid(pid, 0)
    finally:
        _fork._hooks[:] = saved
    # Only the test's own hooks append; the library's run around them.
    assert child == ["before adapter", "before engine", "child engine", "child adapter"]
    assert order == ["before adapter", "before engine", "parent engine", "parent adapter"]


def test_a_failing_child_hook_does_not_stop_the_others() -> None:
    ran: list[str] = []
    saved = list(_fork._hooks)

    def boom() -> None:
        raise RuntimeError("hook failed")

    _fork.register(_fork.ENGINES, after_in_child=boom)
    _fork.register(_fork.ADAPTERS, after_in_child=lambda: ran.append("adapter"))
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(2)  # the traceback of boom() is expected; keep the test output clean
            os.write(w, ",".join(ran).encode())
            os._exit(0)
        os.close(w)
        got = os.read(r, 4096).decode()
        os.close(r)
        os.waitpid(pid, 0)
    finally:
        _fork._hooks[:] = saved
    assert got == "adapter"
