"""examples/ccxt_pool.py (sync processes + an async process) against the local test server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.kraken_server import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "ccxt_pool.py")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess(latency_s=0.01) as srv:
        yield srv


def run_example(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_API_")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          env=env, timeout=100, check=False)


def test_example_sync_and_async_processes_one_key(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("key")
    proc = run_example(["--url", server.url, "--sync-workers", "3", "--tasks", "20",
                        "--calls", "2", "--rate-limit", "none", "--no-ccxt-throttle",
                        "--state-dir", state_dir],
                       {"KRAKEN_API_KEY": key, "KRAKEN_API_SECRET": secret})
    assert proc.returncode == 0, proc.stderr
    assert "total: 46 ok, 0 errors" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if " pid " in line]
    assert len(lines) == 4 and len({line.split(" pid ")[1].split()[0] for line in lines}) == 4
    assert any(line.startswith("async x20 tasks") for line in lines)
    assert key not in proc.stdout + proc.stderr and secret not in proc.stdout + proc.stderr
    ks = server.stats()["keys"]["key"]
    assert (ks["accepted"], ks["invalid_nonce"], ks["max_inflight"]) == (46, 0, 1)


def test_example_test_server_mode_with_rate_model(server: ServerProcess, state_dir: str) -> None:
    """Defaults (starter model): 3 x 2 + 5 tasks x 2 = 16 calls, 14 without waiting."""
    proc = run_example(["--url", server.url, "--test-server", "--state-dir", state_dir], {})
    assert proc.returncode == 0, proc.stderr
    assert "total: 16 ok, 0 errors" in proc.stdout
    assert server.stats()["keys"]["key"]["accepted"] == 16


def test_example_refuses_missing_key() -> None:
    proc = run_example(["--url", "http://127.0.0.1:9"], {})
    assert proc.returncode != 0 and "KRAKEN_API_KEY" in proc.stderr
