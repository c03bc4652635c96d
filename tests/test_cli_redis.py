"""The command line on a Redis sequence (--url / SHMNONCE_URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Iterator[RedisServer]:
    with RedisServer(str(tmp_path_factory.mktemp("redis-cli")), password="s3cret-pw") as srv:
        yield srv


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **(env or {}))
    full.pop("SHMNONCE_URL", None) if env is None or "SHMNONCE_URL" not in env else None
    return subprocess.run([sys.executable, "-m", "shmnonce", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=full)


def test_next_jump_status_unlink_on_redis(server: RedisServer) -> None:
    url = server.url
    assert "s3cret-pw" in url  # the fixture's URL carries the password
    a = cli("--url", url, "next", "cli-seq")
    assert a.returncode == 0, a.stderr
    b = cli("next", "cli-seq", "--url", url, "--json")
    assert b.returncode == 0, b.stderr
    assert json.loads(b.stdout)["nonce"] > int(a.stdout)
    j = cli("--url", url, "jump", "cli-seq", "1h")
    assert j.returncode == 0, j.stderr
    assert int(j.stdout) >= json.loads(b.stdout)["nonce"] + 3600 * 10**9
    st = cli("--json", "status", "cli-seq", env={"SHMNONCE_URL": url})  # the variable works too
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["last_nonce"] == int(j.stdout)
    for res in (a, b, j, st):
        assert "s3cret-pw" not in res.stdout + res.stderr
    u = cli("--url", url, "unlink", "cli-seq")
    assert u.returncode == 0, u.stderr
    again = cli("--url", url, "next", "cli-seq")  # a new sequence: from the server clock
    assert again.returncode == 0 and int(again.stdout) < int(j.stdout)
    cli("--url", url, "unlink", "cli-seq")


def test_doctor_reports_the_servers_persistence(server: RedisServer) -> None:
    res = cli("--url", server.url, "doctor", "--json")
    assert res.returncode in (0, 2), res.stderr
    checks = {f["check"] for f in json.loads(res.stdout)["checks"]}
    assert any("persist" in c or "aof" in c or "append" in c for c in checks), checks
    assert "s3cret-pw" not in res.stdout + res.stderr


def test_shared_memory_only_commands_and_bad_urls_are_one_line_errors(
        server: RedisServer, tmp_path: object) -> None:
    res = cli("--url", server.url, "drop-segment", "x")
    assert res.returncode == 1 and "shared-memory sequences only" in res.stderr
    assert res.stderr.count("\n") == 1
    res = cli("--url", "ftp://user:pw-in-url@host/", "next", "x")
    assert res.returncode == 1 and "ftp" in res.stderr and "pw-in-url" not in res.stderr
    res = cli("--url", server.url, "--state-dir", str(tmp_path), "next", "x")
    assert res.returncode == 1 and "--state-dir" in res.stderr
