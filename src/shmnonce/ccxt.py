"""The guarantees of ``shmnonce.kraken`` for ccxt exchanges (``ccxt`` and ``ccxt.async_support``).

``install(exchange)`` puts every private call of a ccxt exchange instance inside the
key's serialized section: the nonce comes from the key's sequence, is issued inside
the section, and the section is held until the response (or an error) is back, so
Kraken never sees a newer nonce before an older one, whatever the number of
processes, threads and asyncio tasks sharing the key. Public calls are never
serialized.

How it hooks ccxt (the seam, checked at install time)
-----------------------------------------------------
Every ccxt REST call goes through ``Exchange.fetch2(path, api, ...)``, which runs
ccxt's own throttle (``throttle(cost)``, when ``enableRateLimit``), then
``sign(path, api, ...)`` (which takes the nonce from ``nonce()``, or from
``incrementing_nonce()`` in ccxt 4.5) and ``fetch(...)``. ``install`` overrides, on
the instance only: ``fetch2`` (private calls enter the section around ccxt's own
``fetch2``), ``throttle`` (skipped inside the section), ``nonce`` and
``incrementing_nonce`` (the value issued inside the section) and ``sign`` (checks
that the request was signed with that value). Before changing anything it signs a
private request on a throw-away copy of the instance with a marker nonce and
refuses (``CcxtSeamError``, naming the missing piece) unless the marker is in the
signed request. At call time a private request whose ``sign()`` did not take the
section's nonce is refused before it is sent.

Throttling
----------
With shmnonce's shared call-counter model on (``rate_limit`` not None; Kraken's
default ``"starter"``), ccxt's per-instance throttle is *replaced* for private
calls: the shared counter (all processes of the key) decides when a private call
may start, and ccxt's throttle is not run for it. With ``rate_limit=None`` ccxt's
throttle still runs for private calls, but *before* entering the section, never
while holding it. Public calls keep ccxt's throttle unchanged.

Errors
------
ccxt's exceptions reach the caller. ``InvalidNonce`` is retried once (by default)
with a fresh nonce inside the section, as in the krakenex adapter; when Kraken
still rejects it, the error raised is a subclass of ccxt's class (``except
ccxt.InvalidNonce`` catches it) and of ``KrakenInvalidNonceError``, with a message
that explains the cause, including the one-way move from ccxt's millisecond
nonces. Rate-limit and lockout answers become the same kind of dual class (with
``raise_errors=False``: ccxt's own exception, unchanged).

Nonce unit: one-way
-------------------
ccxt's Kraken nonces are 13-digit milliseconds; shmnonce's are 19-digit
nanoseconds. Kraken keeps the largest nonce it accepted per key, so after the
first call through ``install`` every millisecond nonce of that key is too small:
a client of the same key without shmnonce (plain ccxt, an older bot) gets
``EAPI:Invalid nonce`` until the key is replaced. Move all clients of a key at
once, or give the others their own keys.

Other exchanges
---------------
``install`` works on any ccxt exchange whose ``sign()`` takes the nonce of private
calls from ``nonce()`` and where the exchange only requires nonces to increase (no
time window, room for 19 digits): there is no Kraken rate model for them
(``rate_limit`` must be None). See docs/ccxt.md for the list known to work.
Requires the optional extra ``shmnonce[ccxt]``.
"""

from __future__ import annotations

import base64
import contextvars
import copy
import importlib
import inspect
import os
import weakref
from collections.abc import Callable
from typing import Any

from . import _fork
from ._errors import NonceError
from .kraken import (
    DEFAULT_RATE_LIMIT,
    INVALID_NONCE,
    LOCKOUT,
    RATE_LIMIT_EXCEEDED,
    KrakenError,
    KrakenGuard,
    KrakenInvalidNonceError,
    KrakenLockoutError,
    KrakenRateLimitError,
    RateLimit,
)

__all__ = ["CcxtSeamError", "install"]

_PROBE_NONCE = 1234567890123456789
"""Marker nonce signed on a throw-away copy at install time (19 digits, like shmnonce's)."""

_PROBE_SECRET = base64.b64encode(bytes(64)).decode()
"""A well-formed dummy secret (Kraken's are 64 bytes, base64) for the install-time probe."""

_DEFAULT: Any = object()


class CcxtSeamError(NonceError):
    """ccxt no longer has the hook shmnonce relies on; the call was not made.

    Raised by ``install`` when the installed ccxt lacks ``fetch2``/``throttle``/
    ``nonce``/``sign`` in the expected form or a private request is not signed with
    the nonce ``nonce()`` returns, and by a private call whose request was signed
    without the section's nonce (nothing is sent then).
    """


def _ccxt(module: str = "ccxt") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError("ccxt is not installed: pip install 'shmnonce[ccxt]'") from exc


# --------------------------------------------------------------------------- per-call state


class _Call:
    """One private call in progress: which installed exchange, and the nonces it handed out."""

    __slots__ = ("last", "owner", "used")

    def __init__(self, owner: _Installed) -> None:
        self.owner = owner
        self.last: int | None = None
        self.used = 0


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("shmnonce_ccxt_call",
                                                                     default=None)
"""The private call in progress in this thread or asyncio task (None: none)."""


def _api_names(api: Any) -> list[str]:
    """ccxt passes ``api`` as a string (ccxt < 4.5) or a list of names (ccxt 4.5)."""
    if isinstance(api, str):
        return [api]
    if isinstance(api, list | tuple):
        return [str(a) for a in api]
    return [str(api)]


def _kraken_private(api: Any) -> bool:
    return _api_names(api)[:1] == ["private"]


def _generic_private(api: Any) -> bool:
    return any("private" in name.lower() for name in _api_names(api))


# --------------------------------------------------------------------------- errors


def _kraken_errors_of_exc(ccxt: Any) -> Callable[[BaseException], list[str] | None]:
    """Kraken's error codes of a ccxt exception; None: not an error answer (counted, re-raised)."""

    def errors_of_exc(exc: BaseException) -> list[str] | None:
        if not isinstance(exc, ccxt.BaseError):
            return None
        text = str(exc)
        codes = [code for code in (INVALID_NONCE, RATE_LIMIT_EXCEEDED, LOCKOUT) if code in text]
        if isinstance(exc, ccxt.InvalidNonce) and INVALID_NONCE not in codes:
            codes.append(INVALID_NONCE)
        if codes:
            return codes
        # ccxt's InvalidNonce and DDoSProtection are NetworkErrors: checked above.
        if isinstance(exc, ccxt.NetworkError):
            return None  # timeout, connection error: the request may have been executed
        return []  # another error answer (ExchangeError...): not ours to count or retry

    return errors_of_exc


def _generic_errors_of_exc(ccxt: Any) -> Callable[[BaseException], list[str] | None]:
    """Error classes of ccxt, mapped to the guard's codes for exchanges other than Kraken."""

    def errors_of_exc(exc: BaseException) -> list[str] | None:
        if not isinstance(exc, ccxt.BaseError):
            return None
        if isinstance(exc, ccxt.InvalidNonce):
            return [INVALID_NONCE]
        if isinstance(exc, ccxt.RateLimitExceeded):
            return [RATE_LIMIT_EXCEEDED]
        if isinstance(exc, ccxt.NetworkError):
            return None
        return []

    return errors_of_exc


def _no_errors(result: object) -> list[str]:
    """ccxt raises for every error answer, so a returned result carries none."""
    return []


async def _ano_errors(result: object) -> list[str]:
    """:func:`_no_errors` for the guard's asyncio driver."""
    return []


_DUALS: dict[tuple[type[BaseException], type[KrakenError]], type[KrakenError]] = {}


def _dual(ccxt_cls: type[BaseException], shm_cls: type[KrakenError]) -> type[KrakenError]:
    """A subclass of both ccxt's exception class and shmnonce's, so either ``except`` catches it."""
    cached = _DUALS.get((ccxt_cls, shm_cls))
    if cached is not None:
        return cached

    def __init__(self: KrakenError, message: str, *, method: str, errors: list[str],
                 response: object = None) -> None:
        Exception.__init__(self, message)
        self.method = method
        self.errors = errors
        self.response = response

    def __reduce__(self: KrakenError) -> tuple[Any, ...]:
        return (_rebuild, (ccxt_cls, shm_cls, str(self), self.method, self.errors))

    name = ccxt_cls.__name__
    cls = type(name, (ccxt_cls, shm_cls), {
        "__init__": __init__, "__reduce__": __reduce__, "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"ccxt's {name} raised through shmnonce, also a {shm_cls.__name__}.",
    })
    return _DUALS.setdefault((ccxt_cls, shm_cls), cls)


def _rebuild(ccxt_cls: type[BaseException], shm_cls: type[KrakenError], message: str,
             method: str, errors: list[str]) -> KrakenError:
    """Unpickle a dual exception (it crosses process boundaries in multiprocessing pools)."""
    return _dual(ccxt_cls, shm_cls)(message, method=method, errors=errors)


def _invalid_nonce_message(exchange_id: str, method: str, attempts: int, sequence: str,
                           nonce: int | None, ccxt_text: str) -> str:
    return (
        f"{exchange_id} rejected the nonce of {method} {attempts} time(s) ({ccxt_text}); the "
        f"last, {nonce}, was issued inside this key's serialized section, so no process using "
        "shmnonce for this key sent a larger one. Another client of the key sent larger "
        "nonces: one not using shmnonce with a larger counter, or shmnonce with another "
        "state_dir or host. (ccxt's own Kraken nonces are 13-digit milliseconds, below "
        "shmnonce's 19-digit nanoseconds, so a key used with plain ccxt before is not the "
        "cause; the move is one-way: from now on, plain ccxt clients of this key get "
        "InvalidNonce.) Fix: give every client its own API key or put all on shmnonce, or "
        f"move this key's sequence past the other client's nonces with `shmnonce jump "
        f"{sequence} DELTA_NS` (add --state-dir if you use one). Repeated invalid nonces "
        "lead to a temporary lockout, so shmnonce stops here."
    )


# --------------------------------------------------------------------------- the hooks


_SYNC_SESSIONS: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """After fork: close the child's copies of pooled HTTP connections of installed exchanges.

    A keep-alive connection inherited from the parent is one TCP stream shared by two
    processes; requests of both would interleave on it.
    """
    for exchange in list(_SYNC_SESSIONS):
        session = getattr(exchange, "session", None)
        if session is not None and hasattr(session, "close"):
            session.close()


_fork.register(_fork.ADAPTERS, after_in_child=_after_fork_in_child)


class _Installed:
    """What ``install`` keeps for one exchange instance: the originals and the policy."""

    def __init__(self, exchange: Any, guard: KrakenGuard, ccxt: Any, is_async: bool,
                 private: Callable[[Any], bool],
                 errors_of_exc: Callable[[BaseException], list[str] | None]) -> None:
        self.exchange_ref = weakref.ref(exchange)
        self.exchange_id = str(exchange.id)
        self.guard = guard
        self.ccxt = ccxt
        self.is_async = is_async
        self.private = private
        self.errors_of_exc = errors_of_exc
        self.fetch2 = exchange.fetch2
        self.throttle = exchange.throttle
        self.sign = exchange.sign
        self.nonce = exchange.nonce
        self.fetch2_sig = inspect.signature(self.fetch2)

    # -- shared pieces

    def current(self) -> _Call | None:
        call = _CALL.get()
        return call if call is not None and call.owner is self else None

    def next_nonce(self) -> int:
        """``nonce()``: inside a private call, the section's nonce; a second one is fresh."""
        call = self.current()
        if call is None:
            exchange = self.exchange_ref()
            if exchange is None or not getattr(exchange, "apiKey", None):
                return int(self.nonce())  # no key, no sequence: ccxt's own value
            return int(self.guard.engine.next())  # outside a private call: a fresh value
        nonce = int(self.guard.current_nonce())
        if call.last is not None and nonce <= call.last:
            # sign() asked twice in one attempt, or ccxt retried inside fetch2: fresh, and
            # still inside the section, so still in order
            nonce = int(self.guard.engine.next())
        call.last = nonce
        call.used += 1
        return nonce

    def checked_sign(self, *args: Any, **kwargs: Any) -> Any:
        """ccxt's ``sign``; inside a private call, refuse a request not signed with our nonce."""
        call = self.current()
        if call is None:
            return self.sign(*args, **kwargs)
        before = call.used
        request = self.sign(*args, **kwargs)
        if call.used == before:
            raise CcxtSeamError(
                f"ccxt {self.ccxt.__version__}: {self.exchange_id}.sign() signed a private "
                f"request ({_api_names(args[1] if len(args) > 1 else kwargs.get('api'))}) "
                "without calling nonce() or incrementing_nonce(), so shmnonce cannot order it; "
                "the request was not sent. This ccxt version is not supported by "
                "shmnonce.ccxt for this exchange."
            )
        return request

    def ccxt_cost(self, path: Any, api: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
        """The cost ccxt's own ``fetch2`` would pass to its throttle."""
        exchange = self.exchange_ref()
        if exchange is None:  # pragma: no cover - the caller holds the exchange
            return 1
        bound = self.fetch2_sig.bind(path, api, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return exchange.calculate_rate_limiter_cost(api, a.get("method", "GET"), path,
                                                    a.get("params", {}), a.get("config", {}))

    def ccxt_throttle_first(self) -> bool:
        """Run ccxt's throttle before entering: only when shmnonce's rate model is off."""
        exchange = self.exchange_ref()
        return bool(exchange is not None and exchange.enableRateLimit
                    and self.guard.rate_limit is None)

    def translate(self, err: KrakenError, method: str, call: _Call) -> BaseException:
        """The guard's error as a subclass of the ccxt exception that caused it."""
        cause = err.__cause__
        if cause is None or not isinstance(cause, self.ccxt.BaseError):
            return err
        if isinstance(err, KrakenInvalidNonceError):
            message = _invalid_nonce_message(
                self.exchange_id, method, self.guard.invalid_nonce_retries + 1,
                str(self.guard.engine.name), call.last, str(cause))
            shm_cls: type[KrakenError] = KrakenInvalidNonceError
        elif isinstance(err, KrakenRateLimitError | KrakenLockoutError):
            message = f"{err} ({cause})"
            shm_cls = type(err)
        else:  # pragma: no cover - the guard raises no other KrakenError
            return err
        return _dual(type(cause), shm_cls)(message, method=err.method, errors=err.errors,
                                           response=err.response)

    # -- sync

    def sync_throttle(self, cost: Any = None) -> Any:
        if self.current() is not None:
            return None  # a private call in the section: throttled before, or by the model
        return self.throttle(cost)

    def sync_fetch2(self, path: Any, api: Any = "public", *args: Any, **kwargs: Any) -> Any:
        exchange = self.exchange_ref()
        if (exchange is None or not self.private(api) or self.current() is not None
                or not exchange.apiKey):
            # public; or no key (ccxt raises its own AuthenticationError in sign)
            return self.fetch2(path, api, *args, **kwargs)
        if self.ccxt_throttle_first():
            self.throttle(self.ccxt_cost(path, api, args, kwargs))
        call = _Call(self)
        token = _CALL.set(call)
        method = str(path)
        try:
            return self.guard.call(method, lambda: self.fetch2(path, api, *args, **kwargs),
                                   _no_errors, self.errors_of_exc)
        except KrakenError as err:
            translated = self.translate(err, method, call)
            if translated is err:
                raise
            raise translated from err.__cause__
        finally:
            _CALL.reset(token)

    # -- async

    async def async_fetch2(self, path: Any, api: Any = "public", *args: Any, **kwargs: Any) -> Any:
        exchange = self.exchange_ref()
        if (exchange is None or not self.private(api) or self.current() is not None
                or not exchange.apiKey):
            return await self.fetch2(path, api, *args, **kwargs)
        if self.ccxt_throttle_first():
            await self.throttle(self.ccxt_cost(path, api, args, kwargs))
        call = _Call(self)
        token = _CALL.set(call)
        method = str(path)
        try:
            return await self.guard.acall(
                method, lambda: self.fetch2(path, api, *args, **kwargs), _ano_errors,
                self.errors_of_exc)
        except KrakenError as err:
            translated = self.translate(err, method, call)
            if translated is err:
                raise
            raise translated from err.__cause__
        finally:
            _CALL.reset(token)


class _AsyncThrottle:
    """ccxt's async throttle, skipped inside a private call's section.

    ccxt up to 4.3 keeps a ``Throttler`` object in ``exchange.throttle`` and sets its
    ``loop`` attribute later (``open()``); attributes are therefore forwarded to it.
    From 4.4 on ``throttle`` is a coroutine method.
    """

    def __init__(self, state: _Installed, original: Any) -> None:
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_original", original)

    def __call__(self, cost: Any = None) -> Any:
        if self._state.current() is not None:
            return _skipped()  # a private call in the section: before, or by the model
        return self._original(cost)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._original, name, value)


async def _skipped() -> None:
    return None


# --------------------------------------------------------------------------- install


def _entries(cls: type) -> list[Any]:
    """ccxt's implicit-API endpoint descriptors of an exchange class (``Entry``)."""
    types = _ccxt("ccxt.base.types")
    entry_cls = getattr(types, "Entry", None)
    if entry_cls is None:
        raise CcxtSeamError(f"ccxt {_ccxt().__version__} has no ccxt.base.types.Entry "
                            "(the implicit API endpoints): not supported by shmnonce.ccxt")
    return [v for _k, v in sorted(inspect.getmembers_static(cls), key=lambda kv: kv[0])
            if isinstance(v, entry_cls)]


def _probe_endpoint(exchange: Any, private: Callable[[Any], bool]) -> Any:
    entries = [e for e in _entries(type(exchange)) if private(e.api)]
    if not entries:
        raise CcxtSeamError(f"{exchange.id}: no private endpoint found in ccxt's implicit API "
                            "(pass private= if its private APIs are not named 'private')")
    for e in entries:
        if exchange.id == "kraken" and e.path == "Balance":
            return e
    return entries[0]


def _check_seam(exchange: Any, private: Callable[[Any], bool], is_async: bool) -> None:
    """Refuse (``CcxtSeamError``) unless this ccxt signs private requests with ``nonce()``."""
    ccxt = _ccxt()
    version = getattr(ccxt, "__version__", "?")
    for name in ("fetch2", "throttle", "sign", "nonce", "calculate_rate_limiter_cost"):
        if not callable(getattr(exchange, name, None)):
            raise CcxtSeamError(f"ccxt {version}: {type(exchange).__name__}.{name}() is missing; "
                                "shmnonce.ccxt hooks it and cannot protect this exchange")
    for name in ("fetch2", "throttle"):
        attr = getattr(exchange, name)
        if name == "throttle" and is_async and not inspect.isroutine(attr):
            continue  # ccxt <= 4.3: a Throttler object whose call returns an awaitable
        if inspect.iscoroutinefunction(attr) != is_async:
            raise CcxtSeamError(
                f"ccxt {version}: {type(exchange).__name__}.{name}() is "
                f"{'not ' if is_async else ''}a coroutine function, unlike the ccxt versions "
                "shmnonce.ccxt supports")
    params = list(inspect.signature(exchange.fetch2).parameters)
    if params[:2] != ["path", "api"]:
        raise CcxtSeamError(f"ccxt {version}: fetch2{tuple(params)} no longer starts with "
                            "(path, api); shmnonce.ccxt cannot tell private calls apart")
    entry = _probe_endpoint(exchange, private)
    probe = copy.copy(exchange)
    probe.options = dict(exchange.options) if isinstance(exchange.options, dict) else {}
    for cred in ("apiKey", "secret"):
        if not getattr(probe, cred, None):
            setattr(probe, cred, "shmnonce-probe" if cred == "apiKey" else _PROBE_SECRET)
    required = getattr(probe, "requiredCredentials", {}) or {}
    for cred, needed in required.items():
        if needed and not getattr(probe, cred, None):
            setattr(probe, cred, "shmnonce-probe")
    probe.nonce = lambda: _PROBE_NONCE
    probe.incrementing_nonce = lambda: _PROBE_NONCE
    try:
        request = type(exchange).sign(probe, entry.path, entry.api, entry.method, {})
    except Exception as exc:
        raise CcxtSeamError(
            f"ccxt {version}: signing a private {exchange.id} request ({entry.path}) for the "
            f"install-time check failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for attr in ("session", "socks_proxy_sessions"):  # a copy must not close shared sessions
            if attr in probe.__dict__:
                probe.__dict__[attr] = None
    signed = " ".join(str(request.get(k)) for k in ("url", "body", "headers")
                      ) if isinstance(request, dict) else ""
    if str(_PROBE_NONCE) not in signed:
        raise CcxtSeamError(
            f"ccxt {version}: {exchange.id}.sign() did not take the nonce of a private request "
            f"({entry.path}) from nonce() or incrementing_nonce(); shmnonce.ccxt cannot order "
            "its calls. Pin ccxt to a supported version (see docs/ccxt.md).")


def install(
    exchange: Any,
    state_dir: str | os.PathLike[str] | None = None,
    rate_limit: str | RateLimit | None = _DEFAULT,
    url: str | None = None,
    *,
    private: Callable[[Any], bool] | None = None,
    **options: Any,
) -> Any:
    """Serialize ``exchange``'s private calls per API key across processes; return it.

    ``exchange`` is a ccxt exchange instance, sync (``ccxt.kraken``) or async
    (``ccxt.async_support.kraken``). ``rate_limit``: Kraken's shared call-counter
    model ("starter" by default for Kraken; "intermediate", "pro", a ``RateLimit``,
    or None); for other exchanges it must be None. ``url``: the engine (None:
    ``$SHMNONCE_URL``, else shared memory on this host). ``private(api) -> bool``
    tells private calls apart (default: Kraken's ``api[0] == 'private'``, elsewhere
    any api name containing "private"). ``options`` are those of
    ``shmnonce.kraken.KrakenAPI`` except ``http_timeout`` (ccxt has ``timeout``):
    ``invalid_nonce_retries``, ``raise_errors``, ``lock_timeout``, ``burst_guard``.

    Adds ``exchange.shmnonce`` (a ``KrakenGuard``, with ``stats()``). Installing
    twice is a no-op. Moving a key from ccxt's millisecond nonces to shmnonce's
    nanosecond nonces is one-way: see the module documentation.
    """
    ccxt = _ccxt()
    base = _ccxt("ccxt.base.exchange")
    root = getattr(base, "BaseExchange", base.Exchange)  # 4.5: the sync and async classes' root
    if not isinstance(exchange, root):
        raise TypeError("install() expects a ccxt exchange instance (e.g. ccxt.kraken(...))")
    if isinstance(getattr(exchange, "shmnonce", None), KrakenGuard):
        return exchange
    base_async = _ccxt("ccxt.async_support.base.exchange").Exchange
    is_async = isinstance(exchange, base_async)
    is_kraken = exchange.id == "kraken"
    if rate_limit is _DEFAULT:
        rate_limit = DEFAULT_RATE_LIMIT if is_kraken else None
    if rate_limit is not None and not is_kraken:
        raise ValueError(f"rate_limit= models Kraken's call counter; for {exchange.id} use "
                         "rate_limit=None (ccxt's own throttle then runs before the section)")
    options.pop("http_timeout", None)
    if private is None:
        private = _kraken_private if is_kraken else _generic_private
    _check_seam(exchange, private, is_async)
    guard = KrakenGuard(exchange, key_attr="apiKey", state_dir=state_dir, url=url,
                        rate_limit=rate_limit, http_timeout=None, **options)
    errors_of_exc = _kraken_errors_of_exc(ccxt) if is_kraken else _generic_errors_of_exc(ccxt)
    state = _Installed(exchange, guard, ccxt, is_async, private, errors_of_exc)
    if getattr(exchange, "apiKey", None):
        # Attach now (files, segment, an fsync on creation) rather than inside the first
        # private call, which in asyncio would run on the event loop.
        guard.engine  # noqa: B018
    exchange.shmnonce = guard
    exchange.nonce = state.next_nonce
    if callable(getattr(exchange, "incrementing_nonce", None)):
        exchange.incrementing_nonce = state.next_nonce
    exchange.sign = state.checked_sign
    if is_async:
        exchange.fetch2 = state.async_fetch2
        exchange.throttle = _AsyncThrottle(state, state.throttle)
    else:
        exchange.fetch2 = state.sync_fetch2
        exchange.throttle = state.sync_throttle
        _SYNC_SESSIONS.add(exchange)
    return exchange
