"""docs/pools.md: the multiprocessing example runs as a script, as written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multiprocessing_example_runs(tmp_path: object) -> None:
    with open(os.path.join(ROOT, "docs", "pools.md")) as fh:
        doc = fh.read()
    section = doc[doc.index("## multiprocessing"):doc.index("## What happens across fork")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    script = os.path.join(str(tmp_path), "pool_example.py")  # spawn re-imports __main__
    with open(script, "w") as fh:
        fh.write(code)
    env = dict(os.environ, SHMNONCE_STATE_DIR=os.path.join(str(tmp_path), "state"))
    try:
        res = subprocess.run([sys.executable, "-W", "error", script], capture_output=True,
                             text=True, timeout=100, cwd=str(tmp_path), env=env)
        assert res.returncode == 0, res.stderr
        nonces = ast.literal_eval(res.stdout)  # the example prints a list of ints
        assert len(nonces) == 8 and len(set(nonces)) == 8
    finally:
        subprocess.run([sys.executable, "-m", "shmnonce", "unlink", "orders"], env=env,
                       capture_output=True, timeout=60)


def test_docs_build_strict() -> None:
    """The docs site builds with warnings as errors (broken links, missing pages)."""
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "--site-dir", os.path.join(ROOT, "build", "site")],
                         capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert res.returncode == 0, res.stderr
