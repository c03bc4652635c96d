"""Mutual-exclusion observer shared by the examples; independent of shmnonce.

The examples record with it whether two holders of ``serialized()`` ever overlap,
so that their tests check exclusion with something shmnonce does not control.
"""

from __future__ import annotations

import os
import threading


class Observer:
    """Independent check of mutual exclusion, kept outside shmnonce.

    On entry a holder creates ``held`` exclusively (``link(2)`` of a file that
    already contains ``"pid nonce tag"``: it fails with EEXIST like ``O_EXCL``,
    and the content is complete the moment the name exists); on exit it removes
    it. Finding ``held`` present on entry means either two holders overlap or
    the previous holder died inside the section; the finder records
    ``collision-<pid>-<nonce>`` naming that holder's pid, takes the marker over
    and reports the pid, so whoever killed a process can tell the two apart.
    A holder that finds someone else's marker on exit writes ``overlap-...``.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.marker = os.path.join(directory, "held")

    def enter(self, nonce: int, tag: str = "") -> int | None:
        """Take the marker; return the pid named by a marker that was already there."""
        me = _label(nonce, tag)
        tmp = os.path.join(self.dir, f"tmp-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "w") as f:
            f.write(me)
        try:
            os.link(tmp, self.marker)
            return None
        except FileExistsError:
            holder = self._read()
            os.replace(tmp, self.marker)
            with open(os.path.join(self.dir, f"collision-{os.getpid()}-{nonce}"), "w") as f:
                f.write(holder)
            return int(holder.split()[0]) if holder else -1
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exit(self, nonce: int, tag: str = "") -> None:
        """Remove the marker; record an overlap if it is not ours any more."""
        current = self._read()
        if current != _label(nonce, tag):
            with open(os.path.join(self.dir, f"overlap-{os.getpid()}-{nonce}"), "w") as f:
                f.write(current)
            return
        os.unlink(self.marker)

    def _read(self) -> str:
        try:
            with open(self.marker) as f:
                return f.read()
        except FileNotFoundError:
            return ""


def _label(nonce: int, tag: str) -> str:
    """What a holder writes into the marker: ``"pid nonce"`` plus the tag, if any."""
    return f"{os.getpid()} {nonce} {tag}" if tag else f"{os.getpid()} {nonce}"
