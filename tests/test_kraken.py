"""KrakenAPI and install() in one process, against the local Kraken-compatible server.

Covers drop-in behaviour, the nonce coming from the key's engine, the
invalid-nonce retry policy and its limits, surfacing and counting of Kraken's
rate-limit and lockout errors, the limiter and burst guard inside a call, and
that no key or secret appears in stats, reprs, names or state files.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import krakenex
import pytest
import requests

from shmnonce import LockTimeout, NonceError, ShmNonce
from shmnonce.kraken import (
    KrakenAPI,
    KrakenError,
    KrakenInvalidNonceError,
    KrakenLockoutError,
    KrakenRateLimitError,
    RateLimit,
    install,
)
from tests._fork_helpers import CHILD_HUNG, CHILD_OK, FORK_WARNING, fork_while_held
from tests.kraken_server import ServerProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


def client(srv: ServerProcess, key: str, secret: str, state_dir: str, **kw: Any) -> KrakenAPI:
    api = KrakenAPI(key, secret, state_dir, **kw)
    api.uri = srv.url
    api.session.trust_env = False
    return api


@pytest.fixture
def api_a(server: ServerProcess, state_dir: str) -> Iterator[KrakenAPI]:
    key, secret = server.register("A")
    api = client(server, key, secret, state_dir, rate_limit=None)
    yield api
    api.close()


# --------------------------------------------------------------------------- drop-in


def test_drop_in_same_results_as_krakenex(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    plain = krakenex.API(key, secret)
    plain.uri = server.url
    plain.session.trust_env = False
    api = client(server, key, secret, state_dir)
    try:
        assert isinstance(api, krakenex.API)
        expected = plain.query_private("Balance")
        assert expected["error"] == []
        assert api.query_private("Balance") == expected
        assert api.query_private("Balance", {"asset": "XBT"}) == expected
        assert api.query_public("Time")["error"] == []
        assert api.response is not None and api.response.status_code == 200
        st = server.stats()["keys"]["A"]
        assert st["accepted"] == 3 and st["bad_signature"] == 0 and st["invalid_nonce"] == 0
    finally:
        plain.close()
        api.close()


def test_nonce_comes_from_the_keys_engine(api_a: KrakenAPI, server: ServerProcess,
                                          state_dir: str) -> None:
    for _ in range(3):
        api_a.query_private("Balance")
    with ShmNonce.for_api_key(api_a.key, state_dir) as eng:
        last = eng.peek()
        assert server.stats()["keys"]["A"]["last_nonce"] == last
        # values of the sequence are nanosecond time: far above krakenex's milliseconds
        assert last > time.time_ns() - 60 * 10**9
        assert eng.stats()["name"] == api_a.stats()["sequence"]
    assert api_a._nonce() > last  # outside a call: a fresh value of the sequence


def test_install_on_existing_instance(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")

    class MyAPI(krakenex.API):  # type: ignore[misc]
        seen: list[str]

        def query_private(self, method: str, data: Any = None, timeout: Any = None) -> Any:
            self.seen.append(method)
            return super().query_private(method, data, timeout)

    raw = MyAPI(key, secret)
    raw.seen = []
    raw.uri = server.url
    raw.session.trust_env = False
    api = install(raw, state_dir, rate_limit="pro")
    try:
        assert api is raw and install(raw, state_dir) is raw  # idempotent
        assert api.query_private("Balance")["error"] == []
        assert raw.seen == ["Balance"]  # the subclass's own path is kept, inside the section
        with ShmNonce.for_api_key(key, state_dir) as eng:
            assert server.stats()["keys"]["A"]["last_nonce"] == eng.peek()
        assert api.shmnonce.stats()["rate_limit"] == "pro"
        with pytest.raises(TypeError):
            install(object())  # type: ignore[arg-type]
    finally:
        raw.close()
        api.shmnonce.close()


def test_key_set_after_construction(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    api = client(server, "", "", state_dir)
    try:
        with pytest.raises(Exception, match="key or secret is not set"):
            api.query_private("Balance")  # krakenex's own error, unchanged
        api.key, api.secret = key, secret  # what load_key() does
        assert api.query_private("Balance")["error"] == []
    finally:
        api.close()


def test_query_public_is_not_serialized(api_a: KrakenAPI, state_dir: str) -> None:
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ShmNonce.for_api_key(api_a.key, state_dir) as eng, eng.serialized():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(10)
        t0 = time.monotonic()
        assert api_a.query_public("Time")["error"] == []
        assert time.monotonic() - t0 < 2.0
        # while the key's section is held elsewhere, a private call waits for it
        api_a.shmnonce.lock_timeout = 0.2
        with pytest.raises(LockTimeout):
            api_a.query_private("Balance")
    finally:
        release.set()
        t.join()
    api_a.shmnonce.lock_timeout = None
    assert api_a.query_private("Balance")["error"] == []


def test_threads_two_keys_one_in_flight_per_key(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=0.02)
    apis = []
    for label in ("A", "B"):
        key, secret = server.register(label)
        apis += [client(server, key, secret, state_dir, rate_limit=None) for _ in range(2)]
    errors: list[object] = []

    def work(api: KrakenAPI) -> None:
        for _ in range(8):
            res = api.query_private("Balance")
            if res["error"]:
                errors.append(res["error"])

    threads = [threading.Thread(target=work, args=(a,)) for a in apis for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a in apis:
        a.close()
    st = server.stats()
    assert errors == []
    for label in ("A", "B"):
        assert st["keys"][label]["accepted"] == 32
        assert st["keys"][label]["max_inflight"] == 1
    assert st["max_distinct_keys_inflight"] == 2  # different keys did overlap


# --------------------------------------------------------------------------- retry policy


def test_invalid_nonce_retried_once_with_fresh_nonce(api_a: KrakenAPI,
                                                     server: ServerProcess) -> None:
    """Another client used a nonce slightly ahead: the first attempt fails, the retry passes."""
    server.configure(latency_s=0.6)
    server.prime("A", time.time_ns() + 300_000_000)  # 0.3 s ahead of this host's clock
    assert api_a.query_private("Balance")["error"] == []
    st = api_a.stats()
    assert (st["invalid_nonce"], st["retries"], st["invalid_nonce_raised"]) == (1, 1, 0)
    ks = server.stats()["keys"]["A"]
    assert (ks["invalid_nonce"], ks["accepted"]) == (1, 1)


def test_invalid_nonce_twice_raises_clear_error(api_a: KrakenAPI, server: ServerProcess,
                                                state_dir: str) -> None:
    server.prime("A", 2**64 - 10)  # e.g. another client with a 20-digit counter
    with pytest.raises(KrakenInvalidNonceError) as info:
        api_a.query_private("Balance")
    err = info.value
    assert isinstance(err, KrakenError) and isinstance(err, NonceError)
    msg = str(err)
    assert "EAPI:Invalid nonce" in msg and "2 time(s)" in msg
    assert "another client uses the same API key" in msg and "nonce window" in msg
    assert f"shmnonce jump {api_a.stats()['sequence']}" in msg
    assert api_a.key not in msg and api_a.secret not in msg
    assert err.method == "Balance" and err.errors == ["EAPI:Invalid nonce"]
    assert server.stats()["keys"]["A"]["invalid_nonce"] == 2  # exactly one retry
    st = api_a.stats()
    assert (st["invalid_nonce"], st["retries"], st["invalid_nonce_raised"]) == (2, 1, 1)


def test_retries_configurable(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    server.prime("A", 2**64 - 10)
    for retries, attempts in ((0, 1), (2, 3)):
        api = client(server, key, secret, state_dir, invalid_nonce_retries=retries)
        server.reset()
        with pytest.raises(KrakenInvalidNonceError):
            api.query_private("Balance")
        assert server.stats()["keys"]["A"]["invalid_nonce"] == attempts
        api.close()
    with pytest.raises(ValueError):
        KrakenAPI(key, secret, state_dir, invalid_nonce_retries=-1)


def test_other_errors_never_retried(api_a: KrakenAPI, server: ServerProcess) -> None:
    server.configure(fail_methods={"AddOrder": "EOrder:Insufficient funds"})
    res = api_a.query_private("AddOrder", {"pair": "XBTUSD"})
    assert res == {"error": ["EOrder:Insufficient funds"]}  # returned as krakenex does
    assert server.stats()["requests"] == 1


def test_timeout_not_retried_and_section_released(api_a: KrakenAPI,
                                                  server: ServerProcess) -> None:
    """An HTTP timeout on AddOrder may have placed the order: it must reach the caller once."""
    server.configure(latency_s=1.0)
    with pytest.raises(requests.exceptions.Timeout):
        api_a.query_private("AddOrder", {"pair": "XBTUSD"}, timeout=0.2)
    time.sleep(1.0)
    assert server.stats()["requests"] == 1
    assert api_a.stats()["transport_errors"] == 1
    server.configure(latency_s=0.0)
    assert api_a.query_private("Balance")["error"] == []  # the key's section was left


# --------------------------------------------------------------------------- Kraken errors


def test_rate_limit_error_surfaced_and_counted(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    server.configure(rate_max=2, rate_decay=0.01)
    api = client(server, key, secret, state_dir, rate_limit=None)
    soft = client(server, key, secret, state_dir, rate_limit=None, raise_errors=False)
    try:
        api.query_private("Balance")
        api.query_private("Balance")
        with pytest.raises(KrakenRateLimitError, match="call counter is full"):
            api.query_private("Balance")
        assert soft.query_private("Balance") == {"error": ["EAPI:Rate limit exceeded"]}
        assert api.stats()["rate_limit_errors"] == 2  # shared by both clients of the key
        assert server.stats()["keys"]["A"]["invalid_nonce"] == 0  # not retried as a nonce
    finally:
        api.close()
        soft.close()


def test_lockout_surfaced_and_counted(api_a: KrakenAPI, server: ServerProcess) -> None:
    server.configure(lockout_after=2, lockout_s=30)
    server.prime("A", 2**64 - 10)
    with pytest.raises(KrakenInvalidNonceError):
        api_a.query_private("Balance")  # two invalid nonces: the server locks the key out
    with pytest.raises(KrakenLockoutError, match="locked out"):
        api_a.query_private("Balance")
    st = api_a.stats()
    assert st["lockouts"] == 1 and st["invalid_nonce"] == 2
    assert server.stats()["keys"]["A"]["lockout_rejections"] == 1


# --------------------------------------------------------------------------- limiter, burst guard


def test_limiter_waits_inside_the_call(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    server.configure(rate_max=3, rate_decay=10.0)
    api = client(server, key, secret, state_dir, rate_limit=RateLimit(3, 10.0, headroom=0.5))
    try:
        t0 = time.monotonic()
        for _ in range(8):
            assert api.query_private("Balance")["error"] == []
        elapsed = time.monotonic() - t0
        st = api.stats()
        # capacity 2.5: two calls at once, then one per 0.1 s
        assert elapsed >= 0.55
        assert st["waits"] >= 5 and st["calls"] == 8 and st["rate_limit_errors"] == 0
        assert server.stats()["keys"]["A"]["rate_limited"] == 0
        api.query_private("Ledgers")
        assert api.stats()["cost_total"] == 10
    finally:
        api.close()


def test_burst_guard_in_calls(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    api = client(server, key, secret, state_dir, rate_limit=None,
                 burst_guard={"min_spacing_s": 0.1, "window_s": 30.0})
    try:
        t0 = time.monotonic()
        for _ in range(5):
            api.query_private("Balance")
        assert time.monotonic() - t0 >= 0.38
        st = api.stats()
        assert st["burst_guard"] is True and st["burst_acquired"] == 5
        assert st["burst_waits"] >= 4 and st["burst_in_window"] is True
    finally:
        api.close()


# --------------------------------------------------------------------------- secrets


def test_key_and_secret_never_exposed(api_a: KrakenAPI, server: ServerProcess,
                                      state_dir: str) -> None:
    server.prime("A", 2**64 - 10)
    with pytest.raises(KrakenInvalidNonceError) as info:
        api_a.query_private("Balance")
    key, secret = api_a.key, api_a.secret
    texts = [repr(api_a), repr(api_a.shmnonce), str(api_a.stats()), str(info.value)]
    eng = api_a.shmnonce.engine
    texts += [eng.segment_name, eng.name, str(eng.stats())]
    for root, _dirs, files in os.walk(state_dir):
        for name in files:
            texts.append(name)
            with open(os.path.join(root, name), "rb") as fh:
                texts.append(fh.read().decode("latin-1"))
    shm = f"/dev/shm/{eng.segment_name}"
    if os.path.exists(shm):
        with open(shm, "rb") as fh:
            texts.append(fh.read().decode("latin-1"))
    for text in texts:
        assert key not in text and secret not in text


# --------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("how", ["KrakenAPI", "install"])
def test_child_forked_while_a_thread_attaches_is_not_deadlocked(state_dir: str, how: str) -> None:
    """The guard's attach lock held by another thread at fork() is free in the child.

    The child's first use of a key (an engine not yet attached) takes the lock; the
    thread that held it in the parent does not exist in the child.
    """
    key, secret = f"fork-key-{how}", "c2VjcmV0"
    if how == "KrakenAPI":
        api = KrakenAPI(key, secret, state_dir)
    else:
        api = install(krakenex.API(key, secret), state_dir=state_dir)
    guard = api.shmnonce
    code = fork_while_held(guard._lock, lambda: guard.engine.next())
    assert code == CHILD_OK, f"child exit code {code} ({CHILD_HUNG}: hung on the guard's lock)"
    first = guard.engine.next()  # the parent's lock was released by its holder
    assert guard.engine.next() > first
    api.close()
