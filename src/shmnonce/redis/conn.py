"""Redis URLs, clients and the mapping of redis-py errors to shmnonce's errors."""

from __future__ import annotations

import urllib.parse
from typing import Any

import redis
import redis.asyncio
import redis.exceptions as rx

from .._errors import NonceError, StateError

__all__ = ["SCHEMES", "RedisUnavailable", "async_client", "map_error", "redact", "sync_client"]

SCHEMES = ("redis://", "rediss://", "unix://")

_OPTIONS: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": 10.0}
_TCP_OPTIONS: dict[str, Any] = {**_OPTIONS, "socket_keepalive": True}


def _options(url: str) -> dict[str, Any]:
    # keepalive: a waiter blocked in BLPOP notices a vanished server (TCP only)
    return _OPTIONS if url.startswith("unix://") else _TCP_OPTIONS


class RedisUnavailable(NonceError, ConnectionError):
    """The Redis server could not be reached or refused the credentials."""


def check_url(url: object) -> str:
    """Return ``url`` if it has a supported scheme, else raise ValueError (no fallback)."""
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        shown = url.split("://", 1)[0] + "://..." if isinstance(url, str) else repr(url)
        raise ValueError(
            f"unsupported Redis URL {shown}: use redis://, rediss:// (TLS) or unix://"
        )
    return url


def redact(url: str) -> str:
    """The URL without its password (for messages, repr and stats)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        query = [(k, "***" if k == "password" else v) for k, v in query]
    text = f"{parts.scheme}://{netloc}{parts.path}"
    return text + ("?" + urllib.parse.urlencode(query, safe="*/") if query else "")


def sync_client(url: str) -> redis.Redis:
    """A redis-py client (its own connection pool) for ``url``."""
    return redis.Redis.from_url(url, **_options(url))


def async_client(url: str) -> redis.asyncio.Redis:
    """A redis.asyncio client for ``url``, bound to the running event loop once used."""
    return redis.asyncio.Redis.from_url(url, **_options(url))


def map_error(exc: rx.RedisError, where: str) -> BaseException:
    """shmnonce's error for a redis-py error (``where`` names the sequence and server)."""
    msg = str(exc)
    if isinstance(exc, rx.ResponseError):
        if msg.startswith("SHMNONCE_RANGE"):
            return NonceError(f"{where} {_strip(msg)}")
        if msg.startswith("SHMNONCE_STATE"):
            return StateError(f"{where} {_strip(msg)}")
        if msg.startswith("SHMNONCE_JUMP"):
            return ValueError(_strip(msg))
        if msg.startswith("WRONGTYPE"):
            return StateError(f"{where}: a key of the sequence holds another type of value ({msg})")
        if isinstance(exc, rx.NoPermissionError) or msg.startswith("NOPERM"):
            return NonceError(
                f"{where}: the Redis user lacks a permission ({msg}); see the ACL "
                "recommendation in docs/redis.md"
            )
        return NonceError(f"{where}: Redis answered {msg}")
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return RedisUnavailable(f"{where}: authentication failed ({msg})")
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError):
        return RedisUnavailable(f"{where}: Redis unreachable ({msg})")
    return NonceError(f"{where}: {type(exc).__name__}: {msg}")


def _strip(msg: str) -> str:
    """Our script error text without its kind prefix and Redis's script location."""
    text = msg.split(" ", 1)[1] if " " in msg else msg
    return text.split(" script: ", 1)[0]
