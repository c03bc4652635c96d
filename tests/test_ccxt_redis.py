"""shmnonce.ccxt on the Redis engine (``url=`` / ``SHMNONCE_URL``), with a real redis-server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async
import pytest

redis_engine = pytest.importorskip("shmnonce.redis", reason="the Redis engine is not installed")
redis_server = pytest.importorskip("tests.redis_server", reason="no Redis test server helper")

from shmnonce.ccxt import install  # noqa: E402
from tests._ccxt_workers import kraken_spec, run_pool  # noqa: E402
from tests.kraken_server import ServerProcess  # noqa: E402

pytestmark = pytest.mark.timeout(120)
PASSWORD = "ccxt-redis-test-password"

if not os.path.exists(redis_server.REDIS_SERVER):
    pytest.skip("redis-server is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: Any) -> Iterator[str]:
    with redis_server.RedisServer(str(tmp_path_factory.mktemp("redis")), password=PASSWORD) as srv:
        yield srv.url


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess(latency_s=0.01) as srv:
        yield srv


def test_url_and_env_select_redis(redis_url: str, server: ServerProcess,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    key, secret = server.register("A")
    ex = install(ccxt.kraken({"apiKey": key, "secret": secret, "enableRateLimit": False}),
                 url=redis_url, rate_limit=None)
    ex.urls["api"] = {"public": server.url, "private": server.url}
    assert isinstance(ex.shmnonce.engine, redis_engine.RedisNonce)
    assert ex.private_post_balance()["error"] == []
    assert server.stats()["keys"]["A"]["last_nonce"] == ex.shmnonce.engine.peek()
    assert PASSWORD not in repr(ex.shmnonce) + str(ex.shmnonce.stats())
    ex.shmnonce.close()
    monkeypatch.setenv("SHMNONCE_URL", redis_url)
    ax = install(ccxt_async.kraken({"apiKey": key, "secret": secret}), rate_limit=None)
    assert isinstance(ax.shmnonce.engine, redis_engine.RedisNonce)
    asyncio.run(ax.close())
    ax.shmnonce.close()
    with pytest.raises(ValueError, match="state_dir"):
        install(ccxt.kraken({"apiKey": key, "secret": secret}), state_dir="/tmp", url=redis_url)


def test_sync_and_async_processes_on_redis(redis_url: str, server: ServerProcess,
                                           state_dir: str) -> None:
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir, calls=10,
                       options={"rate_limit": None, "url": redis_url})
    out, _ = run_pool(spec, ("fork", "unrelated"), async_spec={"tasks": 10, "calls": 2})
    ks = server.stats()["keys"]["A"]
    assert out["ok"] == 40 and out["exceptions"] == {}
    assert (ks["accepted"], ks["invalid_nonce"], ks["max_inflight"]) == (40, 0, 1)
