"""Read-only checks of a Redis server that holds shmnonce sequences.

``check_server(url, names)`` reports, as ``ok``/``warn``/``error`` findings:

``server``
    Reachable, a primary (a replica refuses writes), version 6.2 or later.
``persistence``
    What a restart keeps: AOF with ``appendfsync always`` keeps every acknowledged
    value; ``everysec`` can lose about the last second on a host crash or power loss
    (a crash of the Redis process alone loses nothing written); ``no`` leaves it to
    the OS; RDB snapshots alone lose everything since the last snapshot; nothing
    loses everything. A lost sequence continues from the server clock.
``eviction``
    ``maxmemory-policy`` ``allkeys-*`` may evict a sequence (it has no TTL, so
    ``volatile-*`` and ``noeviction`` never do).
``replication``
    With replicas, a failover loses the writes not yet replicated (replication is
    asynchronous) and the new primary's clock must be synchronized.
``ahead``
    Per sequence: its last value against the server clock. A sequence ahead of the
    clock (after ``jump_forward``) regresses if a restart loses its latest writes,
    unless ``appendfsync always``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.exceptions as rx

from .._paths import validate_name
from ..ops.doctor import ERROR, OK, WARN, Finding
from .conn import check_url, redact, sync_client

__all__ = ["check_server"]


def _config(r: Any, name: str) -> str | None:
    got = r.execute_command("CONFIG", "GET", name)
    if isinstance(got, dict):  # RESP3
        return got.get(name)
    values = list(got)
    return str(values[1]) if len(values) >= 2 else None


def check_server(url: str, names: Iterable[str] = ()) -> list[Finding]:
    """Findings about the server at ``url`` and the sequences ``names`` on it."""
    check_url(url)
    shown = redact(url)
    seqs = [validate_name(n) for n in names]
    out: list[Finding] = []
    r = sync_client(url)
    try:
        try:
            info = r.info("server")
            repl = r.info("replication")
        except rx.NoPermissionError as exc:
            out.append(Finding("server", WARN, f"{shown}: INFO is not permitted for this user "
                               f"({exc}); version and role unchecked"))
            info, repl = {}, {}
        except rx.RedisError as exc:
            return [Finding("server", ERROR, f"{shown}: cannot talk to Redis ({exc})")]
        version = str(info.get("redis_version", ""))
        if version:
            parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            if parts < (6, 2):
                out.append(Finding("server", ERROR, f"{shown}: Redis {version}; 6.2 or later needed"))
            else:
                out.append(Finding("server", OK, f"{shown}: Redis {version}",
                                   details={"version": version}))
        role = repl.get("role")
        if role == "slave":
            out.append(Finding("replication", ERROR, f"{shown} is a replica (read-only): point "
                               "url= at the primary"))
        elif role == "master":
            replicas = int(repl.get("connected_slaves", 0))
            if replicas:
                out.append(Finding(
                    "replication", WARN,
                    f"{replicas} replica(s): replication is asynchronous, so a failover can lose "
                    "the last writes; the sequence then continues from max(stored, the new "
                    "primary's clock), which is safe while no sequence is ahead of that clock "
                    "and the primaries' clocks are synchronized (NTP)",
                    details={"replicas": replicas}))
            else:
                out.append(Finding("replication", OK, "no replicas"))
        always = False
        try:
            aof = _config(r, "appendonly")
            fsync = _config(r, "appendfsync")
            save = _config(r, "save")
            policy = _config(r, "maxmemory-policy")
        except rx.RedisError as exc:
            out.append(Finding("persistence", WARN, f"cannot read the persistence settings "
                               f"(CONFIG GET: {exc}); check appendonly/appendfsync by hand"))
        else:
            details: dict[str, object] = {"appendonly": aof, "appendfsync": fsync, "save": save}
            if aof == "yes" and fsync == "always":
                always = True
                out.append(Finding("persistence", OK, "AOF with appendfsync always: every value "
                                   "Redis acknowledged survives a restart", details=details))
            elif aof == "yes" and fsync == "everysec":
                out.append(Finding("persistence", WARN, "AOF with appendfsync everysec: a crash "
                                   "of the host (power, kernel) can lose about the last second "
                                   "of values; use appendfsync always to lose none", details=details))
            elif aof == "yes":
                out.append(Finding("persistence", WARN, f"AOF with appendfsync {fsync}: the OS "
                                   "decides when values reach the disk; a host crash can lose "
                                   "many seconds", details=details))
            elif save:
                out.append(Finding("persistence", WARN, f"RDB snapshots only (save {save!r}): a "
                                   "restart loses every value since the last snapshot; enable "
                                   "appendonly yes with appendfsync always", details=details))
            else:
                out.append(Finding("persistence", WARN, "no persistence: a restart loses every "
                                   "sequence (each continues from the server clock); enable "
                                   "appendonly yes with appendfsync always", details=details))
            if policy and policy.startswith("allkeys-"):
                out.append(Finding("eviction", ERROR, f"maxmemory-policy {policy} may evict "
                                   "sequences; use noeviction or a volatile-* policy",
                                   details={"maxmemory-policy": policy}))
            elif policy:
                out.append(Finding("eviction", OK, f"maxmemory-policy {policy} never evicts a "
                                   "sequence", details={"maxmemory-policy": policy}))
        for name in seqs:
            out.append(_ahead(r, name, always))
    finally:
        r.close()
    return out


def _ahead(r: Any, name: str, always: bool) -> Finding:
    key = f"shmnonce:{{{name}}}:seq"
    try:
        last = r.hget(key, "last")
        sec, us = r.execute_command("TIME")
    except rx.RedisError as exc:
        return Finding("ahead", WARN, f"cannot read the sequence ({exc})", sequence=name)
    if last is None:
        return Finding("ahead", OK, "no such sequence on this server", sequence=name)
    now = int(sec) * 1_000_000_000 + int(us) * 1000
    ahead = int(last) - now
    details: dict[str, object] = {"last_nonce": int(last), "server_time_ns": now, "ahead_ns": ahead}
    if ahead <= 0:
        return Finding("ahead", OK, "last value is not ahead of the server clock: values lost "
                       "by a restart are re-covered by the clock", sequence=name, details=details)
    if always:
        return Finding("ahead", OK, f"last value is {ahead / 1e9:.3f} s ahead of the server clock; "
                       "appendfsync always keeps it across restarts", sequence=name, details=details)
    return Finding("ahead", WARN, f"last value is {ahead / 1e9:.3f} s ahead of the server clock: "
                   "a restart that loses the latest writes would issue values at or below ones "
                   "already issued (until the clock passes them); use appendfsync always",
                   sequence=name, details=details)
