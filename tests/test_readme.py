"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from shmnonce._paths import api_key_name
from shmnonce.ops.repair import destroy

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs(tmp_path: object) -> None:
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    section = readme[readme.index("## Quickstart") : readme.index("## Guarantees")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    env = dict(os.environ, SHMNONCE_STATE_DIR=os.path.join(str(tmp_path), "state"))
    res = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                         text=True, timeout=50, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "True\n"
    assert res.stderr == ""
    for name in ("orders", api_key_name("my-api-key")):  # leave no segment behind
        assert destroy(name, env["SHMNONCE_STATE_DIR"])
