"""System calls on the hot paths, counted with strace (not timed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import sys
from shmnonce import ShmNonce
e = ShmNonce.attach("sc", sys.argv[1])
e.next()
with e.serialized():
    pass
n, mode = int(sys.argv[2]), sys.argv[3]
if mode == "next":
    for _ in range(n):
        e.next()
else:
    for _ in range(n):
        with e.serialized():
            pass
"""


def _count(state_dir: str, n: int, mode: str, tmp: str) -> dict[str, int]:
    out = os.path.join(tmp, f"strace-{mode}-{n}")
    subprocess.run(["strace", "-f", "-qq", "-c", "-o", out, sys.executable, "-c", SCRIPT,
                    state_dir, str(n), mode], check=True, cwd=ROOT, timeout=100)
    counts: dict[str, int] = {}
    with open(out) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 5 and parts[3].isdigit():
                counts[parts[-1]] = int(parts[3])
    return counts


@pytest.mark.parametrize(("mode", "budget"), [("next", {"flock": 2}),
                                               ("serialized", {"flock": 2, "fcntl": 2})])
def test_syscalls_per_call(state_dir: str, tmp_path: object, mode: str, budget: dict[str, int]) -> None:
    assert shutil.which("strace"), ".ci/run installs strace"
    n = 2000
    base = _count(state_dir, 0, mode, str(tmp_path))
    loaded = _count(state_dir, n, mode, str(tmp_path))
    per_call = {k: (loaded.get(k, 0) - base.get(k, 0)) / n for k in loaded.keys() | base.keys()}
    extra = {k: v for k, v in per_call.items() if k != "total" and v > 0.01 and k not in budget}
    assert not extra, f"unexpected system calls per {mode}(): {extra}"
    for name, allowed in budget.items():
        assert per_call.get(name, 0) <= allowed + 0.01, (name, per_call)
