"""Drop-in replacement for a process-global Kraken nonce manager, shared by every process.

Many bots use a "global Kraken nonce manager" module with these names::

    get_global_nonce_manager()      # the manager object (singleton)
    get_global_kraken_nonce()       # next nonce
    get_kraken_nonce()              # legacy alias
    get_kraken_api_lock()           # with get_kraken_api_lock(): api.query_private(...)
    get_global_nonce_stats()        # dict of counters

That design keeps its state in one process, so two workers of the same bot issue
colliding nonces and call Kraken in parallel. Here the same names are backed by a
shmnonce sequence (shared memory, or Redis with ``url=``): nonces are unique and
increasing across every process using it, the lock excludes other processes as well
as other threads, and the statistics cover every process. Switching is one import::

    # before
    from bot.global_kraken_nonce import get_global_kraken_nonce, get_kraken_api_lock
    # after
    from shmnonce.compat import get_global_kraken_nonce, get_kraken_api_lock

Which sequence is used (first match wins):

1. :func:`configure` (``name=``, ``state_dir=`` or ``api_key=``), called before first use;
2. ``SHMNONCE_COMPAT_NAME`` (and ``SHMNONCE_COMPAT_STATE_DIR``);
3. ``SHMNONCE_COMPAT_KEY_ENV``: the name of an environment variable holding the API
   key; the sequence is then the key's own sequence, the one
   ``shmnonce.kraken.KrakenAPI`` uses for that key (only a hash of the key is kept);
4. the name ``kraken-global``.

The engine is Redis when ``configure(url=...)`` or ``SHMNONCE_URL`` names one
(``redis://``, ``rediss://``, ``unix://``), else shared memory on this host, whose
state directory is ``state_dir=``, else ``SHMNONCE_COMPAT_STATE_DIR``, else the
engine's default (``SHMNONCE_STATE_DIR``, ``$XDG_STATE_HOME/shmnonce``, ...). A state
directory and a URL together are a ``ValueError``.
The start-up guard takes ``SHMNONCE_COMPAT_STARTUP_WINDOW_S`` (default 10),
``SHMNONCE_COMPAT_MIN_SPACING_S`` (0.5) and ``SHMNONCE_COMPAT_MAX_BURST_RATE`` (20).
A wait of more than 5 s for the API lock is logged at INFO by the engine.

Each function documents where it differs from the single-process original.
:func:`import_legacy` (from ``shmnonce.kraken.legacy``) raises a sequence above the values
in the original's nonce files; run it (or ``shmnonce import-legacy``) once before the
switch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, NamedTuple

from . import _fork
from ._errors import LockTimeout, NonceError
from ._paths import api_key_name, resolve_state_dir, validate_name
from ._protocol import ENV_URL, NonceEngine, Section, engine_for_name, resolve_url
from .kraken.legacy import LegacyImport, LegacyImportError, import_legacy
from .kraken.ratelimit import StartupBurstGuard

__all__ = [
    "CompatLock",
    "GlobalKrakenNonceManager",
    "LegacyImport",
    "LegacyImportError",
    "close_global_nonce_manager",
    "configure",
    "get_global_kraken_nonce",
    "get_global_nonce_manager",
    "get_global_nonce_stats",
    "get_kraken_api_lock",
    "get_kraken_nonce",
    "import_legacy",
    "jump_global_kraken_nonce_forward",
]

log = logging.getLogger("shmnonce")

ENV_NAME = "SHMNONCE_COMPAT_NAME"
ENV_STATE_DIR = "SHMNONCE_COMPAT_STATE_DIR"
ENV_KEY_ENV = "SHMNONCE_COMPAT_KEY_ENV"
ENV_STARTUP_WINDOW = "SHMNONCE_COMPAT_STARTUP_WINDOW_S"
ENV_MIN_SPACING = "SHMNONCE_COMPAT_MIN_SPACING_S"
ENV_MAX_BURST = "SHMNONCE_COMPAT_MAX_BURST_RATE"
DEFAULT_NAME = "kraken-global"

_NS = 1_000_000_000
_RING = 16
"""How many of the latest nonce times (host-wide) ``recent_burst_rate`` is computed over."""

COUNTERS_RECORD = "compat.counters"
"""The engine's shared record of the compat counters (24 u64 fields): started_at (wall
ns), nonces, lock_entries, lock_waits, lock_wait_ns, rate_limited, rate_limited_ns,
ring_pos, ring[16] (monotonic ns)."""
_STARTED, _NONCES, _ENTRIES, _LWAITS, _LWAIT_NS, _RLIM, _RLIM_NS, _RPOS = range(8)
_RING0 = 8
_FIELDS = _RING0 + _RING
_U64 = 2**64 - 1
_LOCK_WAIT_COUNTED_NS = 1_000_000
"""An API-lock entry that waited longer than this (1 ms) counts in ``api_lock_waits``."""


# --------------------------------------------------------------------------- settings


def _env_float(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {var}={raw!r} is not a number") from None
    if not value >= 0:
        raise ValueError(f"environment variable {var}={raw!r} must be >= 0")
    return value


class _Place(NamedTuple):
    """Where a manager's sequence lives: shared memory (``state_dir``) or Redis (``url``)."""

    name: str
    state_dir: str | None
    """The resolved state directory (shared memory), else None."""
    url: str | None
    """The engine URL (Redis), else None; never logged or shown (it may hold a password)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, "url:" + self.url if self.url is not None else "dir:" + str(self.state_dir))


@dataclass(frozen=True)
class _Settings:
    name: str | None = None
    state_dir: str | None = None
    startup_window_s: float | None = None
    min_spacing_s: float | None = None
    max_burst_rate: float | None = None
    url: str | None = None

    def place(self) -> _Place:
        """The sequence and engine the settings (then the environment) select."""
        name, state_dir = self.sequence()
        url = self.url if self.url is not None else (os.environ.get(ENV_URL) or None)
        if url is not None and state_dir is not None:
            raise ValueError(
                "shmnonce.compat: both a state directory (state_dir= or "
                f"{ENV_STATE_DIR}) and an engine URL (url= or {ENV_URL}) are set; they "
                "select different engines: set only one"
            )
        url = resolve_url(url)
        if url is None:
            return _Place(name, resolve_state_dir(state_dir), None)
        return _Place(name, None, url)

    def sequence(self) -> tuple[str, str | None]:
        """(sequence name, state_dir or None) from the settings, then the environment."""
        state_dir = self.state_dir or os.environ.get(ENV_STATE_DIR) or None
        if self.name is not None:  # configure(api_key=...) stored the key's hashed name
            return validate_name(self.name), state_dir
        env_name = os.environ.get(ENV_NAME)
        if env_name:
            return validate_name(env_name), state_dir
        key_var = os.environ.get(ENV_KEY_ENV)
        if key_var:
            key = os.environ.get(key_var)
            if not key:
                raise ValueError(
                    f"{ENV_KEY_ENV} names the environment variable {key_var!r}, which is unset or empty"
                )
            return api_key_name(key), state_dir
        return DEFAULT_NAME, state_dir

    def guard(self) -> tuple[float, float, float]:
        """(min_spacing_s, window_s, max_per_s) of the start-up burst guard."""
        return (
            self.min_spacing_s if self.min_spacing_s is not None else _env_float(ENV_MIN_SPACING, 0.5),
            self.startup_window_s if self.startup_window_s is not None
            else _env_float(ENV_STARTUP_WINDOW, 10.0),
            self.max_burst_rate if self.max_burst_rate is not None else _env_float(ENV_MAX_BURST, 20.0),
        )


_settings = _Settings()
_registry: dict[tuple[str, str], GlobalKrakenNonceManager] = {}
_default_key: tuple[str, str] | None = None
_registry_lock = threading.Lock()
_managers: weakref.WeakSet[GlobalKrakenNonceManager] = weakref.WeakSet()


def _after_fork_child() -> None:
    """Fresh locks in a forked child: a thread of the parent may have held one at fork()."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for mgr in list(_managers):
        mgr._flag_lock = threading.Lock()


_fork.register(_fork.ADAPTERS, after_in_child=_after_fork_child)


def configure(
    name: str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    *,
    api_key: str | bytes | None = None,
    url: str | None = None,
    startup_window_s: float | None = None,
    min_spacing_s: float | None = None,
    max_burst_rate: float | None = None,
) -> None:
    """Choose the sequence and tuning of the process-global manager (not in the original).

    Call it before the first use of the other functions; arguments left ``None``
    fall back to the environment variables (see the module docs). ``api_key``
    selects the key's own sequence (the one ``shmnonce.kraken`` uses); the key is
    only hashed, never stored. ``url`` selects the Redis engine (None:
    ``SHMNONCE_URL``, else shared memory). Calling it again with other values after the
    manager was created raises :class:`NonceError`: code holding the old manager
    or lock would otherwise use another sequence than new code.
    """
    global _settings
    if name is not None and api_key is not None:
        raise ValueError("give either name or api_key, not both")
    for label, value in (
        ("startup_window_s", startup_window_s), ("min_spacing_s", min_spacing_s),
        ("max_burst_rate", max_burst_rate),
    ):
        if value is not None and not value >= 0:
            raise ValueError(f"{label} must be >= 0")
    if name is not None:
        validate_name(name)
    if api_key is not None:
        name = api_key_name(api_key)  # keep only the hash of the key
    new = _Settings(
        name, None if state_dir is None else os.fspath(state_dir),
        startup_window_s, min_spacing_s, max_burst_rate, url,
    )
    if url is not None:
        # a bad URL fails here, not at the first nonce
        resolve_url(url, None if state_dir is None else os.fspath(state_dir))
    with _registry_lock:
        current = _registry.get(_default_key) if _default_key is not None else None
        if current is not None and not current._closed:
            same = (
                new.place().key == current._place.key
                and new.guard() == current._settings.guard()
            )
            if not same:
                raise NonceError(
                    "shmnonce.compat is already in use with sequence "
                    f"{current.engine.name!r}; call configure() before the first nonce or lock"
                )
        _settings = new


def close_global_nonce_manager() -> None:
    """Detach every compat manager of this process (not in the original).

    The sequence lives on; the next call of any function here attaches again.
    Managers and locks obtained before are closed and raise :class:`NonceError`.
    """
    global _default_key
    with _registry_lock:
        managers = list(_registry.values())
        _registry.clear()
        _default_key = None
    for mgr in managers:
        mgr.close()


# --------------------------------------------------------------------------- counters


class _Counters:
    """The compat counters, a shared record of the sequence (torn-safe).

    A torn record (a writer killed mid-update, detected by the engine) restarts the
    counters from zero, logged as a warning.
    """

    def __init__(self, eng: NonceEngine) -> None:
        self._name = eng.name
        self._record = eng.record(COUNTERS_RECORD, _FIELDS)

    def _update(self, apply: Callable[[list[int]], None] | None) -> list[int]:
        if apply is None:
            stored = self._record.read()
            if stored is not None and stored[_STARTED] != 0:
                return stored  # a plain read: nothing to initialise

        def fn(stored: list[int] | None) -> tuple[list[int], tuple[list[int], bool]]:
            if stored is None or stored[_STARTED] == 0:  # torn, or never written
                vals = [0] * _FIELDS
                vals[_STARTED] = time.time_ns()
            else:
                vals = list(stored)
            if apply is not None:
                apply(vals)
            vals = [min(v, _U64) for v in vals]
            return vals, (vals, stored is None)

        vals, torn = self._record.update(fn)
        if torn:
            log.warning(
                "sequence %r: the compat counters were torn (a process was killed while "
                "updating them); they restart from zero", self._name,
            )
        return vals

    def nonce(self, waited_ns: int) -> None:
        def apply(v: list[int]) -> None:
            v[_NONCES] += 1
            v[_RING0 + v[_RPOS] % _RING] = time.monotonic_ns()  # under the record's lock
            v[_RPOS] += 1
            if waited_ns > 0:
                v[_RLIM] += 1
                v[_RLIM_NS] += waited_ns

        self._update(apply)

    def lock_entry(self, waited_ns: int) -> None:
        def apply(v: list[int]) -> None:
            v[_ENTRIES] += 1
            if waited_ns > _LOCK_WAIT_COUNTED_NS:
                v[_LWAITS] += 1
            v[_LWAIT_NS] += waited_ns

        self._update(apply)

    def clear_ring(self) -> None:
        def apply(v: list[int]) -> None:
            v[_RPOS] = 0
            v[_RING0:] = [0] * _RING

        self._update(apply)

    def reset(self) -> None:
        now = time.time_ns()

        def apply(v: list[int]) -> None:
            v[:] = [0] * len(v)
            v[_STARTED] = now

        self._update(apply)

    def snapshot(self) -> list[int]:
        return self._update(None)


def _burst_rate(vals: list[int]) -> float:
    """Nonces per second over the latest (up to 16) nonces issued through compat, host-wide."""
    n = min(vals[_RPOS], _RING)
    if n < 2:
        return 0.0
    pos = vals[_RPOS]
    newest = vals[_RING0 + (pos - 1) % _RING]
    oldest = vals[_RING0 + (pos - n) % _RING]
    span = newest - oldest
    return (n - 1) / (span / _NS) if span > 0 else 0.0


# --------------------------------------------------------------------------- the lock


@dataclass
class _Hold:
    pid: int
    depth: int
    section: Section


class CompatLock:
    """The API lock: the engine's section (``engine.enter()``) made re-entrant per thread.

    Differences from the original ``threading.RLock``:

    * it excludes every thread of every process attached to the sequence, not only
      the threads of this process; waiters are served in arrival order and the lock
      is freed if its holder dies (even by SIGKILL);
    * re-entrant like the original's RLock: the outermost ``acquire()`` of a thread
      enters the section, nested ones only count, and the section is left at the
      matching outermost ``release()``. (The engine's ``serialized()`` itself raises
      ``NonceError`` when a thread enters it twice; code written for the RLock nests
      ``with get_kraken_api_lock():`` blocks, so the compat lock counts instead.)
      Only the thread that acquired may release (``RuntimeError`` otherwise);
    * a child forked while a thread held the lock does not hold it: the section
      belongs to the parent;
    * entering issues one nonce inside the section (the engine's section does); it is
      available as :attr:`nonce` and counts in ``sequence_total_issued``, not in
      ``total_nonces_issued``;
    * a wait longer than 5 s is logged at INFO on the ``shmnonce`` logger (by the engine).
    """

    def __init__(self, manager: GlobalKrakenNonceManager) -> None:
        self._mgr = manager
        self._local = threading.local()

    def _hold(self) -> _Hold | None:
        hold: _Hold | None = getattr(self._local, "hold", None)
        if hold is not None and hold.pid != os.getpid():
            self._local.hold = None  # inherited through fork(): the parent holds the section
            return None
        return hold

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire like ``threading.RLock.acquire``; True when acquired.

        ``blocking=False`` tries once; ``timeout`` (seconds, -1 = forever) bounds the
        wait and returns False on expiry, as the RLock does.
        """
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        hold = self._hold()
        if hold is not None:
            hold.depth += 1
            return True
        wait: float | None = 0.0 if not blocking else (None if timeout == -1 else float(timeout))
        t0 = time.monotonic_ns()
        try:
            section = self._mgr.engine.enter(timeout=wait)
        except LockTimeout:
            return False
        waited_ns = time.monotonic_ns() - t0
        self._local.hold = _Hold(os.getpid(), 1, section)
        try:
            self._mgr._lock_entered(waited_ns)
        except BaseException:
            self._local.hold = None
            section.leave()
            raise
        return True

    def release(self) -> None:
        """Release one level; the section is left when the outermost level is released."""
        hold = self._hold()
        if hold is None:
            raise RuntimeError("cannot release un-acquired lock")
        hold.depth -= 1
        if hold.depth == 0:
            self._local.hold = None
            hold.section.leave()

    def _is_owned(self) -> bool:
        """True if the calling thread holds the lock (the RLock's private helper)."""
        return self._hold() is not None

    @property
    def nonce(self) -> int | None:
        """The nonce issued when this thread entered (None if it does not hold the lock)."""
        hold = self._hold()
        return None if hold is None else hold.section.nonce

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        hold = self._hold()
        state = "unlocked by this thread" if hold is None else f"held by this thread (depth {hold.depth})"
        return f"<shmnonce.compat.CompatLock sequence={self._mgr.engine.name!r} {state}>"


# --------------------------------------------------------------------------- the manager


class GlobalKrakenNonceManager:
    """The manager object, backed by one shared sequence (shared memory or Redis).

    ``GlobalKrakenNonceManager()`` returns the process-global manager, as the
    original's singleton did. ``GlobalKrakenNonceManager(name, state_dir)`` or
    ``GlobalKrakenNonceManager(api_key=...)`` (not in the original; both also take
    ``url=``) returns the manager of another sequence; one manager exists per
    sequence and process, so all locks of a sequence in a process are the same object.
    """

    STARTUP_RATE_LIMIT_SECONDS: float = 0.5
    STARTUP_BURST_WINDOW: float = 10.0
    MAX_BURST_RATE: float = 20.0

    _closed: bool
    _settings: _Settings
    _place: _Place
    engine: NonceEngine
    _counters: _Counters
    _guard_obj: StartupBurstGuard | None
    _flag_lock: threading.Lock
    _serialization: bool
    _process_issued: int
    _api_lock: CompatLock

    def __new__(
        cls,
        name: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        api_key: str | bytes | None = None,
        url: str | None = None,
    ) -> GlobalKrakenNonceManager:
        if name is None and state_dir is None and api_key is None and url is None:
            return get_global_nonce_manager()
        if name is not None and api_key is not None:
            raise ValueError("give either name or api_key, not both")
        settings = replace(
            _settings, name=name if api_key is None else api_key_name(api_key),
            state_dir=None if state_dir is None else os.fspath(state_dir),
            url=_settings.url if url is None else url,
        )
        return _manager_for(settings, default=False)

    @classmethod
    def _create(cls, settings: _Settings, place: _Place) -> GlobalKrakenNonceManager:
        self = object.__new__(cls)
        self._settings = settings
        self._place = place
        self._closed = False
        self.engine = engine_for_name(place.name, state_dir=place.state_dir, url=place.url)
        try:
            self._counters = _Counters(self.engine)
        except BaseException:
            self.engine.close()
            raise
        spacing, window, max_rate = settings.guard()
        self.STARTUP_RATE_LIMIT_SECONDS = spacing
        self.STARTUP_BURST_WINDOW = window
        self.MAX_BURST_RATE = max_rate
        self._guard_obj = None
        self._flag_lock = threading.Lock()  # replaced in a forked child, see _after_fork_child
        self._serialization = True
        self._process_issued = 0
        self._api_lock = CompatLock(self)
        _managers.add(self)
        if place.url is None:
            log.info(
                "shmnonce.compat: using sequence %r in %s (segment %s)",
                self.engine.name, place.state_dir, self.engine.stats().get("segment"),
            )
        else:  # the URL is not logged: it may hold a password
            log.info("shmnonce.compat: using sequence %r on Redis", self.engine.name)
        return self

    def _guard(self) -> StartupBurstGuard:
        guard = self._guard_obj
        if guard is None:
            guard = StartupBurstGuard(
                self.engine,
                min_spacing_s=self.STARTUP_RATE_LIMIT_SECONDS,
                window_s=self.STARTUP_BURST_WINDOW,
                max_per_s=self.MAX_BURST_RATE,
            )
            self._guard_obj = guard
        return guard

    def _lock_entered(self, waited_ns: int) -> None:
        self._counters.lock_entry(waited_ns)

    # -- the original's methods -----------------------------------------------------
    def get_nonce(self, apply_rate_limiting: bool = True) -> int:
        """The next nonce, unique and increasing across all processes on the host.

        Differences: ``apply_rate_limiting=True`` applies the host-wide start-up
        burst guard of ``shmnonce.kraken.ratelimit`` instead of a per-process one: during
        the first ``STARTUP_BURST_WINDOW`` seconds after the sequence's segment was
        created (normally the first worker's start, or a reboot), nonces asked for
        with rate limiting are spaced ``max(STARTUP_RATE_LIMIT_SECONDS,
        1 / MAX_BURST_RATE)`` apart across all processes, from the first one on (the
        original spaced them only once its own process exceeded 20/s, and its window
        started with each process). Processes that start later never wait. The wait
        happens before the nonce is issued and outside any lock except the API lock
        if the caller holds it. Nothing is written to a text file per nonce: the
        engine persists a ceiling ahead of the values instead.
        """
        waited_ns = 0
        if apply_rate_limiting:
            waited_ns = int(self._guard().acquire() * _NS)
        nonce = self.engine.next()
        self._counters.nonce(waited_ns)
        with self._flag_lock:
            self._process_issued += 1
        return nonce

    def jump_forward(self, nanoseconds: int) -> int:
        """Set the last value to ``max(last, now) + nanoseconds`` and return it.

        Same result as the original (``max(now + ns, last + ns)``), for every process.
        Difference: ``nanoseconds`` must be a non-negative int (else ``ValueError``)
        and the result must stay below 2**64; the original also accepted negative
        values, which would move the sequence backwards.
        """
        return self.engine.jump_forward(nanoseconds)

    def get_api_call_lock(self) -> CompatLock:
        """The API lock; the same object as :func:`get_kraken_api_lock` returns.

        Difference: a :class:`CompatLock` (cross-process, re-entrant per thread)
        instead of a ``threading.RLock``; it supports ``with``, ``acquire(blocking,
        timeout)`` and ``release()`` like the RLock.
        """
        return self._api_lock

    def enable_api_serialization(self) -> None:
        """Set the advisory flag (default: enabled). As in the original, the lock
        works the same either way; the flag only tells callers whether to use it.
        Difference: the flag is per process (each worker runs its own start-up code).
        """
        with self._flag_lock:
            self._serialization = True
        log.info("sequence %r: API call serialization enabled", self.engine.name)

    def disable_api_serialization(self) -> None:
        """Clear the advisory flag (per process; the lock keeps excluding, see enable)."""
        with self._flag_lock:
            self._serialization = False
        log.warning(
            "sequence %r: API call serialization disabled in process %d (not recommended)",
            self.engine.name, os.getpid(),
        )

    def is_api_serialization_enabled(self) -> bool:
        """The advisory flag of this process."""
        with self._flag_lock:
            return self._serialization

    def set_rate_limiting(self, enabled: bool) -> None:
        """Kept for code that calls it; as in the original it only logs (the
        ``apply_rate_limiting`` argument of :meth:`get_nonce` decides)."""
        log.info(
            "sequence %r: start-up burst protection %s (per call: apply_rate_limiting)",
            self.engine.name, "enabled" if enabled else "disabled",
        )

    def reset_burst_tracking(self) -> None:
        """Forget the recent nonce times behind ``recent_burst_rate`` (host-wide)."""
        self._counters.clear_ring()

    def reset_for_testing(self) -> None:
        """Reset the host-wide compat counters. Difference: the sequence itself is
        never moved back (the original restarted it from the clock, which can
        reissue values Kraken has seen)."""
        self._counters.reset()
        with self._flag_lock:
            self._process_issued = 0

    def get_stats(self) -> dict[str, Any]:
        """Statistics with the original's keys, host-wide, plus more.

        Differences: ``total_nonces_issued`` counts the nonces issued through this
        module (``get_nonce`` and the ``get_*kraken_nonce`` functions) by every process
        since the compat counters started (first use after the segment was created),
        not only by this process; ``uptime_seconds``, ``initialized_at`` and
        ``nonces_per_second`` refer to that start; ``last_nonce`` is the last value of
        the sequence issued by any process; ``recent_burst_rate`` is nonces per
        second over the latest 16 such nonces host-wide; ``in_startup_window`` is the
        host-wide guard's window; ``persistence_file`` is the engine's binary ceiling
        file, not a text file holding the last nonce (None on Redis). ``api_serialization_enabled``
        is this process's flag. Added keys: ``sequence``, ``state_dir``,
        ``process_nonces_issued`` (this process), ``sequence_total_issued`` (every
        value of the sequence, including those issued on entering the API lock and
        by non-compat users), ``api_lock_entries``, ``api_lock_waits`` (entries that
        waited over 1 ms), ``api_lock_wait_seconds``, ``rate_limited_nonces``,
        ``rate_limit_wait_seconds``, ``clock_regressions``, ``persisted_ceiling``
        and ``startup_guard`` (the guard's own counters).
        """
        eng_stats = self.engine.stats()
        guard = self._guard()
        guard_stats = guard.stats()
        vals = self._counters.snapshot()
        started = vals[_STARTED]
        uptime = max(0.0, (time.time_ns() - started) / _NS)
        with self._flag_lock:
            serialization = self._serialization
            process_issued = self._process_issued
        return {
            "total_nonces_issued": vals[_NONCES],
            "last_nonce": eng_stats["last_nonce"],
            "uptime_seconds": uptime,
            "nonces_per_second": vals[_NONCES] / uptime if uptime > 0 else 0.0,
            "recent_burst_rate": _burst_rate(vals),
            "in_startup_window": bool(guard_stats.get("in_window", False)),
            "persistence_file": self._persistence_file(),
            "rate_limit_config": {
                "startup_rate_limit_seconds": self.STARTUP_RATE_LIMIT_SECONDS,
                "max_burst_rate": self.MAX_BURST_RATE,
                "startup_window_seconds": self.STARTUP_BURST_WINDOW,
            },
            "initialized_at": started / _NS,
            "api_serialization_enabled": serialization,
            "sequence": self.engine.name,
            "state_dir": self._place.state_dir,
            "process_nonces_issued": process_issued,
            "sequence_total_issued": eng_stats["total_issued"],
            "api_lock_entries": vals[_ENTRIES],
            "api_lock_waits": vals[_LWAITS],
            "api_lock_wait_seconds": vals[_LWAIT_NS] / _NS,
            "rate_limited_nonces": vals[_RLIM],
            "rate_limit_wait_seconds": vals[_RLIM_NS] / _NS,
            "clock_regressions": eng_stats.get("clock_regressions"),
            "persisted_ceiling": eng_stats.get("persisted_ceiling"),
            "startup_guard": guard_stats,
        }

    def close(self) -> None:
        """Detach this manager's engine (not in the original)."""
        if self._closed:
            return
        self._closed = True
        self.engine.close()

    def _persistence_file(self) -> str | None:
        """The shared-memory engine's ceiling file (None on Redis)."""
        if self._place.state_dir is None:
            return None
        return os.path.join(self._place.state_dir, self.engine.name + ".ceiling")

    def __repr__(self) -> str:
        where = (f"state_dir={self._place.state_dir!r}" if self._place.url is None
                 else "engine=redis")
        return f"<shmnonce.compat.GlobalKrakenNonceManager sequence={self.engine.name!r} {where}>"


def _manager_for(settings: _Settings, default: bool) -> GlobalKrakenNonceManager:
    global _default_key
    with _registry_lock:
        if default and _default_key is not None:
            mgr = _registry.get(_default_key)
            if mgr is not None and not mgr._closed:
                return mgr
        place = settings.place()
        key = place.key
        mgr = _registry.get(key)
        if mgr is None or mgr._closed:
            mgr = GlobalKrakenNonceManager._create(settings, place)
            _registry[key] = mgr
        if default:
            _default_key = key
        return mgr


# --------------------------------------------------------------------------- functions


def get_global_nonce_manager() -> GlobalKrakenNonceManager:
    """The process-global manager, attached on first use.

    Difference: the object is per process as before, but its sequence, lock and
    counters are shared by every process using the same sequence name and state
    directory (see :func:`configure`).
    """
    return _manager_for(_settings, default=True)


def get_global_kraken_nonce() -> int:
    """``get_global_nonce_manager().get_nonce()`` (rate limiting on, as in the original)."""
    return get_global_nonce_manager().get_nonce()


def get_kraken_nonce() -> int:
    """Legacy alias of :func:`get_global_kraken_nonce`."""
    return get_global_nonce_manager().get_nonce()


def get_global_nonce_stats() -> dict[str, Any]:
    """``get_global_nonce_manager().get_stats()``: host-wide, see that method."""
    return get_global_nonce_manager().get_stats()


def get_kraken_api_lock() -> CompatLock:
    """The API lock of the global manager: ``with get_kraken_api_lock(): api.query_private(...)``.

    Differences: excludes other processes, not only threads; re-entrant per thread;
    one lock object for both this function and ``get_api_call_lock()`` (one version
    of the original had two unrelated locks, which could not exclude each other's
    callers). See :class:`CompatLock`.
    """
    return get_global_nonce_manager().get_api_call_lock()


def jump_global_kraken_nonce_forward(milliseconds: int) -> int:
    """Jump the sequence ``milliseconds`` ahead (converted to ns) and return the new last value.

    Difference: ``milliseconds`` must be a non-negative int (``ValueError`` otherwise).
    """
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int) or milliseconds < 0:
        raise ValueError(f"milliseconds must be a non-negative int, got {milliseconds!r}")
    return get_global_nonce_manager().jump_forward(milliseconds * 1_000_000)
