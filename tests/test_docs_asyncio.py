"""docs/asyncio.md: its complete example runs as a script, as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_complete_example_runs(tmp_path: object) -> None:
    with open(os.path.join(ROOT, "docs", "asyncio.md")) as fh:
        doc = fh.read()
    section = doc[doc.index("## A complete example"):doc.index("## Tickets")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    script = os.path.join(str(tmp_path), "example.py")
    with open(script, "w") as fh:
        fh.write(code)
    env = dict(os.environ, SHMNONCE_STATE_DIR=os.path.join(str(tmp_path), "state"),
               PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-W", "error", script], capture_output=True,
                         text=True, timeout=100, cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "6 sections, nonces unique: True\n"
    assert res.stderr == ""
