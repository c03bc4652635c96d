"""The guarantees of ``shmnonce.kraken`` for python-kraken-sdk's synchronous Spot clients.

``install(client)`` works on any ``kraken.base_api.SpotClient`` instance (``User``,
``Trade``, ``Funding``, ``Earn``, ...): its nonce comes from ``get_nonce()`` and
every request goes through ``request()``, so overriding both on the instance
puts each authenticated request inside the key's serialized section, with the
shared call counter and the invalid-nonce retry of ``shmnonce.kraken``.

Not supported: ``SpotAsyncClient`` (a cross-process section would have to be
held across ``await`` points and would block the event loop) and the Futures
clients (another API with its own keys and limits). Requires the optional
extra ``shmnonce[kraken-sdk]``.
"""

from __future__ import annotations

import importlib
import os
import weakref
from typing import Any

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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_connections)


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


def install(client: Any, state_dir: str | os.PathLike[str] | None = None, **options: Any) -> Any:
    """Serialize ``client``'s authenticated requests per key across processes; return it.

    ``options`` are those of ``shmnonce.kraken.KrakenAPI`` except ``http_timeout``
    (the SDK has its own ``TIMEOUT``). Adds ``client.shmnonce`` (a
    ``KrakenGuard``). Installing twice is a no-op.
    """
    base = _sdk("kraken.base_api")
    if isinstance(client, base.SpotAsyncClient):
        raise TypeError("shmnonce.kraken_sdk supports the synchronous SpotClient family only")
    if not isinstance(client, base.SpotClient):
        raise TypeError("install() expects a kraken.spot client (a SpotClient instance)")
    if isinstance(getattr(client, "shmnonce", None), KrakenGuard):
        return client
    options.pop("http_timeout", None)
    guard = KrakenGuard(client, key_attr="_key", state_dir=state_dir, http_timeout=None,
                        **options)
    original = client.request

    def request(method: str, uri: str, params: dict[str, Any] | None = None,
                timeout: int = 10, *, auth: bool = True, **kwargs: Any) -> Any:
        """``SpotClient.request``; authenticated calls inside the key's serialized section."""
        if not auth or not client._key or not client._secret:
            return original(method, uri, params, timeout, auth=auth, **kwargs)
        name = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

        def send() -> Any:
            # the SDK adds the nonce to ``params`` in place: give each attempt a copy
            fresh = dict(params) if params is not None else None
            return original(method, uri, fresh, timeout, auth=auth, **kwargs)

        return guard.call(name, send, _result_errors, _exception_errors)

    def get_nonce() -> str:
        """The nonce issued in the current section (a fresh one outside a call)."""
        return str(guard.current_nonce())

    client.shmnonce = guard
    client.request = request
    client.get_nonce = get_nonce
    _CLIENTS.add(client)
    return client
