"""Kraken private calls serialized per API key across processes (krakenex; the guard).

Kraken rejects a private call whose nonce is not above the last one it accepted
for the key, so issuing increasing nonces is not enough: a request issued
earlier can arrive later. ``KrakenAPI`` (and ``install`` on an existing
``krakenex.API``) therefore issues the nonce inside the key's section
(``serialized()``) and leaves the section only when the response (or an
error) is back. Different keys use different sequences and never wait for each
other. Inside the section a shared model of Kraken's call counter (see
``shmnonce.kraken.ratelimit``) delays calls that would exceed the key's rate limit.
``KrakenGuard`` holds this policy once, for the threads of krakenex and the
python-kraken-sdk clients (``call``) and for asyncio clients (``acall``, with
``aserialized()`` and ``asyncio.sleep``); ``shmnonce.kraken_sdk`` uses it too.

Retry policy: a response ``EAPI:Invalid nonce`` means Kraken rejected the
request before doing anything, so it is retried (once by default) with a fresh
nonce, still inside the section. Nothing else is ever retried: after a
timeout or a connection error the request may have been executed (an order
placed), so the error goes to the caller unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar, cast

import krakenex  # type: ignore[import-untyped]

from .. import _fork
from .._errors import NonceError
from .._paths import api_key_name
from .._protocol import NonceEngine, engine_for_key, resolve_url
from . import ratelimit as _ratelimit
from .ratelimit import CallCounter, RateLimit, StartupBurstGuard

__all__ = [
    "INVALID_NONCE",
    "LOCKOUT",
    "RATE_LIMIT_EXCEEDED",
    "KrakenAPI",
    "KrakenError",
    "KrakenGuard",
    "KrakenInvalidNonceError",
    "KrakenLockoutError",
    "KrakenRateLimitError",
    "RateLimit",
    "install",
]

INVALID_NONCE = "EAPI:Invalid nonce"
RATE_LIMIT_EXCEEDED = "EAPI:Rate limit exceeded"
LOCKOUT = "EGeneral:Temporary lockout"

DEFAULT_RATE_LIMIT = "starter"
DEFAULT_HTTP_TIMEOUT = 30.0
_NS = 1_000_000_000

log = logging.getLogger("shmnonce")

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class KrakenError(NonceError):
    """A Kraken error response that shmnonce surfaces as an exception.

    ``method`` is the private method, ``errors`` Kraken's error list and
    ``response`` the decoded response (``None`` when the client raised instead).
    """

    def __init__(self, message: str, *, method: str, errors: list[str],
                 response: object = None) -> None:
        super().__init__(message)
        self.method = method
        self.errors = errors
        self.response = response


class KrakenInvalidNonceError(KrakenError):
    """Kraken rejected the nonce again after the configured retries."""


class KrakenRateLimitError(KrakenError):
    """``EAPI:Rate limit exceeded``: Kraken's call counter for the key is full."""


class KrakenLockoutError(KrakenError):
    """``EGeneral:Temporary lockout``: Kraken locked the key out for a while."""


def _has(errors: list[str], code: str) -> bool:
    return any(isinstance(e, str) and e.startswith(code) for e in errors)


def _invalid_nonce_message(method: str, attempts: int, sequence: str, nonce: int) -> str:
    return (
        f"Kraken answered {INVALID_NONCE} to {method} {attempts} time(s), the last with nonce "
        f"{nonce} issued inside this key's serialized section, so no process using shmnonce "
        "for this key sent a larger one. Likely causes: another client uses the same API key "
        "with larger nonces (for example a 19-digit counter, or a tool that is not using "
        "shmnonce); or the key's nonce state on Kraken is ahead of this host's sequence "
        "(state_dir changed or was deleted). Fix: give every client its own API key, or "
        "move this key's sequence past the other client's nonces with "
        f"`shmnonce jump {sequence} DELTA_NS` (DELTA_NS: how far ahead of the current time, "
        "in nanoseconds, the other client's nonces are; add --state-dir if you use one), "
        "or raise the key's "
        "'nonce window' in Kraken's API key settings. Repeated invalid nonces lead to "
        "EGeneral:Temporary lockout, so shmnonce stops here."
    )


# --------------------------------------------------------------------------- per-client guard

_BurstOption = bool | Mapping[str, float]

_GUARDS: weakref.WeakSet[KrakenGuard] = weakref.WeakSet()
"""Every live guard, so that the after-fork hook can give each a fresh lock."""

_LOG_WAIT_INFO_NS = _NS
"""A rate-limit wait at least this long (1 s) is logged at INFO, shorter ones at DEBUG."""


class _Sleep(NamedTuple):
    """Policy step: wait ``seconds`` (still inside the key's section) before going on."""

    seconds: float


class _Send(NamedTuple):
    """Policy step: send the request once with ``nonce``; reply with an :class:`_Outcome`."""

    nonce: int


class _Outcome(NamedTuple):
    """What one attempt gave: the result or the exception, and Kraken's error list.

    ``errors`` is None when the exception is not a Kraken error response (a timeout,
    a connection error): the request may have been executed.
    """

    result: object
    exc: Exception | None
    errors: list[str] | None


_Step = _Sleep | _Send
_Policy = Generator[_Step, _Outcome | None, object]


class KrakenGuard:
    """Per-client policy and state: the key's engine, call counter, burst guard, retries.

    The key is read from the client on every call (``client.<key_attr>``), so
    ``load_key()`` after construction works; engines are cached by the key's
    hashed sequence name and the key itself is kept nowhere else. ``url`` selects
    the engine (None: ``$SHMNONCE_URL``, else shared memory on this host; see
    ``shmnonce._protocol.engine_for_key``).

    One private call is a policy (:meth:`_policy`: what to wait for, when to take
    a fresh nonce, what to retry, raise and count) run by a driver: :meth:`call`
    (threads: ``serialized()``, ``time.sleep``) or :meth:`acall` (asyncio:
    ``aserialized()``, ``asyncio.sleep``).
    """

    def __init__(
        self,
        client: object,
        *,
        key_attr: str = "key",
        state_dir: str | os.PathLike[str] | None = None,
        url: str | None = None,
        rate_limit: str | RateLimit | None = DEFAULT_RATE_LIMIT,
        burst_guard: _BurstOption = False,
        invalid_nonce_retries: int = 1,
        raise_errors: bool = True,
        lock_timeout: float | None = None,
        http_timeout: float | None = DEFAULT_HTTP_TIMEOUT,
    ) -> None:
        if not isinstance(invalid_nonce_retries, int) or invalid_nonce_retries < 0:
            raise ValueError("invalid_nonce_retries must be an int >= 0")
        resolve_url(url, state_dir)  # a bad url or url + state_dir fails here, not at the first call
        self._client = weakref.ref(client)
        self._key_attr = key_attr
        self.state_dir = state_dir
        self.url = url
        self.rate_limit = _ratelimit.resolve_rate_limit(rate_limit)
        self.burst_guard = burst_guard
        self.invalid_nonce_retries = invalid_nonce_retries
        self.raise_errors = raise_errors
        self.lock_timeout = lock_timeout
        self.http_timeout = http_timeout
        self._lock = threading.Lock()  # replaced in a forked child, see _after_fork_in_child
        self._engines: dict[str, tuple[NonceEngine, CallCounter, StartupBurstGuard | None]] = {}
        # The nonce of the attempt in progress, per thread and per asyncio task.
        self._current: ContextVar[int | None] = ContextVar("shmnonce_kraken_nonce", default=None)
        self._sleep: Callable[[float], None] = time.sleep  # the drivers' waits (tests wrap them)
        self._asleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        _GUARDS.add(self)

    def __repr__(self) -> str:
        return (f"KrakenGuard(rate_limit={self.rate_limit and self.rate_limit.name!r}, "
                f"invalid_nonce_retries={self.invalid_nonce_retries})")

    # -- engines

    def _key(self) -> str:
        client = self._client()
        key = getattr(client, self._key_attr, "") if client is not None else ""
        if not isinstance(key, str | bytes) or not key:
            raise ValueError("the Kraken client has no API key set")
        return key if isinstance(key, str) else key.decode()

    def _parts(self) -> tuple[NonceEngine, CallCounter, StartupBurstGuard | None]:
        key = self._key()
        name = api_key_name(key)
        parts = self._engines.get(name)
        if parts is not None:
            return parts
        with self._lock:
            parts = self._engines.get(name)
            if parts is None:
                eng = engine_for_key(key, state_dir=self.state_dir, url=self.url)
                try:
                    burst: StartupBurstGuard | None = None
                    if self.burst_guard:
                        opts = {} if self.burst_guard is True else dict(self.burst_guard)
                        burst = StartupBurstGuard(eng, **opts)
                    parts = (eng, CallCounter(eng, self.rate_limit), burst)
                except BaseException:
                    eng.close()
                    raise
                self._engines[name] = parts
        return parts

    @property
    def engine(self) -> NonceEngine:
        """The nonce engine (sequence) of the client's current key."""
        return self._parts()[0]

    @property
    def counter(self) -> CallCounter:
        """The shared call counter of the client's current key."""
        return self._parts()[1]

    def current_nonce(self) -> int:
        """The nonce of the call in progress in this thread or task, else a fresh one."""
        nonce = self._current.get()
        if nonce is not None:
            return nonce
        return self.engine.next()

    # -- the policy of one private call (shared by both drivers)

    def _cost(self, method: str) -> int:
        limit = self.rate_limit
        return limit.cost(method) if limit is not None else _ratelimit.DEFAULT_COSTS.get(method, 1)

    def _policy(
        self,
        method: str,
        parts: tuple[NonceEngine, CallCounter, StartupBurstGuard | None],
        entered_nonce: int,
    ) -> _Policy:
        """The steps of one private call inside the key's section; returns the result.

        Yields :class:`_Sleep` (rate-limit waits) and :class:`_Send` (one attempt,
        answered with an :class:`_Outcome`); raises the errors of the module's
        retry policy. Runs with the section held: every nonce it sends was issued
        inside the section, the first on entry, later ones after a wait or a retry.
        """
        eng, counter, burst = parts
        cost = self._cost(method)
        attempts = 0
        nonce = entered_nonce
        while True:
            waited = False
            for wait_ns in self._reservations(counter, cost, burst):
                if wait_ns:
                    waited = True
                    _log_wait(eng.name, method, wait_ns)
                    yield _Sleep(wait_ns / _NS)
            if waited or attempts:
                nonce = eng.next()  # fresh, still inside the section
            attempts += 1
            outcome = yield _Send(nonce)
            assert outcome is not None, "the driver answers _Send with an _Outcome"
            result, exc, errors = outcome
            if errors is None:  # no Kraken answer: the request may have been executed
                counter.count("transport_errors")
                assert exc is not None
                raise exc
            response = None if exc is not None else result
            if _has(errors, INVALID_NONCE):
                counter.count("invalid_nonce")
                if attempts <= self.invalid_nonce_retries:
                    counter.count("retries")
                    continue
                counter.count("invalid_nonce_raised")
                raise KrakenInvalidNonceError(
                    _invalid_nonce_message(method, attempts, eng.name, nonce),
                    method=method, errors=errors, response=response,
                ) from exc
            if _has(errors, RATE_LIMIT_EXCEEDED):
                counter.count("rate_limit_errors")
                if self.raise_errors:
                    limit = self.rate_limit
                    raise KrakenRateLimitError(
                        f"Kraken answered {RATE_LIMIT_EXCEEDED} to {method}: the key's call "
                        "counter is full. Another client may use this key, or the "
                        f"rate_limit setting ({limit and limit.name}) is above the "
                        "account's tier; choose the tier's preset or a custom RateLimit.",
                        method=method, errors=errors, response=response,
                    ) from exc
            if _has(errors, LOCKOUT):
                counter.count("lockouts")
                if self.raise_errors:
                    raise KrakenLockoutError(
                        f"Kraken answered {LOCKOUT} to {method}: the key is locked out "
                        "for a while (typically about 15 minutes) after repeated "
                        "rate-limit or nonce errors. Stop calling with this key until "
                        "then; calls during the lockout extend it.",
                        method=method, errors=errors, response=response,
                    ) from exc
            if exc is not None:
                raise exc
            return result

    @staticmethod
    def _reservations(
        counter: CallCounter, cost: int, burst: StartupBurstGuard | None
    ) -> Iterator[int]:
        """The waits before an attempt, each reserved after the previous one was waited:
        the call counter's slot, then the start-up burst guard's slot."""
        yield counter.reserve(cost)
        if burst is not None:
            yield burst.reserve()

    # -- the drivers

    def call(
        self,
        method: str,
        send: Callable[[], T],
        errors_of: Callable[[T], list[str]],
        errors_of_exc: Callable[[BaseException], list[str] | None],
    ) -> T:
        """Run one private call in this thread: serialize per key, wait, retry invalid nonces.

        ``send`` performs the request using ``current_nonce()``; ``errors_of``
        extracts Kraken's error list from a result; ``errors_of_exc`` from an
        exception the client raised for an error response (None: not a Kraken
        error response, e.g. a timeout, which is counted and re-raised).
        """
        parts = self._parts()
        with parts[0].serialized(timeout=self.lock_timeout) as entered:
            policy = self._policy(method, parts, entered)
            try:
                reply: _Outcome | None = None
                while True:
                    try:
                        step = policy.send(reply)
                    except StopIteration as done:
                        return cast(T, done.value)
                    if isinstance(step, _Sleep):
                        self._sleep(step.seconds)
                        reply = None
                        continue
                    token = self._current.set(step.nonce)
                    try:
                        result = send()
                    except Exception as e:
                        reply = _Outcome(None, e, errors_of_exc(e))
                    else:
                        reply = _Outcome(result, None, errors_of(result))
                    finally:
                        self._current.reset(token)
            finally:
                policy.close()

    async def acall(
        self,
        method: str,
        send: Callable[[], Awaitable[T]],
        errors_of: Callable[[T], Awaitable[list[str]]],
        errors_of_exc: Callable[[BaseException], list[str] | None],
    ) -> T:
        """:meth:`call` for asyncio: the same policy; waits never block the event loop.

        The key's section is entered with ``engine.aserialized()`` (each task is
        its own entrant) and rate-limit waits are ``asyncio.sleep``. ``send`` and
        ``errors_of`` are coroutine functions. Cancelling the task leaves the section.
        """
        parts = self._parts()
        async with parts[0].aserialized(timeout=self.lock_timeout) as entered:
            policy = self._policy(method, parts, entered)
            try:
                reply: _Outcome | None = None
                while True:
                    try:
                        step = policy.send(reply)
                    except StopIteration as done:
                        return cast(T, done.value)
                    if isinstance(step, _Sleep):
                        await self._asleep(step.seconds)
                        reply = None
                        continue
                    token = self._current.set(step.nonce)
                    try:
                        result = await send()
                    except Exception as e:
                        reply = _Outcome(None, e, errors_of_exc(e))
                    else:
                        reply = _Outcome(result, None, await errors_of(result))
                    finally:
                        self._current.reset(token)
            finally:
                policy.close()

    # -- reporting

    def stats(self) -> dict[str, object]:
        """Shared statistics of the current key: sequence, counter, errors, burst guard.

        Holds no secret: the sequence name is a hash of the key.
        """
        eng, counter, burst = self._parts()
        es = eng.stats()
        out: dict[str, object] = {
            "sequence": es.get("name"),
            "last_nonce": es.get("last_nonce"),
            "total_issued": es.get("total_issued"),
            "invalid_nonce_retries": self.invalid_nonce_retries,
        }
        out.update(counter.stats())
        out["burst_guard"] = burst is not None
        if burst is not None:
            out.update({f"burst_{k}": v for k, v in burst.stats().items()})
        return out

    def close(self) -> None:
        """Detach this process from the cached sequences (they live on)."""
        with self._lock:
            parts, self._engines = list(self._engines.values()), {}
        for eng, _counter, _burst in parts:
            eng.close()


def _log_wait(sequence: str, method: str, wait_ns: int) -> None:
    """Log a rate-limit wait below WARNING: it is routine, not a fault."""
    log.log(
        logging.INFO if wait_ns >= _LOG_WAIT_INFO_NS else logging.DEBUG,
        "sequence %s: %s waits %.3f s for the key's call counter or start-up spacing",
        sequence, method, wait_ns / _NS,
    )


# --------------------------------------------------------------------------- krakenex

_SESSIONS: weakref.WeakSet[krakenex.API] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """After fork: fresh guard locks; close the child's copies of pooled HTTP connections.

    A guard's lock held by another thread of the parent at fork() (attaching an
    engine, which does file I/O) would stay held forever in the child, where that
    thread does not exist; the child's first new key would then wait forever.
    Only the forking thread runs in the child, and a ``with`` block it was in
    releases the old lock object, so replacing the lock is safe.

    A keep-alive connection inherited from the parent is one TCP stream shared by
    two processes; requests of both would interleave on it.
    """
    for guard in list(_GUARDS):
        guard._lock = threading.Lock()
    for api in list(_SESSIONS):
        session = getattr(api, "session", None)
        if session is not None:
            session.close()  # closes pooled connections; the session stays usable


_fork.register(_fork.ADAPTERS, after_in_child=_after_fork_in_child)


def _krakenex_errors(result: Any) -> list[str]:
    if isinstance(result, Mapping):
        errors = result.get("error") or []
        if isinstance(errors, list):
            return [e for e in errors if isinstance(e, str)]
    return []


def _not_a_response(exc: BaseException) -> list[str] | None:
    return None


def _guarded_query_private(
    api: krakenex.API,
    guard: KrakenGuard,
    original: Callable[[str, dict[str, Any] | None, float | None], Any],
    method: str,
    data: dict[str, Any] | None,
    timeout: float | None,
) -> Any:
    if not api.key or not api.secret:
        return original(method, data, timeout)  # krakenex raises its own error
    if timeout is None:
        timeout = guard.http_timeout
    payload = {} if data is None else data
    return guard.call(
        method,
        lambda: original(method, payload, timeout),
        _krakenex_errors,
        _not_a_response,
    )


class KrakenAPI(krakenex.API):  # type: ignore[misc]
    """``krakenex.API`` whose private calls are serialized per key across processes.

    Same methods and return values as krakenex. Options (keyword-only):
    ``url`` (the engine: None means ``$SHMNONCE_URL``, else shared memory on
    this host in ``state_dir``; ``redis://...`` selects Redis), ``rate_limit``
    ("starter", "intermediate", "pro", a ``RateLimit`` or None),
    ``burst_guard`` (False, True or StartupBurstGuard keyword arguments),
    ``invalid_nonce_retries`` (default 1), ``raise_errors`` (raise
    ``KrakenRateLimitError``/``KrakenLockoutError`` instead of returning the
    error dict), ``lock_timeout`` (seconds to wait for the key's section, None:
    forever) and ``http_timeout`` (used when a call passes ``timeout=None``, so a
    hung connection cannot hold the key's section forever).
    """

    def __init__(
        self,
        key: str = "",
        secret: str = "",
        state_dir: str | os.PathLike[str] | None = None,
        *,
        url: str | None = None,
        rate_limit: str | RateLimit | None = DEFAULT_RATE_LIMIT,
        burst_guard: _BurstOption = False,
        invalid_nonce_retries: int = 1,
        raise_errors: bool = True,
        lock_timeout: float | None = None,
        http_timeout: float | None = DEFAULT_HTTP_TIMEOUT,
    ) -> None:
        super().__init__(key, secret)
        self.shmnonce = KrakenGuard(
            self, state_dir=state_dir, url=url, rate_limit=rate_limit, burst_guard=burst_guard,
            invalid_nonce_retries=invalid_nonce_retries, raise_errors=raise_errors,
            lock_timeout=lock_timeout, http_timeout=http_timeout,
        )
        _SESSIONS.add(self)

    def __repr__(self) -> str:
        return f"<shmnonce.kraken.KrakenAPI uri={self.uri!r} {self.shmnonce!r}>"

    def query_private(self, method: str, data: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """krakenex's ``query_private``, inside the key's serialized section."""
        return _guarded_query_private(
            self, self.shmnonce,
            lambda m, d, t: krakenex.API.query_private(self, m, d, t),
            method, data, timeout,
        )

    def _nonce(self) -> int:
        """The nonce issued in the current section (a fresh one outside a call)."""
        return self.shmnonce.current_nonce()

    def stats(self) -> dict[str, object]:
        """Shared statistics of the current key (see ``KrakenGuard.stats``)."""
        return self.shmnonce.stats()

    def close(self) -> None:
        """Close the HTTP session and detach from the key's sequence."""
        super().close()
        self.shmnonce.close()


def install(
    api: krakenex.API,
    state_dir: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    **options: Any,
) -> krakenex.API:
    """Give an existing ``krakenex.API`` instance the guarantees of ``KrakenAPI``.

    Overrides the instance's ``_nonce`` and ``query_private`` (the private call
    path) and adds ``api.shmnonce`` (a ``KrakenGuard``, with ``stats()``).
    ``url`` and ``options`` are those of ``KrakenAPI``. Returns ``api``;
    installing twice is a no-op.
    """
    if not isinstance(api, krakenex.API):
        raise TypeError("install() expects a krakenex.API instance")
    if isinstance(getattr(api, "shmnonce", None), KrakenGuard):
        return api
    guard = KrakenGuard(api, state_dir=state_dir, url=url, **options)
    original = api.query_private  # bound: a subclass's own query_private is kept

    def query_private(method: str, data: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """krakenex's ``query_private``, inside the key's serialized section."""
        return _guarded_query_private(api, guard, original, method, data, timeout)

    api.shmnonce = guard
    api.query_private = query_private
    api._nonce = guard.current_nonce
    _SESSIONS.add(api)
    return api
