"""The guarantees of ``shmnonce.kraken`` for python-kraken-sdk's Spot clients, sync and async.

``install(client)`` works on any ``kraken.base_api.SpotClient`` instance (``User``,
``Trade``, ``Funding``, ``Earn``, ...) and on any ``SpotAsyncClient`` (used directly,
``await client.request("POST", "/0/private/Balance")``, and the clients built on it:
``SpotWSClient``, whose ``get_ws_token()`` sends the private ``GetWebSocketsToken``
through ``request()``). The nonce comes from
``get_nonce()`` and every request goes through ``request()``, so overriding both
on the instance puts each authenticated request inside the key's section, with
the shared call counter and the invalid-nonce retry of ``shmnonce.kraken``. The
async client enters the section with ``engine.aserialized()`` and waits for the
rate limit with ``asyncio.sleep``: the event loop is never blocked by a wait.

Not supported: the Futures clients (another API with its own keys and limits).
Requires the optional extra ``shmnonce[kraken-sdk]``.
"""

from __future__ import annotations

import importlib
import os
import weakref
from typing import Any

from . import _fork
from .kraken import INVALID_NONCE, LOCKOUT, RATE_LIMIT_EXCEEDED, KrakenGuard

__all__ = ["install"]

_CLIENTS: weakref.WeakSet[Any] = weakref.WeakSet()


def _sdk(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "python-kraken-sdk is not installed: pip install 'shmnonce[kraken-sdk]'"
        ) from exc


def _drop_inherited_connections() -> None:
    """After fork: close the child's copies of the pooled connections of guarded clients."""
    for client in list(_CLIENTS):
        session = getattr(client, "_SpotClient__session", None)
        if session is not None:
            session.close()


_fork.register(_fork.ADAPTERS, after_in_child=_drop_inherited_connections)


def _result_errors(result: Any) -> list[str]:
    """Kraken's error list from what ``SpotClient.request`` returned."""
    if result.__class__.__name__ == "Response" and hasattr(result, "json"):
        # use_custom_exceptions=False: the raw requests.Response
        try:
            result = result.json()
        except ValueError:
            return []
    if isinstance(result, dict):
        errors = result.get("error") or []
        if isinstance(errors, list):
            return [e for e in errors if isinstance(e, str)]
    return []


def _exception_errors(exc: BaseException) -> list[str] | None:
    """Kraken's error code for an SDK exception; None when it is not an error response."""
    exceptions = _sdk("kraken.exceptions")
    mapping = {
        INVALID_NONCE: exceptions.KrakenInvalidNonceError,
        RATE_LIMIT_EXCEEDED: exceptions.KrakenApiLimitExceededError,
        LOCKOUT: exceptions.KrakenTemporaryLockoutError,
    }
    for code, cls in mapping.items():
        if isinstance(exc, cls):
            return [code]
    if type(exc).__module__ == exceptions.__name__:
        return []  # another Kraken error response: not ours to count or retry
    return None


async def _async_result_errors(result: Any) -> list[str]:
    """Kraken's error list from what ``SpotAsyncClient.request`` returned."""
    if isinstance(result, _sdk("aiohttp").ClientResponse):
        # use_custom_exceptions=False: the raw response (aiohttp caches the body it
        # reads, so the caller can still read it)
        try:
            result = await result.json(content_type=None)
        except ValueError:
            return []
    return _result_errors(result)


def install(
    client: Any,
    state_dir: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    **options: Any,
) -> Any:
    """Serialize ``client``'s authenticated requests per key across processes; return it.

    ``client`` is a ``SpotClient`` or a ``SpotAsyncClient`` (including
    ``SpotWSClient``). ``url`` and ``options`` are those of
    ``shmnonce.kraken.KrakenAPI`` except ``http_timeout`` (the SDK has its own
    ``TIMEOUT``). Adds ``client.shmnonce`` (a ``KrakenGuard``). Installing twice
    is a no-op.
    """
    base = _sdk("kraken.base_api")
    if not isinstance(client, base.SpotClient):  # SpotAsyncClient is a SpotClient too
        raise TypeError(
            "install() expects a python-kraken-sdk Spot client: a SpotClient (User, Trade, "
            "Funding, Earn, Market, ...) or a SpotAsyncClient (the same clients from "
            "kraken.spot with async requests, and SpotWSClient)"
        )
    if isinstance(getattr(client, "shmnonce", None), KrakenGuard):
        return client
    options.pop("http_timeout", None)
    guard = KrakenGuard(client, key_attr="_key", state_dir=state_dir, url=url,
                        http_timeout=None, **options)
    if isinstance(client, base.SpotAsyncClient):
        _install_async(client, guard)
    else:
        _install_sync(client, guard)
    client.shmnonce = guard
    client.get_nonce = lambda: str(guard.current_nonce())
    _CLIENTS.add(client)
    return client


def _method_name(uri: str) -> str:
    """The private method of a request URI: ``/0/private/Balance?x`` -> ``Balance``."""
    return uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _install_sync(client: Any, guard: KrakenGuard) -> None:
    original = client.request

    def request(method: str, uri: str, params: dict[str, Any] | None = None,
                timeout: int = 10, *, auth: bool = True, **kwargs: Any) -> Any:
        """``SpotClient.request``; authenticated calls inside the key's serialized section."""
        if not auth or not client._key or not client._secret:
            return original(method, uri, params, timeout, auth=auth, **kwargs)

        def send() -> Any:
            # the SDK adds the nonce to ``params`` in place: give each attempt a copy
            fresh = dict(params) if params is not None else None
            return original(method, uri, fresh, timeout, auth=auth, **kwargs)

        return guard.call(_method_name(uri), send, _result_errors, _exception_errors)

    client.request = request


def _install_async(client: Any, guard: KrakenGuard) -> None:
    original = client.request

    async def request(method: str, uri: str, params: dict[str, Any] | None = None,
                      timeout: int = 10, *, auth: bool = True, **kwargs: Any) -> Any:
        """``SpotAsyncClient.request``; authenticated calls inside the key's section."""
        if not auth or not client._key or not client._secret:
            return await original(method, uri, params, timeout, auth=auth, **kwargs)

        async def send() -> Any:
            fresh = dict(params) if params is not None else None
            return await original(method, uri, fresh, timeout, auth=auth, **kwargs)

        return await guard.acall(_method_name(uri), send, _async_result_errors, _exception_errors)

    client.request = request
