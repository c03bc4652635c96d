"""python-kraken-sdk's SpotAsyncClient and SpotWSClient under ``shmnonce.kraken_sdk.install``.

Against the local Kraken-compatible server (tests/kraken_server.py), in one process:
the nonce comes from the key's sequence, tasks of one key never have two requests
in flight, the invalid-nonce retry and the error mapping are those of the sync
adapter, raw (``use_custom_exceptions=False``) responses are inspected without
being consumed, and SpotWSClient's token request (``GetWebSocketsToken``) goes
through the key's section. Cross-process tests are in test_kraken_async_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kraken.spot import SpotAsyncClient, SpotWSClient

from shmnonce import ShmNonce
from shmnonce.kraken import (
    KrakenGuard,
    KrakenInvalidNonceError,
    KrakenLockoutError,
    KrakenRateLimitError,
)
from shmnonce.kraken_sdk import install
from tests.kraken_server import ServerProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


def make(srv: ServerProcess, label: str, state_dir: str, **kw: Any) -> SpotAsyncClient:
    key, secret = srv.register(label)
    options = {"rate_limit": None, **kw}
    custom = options.pop("use_custom_exceptions", True)
    return install(SpotAsyncClient(key=key, secret=secret, url=srv.url,
                                   use_custom_exceptions=custom), state_dir, **options)


def test_drop_in_nonce_from_the_keys_sequence(server: ServerProcess, state_dir: str) -> None:
    async def main() -> tuple[Any, Any, Any, int]:
        client = make(server, "A", state_dir)
        try:
            assert install(client, state_dir) is client and isinstance(client.shmnonce, KrakenGuard)
            res = await client.request("POST", "/0/private/Balance")
            res2 = await client.request("POST", "/0/private/Balance", params={"asset": "XBT"})
            public = await client.request("GET", "/0/public/Time", auth=False)
            with ShmNonce.for_api_key(client._key, state_dir) as eng:
                last = eng.peek()
            return res, res2, public, last
        finally:
            await client.close()

    res, res2, public, last = asyncio.run(main())
    assert res == res2 == {"ZUSD": "1000.0000", "XXBT": "0.5000000000"}
    assert "unixtime" in public
    ks = server.stats()["keys"]["A"]
    assert ks["accepted"] == 2 and ks["bad_signature"] == 0 and ks["invalid_nonce"] == 0
    assert ks["last_nonce"] == last  # the key's sequence, not the SDK's millisecond clock


def test_tasks_of_one_key_one_request_in_flight(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=0.01)

    async def main() -> tuple[int, dict[str, object]]:
        a = make(server, "A", state_dir)
        b = make(server, "B", state_dir)
        try:
            calls = [c.request("POST", "/0/private/Balance") for _ in range(15) for c in (a, b)]
            results = await asyncio.gather(*calls)
            with ShmNonce.for_api_key(a._key, state_dir) as eng:
                assert server.stats()["keys"]["A"]["last_nonce"] == eng.peek()
            return len(results), a.shmnonce.stats()
        finally:
            await a.close()
            await b.close()

    n, stats = asyncio.run(main())
    assert n == 30
    st = server.stats()
    for label in ("A", "B"):
        ks = st["keys"][label]
        assert ks["accepted"] == 15 and ks["invalid_nonce"] == 0 and ks["max_inflight"] == 1
    assert st["max_distinct_keys_inflight"] == 2  # different keys do not wait for each other
    assert stats["calls"] == 15


def test_invalid_nonce_retried_once_with_fresh_nonce(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=0.6)

    async def main() -> tuple[Any, dict[str, object]]:
        client = make(server, "A", state_dir)
        try:
            server.prime("A", time.time_ns() + 300_000_000)  # 0.3 s ahead of this host's clock
            res = await client.request("POST", "/0/private/Balance")
            return res, client.shmnonce.stats()
        finally:
            await client.close()

    res, st = asyncio.run(main())
    assert res["ZUSD"] == "1000.0000"
    assert (st["invalid_nonce"], st["retries"], st["invalid_nonce_raised"]) == (1, 1, 0)
    ks = server.stats()["keys"]["A"]
    assert (ks["invalid_nonce"], ks["accepted"]) == (1, 1)


@pytest.mark.parametrize("custom", [True, False])
def test_invalid_nonce_twice_raises(server: ServerProcess, state_dir: str, custom: bool) -> None:
    """Also with raw aiohttp responses: their error list is read, and stays readable."""

    async def main() -> tuple[KrakenInvalidNonceError, Any]:
        client = make(server, "A", state_dir, use_custom_exceptions=custom)
        try:
            server.prime("A", 2**64 - 10)
            with pytest.raises(KrakenInvalidNonceError) as info:
                await client.request("POST", "/0/private/Balance")
            resp = info.value.response
            body = await resp.json() if resp is not None else None
            return info.value, body
        finally:
            await client.close()

    err, body = asyncio.run(main())
    assert err.method == "Balance" and err.errors == ["EAPI:Invalid nonce"]
    if custom:
        assert err.response is None and err.__cause__ is not None
    else:
        assert body == {"error": ["EAPI:Invalid nonce"]}  # the caller can still read it
    assert server.stats()["keys"]["A"]["invalid_nonce"] == 2


def test_raw_response_success_is_returned_unread(server: ServerProcess, state_dir: str) -> None:
    async def main() -> Any:
        client = make(server, "A", state_dir, use_custom_exceptions=False)
        try:
            resp = await client.request("POST", "/0/private/Balance")
            return resp.status, await resp.json()
        finally:
            await client.close()

    assert asyncio.run(main()) == (200, {"error": [], "result": {"ZUSD": "1000.0000",
                                                                 "XXBT": "0.5000000000"}})


def test_rate_limit_and_lockout_errors_mapped(server: ServerProcess, state_dir: str) -> None:
    async def main() -> dict[str, object]:
        client = make(server, "A", state_dir)
        try:
            server.configure(rate_max=1, rate_decay=0.01)
            await client.request("POST", "/0/private/Balance")
            with pytest.raises(KrakenRateLimitError, match="call counter is full"):
                await client.request("POST", "/0/private/Balance")
            server.configure(rate_max=None, lockout_after=2, lockout_s=30)
            server.prime("A", 2**64 - 10)
            with pytest.raises(KrakenInvalidNonceError):
                await client.request("POST", "/0/private/Balance")
            with pytest.raises(KrakenLockoutError, match="locked out"):
                await client.request("POST", "/0/private/Balance")
            return client.shmnonce.stats()
        finally:
            await client.close()

    st = asyncio.run(main())
    assert (st["rate_limit_errors"], st["lockouts"], st["invalid_nonce"]) == (1, 1, 2)


def test_transport_error_not_retried(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=1.0)

    async def main() -> dict[str, object]:
        client = make(server, "A", state_dir)
        client.TIMEOUT = 0.2  # the SDK's own request timeout
        try:
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                await client.request("POST", "/0/private/AddOrder", params={"pair": "XBTUSD"})
            await asyncio.sleep(1.0)
            server.configure(latency_s=0.0)
            await client.request("POST", "/0/private/Balance")  # the section was left
            return client.shmnonce.stats()
        finally:
            await client.close()

    st = asyncio.run(main())
    assert st["transport_errors"] == 1
    assert server.stats()["requests"] == 2  # AddOrder once, never retried


def test_ws_client_token_request_goes_through_the_section(server: ServerProcess, state_dir: str) -> None:
    """SpotWSClient.start() asks GetWebSocketsToken through request(): that is the private call."""
    import websockets  # a dependency of python-kraken-sdk
    key, secret = server.register("A")

    async def main() -> tuple[dict[str, object], int, object]:
        connections = 0

        async def handler(ws: Any) -> None:
            nonlocal connections
            connections += 1
            while True:  # answer every frame, so the client's receive loop keeps turning
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.recv(), timeout=0.1)
                await ws.send('{"method": "pong"}')

        async def on_message(message: object) -> None:
            pass

        async with websockets.serve(handler, "127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            client = SpotWSClient(key=key, secret=secret, callback=on_message, no_public=True,
                                  rest_url=server.url, auth_ws_url=f"ws://127.0.0.1:{port}/")
            install(client, state_dir, rate_limit=None)
            try:
                await asyncio.wait_for(client.start(), 20)
                token = client._priv_conn.ws_conn_details  # what the SDK got from the request
                return client.shmnonce.stats(), connections, token
            finally:
                await asyncio.wait_for(client.close(), 20)

    st, connections, token = asyncio.run(main())
    assert connections == 1 and st["calls"] == 1
    assert token == {"method": "GetWebSocketsToken"}  # the test server echoes the method
    ks = server.stats()["keys"]["A"]
    assert ks["accepted"] == 1 and ks["bad_signature"] == 0
    with ShmNonce.for_api_key(key, state_dir) as eng:
        assert ks["last_nonce"] == eng.peek()  # signed with the key's sequence


def test_futures_and_other_objects_refused(state_dir: str) -> None:
    from kraken.futures import User as FuturesUser

    with pytest.raises(TypeError, match="SpotAsyncClient"):
        install(FuturesUser(key="k", secret="c2VjcmV0"), state_dir)
    with pytest.raises(TypeError, match="Spot client"):
        install(object(), state_dir)
