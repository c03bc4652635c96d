"""The engine interface every nonce engine implements (shared memory, Redis).

Integrations (the Kraken adapters, the rate limiter, the compat layer, the CLI)
depend on these protocols only, never on an engine's internals, so that any
engine can stand behind them.

* :class:`NonceEngine`: one strictly increasing sequence plus its exclusive section.
* :class:`Section`: an explicit ticket of the section, owned by whoever entered it
  (a thread or an asyncio task), not by a thread-local.
* :class:`SharedRecord`: a small named record of unsigned 64-bit fields that every
  user of the sequence sees, changed by atomic read-modify-write.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import ModuleType, TracebackType
from typing import Protocol, TypeVar, runtime_checkable

__all__ = [
    "ENV_URL",
    "NonceEngine",
    "Section",
    "SharedRecord",
    "Update",
    "engine_for_key",
    "engine_for_name",
    "resolve_url",
]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

ENV_URL = "SHMNONCE_URL"
"""Environment variable naming the engine when no ``url=`` is given (unset: shared memory)."""

Update = Callable[[list[int] | None], tuple[Sequence[int], R]]
"""``fn(values) -> (new_values, result)`` for :meth:`SharedRecord.update`.

``values`` is None when the record is torn (a writer was killed half-way) or
otherwise unreadable; ``fn`` then decides the safe restart value. A record that was
never written reads as ``fields`` zeros on every engine, so that ``fn`` can tell a
fresh record (e.g. an empty call counter) from a damaged one (assumed full). ``fn`` may run
more than once (an engine may retry on a conflicting writer) and must not have
side effects; it must return exactly ``fields`` values in ``0 .. 2**64-1``.
"""


@runtime_checkable
class Section(Protocol):
    """A place in a sequence's exclusive section, held until :meth:`leave`."""

    @property
    def nonce(self) -> int:
        """The value issued inside the section when it was entered."""
        ...

    def leave(self) -> None:
        """Give the section to the next entrant. Idempotent."""
        ...


@runtime_checkable
class SharedRecord(Protocol):
    """A named record of ``fields`` u64 values shared by every user of one sequence."""

    @property
    def name(self) -> str: ...

    @property
    def fields(self) -> int: ...

    def read(self) -> list[int] | None:
        """The current values (zeros: never written; None: torn), without changing them."""
        ...

    def update(self, fn: Update[R]) -> R:
        """Atomically replace the values with ``fn(values)[0]``; return ``fn(values)[1]``."""
        ...


@runtime_checkable
class NonceEngine(Protocol):
    """One strictly increasing nonce sequence and its exclusive section."""

    @property
    def name(self) -> str: ...

    def next(self) -> int:
        """Issue the next value: greater than every value issued before."""
        ...

    def peek(self) -> int:
        """The last value issued; issues nothing."""
        ...

    def enter(self, timeout: float | None = None) -> Section:
        """Wait for the section and return its ticket (the caller must ``leave()`` it)."""
        ...

    def serialized(self, timeout: float | None = None) -> AbstractContextManager[int]:
        """The section as a context manager yielding the nonce issued inside."""
        ...

    def aserialized(self, timeout: float | None = None) -> AbstractAsyncContextManager[int]:
        """The section for asyncio: waits without blocking the event loop."""
        ...

    def jump_forward(self, delta_ns: int) -> int:
        """Set the last value to ``max(last, now) + delta_ns`` and return it."""
        ...

    def stats(self) -> Mapping[str, object]:
        """Counters of the sequence; never key material."""
        ...

    def record(self, name: str, fields: int) -> SharedRecord:
        """The shared record ``name`` of this sequence (see the engine for known names).

        Names in use: "kraken.counter" and "kraken.burst" (14 fields each,
        ``shmnonce.kraken.ratelimit``), "compat.counters" (24 fields, ``shmnonce.compat``).
        """
        ...

    def close(self) -> None:
        """Detach; the sequence lives on."""
        ...

    def unlink(self) -> None:
        """Destroy the sequence's state everywhere."""
        ...

    def __enter__(self) -> NonceEngine: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def resolve_url(url: str | None, state_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The engine URL to use: ``url``, else ``$SHMNONCE_URL``; None means shared memory.

    Checks without connecting: a scheme other than ``redis://``, ``rediss://`` or
    ``unix://`` is a ``ValueError`` (there is no silent fallback to a weaker engine),
    so is ``state_dir`` together with a URL; a URL whose engine module is not
    installed is an ``ImportError`` naming the extra to install.
    """
    if url is None:
        url = os.environ.get(ENV_URL) or None
    if url is None:
        return None
    # Only the scheme is ever shown: the rest of a URL may hold a password.
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        shown = f"scheme {scheme!r}" if scheme else "URL without a scheme"
        raise ValueError(
            f"unsupported engine URL scheme: {shown}; use redis://, rediss:// or unix:// "
            f"(or no url and no ${ENV_URL} for shared memory on this host)"
        )
    if state_dir is not None:
        raise ValueError("state_dir= applies to the shared-memory engine, not to url=")
    _redis_module(scheme)
    return url


def _redis_module(scheme: str) -> ModuleType:
    try:
        return importlib.import_module("shmnonce.redis")
    except ImportError as exc:  # the optional extra is missing
        raise ImportError(
            f"url={scheme}://... needs the Redis engine: pip install 'shmnonce[redis]'"
        ) from exc


def engine_for_key(
    api_key: str | bytes,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
) -> NonceEngine:
    """The engine of one API key: ``url`` (else ``$SHMNONCE_URL``) selects Redis,
    nothing selects shared memory on this host (see :func:`resolve_url` for errors).

    Every engine names the key's sequence ``api_key_name(key)``, so
    ``engine_for_name(api_key_name(key), ...)`` is the same sequence.
    """
    resolved = resolve_url(url, state_dir)
    if resolved is None:
        from .shm.engine import ShmNonce
        shm: NonceEngine = ShmNonce.for_api_key(api_key, state_dir=state_dir)
        return shm
    engine: NonceEngine = _redis_module("redis").RedisNonce.for_api_key(api_key, url=resolved)
    return engine


def engine_for_name(
    name: str,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
) -> NonceEngine:
    """The engine of the sequence ``name``, selected like :func:`engine_for_key`.

    For integrations that know a sequence by name (the compat layer: a configured
    name, or the hashed name of a key, which is all it keeps of the key).
    """
    resolved = resolve_url(url, state_dir)
    if resolved is None:
        from .shm.engine import ShmNonce
        shm: NonceEngine = ShmNonce.attach(name, state_dir)
        return shm
    engine: NonceEngine = _redis_module("redis").RedisNonce.attach(name, url=resolved)
    return engine
