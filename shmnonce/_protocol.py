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
from types import TracebackType
from typing import Protocol, TypeVar, cast, runtime_checkable

__all__ = ["ENV_URL", "NonceEngine", "Section", "SharedRecord", "Update", "engine_for_key"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

ENV_URL = "SHMNONCE_URL"
"""Environment variable naming the engine when no ``url=`` is given (unset: shared memory)."""

Update = Callable[[list[int] | None], tuple[Sequence[int], R]]
"""``fn(values) -> (new_values, result)`` for :meth:`SharedRecord.update`.

``values`` is None when the record is new, torn (a writer was killed half-way) or
otherwise unreadable; ``fn`` then decides the safe restart value. ``fn`` may run
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
        """The current values (None: new or torn), without changing them."""
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
        """The shared record ``name`` of this sequence (see the engine for known names)."""
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


def engine_for_key(
    api_key: str | bytes,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
) -> NonceEngine:
    """The engine of one API key: ``url`` (else ``$SHMNONCE_URL``) selects Redis,
    nothing selects shared memory on this host.

    A ``url`` of another scheme is a ``ValueError``: there is no silent fallback to
    a weaker engine.
    """
    if url is None:
        url = os.environ.get(ENV_URL) or None
    if url is None:
        from ._engine import ShmNonce

        # cast until ShmNonce has enter(), aserialized() and record() (remove it then)
        return cast(NonceEngine, ShmNonce.for_api_key(api_key, state_dir=state_dir))
    if url.startswith(("redis://", "rediss://", "unix://")):
        if state_dir is not None:
            raise ValueError("state_dir= applies to the shared-memory engine, not to url=")
        try:
            redis_engine = importlib.import_module("shmnonce.redis")
        except ImportError as exc:  # the optional extra is missing
            raise ImportError(
                f"url={url.split('://', 1)[0]}://... needs the Redis engine: "
                "pip install 'shmnonce[redis]'"
            ) from exc
        engine: NonceEngine = redis_engine.RedisNonce.for_api_key(api_key, url=url)
        return engine
    raise ValueError(
        f"unsupported engine URL scheme in {url.split('://', 1)[0]!r}: use redis://, "
        "rediss:// or unix:// (or no url for shared memory on this host)"
    )
