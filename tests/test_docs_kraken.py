"""The Python examples of docs/kraken.md run as written, against the local test server.

Each block runs in a fresh interpreter with a prelude that defines ``key`` and
``secret`` (registered with the test server) and points the clients' default URL
at the server (krakenex's ``uri``, python-kraken-sdk's ``SpotClient.URL``); the
block itself is unchanged.
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

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "docs", "kraken.md")) as _fh:
    BLOCKS = re.findall(r"```python\n(.*?)```", _fh.read(), flags=re.S)

PRELUDE = textwrap.dedent("""
    import os, krakenex, kraken.base_api
    URL = os.environ["TEST_KRAKEN_URL"]
    key, secret = os.environ["TEST_KRAKEN_KEY"], os.environ["TEST_KRAKEN_SECRET"]
    _init = krakenex.API.__init__
    def _at_test_server(self, *a, **k):
        _init(self, *a, **k)
        self.uri = URL
    krakenex.API.__init__ = _at_test_server
    kraken.base_api.SpotClient.URL = URL
    del os.environ["TEST_KRAKEN_KEY"], os.environ["TEST_KRAKEN_SECRET"]
""")


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess(latency_s=0.005) as srv:
        yield srv


def test_the_page_has_the_examples() -> None:
    assert len(BLOCKS) == 4
    assert sum("SpotAsyncClient" in b for b in BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int, server: ServerProcess, state_dir: str) -> None:
    block = BLOCKS[index]
    key, secret = server.register("docs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMNONCE_")}
    env.update(TEST_KRAKEN_URL=server.url, TEST_KRAKEN_KEY=key, TEST_KRAKEN_SECRET=secret,
               SHMNONCE_STATE_DIR=state_dir, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-W", "error", "-c", PRELUDE + block],
                         capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    ks = server.stats()["keys"]["docs"]
    private = any(call in block for call in ("query_private", "get_account_balance", "/0/private/"))
    assert (ks["accepted"] >= 1) == private  # the install-only block calls nothing
    assert ks["invalid_nonce"] == 0 and ks["bad_signature"] == 0 and ks["max_inflight"] <= 1
    if "SpotAsyncClient" in block:
        assert ks["accepted"] == 10
    assert key not in res.stdout + res.stderr and secret not in res.stdout + res.stderr
