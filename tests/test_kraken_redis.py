"""The Kraken integrations on the Redis engine (``url=`` / ``SHMNONCE_URL``), with a real server.

Runs when the Redis engine (``shmnonce.redis``, the ``redis`` extra) and its test server
helper are present: every integration selects ``RedisNonce`` for a ``redis://`` URL, the
calls go through it to the local Kraken test server, the shared call counter lives in the
sequence's record on Redis (a new record is an empty counter, as on shared memory), and
the URL's password appears in no repr, statistic or log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from typing import Any

import krakenex
import pytest

redis_engine = pytest.importorskip("shmnonce.redis", reason="the Redis engine is not installed")
redis_server = pytest.importorskip("tests.redis_server", reason="no Redis test server helper")

from kraken.spot import SpotAsyncClient, User  # noqa: E402

from shmnonce import compat  # noqa: E402
from shmnonce import kraken_sdk as sdk  # noqa: E402
from shmnonce._paths import api_key_name  # noqa: E402
from shmnonce.kraken import KrakenAPI, RateLimit, install  # noqa: E402
from tests.kraken_server import ServerProcess  # noqa: E402

pytestmark = pytest.mark.timeout(60)
PASSWORD = "kraken-redis-test-password"

if not os.path.exists(redis_server.REDIS_SERVER):
    pytest.skip("redis-server is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: Any) -> Iterator[str]:
    with redis_server.RedisServer(str(tmp_path_factory.mktemp("redis")), password=PASSWORD) as srv:
        yield srv.url


@pytest.fixture
def kraken() -> Iterator[ServerProcess]:
    with ServerProcess(latency_s=0.005) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("SHMNONCE_URL", "SHMNONCE_COMPAT_NAME", "SHMNONCE_COMPAT_STATE_DIR",
                "SHMNONCE_COMPAT_KEY_ENV"):
        monkeypatch.delenv(var, raising=False)
    yield
    compat.close_global_nonce_manager()
    compat.configure()


def test_every_integration_selects_redis(redis_url: str, kraken: ServerProcess) -> None:
    assert PASSWORD in redis_url
    key, secret = kraken.register("A")
    api = KrakenAPI(key, secret, url=redis_url)
    raw = install(krakenex.API(key, secret), url=redis_url)
    user = sdk.install(User(key=key, secret=secret), url=redis_url)
    compat.configure(api_key=key, url=redis_url)
    mgr = compat.get_global_nonce_manager()
    try:
        engines = [api.shmnonce.engine, raw.shmnonce.engine, user.shmnonce.engine, mgr.engine]
        assert all(isinstance(e, redis_engine.RedisNonce) for e in engines)
        assert {e.name for e in engines} == {api_key_name(key)}
        values = [e.next() for e in engines for _ in range(2)]
        assert values == sorted(values) and len(set(values)) == len(values)
        shown = repr(api.shmnonce) + repr(mgr) + str(api.stats()) + str(mgr.get_stats())
        assert PASSWORD not in shown and "redis://" not in shown
    finally:
        api.close()
        raw.shmnonce.close()
        user.shmnonce.close()


def test_environment_selects_redis(redis_url: str, kraken: ServerProcess,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMNONCE_URL", redis_url)
    key, secret = kraken.register("A")
    api = KrakenAPI(key, secret)
    try:
        assert isinstance(api.shmnonce.engine, redis_engine.RedisNonce)
    finally:
        api.close()


def test_sync_and_async_calls_through_redis(redis_url: str, kraken: ServerProcess,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shmnonce")
    key, secret = kraken.register("A")
    # A fresh sequence: its counter record was never written, so the first call does not
    # wait (a torn record would be taken as a full counter: (2 + 1 - 2) / 1 s of waiting).
    api = KrakenAPI(key, secret, url=redis_url, rate_limit=RateLimit(2, 1.0, headroom=0))
    api.uri = kraken.url
    api.session.trust_env = False

    async def async_calls() -> int:
        client = sdk.install(SpotAsyncClient(key=key, secret=secret, url=kraken.url),
                             url=redis_url, rate_limit=None)
        try:
            results = await asyncio.gather(
                *(client.request("POST", "/0/private/Balance") for _ in range(8)))
            return len(results)
        finally:
            await client.close()
            client.shmnonce.close()

    try:
        assert api.query_private("Balance")["error"] == []
        st = api.stats()
        assert (st["calls"], st["waits"], st["area_resets"]) == (1, 0, 0)
        assert asyncio.run(async_calls()) == 8
        ks = kraken.stats()["keys"]["A"]
        assert ks["accepted"] == 9 and ks["invalid_nonce"] == 0 and ks["max_inflight"] == 1
        with redis_engine.RedisNonce.for_api_key(key, url=redis_url) as eng:
            assert ks["last_nonce"] == eng.peek()
        assert api.stats()["calls"] == 9  # one counter for both clients of the key, in Redis
    finally:
        api.close()
    assert PASSWORD not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_call_counter_on_redis_uses_the_servers_clock(redis_url: str) -> None:
    """Counters of one key on two hosts compare times of one clock: the server's.

    Each host's monotonic clock counts from its own boot; the second counter below
    stands for another host by reading a monotonic clock 3 days ahead. Mixed with a
    counter on the server's clock, its times look implausible and the shared record is
    reset (to a full counter) again and again: the failure that the server clock avoids.
    """
    import time

    from shmnonce.kraken.ratelimit import CallCounter, record_clocks

    limit = RateLimit(3, 1.0, headroom=0)
    with redis_engine.RedisNonce.attach("clock-a", url=redis_url) as a, \
            redis_engine.RedisNonce.attach("clock-a", url=redis_url) as b:
        assert record_clocks(a) == (a.server_time_ns, a.server_time_ns)
        host1, host2 = CallCounter(a, limit), CallCounter(b, limit)
        waits = [c.reserve(1) for c in (host1, host2, host1, host2)]
        assert waits[:3] == [0, 0, 0] and 0.9e9 < waits[3] <= 1.0e9
        assert host1.stats()["area_resets"] == 0 and host1.stats()["calls"] == 4
    with redis_engine.RedisNonce.attach("clock-b", url=redis_url) as a, \
            redis_engine.RedisNonce.attach("clock-b", url=redis_url) as b:
        host1, other = CallCounter(a, limit), CallCounter(b, limit)
        other._clock = lambda: time.monotonic_ns() + 3 * 86_400 * 10**9
        for c in (host1, other, host1, other):
            c.reserve(1)
        assert host1.stats()["area_resets"] >= 3
