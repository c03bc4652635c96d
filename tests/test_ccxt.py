"""shmnonce.ccxt with real ccxt (sync) against the local Kraken test server and a Coincheck stand-in."""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import ccxt
import pytest

from shmnonce import LockTimeout, NonceError, ShmNonce
from shmnonce.ccxt import CcxtSeamError, install
from shmnonce.kraken import (
    KrakenGuard,
    KrakenInvalidNonceError,
    KrakenLockoutError,
    KrakenRateLimitError,
    RateLimit,
)
from tests._ccxt_workers import (
    RATE,
    STANDIN_NONCE_ERROR,
    CoincheckServer,
    kraken_spec,
    make_exchange,
    private_call,
    public_echo,
    rate_pool,
    run_pool,
)
from tests.kraken_server import ServerProcess

pytestmark = pytest.mark.timeout(120)



@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


def kraken(srv: ServerProcess, key: str, secret: str, state_dir: str | None = None,
           do_install: bool = True, **options: Any) -> Any:
    ex = ccxt.kraken({"apiKey": key, "secret": secret, "enableRateLimit": False})
    ex.urls["api"] = {"public": srv.url, "private": srv.url}
    ex.session.trust_env = False
    if do_install:
        install(ex, state_dir=state_dir, **options)
    return ex


@pytest.fixture
def ex_a(server: ServerProcess, state_dir: str) -> Iterator[Any]:
    key, secret = server.register("A")
    ex = kraken(server, key, secret, state_dir, rate_limit=None)
    yield ex
    ex.shmnonce.close()


# --------------------------------------------------------------------------- install


def test_install_returns_same_instance_and_is_idempotent(server: ServerProcess,
                                                         state_dir: str) -> None:
    key, secret = server.register("A")
    ex = ccxt.kraken({"apiKey": key, "secret": secret})
    assert install(ex, state_dir=state_dir) is ex
    guard = ex.shmnonce
    assert isinstance(guard, KrakenGuard) and guard.rate_limit is not None
    assert guard.rate_limit.name == "starter"  # Kraken's default model, as in the krakenex adapter
    fetch2 = ex.fetch2
    assert install(ex, state_dir=state_dir) is ex and ex.shmnonce is guard and ex.fetch2 is fetch2
    guard.close()


def test_install_refuses_what_it_cannot_protect(server: ServerProcess, state_dir: str) -> None:
    with pytest.raises(TypeError):
        install(object())
    ex = ccxt.coincheck({"apiKey": "k", "secret": "s"})
    with pytest.raises(ValueError, match="rate_limit=None"):
        install(ex, state_dir=state_dir, rate_limit="starter")


def test_private_nonce_is_the_keys_sequence_issued_inside_the_section(
        ex_a: Any, server: ServerProcess, state_dir: str) -> None:
    eng = ShmNonce.for_api_key(ex_a.apiKey, state_dir=state_dir)
    before = eng.peek()
    assert ex_a.private_post_balance()["error"] == []
    last = server.stats()["keys"]["A"]["last_nonce"]
    assert last == eng.peek() > before  # the value Kraken got is the sequence's last one
    assert len(str(last)) == 19  # nanoseconds, not ccxt's 13-digit milliseconds
    assert ex_a.fetch_balance()["info"]["error"] == []  # the high-level method too
    assert server.stats()["keys"]["A"]["accepted"] == 2
    assert ex_a.nonce() > eng.peek() - 1  # outside a call: a fresh value of the same sequence
    eng.close()


def test_incrementing_nonce_is_replaced(ex_a: Any, state_dir: str) -> None:
    """ccxt 4.5's incrementing_nonce() compares through float (safe_integer), which cannot
    tell 19-digit neighbours apart; the hook returns the sequence's exact values."""
    if not hasattr(type(ex_a), "incrementing_nonce"):
        pytest.skip("this ccxt has no incrementing_nonce()")
    eng = ShmNonce.for_api_key(ex_a.apiKey, state_dir=state_dir)
    eng.jump_forward(10**12)  # ahead of the clock: the sequence now counts in steps of 1
    values = [ex_a.incrementing_nonce() for _ in range(50)]
    assert all(type(v) is int for v in values)
    assert values == list(range(values[0], values[0] + 50))
    assert values[-1] == eng.peek()
    eng.close()


def test_public_calls_are_not_serialized(ex_a: Any, state_dir: str) -> None:
    """A public call completes while another thread holds the key's section for 2 s."""
    eng = ShmNonce.for_api_key(ex_a.apiKey, state_dir=state_dir)
    entered = threading.Event()

    def hold() -> None:
        with eng.serialized():
            entered.set()
            time.sleep(2.0)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(10)
        issued = eng.stats()["total_issued"]
        t0 = time.monotonic()
        assert ex_a.fetch_time() > 0
        assert time.monotonic() - t0 < 1.0
        assert eng.stats()["total_issued"] == issued  # and it took no nonce
    finally:
        t.join()
        eng.close()


def test_private_call_waits_for_the_section(ex_a: Any, state_dir: str) -> None:
    eng = ShmNonce.for_api_key(ex_a.apiKey, state_dir=state_dir)
    entered = threading.Event()

    def hold() -> None:
        with eng.serialized():
            entered.set()
            time.sleep(0.5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(10)
        t0 = time.monotonic()
        ex_a.private_post_balance()
        assert time.monotonic() - t0 >= 0.45
    finally:
        t.join()
        eng.close()


def test_key_and_secret_never_exposed(ex_a: Any, server: ServerProcess, state_dir: str) -> None:
    ex_a.private_post_balance()
    shown = repr(ex_a.shmnonce) + repr(ex_a.shmnonce.stats()) + " ".join(os.listdir(state_dir))
    assert ex_a.apiKey not in shown and ex_a.secret not in shown


# --------------------------------------------------------------------------- the seam


class _SignsWithOwnCounter(ccxt.kraken):  # type: ignore[misc]
    """A future ccxt whose Kraken sign() no longer asks nonce(): install must refuse it."""

    counter = 0

    def sign(self, path: str, api: Any = "public", method: str = "GET", params: Any = None,
             *args: Any, **kwargs: Any) -> Any:
        type(self).counter += 1
        return {"url": self.urls["api"]["private"] + "/0/private/" + path, "method": method,
                "body": f"nonce={type(self).counter}", "headers": {}}


class _SignsWithNonceSometimes(ccxt.kraken):  # type: ignore[misc]
    """sign() uses nonce() except for one endpoint: the call-time check catches that one."""

    def sign(self, path: str, api: Any = "public", *args: Any, **kwargs: Any) -> Any:
        if path == "TradeBalance":
            return {"url": self.urls["api"]["private"] + "/0/private/" + path, "method": "POST",
                    "body": "nonce=1", "headers": {"API-Key": self.apiKey}}
        return super().sign(path, api, *args, **kwargs)


def test_missing_seam_fails_loudly_at_install(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    ex = _SignsWithOwnCounter({"apiKey": key, "secret": secret})
    with pytest.raises(CcxtSeamError, match=r"sign\(\) did not take the nonce"):
        install(ex, state_dir=state_dir)
    assert not hasattr(ex, "shmnonce") and "fetch2" not in vars(ex)  # nothing was changed

    ex = ccxt.kraken({"apiKey": key, "secret": secret})
    ex.fetch2 = None  # e.g. renamed in a future ccxt
    with pytest.raises(CcxtSeamError, match=r"fetch2\(\) is missing"):
        install(ex, state_dir=state_dir)

    ex = ccxt.kraken({"apiKey": key, "secret": secret})
    ex.fetch2 = lambda url, method="GET": None  # another signature
    with pytest.raises(CcxtSeamError, match=r"\(path, api\)"):
        install(ex, state_dir=state_dir)

    ex = ccxt.kraken({"apiKey": key, "secret": secret})

    async def throttle(cost: Any = None) -> None: ...

    ex.throttle = throttle  # async throttle on a sync exchange
    with pytest.raises(CcxtSeamError, match="coroutine"):
        install(ex, state_dir=state_dir)


def test_unseamed_private_request_is_not_sent(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    ex = _SignsWithNonceSometimes({"apiKey": key, "secret": secret, "enableRateLimit": False})
    ex.urls["api"] = {"public": server.url, "private": server.url}
    install(ex, state_dir=state_dir, rate_limit=None)
    assert ex.private_post_balance()["error"] == []
    with pytest.raises(CcxtSeamError, match="was not sent"):
        ex.private_post_tradebalance()
    assert server.stats()["requests"] == 1
    assert ex.private_post_balance()["error"] == []  # the section was left
    ex.shmnonce.close()


def test_probe_leaves_the_instance_alone(server: ServerProcess, state_dir: str) -> None:
    """The install-time probe signs on a copy: no credentials or options change on the instance."""
    ex = ccxt.kraken({})  # no key yet (set later, as ccxt allows)
    options = dict(ex.options)
    install(ex, state_dir=state_dir)
    assert not ex.apiKey and not ex.secret and ex.options == options
    key, secret = server.register("A")
    ex.apiKey, ex.secret = key, secret
    ex.urls["api"] = {"public": server.url, "private": server.url}
    ex.enableRateLimit = False
    assert ex.private_post_balance()["error"] == []
    assert len(str(server.stats()["keys"]["A"]["last_nonce"])) == 19
    ex.shmnonce.close()


def test_no_key_gives_ccxts_own_error(state_dir: str) -> None:
    ex = install(ccxt.kraken({"enableRateLimit": False}), state_dir=state_dir)
    with pytest.raises(ccxt.AuthenticationError):
        ex.private_post_balance()


# --------------------------------------------------------------------------- errors


def test_invalid_nonce_retried_once_with_fresh_nonce(ex_a: Any, server: ServerProcess) -> None:
    """Another client used a nonce slightly ahead: the first attempt fails, the retry passes."""
    server.configure(latency_s=0.6)
    server.prime("A", time.time_ns() + 300_000_000)
    assert ex_a.private_post_balance()["error"] == []
    st = ex_a.shmnonce.stats()
    assert (st["invalid_nonce"], st["retries"], st["invalid_nonce_raised"]) == (1, 1, 0)
    ks = server.stats()["keys"]["A"]
    assert (ks["invalid_nonce"], ks["accepted"]) == (1, 1)


def test_invalid_nonce_twice_raises_ccxt_class_with_explanation(
        ex_a: Any, server: ServerProcess) -> None:
    server.prime("A", 2**64 - 10)
    with pytest.raises(ccxt.InvalidNonce) as info:
        ex_a.private_post_balance()
    err = info.value
    assert isinstance(err, KrakenInvalidNonceError) and isinstance(err, NonceError)
    assert isinstance(err.__cause__, ccxt.InvalidNonce)  # ccxt's original, chained
    msg = str(err)
    assert "EAPI:Invalid nonce" in msg and "2 time(s)" in msg
    assert "13-digit milliseconds" in msg and "one-way" in msg
    assert f"shmnonce jump {ex_a.shmnonce.stats()['sequence']}" in msg
    assert ex_a.apiKey not in msg and ex_a.secret not in msg
    assert err.method == "Balance" and err.errors == ["EAPI:Invalid nonce"]
    assert server.stats()["keys"]["A"]["invalid_nonce"] == 2  # exactly one retry
    again = pickle.loads(pickle.dumps(err))  # crosses multiprocessing pools
    assert isinstance(again, ccxt.InvalidNonce) and isinstance(again, KrakenInvalidNonceError)
    assert str(again) == msg


def test_retries_configurable(server: ServerProcess, state_dir: str) -> None:
    key, secret = server.register("A")
    server.prime("A", 2**64 - 10)
    for retries, attempts in ((0, 1), (2, 3)):
        ex = kraken(server, key, secret, state_dir, rate_limit=None,
                    invalid_nonce_retries=retries)
        server.reset()
        with pytest.raises(ccxt.InvalidNonce):
            ex.private_post_balance()
        assert server.stats()["keys"]["A"]["invalid_nonce"] == attempts
        ex.shmnonce.close()


def test_other_errors_never_retried_and_keep_ccxts_class(ex_a: Any,
                                                         server: ServerProcess) -> None:
    server.configure(fail_methods={"AddOrder": "EOrder:Insufficient funds"})
    with pytest.raises(ccxt.InsufficientFunds) as info:
        ex_a.private_post_addorder({"pair": "XBTUSD"})
    assert type(info.value) is ccxt.InsufficientFunds  # exactly ccxt's exception
    assert server.stats()["requests"] == 1


@pytest.mark.parametrize("raise_errors", [True, False])
def test_rate_limit_and_lockout_answers(server: ServerProcess, state_dir: str,
                                        raise_errors: bool) -> None:
    key, secret = server.register("A")
    ex = kraken(server, key, secret, state_dir, rate_limit=None, raise_errors=raise_errors)
    for code, shm_cls in (("EAPI:Rate limit exceeded", KrakenRateLimitError),
                          ("EGeneral:Temporary lockout", KrakenLockoutError)):
        server.configure(fail_methods={"Balance": code})
        server.reset()
        # ccxt's class for these answers: DDoSProtection (4.5), RateLimitExceeded (4.2)
        with pytest.raises((ccxt.DDoSProtection, ccxt.RateLimitExceeded)) as info:
            ex.private_post_balance()
        err, cause = info.value, info.value.__cause__
        if raise_errors:  # a subclass of the very class ccxt raised, and of shmnonce's
            assert isinstance(err, shm_cls) and isinstance(cause, ccxt.BaseError)
            assert isinstance(err, type(cause)) and type(cause).__module__.startswith("ccxt.")
        else:  # ccxt's own exception, unchanged
            assert not isinstance(err, shm_cls) and type(err).__module__.startswith("ccxt.")
        assert code in str(err)
        assert server.stats()["requests"] == 1  # never retried
    st = ex.shmnonce.stats()
    assert (st["rate_limit_errors"], st["lockouts"]) == (1, 1)
    ex.shmnonce.close()


def test_transport_error_reaches_caller_once(ex_a: Any, server: ServerProcess) -> None:
    """A timeout may have executed the call (an order placed): never retried, section left."""
    server.configure(latency_s=2.0)
    ex_a.timeout = 1000  # ms, ccxt's own setting (ccxt 4.0 truncates it to whole seconds)
    with pytest.raises(ccxt.RequestTimeout):
        ex_a.private_post_addorder({"pair": "XBTUSD"})
    time.sleep(1.5)
    assert server.stats()["requests"] == 1
    assert ex_a.shmnonce.stats()["transport_errors"] == 1
    server.configure(latency_s=0.0)
    assert ex_a.private_post_balance()["error"] == []


# --------------------------------------------------------------------------- throttling


def test_ccxt_throttle_replaced_by_the_shared_model(server: ServerProcess,
                                                    state_dir: str) -> None:
    """enableRateLimit=True (ccxt's default, 3 s between Kraken private calls here) is not
    applied to private calls while shmnonce's model is on; public calls keep it."""
    key, secret = server.register("A")
    ex = ccxt.kraken({"apiKey": key, "secret": secret})
    assert ex.enableRateLimit
    ex.urls["api"] = {"public": server.url, "private": server.url}
    install(ex, state_dir=state_dir, rate_limit=RateLimit(20, 10.0))
    t0 = time.monotonic()
    for _ in range(4):
        ex.private_post_balance()
    assert time.monotonic() - t0 < 1.5  # ccxt's throttle would take >= 9 s
    t0 = time.monotonic()
    ex.fetch_time()  # public: ccxt's throttle still spaces it from the last request
    assert time.monotonic() - t0 >= 0.8
    ex.shmnonce.close()


def test_ccxt_throttle_runs_before_the_section_without_model(server: ServerProcess,
                                                             state_dir: str) -> None:
    """rate_limit=None: ccxt's throttle applies, but the key's section is free while it waits."""
    key, secret = server.register("A")
    ex = ccxt.kraken({"apiKey": key, "secret": secret, "rateLimit": 500})  # 1.5 s per private
    ex.urls["api"] = {"public": server.url, "private": server.url}
    install(ex, state_dir=state_dir, rate_limit=None)
    ex.private_post_balance()
    eng = ShmNonce.for_api_key(key, state_dir=state_dir)
    done = threading.Event()
    t = threading.Thread(target=lambda: (ex.private_post_balance(), done.set()))
    t0 = time.monotonic()
    t.start()
    try:
        time.sleep(0.3)  # the second call is in ccxt's throttle now
        assert not done.is_set()
        with eng.serialized(timeout=0.5):  # LockTimeout if the throttle held the section
            pass
    finally:
        t.join()
        eng.close()
    assert done.is_set() and time.monotonic() - t0 >= 1.2  # ccxt's throttle did apply
    assert server.stats()["keys"]["A"]["accepted"] == 2
    ex.shmnonce.close()


def test_throttle_inside_section_would_fail_the_check(server: ServerProcess,
                                                      state_dir: str) -> None:
    """The observer above can fail: plain ccxt's throttle inside a hand-written section."""
    key, secret = server.register("A")
    ex = ccxt.kraken({"apiKey": key, "secret": secret, "rateLimit": 500})
    ex.urls["api"] = {"public": server.url, "private": server.url}
    eng = ShmNonce.for_api_key(key, state_dir=state_dir)
    ex.private_post_balance()

    def glued() -> None:  # the ~20 lines of glue users write today, reduced
        with ShmNonce.for_api_key(key, state_dir=state_dir).serialized():
            ex.private_post_balance()

    t = threading.Thread(target=glued)
    t.start()
    try:
        time.sleep(0.3)
        with pytest.raises(LockTimeout), eng.serialized(timeout=0.5):
            pass
    finally:
        t.join()
        eng.close()


# --------------------------------------------------------------------------- processes


def test_sync_processes_no_invalid_nonce_one_in_flight(server: ServerProcess,
                                                       state_dir: str) -> None:
    """Forked (exchange inherited from the parent), spawned and unrelated processes, one key."""
    server.configure(latency_s=0.01)
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir)
    parent = make_exchange(spec, key, secret)
    parent.private_post_balance()  # a pooled keep-alive connection the forks must not share
    server.reset()
    out, _ = run_pool(spec, ("fork", "fork", "spawn", "unrelated"), inherited=parent)
    ks = server.stats()["keys"]["A"]
    assert out["ok"] == 80 and out["exceptions"] == {}
    assert (ks["accepted"], ks["invalid_nonce"], ks["bad_signature"], ks["max_inflight"]) == (
        80, 0, 0, 1)
    parent.shmnonce.close()


def test_forked_children_do_not_share_the_parents_connection(server: ServerProcess,
                                                             state_dir: str) -> None:
    """Public calls are not serialized: without the after-fork hook two children inheriting
    one keep-alive connection would read each other's answers."""
    server.configure(latency_s=0.005)
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir, task="echo", calls=100)
    parent = make_exchange(spec, key, secret)
    public_echo(parent, {"warm": "1"})  # leaves a pooled keep-alive connection
    _, results = run_pool(spec, ("fork", "fork"), inherited=parent)
    assert [(r["ok"], r["mismatched"], r["failed"]) for r in results] == [(100, 0, 0)] * 2
    parent.shmnonce.close()


def test_sync_processes_without_shmnonce_get_invalid_nonces(server: ServerProcess,
                                                            state_dir: str) -> None:
    """The same pool with plain ccxt: the test above can fail."""
    server.configure(latency_s=0.01)
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir, install=False)
    out, _ = run_pool(spec, ("fork", "fork", "spawn", "unrelated"))
    ks = server.stats()["keys"]["A"]
    assert ks["invalid_nonce"] > 0
    assert out["exceptions"].get("InvalidNonce", 0) == ks["invalid_nonce"]


def test_rate_model_bounds_the_pool_not_ccxts_throttle(server: ServerProcess,
                                                       state_dir: str) -> None:
    """ccxt's enableRateLimit (default on) spaces Kraken private calls 3 s apart per
    instance: 6 calls per process would take >= 15 s, >= 51 s if it slept in the section."""
    wall, bound, ks = rate_pool(server, state_dir, calls=6)
    assert ks["accepted"] == 18 and ks["rate_limited"] == 0 and ks["invalid_nonce"] == 0
    assert ks["max_level"] <= RATE[0]  # the pool stayed under the key's limit together
    assert (18 - (RATE[0] - RATE[2])) / RATE[1] * 0.9 <= wall <= bound, (wall, bound)


# --------------------------------------------------------------------------- another exchange


@pytest.fixture
def coincheck() -> Iterator[CoincheckServer]:
    with CoincheckServer(latency_s=0.01) as srv:
        yield srv


def test_coincheck_processes_one_key(coincheck: CoincheckServer, state_dir: str) -> None:
    key, secret = coincheck.register("C")
    out, _ = run_pool({"exchange": "coincheck", "url": coincheck.url, "creds": [key, secret],
                    "state_dir": state_dir, "options": {}, "calls": 20})
    ks = coincheck.stats()["keys"]["C"]
    assert out["ok"] == 60 and out["exceptions"] == {}
    assert (ks["accepted"], ks["invalid_nonce"], ks["bad_signature"], ks["max_inflight"]) == (
        60, 0, 0, 1)
    assert ks["max_nonce_digits"] == 19  # within Coincheck's documented 2**63-1


def test_coincheck_without_shmnonce_gets_invalid_nonces(coincheck: CoincheckServer,
                                                        state_dir: str) -> None:
    key, secret = coincheck.register("C")
    out, _ = run_pool({"exchange": "coincheck", "url": coincheck.url, "creds": [key, secret],
                    "state_dir": state_dir, "install": False, "calls": 20})
    ks = coincheck.stats()["keys"]["C"]
    assert ks["invalid_nonce"] > 0
    assert out["exceptions"].get("ExchangeError", 0) == ks["invalid_nonce"]


def test_migration_is_one_way(coincheck: CoincheckServer, state_dir: str) -> None:
    """After one nanosecond nonce, ccxt's millisecond nonces on the key are rejected."""
    key, secret = coincheck.register("C")
    spec = {"exchange": "coincheck", "url": coincheck.url, "state_dir": state_dir, "options": {}}
    plain = make_exchange({**spec, "install": False}, key, secret)
    assert private_call(plain)["success"]  # 13 digits accepted
    guarded = make_exchange(spec, key, secret)
    assert private_call(guarded)["success"]  # 19 digits: above every millisecond nonce
    with pytest.raises(ccxt.ExchangeError, match=STANDIN_NONCE_ERROR):
        private_call(plain)
    guarded.shmnonce.close()


def test_coincheck_sign_uses_the_section_nonce(coincheck: CoincheckServer,
                                               state_dir: str) -> None:
    key, secret = coincheck.register("C")
    ex = make_exchange({"exchange": "coincheck", "url": coincheck.url, "state_dir": state_dir,
                        "options": {}}, key, secret)
    assert ex.shmnonce.rate_limit is None
    ex.fetch_ticker("BTC/JPY")  # public: no nonce taken
    assert ex.shmnonce.stats()["total_issued"] == 0
    private_call(ex)
    assert coincheck.stats()["keys"]["C"]["last_nonce"] == ex.shmnonce.engine.peek()
    ex.shmnonce.close()

