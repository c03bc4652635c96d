"""One at-fork registry for every module that keeps per-process state.

``os.register_at_fork`` runs hooks in registration order, which is import order:
with several modules each registering their own, whether a Kraken guard's lock is
reset before or after the engine below it reopened its descriptors would depend
on which module a program happened to import first. Here each hook has a layer:
``before`` hooks run from the top layer down (callers' locks first, then the
engines'), ``after`` hooks from the bottom up (engines first, then what uses
them), so a layer always finds the layers below it ready.

A failing child hook does not stop the others: its traceback is printed, as
CPython does for its own at-fork hooks.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

__all__ = ["ADAPTERS", "ENGINES", "register"]

ENGINES = 0
"""Layer of the engines (shared memory, Redis): descriptors, mappings, connections."""
ADAPTERS = 10
"""Layer of what uses an engine: Kraken guards and clients, compat managers."""

Hook = Callable[[], None]
_hooks: list[tuple[int, int, Hook | None, Hook | None, Hook | None]] = []


def register(
    layer: int,
    *,
    before: Hook | None = None,
    after_in_parent: Hook | None = None,
    after_in_child: Hook | None = None,
) -> None:
    """Register hooks of ``layer`` (``ENGINES`` or ``ADAPTERS``)."""
    _hooks.append((layer, len(_hooks), before, after_in_parent, after_in_child))
    _hooks.sort(key=lambda h: (h[0], h[1]))


def _run(hook: Hook) -> None:
    try:
        hook()
    except Exception:  # reported; the other hooks still run
        traceback.print_exc(file=sys.stderr)


def _before() -> None:
    for _layer, _i, before, _parent, _child in reversed(_hooks):
        if before is not None:
            before()  # may take locks: an error here must reach fork()'s caller


def _after_in_parent() -> None:
    for _layer, _i, _before_hook, parent, _child in _hooks:
        if parent is not None:
            _run(parent)


def _after_in_child() -> None:
    for _layer, _i, _before_hook, _parent, child in _hooks:
        if child is not None:
            _run(child)


os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
