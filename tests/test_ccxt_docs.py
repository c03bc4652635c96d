"""The Python examples of docs/ccxt.md run as written, against the local test server.

Each block runs in a fresh interpreter with a prelude that defines ``key`` and
``secret`` (registered with the test server) and points ccxt's Kraken classes (sync
and async) at the server; the block itself is unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.kraken_server import ServerProcess

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "docs", "ccxt.md")) as _fh:
    BLOCKS = re.findall(r"```python\n(.*?)```", _fh.read(), flags=re.S)

PRELUDE = textwrap.dedent("""
    import os, ccxt, ccxt.async_support
    URL = os.environ["TEST_KRAKEN_URL"]
    key, secret = os.environ["TEST_KRAKEN_KEY"], os.environ["TEST_KRAKEN_SECRET"]
    for _cls in (ccxt.kraken, ccxt.async_support.kraken):
        def _at_test_server(self, *a, _init=_cls.__init__, **k):
            _init(self, *a, **k)
            self.urls["api"] = {"public": URL, "private": URL}
        _cls.__init__ = _at_test_server
    del os.environ["TEST_KRAKEN_KEY"], os.environ["TEST_KRAKEN_SECRET"]
""")


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess(latency_s=0.005) as srv:
        yield srv


def test_the_page_has_the_examples() -> None:
    assert len(BLOCKS) == 2
    assert sum("ccxt.async_support" in b for b in BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int, server: ServerProcess, state_dir: str) -> None:
    block = BLOCKS[index]
    key, secret = server.register("docs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMNONCE_")}
    env.update(TEST_KRAKEN_URL=server.url, TEST_KRAKEN_KEY=key, TEST_KRAKEN_SECRET=secret,
               SHMNONCE_STATE_DIR=state_dir, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-W", "error", "-c", PRELUDE + block],
                         capture_output=True, text=True, env=env, timeout=100, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    ks = server.stats()["keys"]["docs"]
    assert ks["accepted"] == (10 if "async_support" in block else 1)
    assert ks["invalid_nonce"] == 0 and ks["bad_signature"] == 0 and ks["max_inflight"] == 1
    assert len(str(ks["last_nonce"])) == 19
    assert key not in res.stdout + res.stderr and secret not in res.stdout + res.stderr
