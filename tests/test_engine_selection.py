"""Engine selection by ``url=`` / ``SHMNONCE_URL`` in every Kraken integration.

``KrakenAPI``, ``kraken.install``, ``kraken_sdk.install`` and the compat layer take
``url=``; None means the environment variable ``SHMNONCE_URL``, else shared
memory on this host. Errors surface when the client or manager is created, not at
the first private call: an unknown scheme, a state_dir together with a URL, a
Redis URL without the Redis engine installed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import krakenex
import pytest

from shmnonce import ShmNonce, compat
from shmnonce import kraken_sdk as sdk
from shmnonce._paths import api_key_name
from shmnonce._protocol import engine_for_key, engine_for_name, resolve_url
from shmnonce.kraken import KrakenAPI, install

pytestmark = pytest.mark.timeout(30)

KEY = "selection-test-key"


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SHMNONCE_URL", raising=False)
    for var in ("SHMNONCE_COMPAT_NAME", "SHMNONCE_COMPAT_STATE_DIR", "SHMNONCE_COMPAT_KEY_ENV"):
        monkeypatch.delenv(var, raising=False)
    yield
    compat.close_global_nonce_manager()
    compat.configure()


@pytest.fixture
def no_redis_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import shmnonce.redis`` fail as it does without the optional extra."""
    monkeypatch.setitem(sys.modules, "shmnonce.redis", None)


def _sdk_user(**kw: Any) -> Any:
    from kraken.spot import User

    return sdk.install(User(key=KEY, secret="c2VjcmV0"), **kw)


def _sdk_async(**kw: Any) -> Any:
    from kraken.spot import SpotAsyncClient

    async def make() -> Any:
        client = SpotAsyncClient(key=KEY, secret="c2VjcmV0")
        try:
            return sdk.install(client, **kw)
        finally:
            await client.close()

    import asyncio

    return asyncio.run(make())


INTEGRATIONS: dict[str, Callable[..., Any]] = {
    "KrakenAPI": lambda **kw: KrakenAPI(KEY, "c2VjcmV0", **kw),
    "kraken.install": lambda **kw: install(krakenex.API(KEY, "c2VjcmV0"), **kw),
    "kraken_sdk.install": _sdk_user,
    "kraken_sdk.install(async)": _sdk_async,
    "compat.configure": lambda **kw: compat.configure(api_key=KEY, **kw),
    "GlobalKrakenNonceManager": lambda **kw: compat.GlobalKrakenNonceManager(api_key=KEY, **kw),
}


@pytest.mark.parametrize("integration", sorted(INTEGRATIONS))
@pytest.mark.parametrize("url", ["http://u:hunter2@127.0.0.1:6379", "memcached://u:hunter2@h",
                                 "redis:/u:hunter2@no-slashes", "u:hunter2@h:6379"])
def test_unknown_scheme_is_a_value_error(integration: str, url: str) -> None:
    with pytest.raises(ValueError, match="unsupported engine URL scheme") as info:
        INTEGRATIONS[integration](url=url)
    assert "hunter2" not in str(info.value)  # only the scheme is shown


@pytest.mark.parametrize("integration", sorted(INTEGRATIONS))
def test_unknown_scheme_from_the_environment(integration: str, monkeypatch: pytest.MonkeyPatch,
                                             state_dir: str) -> None:
    monkeypatch.setenv("SHMNONCE_URL", "mysql://db")
    with pytest.raises(ValueError, match="SHMNONCE_URL"):
        if integration.startswith("compat"):
            INTEGRATIONS[integration]()
            compat.get_global_nonce_manager()
        else:
            INTEGRATIONS[integration]()


@pytest.mark.parametrize("integration", sorted(INTEGRATIONS))
@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:6380", "unix:///tmp/r.sock"])
def test_redis_url_without_the_engine_names_the_extra(integration: str, url: str,
                                                      no_redis_engine: None) -> None:
    with pytest.raises(ImportError, match=r"shmnonce\[redis\]"):
        INTEGRATIONS[integration](url=url)


@pytest.mark.parametrize("integration", ["KrakenAPI", "kraken.install", "kraken_sdk.install",
                                         "kraken_sdk.install(async)"])
def test_state_dir_and_url_together_is_a_value_error(integration: str, state_dir: str) -> None:
    with pytest.raises(ValueError, match="state_dir"):
        INTEGRATIONS[integration](url="redis://127.0.0.1:1/0", state_dir=state_dir)


def test_compat_state_dir_and_url_together_is_a_value_error(
        state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="state_dir"):
        compat.configure(name="sel", state_dir=state_dir, url="redis://127.0.0.1:1/0")
    # one from the environment, one from configure(): found when the manager is made
    monkeypatch.setenv("SHMNONCE_URL", "redis://127.0.0.1:1/0")
    compat.configure(name="sel", state_dir=state_dir)
    with pytest.raises(ValueError, match=r"state directory .* and an engine URL"):
        compat.get_global_nonce_manager()


def test_resolve_url_rules(monkeypatch: pytest.MonkeyPatch, no_redis_engine: None) -> None:
    assert resolve_url(None) is None
    monkeypatch.setenv("SHMNONCE_URL", "")
    assert resolve_url(None) is None  # empty: unset
    with pytest.raises(ImportError):
        resolve_url("redis://h")
    with pytest.raises(ValueError):
        resolve_url("redis://h", "/tmp/x")  # the conflict is reported before the import
    monkeypatch.setenv("SHMNONCE_URL", "redis://h")
    with pytest.raises(ValueError, match="state_dir"):
        engine_for_key(KEY, state_dir="/tmp/x")


def test_no_url_selects_shared_memory_everywhere(state_dir: str) -> None:
    """Without url and SHMNONCE_URL every integration uses the key's ShmNonce sequence."""
    api = KrakenAPI(KEY, "c2VjcmV0", state_dir)
    raw = install(krakenex.API(KEY, "c2VjcmV0"), state_dir)
    user = _sdk_user(state_dir=state_dir)
    compat.configure(api_key=KEY, state_dir=state_dir)
    mgr = compat.get_global_nonce_manager()
    try:
        engines = [api.shmnonce.engine, raw.shmnonce.engine, user.shmnonce.engine, mgr.engine]
        assert all(isinstance(e, ShmNonce) for e in engines)
        assert {e.name for e in engines} == {api_key_name(KEY)}
        # one sequence: values from each are above the others'
        values = [e.next() for e in engines for _ in range(2)]
        assert values == sorted(values) and len(set(values)) == len(values)
        with engine_for_name(api_key_name(KEY), state_dir=state_dir) as by_name:
            assert by_name.peek() == values[-1]
    finally:
        api.close()
        raw.shmnonce.close()
        user.shmnonce.close()
