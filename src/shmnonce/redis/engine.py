"""RedisNonce: one strictly increasing nonce sequence per name, shared through a Redis server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio
import redis.exceptions as rx

from .. import _fork
from .._errors import LockTimeout, NonceError, StateError
from .._paths import api_key_name, validate_name
from .._protocol import ENV_URL, NonceEngine, Section, SharedRecord, Update
from . import lua as _lua
from .conn import async_client, check_url, map_error, redact, sync_client

__all__ = ["MAX_VALUE", "RedisNonce", "RedisRecord", "RedisSection"]

log = logging.getLogger("shmnonce")

R = TypeVar("R")

MAX_VALUE = _lua.MAX_VALUE
U64_MAX = 2**64 - 1
_SCRIPTS = {"init": _lua.INIT, "issue": _lua.ISSUE, "jump": _lua.JUMP, "enter": _lua.ENTER,
            "leave": _lua.LEAVE, "renew": _lua.RENEW, "unlink": _lua.UNLINK}
_MARGIN_S = 0.005
"""A waiter whose holder stops renewing checks again this long after the lease's expiry."""
_RECORD_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

_WAITING, _HELD, _LEFT = 0, 1, 2
_NEW_POOL_API = tuple(int(p) for p in redis.__version__.split(".")[:2] if p.isdigit()) >= (5, 3)
"""redis-py 5.3 deprecated the arguments of ConnectionPool.get_connection()."""

_engines: weakref.WeakSet[RedisNonce] = weakref.WeakSet()


def _after_fork_child() -> None:
    # Tickets, the renewer thread and asyncio clients belong to the parent; the locks
    # may have been held by one of its other threads at fork time.
    for eng in list(_engines):
        eng._lock = threading.Lock()
        eng._tickets = {}
        eng._renewer = None
        eng._aclients = {}


_fork.register(_fork.ENGINES, after_in_child=_after_fork_child)


class RedisSection:
    """A place in the section of a Redis sequence; the token is this ticket's own.

    ``nonce`` was issued by the script that granted the section, so it is above the
    nonce of every earlier holder. ``lost`` becomes True when the renewer found the
    lease taken by someone else (the holder was paused or cut off past ``lease_s``).
    """

    __slots__ = ("__weakref__", "_eng", "_pid", "lost", "nonce", "state", "token")

    def __init__(self, eng: RedisNonce, token: str) -> None:
        self._eng = eng
        self._pid = os.getpid()  # a copy in a forked child must not release the parent's place
        self.token = token
        self.nonce = 0
        self.state = _WAITING
        self.lost = False

    def leave(self) -> None:
        """Give the section to the next live waiter. Idempotent."""
        self._eng._leave(self)

    async def aleave(self) -> None:
        """:meth:`leave` without blocking the event loop."""
        await self._eng._aleave(self)

    def __repr__(self) -> str:
        state = ("waiting", "held", "left")[self.state]
        return f"<RedisSection {self._eng.name!r} nonce={self.nonce} {state}>"


class RedisNonce:
    """A handle on one nonce sequence kept in Redis, shared by processes on any host.

    Create with :meth:`attach` or :meth:`for_api_key`. Handles are thread-safe, work
    in forked children (redis-py reconnects there) and pickle to spawned children.
    """

    def __init__(self, name: str, url: str, lease_s: float, *, _token: object = None) -> None:
        if _token is not _ATTACH:
            raise TypeError("use RedisNonce.attach(name, url=...) or RedisNonce.for_api_key(key, url=...)")
        self.name = name
        self.lease_s = lease_s
        self._lease_ms = str(max(1, round(lease_s * 1000)))
        self._url = url
        self.url = redact(url)
        self.prefix = f"shmnonce:{{{name}}}:"
        p = self.prefix
        self._k_seq, self._k_dead = p + "seq", p + "dead"
        self._k_lease, self._k_queue, self._k_alive = p + "lease", p + "queue", p + "alive"
        self._k_records, self._rec_prefix, self._box = p + "records", p + "r:", p + "w:"
        self._where = f"Redis sequence {name!r} at {self.url}"
        self._lock = threading.Lock()
        self._tickets: dict[str, RedisSection] = {}
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        self._aclients: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        self._closed = False
        self._shas: dict[str, str] = {}
        self._r: redis.Redis = sync_client(url)
        # execute_command is untyped in redis-py; every reply is checked where it is used
        self._exec: Callable[..., Any] = self._r.execute_command
        try:
            self._load_scripts()
            self._gen: str = str(self._eval("init", (self._k_seq, self._k_dead), secrets.token_hex(8)))
        except rx.RedisError as exc:
            self._r.close()
            raise map_error(exc, self._where) from exc
        except BaseException:
            self._r.close()
            raise
        self._sec_keys = (self._k_seq, self._k_dead, self._k_lease, self._k_queue, self._k_alive)
        self._pool: Any = self._r.connection_pool
        conn: Any = self._pool.get_connection() if _NEW_POOL_API else self._pool.get_connection("EVALSHA")
        try:
            self._packed_issue: Any = conn.pack_command(
                "EVALSHA", self._shas["issue"], 2, self._k_seq, self._k_dead, self._gen)
        finally:
            self._pool.release(conn)
        _engines.add(self)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def attach(cls, name: str, url: str | None = None, lease_s: float = 10.0) -> RedisNonce:
        """Create or attach the sequence ``name`` on the Redis server at ``url``.

        ``url``: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or
        ``unix://[user:password@]/path/to/socket?db=N``; None means ``$SHMNONCE_URL``.
        ``lease_s``: how long the section of a holder that died or lost its
        connection stays held (renewed every ``lease_s / 3`` while held).
        """
        validate_name(name)
        if url is None:
            url = os.environ.get(ENV_URL) or None
            if url is None:
                raise ValueError(f"no Redis URL: pass url= or set ${ENV_URL}")
        check_url(url)
        if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or not 0.1 <= lease_s <= 86_400:
            raise ValueError(f"lease_s must be a number of seconds in 0.1 .. 86400, got {lease_s!r}")
        return cls(name, url, float(lease_s), _token=_ATTACH)

    @classmethod
    def for_api_key(
        cls, api_key: str | bytes, url: str | None = None, lease_s: float = 10.0
    ) -> RedisNonce:
        """The sequence of one API key, named from a salted hash of the key (as on one host)."""
        return cls.attach(api_key_name(api_key), url, lease_s)

    # -- scripts -----------------------------------------------------------------------
    def _load_scripts(self) -> None:
        for name, src in _SCRIPTS.items():
            self._shas[name] = str(self._exec("SCRIPT", "LOAD", src))

    def _eval(self, script: str, keys: Sequence[str], *args: str) -> Any:
        """Run one script (one round trip; reloads the scripts after a server restart)."""
        try:
            return self._exec("EVALSHA", self._shas[script], len(keys), *keys, *args)
        except rx.NoScriptError:
            self._load_scripts()
            return self._exec("EVALSHA", self._shas[script], len(keys), *keys, *args)

    async def _aeval(self, client: Any, script: str, keys: Sequence[str], *args: str) -> Any:
        try:
            return await client.execute_command("EVALSHA", self._shas[script], len(keys), *keys, *args)
        except rx.NoScriptError:
            await client.execute_command("SCRIPT", "LOAD", _SCRIPTS[script])
            return await client.execute_command("EVALSHA", self._shas[script], len(keys), *keys, *args)

    def _unusable(self) -> NonceError:
        return NonceError(f"{self._where}: this handle is closed")

    # -- values --------------------------------------------------------------------------
    def next(self) -> int:
        """Issue ``max(last + 1, server time in ns)``: one script, one round trip.

        The command is packed once per handle and sent on a pooled connection; on
        any trouble (connection lost, script cache flushed by a restart) the call
        is repeated through redis-py's retrying path (a repeated script only skips
        a value).
        """
        if self._closed:
            raise self._unusable()
        pool = self._pool
        conn = pool.get_connection() if _NEW_POOL_API else pool.get_connection("EVALSHA")
        try:
            conn.send_packed_command(self._packed_issue, check_health=False)
            v = conn.read_response()
        except (rx.ConnectionError, rx.TimeoutError, OSError):
            conn.disconnect()
            return self._next_retrying()
        except rx.NoScriptError:
            return self._next_retrying()
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc
        finally:
            pool.release(conn)
        return int(v)

    def _next_retrying(self) -> int:
        try:
            return int(self._eval("issue", (self._k_seq, self._k_dead), self._gen))
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc

    def peek(self) -> int:
        """The last value issued (0 for a new sequence or one Redis lost); issues nothing."""
        if self._closed:
            raise self._unusable()
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(self._k_seq, ["gen", "last"])
            pipe.sismember(self._k_dead, self._gen)
            (gen, last), dead = pipe.execute()
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc
        if gen == self._gen and last is not None and last.isdigit():
            return int(last)
        if gen is None and not dead:
            return 0  # lost by Redis: the next value starts from the server clock
        raise StateError(f"{self._where} was unlinked; attach again")

    def jump_forward(self, delta_ns: int) -> int:
        """Set the last value to ``max(last, server time) + delta_ns`` and return it."""
        if isinstance(delta_ns, bool) or not isinstance(delta_ns, int) or delta_ns < 0:
            raise ValueError(f"delta_ns must be a non-negative int, got {delta_ns!r}")
        if delta_ns > MAX_VALUE:
            raise ValueError("delta_ns must be at most 2**63-1 (the Redis engine's range)")
        if self._closed:
            raise self._unusable()
        try:
            return int(self._eval("jump", (self._k_seq, self._k_dead), self._gen, str(delta_ns)))
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc

    def server_time_ns(self) -> int:
        """The Redis server's clock (``TIME``) in ns: one clock for every host."""
        if self._closed:
            raise self._unusable()
        try:
            sec, us = self._exec("TIME")
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc
        return int(sec) * 1_000_000_000 + int(us) * 1000

    # -- the section ---------------------------------------------------------------------
    def _track(self, ticket: RedisSection) -> None:
        """Renew ``ticket`` (its alive mark while waiting, its lease while held)."""
        with self._lock:
            if self._closed:
                raise self._unusable()
            self._tickets[ticket.token] = ticket
            if self._renewer is None:
                self._stop = threading.Event()
                self._renewer = threading.Thread(
                    target=self._renew_loop, args=(self._stop,), name=f"shmnonce-renew-{self.name}",
                    daemon=True,
                )
                self._renewer.start()

    def _untrack(self, ticket: RedisSection) -> None:
        with self._lock:
            self._tickets.pop(ticket.token, None)

    def _renew_loop(self, stop: threading.Event) -> None:
        """Extend the leases and alive marks of this process's tickets every lease_s / 3.

        A daemon thread: it ends with the process, so a dead (or stopped) holder's
        lease runs out after ``lease_s``. It ends itself when no ticket is left.
        """
        period = self.lease_s / 3
        while not stop.wait(period):
            with self._lock:
                tickets = list(self._tickets.values())
                if not tickets:
                    self._renewer = None
                    return
            try:
                states = self._eval("renew", (self._k_lease, self._k_queue, self._k_alive),
                                    self._lease_ms, *(t.token for t in tickets))
            except Exception as exc:  # the thread must not die while tickets need it
                if stop.is_set():
                    return  # the handle was closed meanwhile
                log.warning("%s: renewing the section lease failed (%s); it expires after "
                            "%.1f s unless a later renewal gets through", self._where, exc, self.lease_s)
                continue
            for ticket, state in zip(tickets, states, strict=False):
                if state == 0 and ticket.state == _HELD and not ticket.lost:
                    ticket.lost = True
                    log.warning("%s: the section lease was lost while held (paused or cut off "
                                "for more than lease_s=%.1f s); the nonce %d of this holder is "
                                "below the next holder's", self._where, self.lease_s, ticket.nonce)

    def _block_for(self, pttl_ms: int, deadline: float | None) -> float:
        """How long to wait for the mailbox: until the lease would expire, or the deadline."""
        block = max(int(pttl_ms), 0) / 1000 + _MARGIN_S
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(f"{self._where}: serialized() timed out")
            block = min(block, remaining)
        # A socket_timeout in the URL would cut a longer BLPOP off as a lost connection:
        # block for at most half of it, and 0.25 s less (the server ends a BLPOP in its
        # cron, which runs every 100 ms by default); the caller then re-checks the queue
        # and blocks again.
        sock = self._pool.connection_kwargs.get("socket_timeout")
        if sock:
            block = min(block, float(sock) / 2, float(sock) - 0.25)
        return max(block, 0.001)

    def enter(self, timeout: float | None = None) -> RedisSection:
        """Wait for the section (FIFO, woken at hand-off) and return its ticket."""
        deadline = _deadline(timeout)
        if self._closed:
            raise self._unusable()
        ticket = RedisSection(self, secrets.token_hex(16))
        self._track(ticket)
        box = self._box + ticket.token
        try:
            granted, val = self._eval("enter", self._sec_keys, self._gen, self._box, ticket.token,
                                      self._lease_ms)
            while not granted:
                got = self._exec("BLPOP", box, self._block_for(val, deadline))
                if got is not None:
                    granted, val = 1, got[1]
                else:
                    granted, val = self._eval("enter", self._sec_keys, self._gen, self._box,
                                              ticket.token, self._lease_ms)
        except BaseException as exc:
            self._withdraw(ticket)
            if isinstance(exc, rx.RedisError):
                raise map_error(exc, self._where) from exc
            raise
        ticket.nonce = int(val)
        ticket.state = _HELD
        return ticket

    def _withdraw(self, ticket: RedisSection) -> None:
        """Give up a place in the queue (and the section, if it was granted meanwhile)."""
        self._untrack(ticket)
        ticket.state = _LEFT
        try:
            self._eval("leave", self._sec_keys, self._gen, self._box, ticket.token, "0")
        except rx.RedisError as exc:  # its alive mark and any lease run out after lease_s
            log.warning("%s: could not withdraw from the section queue (%s)", self._where, exc)

    def _leave(self, ticket: RedisSection) -> None:
        if ticket.state == _LEFT:
            return
        if ticket._pid != os.getpid():  # entered by the parent before fork(): its place, not ours
            ticket.state = _LEFT
            return
        held = ticket.state == _HELD
        ticket.state = _LEFT
        self._untrack(ticket)
        try:
            was = self._eval("leave", self._sec_keys, self._gen, self._box, ticket.token,
                             "1" if held else "0")
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc
        self._after_leave(ticket, held, was)

    def _after_leave(self, ticket: RedisSection, held: bool, was: int) -> None:
        if held and not was and not ticket.lost:
            ticket.lost = True
            log.warning("%s: the section lease had expired when its holder left (held for "
                        "more than lease_s=%.1f s without renewal)", self._where, self.lease_s)

    @contextlib.contextmanager
    def serialized(self, timeout: float | None = None) -> Iterator[int]:
        """Exclusive section across processes on every host; yields a nonce issued inside.

        Entrants are served in arrival order and woken by the hand-off (a blocking
        pop of their mailbox, no polling). The lease is renewed while held; a holder
        that dies or loses its connection keeps the section for at most ``lease_s``.
        """
        ticket = self.enter(timeout)
        try:
            yield ticket.nonce
        finally:
            ticket.leave()

    # -- asyncio -------------------------------------------------------------------------
    def _aref(self) -> tuple[asyncio.AbstractEventLoop, Any]:
        """This loop's client (one pool per event loop), with one more user."""
        loop = asyncio.get_running_loop()
        entry = self._aclients.get(loop)
        if entry is None:
            entry = self._aclients[loop] = [async_client(self._url), 0]
        entry[1] += 1
        return loop, entry[0]

    async def _aunref(self, loop: asyncio.AbstractEventLoop) -> None:
        entry = self._aclients.get(loop)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._aclients[loop]
            await entry[0].aclose()

    async def _aenter(self, client: Any, timeout: float | None) -> RedisSection:
        deadline = _deadline(timeout)
        if self._closed:
            raise self._unusable()
        ticket = RedisSection(self, secrets.token_hex(16))
        self._track(ticket)
        box = self._box + ticket.token
        try:
            granted, val = await self._aeval(client, "enter", self._sec_keys, self._gen, self._box,
                                             ticket.token, self._lease_ms)
            while not granted:
                got = await client.execute_command("BLPOP", box, self._block_for(val, deadline))
                if got is not None:
                    granted, val = 1, got[1]
                else:
                    granted, val = await self._aeval(client, "enter", self._sec_keys, self._gen,
                                                     self._box, ticket.token, self._lease_ms)
        except BaseException as exc:
            self._untrack(ticket)
            ticket.state = _LEFT
            await self._shielded_leave(ticket, held=False)
            if isinstance(exc, rx.RedisError):
                raise map_error(exc, self._where) from exc
            raise
        ticket.nonce = int(val)
        ticket.state = _HELD
        return ticket

    async def _shielded_leave(self, ticket: RedisSection, held: bool) -> int:
        """Run the leave script in a task that a cancellation of the caller cannot stop."""
        loop, client = self._aref()

        async def run() -> int:
            try:
                return int(await self._aeval(client, "leave", self._sec_keys, self._gen, self._box,
                                             ticket.token, "1" if held else "0"))
            finally:
                await self._aunref(loop)

        task = loop.create_task(run())
        if held:
            return await asyncio.shield(task)
        try:
            return await asyncio.shield(task)
        except rx.RedisError as exc:  # withdrawing: its alive mark runs out after lease_s
            log.warning("%s: could not withdraw from the section queue (%s)", self._where, exc)
            return 0

    async def _aleave(self, ticket: RedisSection) -> None:
        if ticket.state == _LEFT:
            return
        if ticket._pid != os.getpid():  # entered by the parent before fork(): its place, not ours
            ticket.state = _LEFT
            return
        held = ticket.state == _HELD
        ticket.state = _LEFT
        self._untrack(ticket)
        try:
            was = await self._shielded_leave(ticket, held)
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc
        self._after_leave(ticket, held, was)

    @contextlib.asynccontextmanager
    async def aserialized(self, timeout: float | None = None) -> AsyncIterator[int]:
        """The section for asyncio (redis.asyncio): waits without blocking the event loop.

        Each task is its own entrant; cancelling a waiting task withdraws it from the
        queue, cancelling a holding task leaves the section.
        """
        loop, client = self._aref()
        try:
            ticket = await self._aenter(client, timeout)
            try:
                yield ticket.nonce
            finally:
                await ticket.aleave()
        finally:
            await self._aunref(loop)

    # -- records and counters ------------------------------------------------------------
    def record(self, name: str, fields: int) -> RedisRecord:
        """The shared record ``name`` of this sequence: ``fields`` u64 values in Redis."""
        return RedisRecord(self, name, fields)

    def stats(self) -> Mapping[str, object]:
        """Counters of the sequence, read in one round trip (no key material)."""
        if self._closed:
            raise self._unusable()
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(self._k_seq)
            pipe.zcard(self._k_queue)
            pipe.pttl(self._k_lease)
            pipe.sismember(self._k_dead, self._gen)
            h, queued, pttl, dead = pipe.execute()
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc
        if h.get("gen") != self._gen and (dead or h):
            raise StateError(f"{self._where} was unlinked; attach again")
        last = int(h.get("last", 0))
        return {
            "name": self.name,
            "engine": "redis",
            "url": self.url,
            "segment": self.prefix,
            "last_nonce": last,
            "total_issued": int(h.get("total", 0)),
            "created_at": int(h.get("created", 0)),
            "clock_regressions": int(h.get("regressions", 0)),
            "persisted_ceiling": last + 1,
            "max_value": MAX_VALUE,
            "lease_ns": round(self.lease_s * 1e9),
            "section_entries": int(h.get("entries", 0)),
            "section_waits": int(h.get("waits", 0)),
            "section_queue": int(queued),
            "section_held": pttl != -2,
            "lease_lost": int(h.get("lease_lost", 0)),
            "recreated": h.get("recreated") == "1",
        }

    def doctor(self) -> list[Any]:
        """Findings about the server's persistence for this sequence (see check_server)."""
        from .doctor import check_server
        return check_server(self._url, [self.name])

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Detach: stop renewing, close the connections; the sequence lives on.

        Raises NonceError while a thread or task of this process waits for or holds
        the section through this handle (closing would strand its lease).
        """
        with self._lock:
            if self._closed:
                return
            if self._tickets:
                raise NonceError(f"{self._where}: close() while the section is held or "
                                 "waited for through this handle")
            self._closed = True
            self._stop.set()
            renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(10)  # it may be half-way through a renewal on a pooled connection
        self._r.close()
        _engines.discard(self)

    def unlink(self) -> None:
        """Delete the sequence's keys (values, queue, records), then close this handle.

        Handles attached elsewhere get StateError at their next call; a later attach
        starts a new sequence from the server clock.
        """
        if self._closed:
            raise self._unusable()
        with self._lock:
            if self._tickets:
                raise NonceError(f"{self._where}: unlink() while the section is held or "
                                 "waited for through this handle")
        try:
            self._eval("unlink", (*self._sec_keys, self._k_records), self._rec_prefix)
        except rx.RedisError as exc:
            raise map_error(exc, self._where) from exc
        self.close()

    def __enter__(self) -> RedisNonce:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "attached"
        return f"<RedisNonce {self.name!r} url={self.url!r} {state}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Spawned children attach again by name (the URL travels with its password).
        return (_reattach, (self.name, self._url, self.lease_s))


class RedisRecord:
    """A named record of ``fields`` u64 values of one Redis sequence.

    Stored as one string of decimal fields; :meth:`update` is WATCH/MULTI/EXEC,
    retried when another writer changed the record in between (``fn`` may run
    more than once), so the values never pass through a Lua number.
    """

    def __init__(self, eng: RedisNonce, name: str, fields: int) -> None:
        if not isinstance(name, str) or _RECORD_RE.fullmatch(name) is None:
            raise ValueError(f"invalid record name {name!r}: use 1-64 characters of [A-Za-z0-9._-]")
        if isinstance(fields, bool) or not isinstance(fields, int) or not 1 <= fields <= 256:
            raise ValueError(f"fields must be an int in 1 .. 256, got {fields!r}")
        self._eng = eng
        self._name = name
        self._fields = fields
        self._key = eng._rec_prefix + name

    @property
    def name(self) -> str:
        return self._name

    @property
    def fields(self) -> int:
        return self._fields

    def _decode(self, raw: str | None) -> list[int] | None:
        if raw is None:  # never written: zeros, as every engine (see _protocol.Update)
            return [0] * self._fields
        parts = raw.split(",")
        if len(parts) != self._fields or not all(p.isdigit() and len(p) <= 20 for p in parts):
            return None
        values = [int(p) for p in parts]
        return values if all(v <= U64_MAX for v in values) else None

    def _encode(self, values: Sequence[int]) -> str:
        vals = list(values)
        if len(vals) != self._fields or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64_MAX for v in vals
        ):
            raise ValueError(f"record {self._name!r} takes exactly {self._fields} ints in 0 .. 2**64-1")
        return ",".join(str(v) for v in vals)

    def read(self) -> list[int] | None:
        """The current values (zeros: never written; None: unreadable), without changing them."""
        eng = self._eng
        if eng._closed:
            raise eng._unusable()
        try:
            raw = eng._r.get(self._key)
        except rx.RedisError as exc:
            raise map_error(exc, eng._where) from exc
        return self._decode(raw)  # type: ignore[arg-type]

    def update(self, fn: Update[R]) -> R:
        """Atomically replace the values with ``fn(values)[0]``; return ``fn(values)[1]``."""
        eng = self._eng
        if eng._closed:
            raise eng._unusable()
        out: list[R] = []

        def txn(pipe: Any) -> None:
            values = self._decode(pipe.get(self._key))
            new, result = fn(values)
            encoded = self._encode(new)
            out[:] = [result]
            pipe.multi()
            pipe.set(self._key, encoded)
            pipe.sadd(eng._k_records, self._name)

        try:
            eng._r.transaction(txn, self._key)
        except rx.RedisError as exc:
            raise map_error(exc, eng._where) from exc
        return out[0]

    def __repr__(self) -> str:
        return f"<RedisRecord {self._name!r} of {self._eng.name!r}>"


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout != timeout:
        raise ValueError(f"timeout must be None or a number of seconds, got {timeout!r}")
    return time.monotonic() + max(float(timeout), 0.0)


def _reattach(name: str, url: str, lease_s: float) -> RedisNonce:
    return RedisNonce.attach(name, url, lease_s)


_ATTACH = object()


if TYPE_CHECKING:  # mypy proves that the classes implement the engine protocols

    def _is_engine(e: RedisNonce) -> NonceEngine:
        return e

    def _is_section(s: RedisSection) -> Section:
        return s

    def _is_record(r: RedisRecord) -> SharedRecord:
        return r
