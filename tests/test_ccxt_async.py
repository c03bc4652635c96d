"""shmnonce.ccxt with ccxt.async_support against the local Kraken test server.

The pool tests run 3 sync processes and 1 async process with 20 tasks on one key.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async
import pytest

from shmnonce import ShmNonce
from shmnonce.ccxt import install
from shmnonce.kraken import KrakenInvalidNonceError, RateLimit
from tests._ccxt_workers import RATE, kraken_spec, rate_pool, run_pool
from tests.kraken_server import ServerProcess

pytestmark = pytest.mark.timeout(120)

LOOP_LAG_LIMIT = 0.05
"""Worst heartbeat lag allowed in the async process while others hold the key for L = 0.1 s."""


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


def akraken(srv: ServerProcess, key: str, secret: str, state_dir: str, **options: Any) -> Any:
    ex = ccxt_async.kraken({"apiKey": key, "secret": secret, "enableRateLimit": False})
    ex.urls["api"] = {"public": srv.url, "private": srv.url}
    return install(ex, state_dir=state_dir, **options)


async def _closing(ex: Any, coro: Any) -> Any:
    try:
        return await coro
    finally:
        await ex.close()
        ex.shmnonce.close()


# --------------------------------------------------------------------------- one process


def test_tasks_one_in_flight_nonces_in_order(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=0.01)
    key, secret = server.register("A")
    ex = akraken(server, key, secret, state_dir, rate_limit=None)
    assert ex.shmnonce is not None and install(ex, state_dir=state_dir) is ex

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(ex.private_post_balance() for _ in range(40))))

    results = asyncio.run(_closing(ex, main()))
    assert all(r["error"] == [] for r in results)
    ks = server.stats()["keys"]["A"]
    assert (ks["accepted"], ks["invalid_nonce"], ks["max_inflight"]) == (40, 0, 1)
    assert len(str(ks["last_nonce"])) == 19


def test_public_calls_not_serialized(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    ex = akraken(server, key, secret, state_dir, rate_limit=None)
    eng = ShmNonce.for_api_key(key, state_dir=state_dir)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with eng.serialized():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()

    async def main() -> float:
        assert entered.wait(10)
        t0 = time.monotonic()
        assert await ex.fetch_time() > 0
        return time.monotonic() - t0

    try:
        assert asyncio.run(_closing(ex, main())) < 1.0
    finally:
        release.set()
        t.join()
        eng.close()


def test_waiting_task_does_not_block_the_loop_and_cancellation(server: ServerProcess,
                                                               state_dir: str) -> None:
    """Another thread holds the key for 1 s: a private call waits, the loop keeps running;
    a cancelled waiter gives its place up; a cancelled holder leaves the section."""
    server.configure(latency_s=0.5)
    key, secret = server.register("A")
    ex = akraken(server, key, secret, state_dir, rate_limit=None)
    eng = ShmNonce.for_api_key(key, state_dir=state_dir)
    entered = threading.Event()

    def hold() -> None:
        with eng.serialized():
            entered.set()
            time.sleep(1.0)

    t = threading.Thread(target=hold)
    t.start()

    async def main() -> None:
        assert entered.wait(10)
        ticks = 0

        async def beat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        b = asyncio.ensure_future(beat())
        waiter = asyncio.ensure_future(ex.private_post_balance())
        await asyncio.sleep(0.3)
        assert not waiter.done() and ticks >= 10  # waiting, and the loop ran meanwhile
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        t0 = time.monotonic()
        holder = asyncio.ensure_future(ex.private_post_balance())  # waits for the thread
        await asyncio.sleep(0.9)  # the thread leaves at ~1.0 s; holder in flight by ~1.2 s
        holder.cancel()  # cancelled while its request is in flight (server latency 0.5 s)
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert (await ex.private_post_balance())["error"] == []  # the section was left
        assert time.monotonic() - t0 < 5
        b.cancel()

    try:
        asyncio.run(_closing(ex, main()))
    finally:
        t.join()
        eng.close()
    assert server.stats()["keys"]["A"]["invalid_nonce"] == 0


def test_invalid_nonce_retry_and_errors(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=0.6)
    key, secret = server.register("A")
    ex = akraken(server, key, secret, state_dir, rate_limit=None)

    async def main() -> None:
        server.prime("A", time.time_ns() + 300_000_000)
        assert (await ex.private_post_balance())["error"] == []  # retried once, passed
        server.configure(latency_s=0.0)
        server.prime("A", 2**64 - 10)
        with pytest.raises(ccxt.InvalidNonce) as info:
            await ex.private_post_balance()
        assert isinstance(info.value, KrakenInvalidNonceError)
        assert "one-way" in str(info.value)
        server.prime("A", 0)
        server.configure(fail_methods={"AddOrder": "EOrder:Insufficient funds"})
        with pytest.raises(ccxt.InsufficientFunds):
            await ex.private_post_addorder({"pair": "XBTUSD"})

    asyncio.run(_closing(ex, main()))
    ks = server.stats()["keys"]["A"]
    assert (ks["invalid_nonce"], ks["accepted"]) == (3, 1)


def test_throttle_replaced_or_run_before_entering(server: ServerProcess, state_dir: str) -> None:
    """ccxt's async throttler (default on): skipped for private calls under the model; run
    before the section (which stays free meanwhile) without it."""
    key, secret = server.register("A")

    async def with_model() -> float:
        ex = ccxt_async.kraken({"apiKey": key, "secret": secret})
        ex.urls["api"] = {"public": server.url, "private": server.url}
        install(ex, state_dir=state_dir, rate_limit=RateLimit(20, 10.0))

        async def calls() -> float:
            t0 = time.monotonic()
            await asyncio.gather(*(ex.private_post_balance() for _ in range(5)))
            return time.monotonic() - t0

        return float(await _closing(ex, calls()))

    assert asyncio.run(with_model()) < 1.5  # ccxt's throttle: >= 12 s

    eng = ShmNonce.for_api_key(key, state_dir=state_dir)

    async def without_model() -> None:
        ex = ccxt_async.kraken({"apiKey": key, "secret": secret, "rateLimit": 500})
        ex.urls["api"] = {"public": server.url, "private": server.url}
        install(ex, state_dir=state_dir, rate_limit=None)

        async def calls() -> None:
            await ex.private_post_balance()
            second = asyncio.ensure_future(ex.private_post_balance())  # 1.5 s in the throttler
            await asyncio.sleep(0.3)
            assert not second.done()
            free = await asyncio.to_thread(lambda: _enter_and_leave(eng, 0.5))
            assert free  # LockTimeout if the throttler held the section
            await second

        await _closing(ex, calls())

    try:
        asyncio.run(without_model())
    finally:
        eng.close()


def _enter_and_leave(eng: ShmNonce, timeout: float) -> bool:
    with eng.serialized(timeout=timeout):
        return True


# --------------------------------------------------------------------------- pools


ASYNC_TASKS = {"tasks": 20, "calls": 2}


def test_sync_and_async_processes_one_key(server: ServerProcess, state_dir: str) -> None:
    """3 sync processes + 1 async process with 20 tasks: 0 invalid nonces, one request in
    flight, and the async loop is never stalled while others hold the key (L = 0.1 s)."""
    server.configure(latency_s=0.1)
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir, calls=8)
    out, results = run_pool(spec, ("fork", "spawn", "unrelated"), async_spec=ASYNC_TASKS)
    ks = server.stats()["keys"]["A"]
    assert out["ok"] == 64 and out["exceptions"] == {}
    assert (ks["accepted"], ks["invalid_nonce"], ks["bad_signature"], ks["max_inflight"]) == (
        64, 0, 0, 1)
    (lagged,) = [r for r in results if r["mode"] == "async"]
    assert lagged["beats"] > 100
    assert lagged["max_lag_s"] < LOOP_LAG_LIMIT, lagged


def test_blocking_glue_stalls_the_loop(server: ServerProcess, state_dir: str) -> None:
    """The lag check above can fail: the async process waiting for the key with the sync
    section (what glue code does today) freezes its loop while others hold the key."""
    server.configure(latency_s=0.1)
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir, calls=8)
    _out, results = run_pool(spec, ("fork", "spawn", "unrelated"),
                          async_spec={"tasks": 1, "calls": 8, "blocking_glue": True})
    (lagged,) = [r for r in results if r["mode"] == "async"]
    assert lagged["max_lag_s"] > LOOP_LAG_LIMIT, lagged
    assert server.stats()["keys"]["A"]["invalid_nonce"] == 0


def test_same_pool_without_shmnonce_gets_invalid_nonces(server: ServerProcess,
                                                        state_dir: str) -> None:
    server.configure(latency_s=0.01)
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir, calls=8, install=False)
    out, _ = run_pool(spec, ("fork", "spawn", "unrelated"), async_spec=ASYNC_TASKS)
    ks = server.stats()["keys"]["A"]
    assert ks["invalid_nonce"] > 0
    assert out["exceptions"].get("InvalidNonce", 0) == ks["invalid_nonce"]


def test_rate_model_bounds_the_mixed_pool(server: ServerProcess, state_dir: str) -> None:
    """ccxt's throttle on (default) in all four processes; shmnonce's model on."""
    wall, bound, ks = rate_pool(server, state_dir, calls=4,
                                async_spec={"tasks": 20, "calls": 1,
                                            "enable_rate_limit": True})
    n = 3 * 4 + 20
    assert ks["accepted"] == n and ks["rate_limited"] == 0 and ks["invalid_nonce"] == 0
    assert ks["max_level"] <= RATE[0]
    assert (n - (RATE[0] - RATE[2])) / RATE[1] * 0.9 <= wall <= bound, (wall, bound)


def test_ccxt_pro_token_request_goes_through_the_section(server: ServerProcess,
                                                         state_dir: str) -> None:
    """ccxt.pro's Kraken authenticate() asks GetWebSocketsToken over REST (fetch2): serialized
    with the key's other private calls. (The test server sends no token.)"""
    import ccxt.pro

    key, secret = server.register("A")
    ex = ccxt.pro.kraken({"apiKey": key, "secret": secret, "enableRateLimit": False})
    ex.urls["api"]["public"] = ex.urls["api"]["private"] = server.url
    install(ex, state_dir=state_dir, rate_limit=None)

    async def main() -> None:
        try:
            # ccxt 4.5 raises AuthenticationError on the missing token, older ones return
            with contextlib.suppress(ccxt.AuthenticationError):
                await asyncio.wait_for(ex.authenticate(), 30)
        finally:
            await ex.close()

    asyncio.run(main())
    ks = server.stats()["keys"]["A"]
    assert ks["accepted"] == 1 and ks["last_nonce"] == ex.shmnonce.engine.peek()
    ex.shmnonce.close()
