"""asyncio and synchronous Kraken clients on one key across processes, end to end.

SpotAsyncClient tasks (shmnonce.kraken_sdk) in one process and synchronous krakenex
clients (shmnonce.kraken) in others share one API key at the local test server: the
server must see 0 invalid nonces and never two requests of the key in flight, and the
async process's event loop must keep running while the sync processes hold the key's
section (each request holds it for the server's latency). The baseline without
shmnonce's section for the async client shows that the same workload does produce
invalid nonces. examples/async_bot.py runs as documented.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmnonce import ShmNonce
from tests.kraken_server import ServerProcess, Workers

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


def _spec(srv: ServerProcess, creds: list[tuple[str, str]], state_dir: str, **kw: Any) -> dict[str, Any]:
    return {"url": srv.url, "creds": creds, "state_dir": state_dir,
            "options": {"rate_limit": None}, "start_at": time.time() + 2.0, **kw}


def test_async_tasks_and_sync_processes_share_a_key(server: ServerProcess, state_dir: str) -> None:
    """An async process (10 tasks) and 2 sync krakenex processes on one key.

    Latency 30 ms per request: every request holds the key's section for 30 ms, so
    the async tasks wait behind the sync processes' calls most of the time; the loop
    stays free (lag far below one hold).
    """
    server.configure(latency_s=0.03)
    creds = [server.register("A")]
    async_spec = _spec(server, creds, state_dir, task="async_calls", tasks=10, calls=4)
    sync_spec = _spec(server, creds, state_dir, client="shmnonce", calls=20)
    with ShmNonce.for_api_key(creds[0][0], state_dir):  # the sequence exists before the start
        pass
    with Workers() as w:
        w.unrelated(async_spec)
        w.spawn({**sync_spec, "start_at": async_spec["start_at"]})
        w.unrelated({**sync_spec, "start_at": async_spec["start_at"]})
        results = w.results(timeout=100)
    by_kind = {("async" if "max_lag_s" in r else "sync") + str(i): r for i, r in enumerate(results)}
    for r in results:
        assert r["exceptions"] == {} and r["errors"] == {}, r
    assert sum(r["ok"] for r in results) == 40 + 2 * 20
    ks = server.stats()["keys"]["A"]
    assert ks["invalid_nonce"] == 0 and ks["bad_signature"] == 0
    assert ks["accepted"] == 80 and ks["max_inflight"] == 1
    (async_result,) = [r for k, r in by_kind.items() if k.startswith("async")]
    # the processes overlapped (otherwise nothing was tested)
    sync_results = [r for k, r in by_kind.items() if k.startswith("sync")]
    assert any(r["t0"] < async_result["t1"] and async_result["t0"] < r["t1"] for r in sync_results)
    assert async_result["max_lag_s"] < 0.05, async_result


def test_baseline_async_client_without_shmnonce_gets_invalid_nonces(server: ServerProcess,
                                                                    state_dir: str) -> None:
    """The same mix where the sync processes use shmnonce and the async tasks the SDK's own
    nonces: nothing orders them, and the server rejects many (the test above can fail)."""
    server.configure(latency_s=0.01)
    creds = [server.register("A")]
    async_spec = _spec(server, creds, state_dir, task="async_calls", tasks=10, calls=4,
                       install=False)
    sync_spec = _spec(server, creds, state_dir, client="shmnonce", calls=20)
    with Workers() as w:
        w.unrelated(async_spec)
        w.spawn({**sync_spec, "start_at": async_spec["start_at"]})
        results = w.results(timeout=100)
    ks = server.stats()["keys"]["A"]
    errors = sum(sum(r["errors"].values()) + sum(r["exceptions"].values()) for r in results)
    assert ks["invalid_nonce"] > 0 and errors > 0


def test_async_bot_example(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=0.01)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_API_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "async_bot.py"), "--url", server.url,
         "--test-server", "--processes", "3", "--tasks", "5", "--calls", "2",
         "--rate-limit", "none", "--state-dir", state_dir],
        capture_output=True, text=True, env=env, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "total: 30 ok, 0 errors" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("process")]
    assert len({line.split()[3] for line in lines}) == 3  # three distinct processes
    ks = server.stats()["keys"]["bot"]
    assert ks["accepted"] == 30 and ks["invalid_nonce"] == 0 and ks["max_inflight"] == 1
