"""examples/kraken_pool.py runs against the local test server and behaves as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.kraken_server import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "kraken_pool.py")

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
                          env=env, timeout=90, check=False)


def test_example_with_keys_from_environment(server: ServerProcess, state_dir: str) -> None:
    (k1, s1), (k2, s2) = server.register("key1"), server.register("key2")
    env = {"KRAKEN_API_KEY_1": k1, "KRAKEN_API_SECRET_1": s1,
           "KRAKEN_API_KEY_2": k2, "KRAKEN_API_SECRET_2": s2}
    proc = run_example(["--url", server.url, "--workers", "4", "--calls", "5",
                        "--state-dir", state_dir], env)
    assert proc.returncode == 0, proc.stderr
    assert "total: 20 ok, 0 errors" in proc.stdout
    assert len({line.split()[3] for line in proc.stdout.splitlines()
                if line.startswith("worker")}) == 4  # four distinct worker processes
    for secret in (k1, s1, k2, s2):
        assert secret not in proc.stdout and secret not in proc.stderr
    st = server.stats()
    for label in ("key1", "key2"):
        ks = st["keys"][label]
        assert ks["accepted"] == 10 and ks["invalid_nonce"] == 0 and ks["max_inflight"] == 1


def test_example_test_server_mode(server: ServerProcess, state_dir: str) -> None:
    proc = run_example(["--url", server.url, "--test-server", "--workers", "3", "--calls", "4",
                        "--state-dir", state_dir, "--rate-limit", "pro"], {})
    assert proc.returncode == 0, proc.stderr
    assert "total: 12 ok, 0 errors" in proc.stdout
    st = server.stats()
    assert st["keys"]["key1"]["accepted"] == 8 and st["keys"]["key2"]["accepted"] == 4


def test_example_refuses_missing_keys() -> None:
    proc = run_example(["--url", "http://127.0.0.1:9"], {})
    assert proc.returncode != 0 and "KRAKEN_API_KEY_1" in proc.stderr
