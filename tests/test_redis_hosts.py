"""The Redis engine across "hosts": processes that share nothing but the Redis server.

Each host is a separate Python process started with ``unshare -m`` and a private
tmpfs on /dev/shm (where that works; the tests say which ran) and its own state
directory, so the shared-memory engine could not connect them. The observers are
files in a folder every host sees: an O_EXCL marker inside each section and a log
of the nonces in entry order.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmnonce._paths import api_key_name
from shmnonce.redis import RedisNonce
from tests.kraken_server import ServerProcess
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.redis_worker import start_host, unshare_works

if not os.path.exists(REDIS_SERVER) and not os.environ.get("CI"):
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)

ISOLATED = unshare_works()
LEASE_S = 1.0
BOUND_S = 0.5
"""A holder killed inside: the next host enters within LEASE_S + BOUND_S of the kill."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Iterator[RedisServer]:
    with RedisServer(str(tmp_path_factory.mktemp("redis-hosts"))) as srv:
        yield srv


class Hosts:
    """Start worker hosts; each gets its own state directory under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, host: int, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
        state = os.path.join(self.root, f"host{host}", "state")
        os.makedirs(state, exist_ok=True)
        proc = start_host(spec, state, ISOLATED)
        self.procs.append(proc)
        return proc

    def wait(self, timeout: float = 120) -> None:
        for p in self.procs:
            assert p.wait(timeout) == 0, f"worker {p.pid} exited {p.returncode}"

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(10)


@pytest.fixture
def hosts(tmp_path: Any) -> Iterator[Hosts]:
    h = Hosts(str(tmp_path))
    yield h
    h.cleanup()


def _wait_file(path: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)
    with open(path) as f:
        result: dict[str, Any] = json.load(f)
        return result


def test_unshare_isolation_reported() -> None:
    """Say which kind of host ran (the summary line shows it with -rA)."""
    print(f"hosts isolated with unshare -m and a private /dev/shm: {ISOLATED}")
    if os.geteuid() == 0 and not os.environ.get("SHMNONCE_NO_UNSHARE"):
        assert ISOLATED, "unshare -m failed as root"


def test_no_duplicate_across_hosts(server: RedisServer, hosts: Hosts, tmp_path: Any) -> None:
    """3 hosts x 2 processes x 3000 next(): every value distinct, each process increasing."""
    n, outs = 3000, []
    start_at = time.time() + 2.0
    for h in range(3):
        for p in range(2):
            out = str(tmp_path / f"values-{h}-{p}")
            outs.append(out)
            url = server.url if p == 0 else server.unix_url
            hosts.start(h, {"mode": "next", "name": "dup", "url": url, "n": n, "out": out,
                            "start_at": start_at})
    hosts.wait()
    every: list[int] = []
    for out in outs:
        with open(out) as f:
            lines = f.read().split()
        assert lines[-2] == "shm_private"
        assert lines[-1] == str(int(ISOLATED))  # the host saw its own empty /dev/shm
        values = [int(v) for v in lines[:-2]]
        assert len(values) == n and values == sorted(values) and len(set(values)) == n
        every += values
    assert len(set(every)) == 6 * n
    with RedisNonce.attach("dup", url=server.url) as e:
        assert e.stats()["total_issued"] == 6 * n
        assert e.next() > max(every)
        e.unlink()


def test_record_updates_across_hosts(server: RedisServer, hosts: Hosts, tmp_path: Any) -> None:
    """3 hosts x 2 processes x 300 record updates: none lost (the counters equal N x P)."""
    start_at = time.time() + 2.0
    for h in range(3):
        for p in range(2):
            hosts.start(h, {"mode": "record", "name": "rec", "n": 300, "start_at": start_at,
                            "url": server.url if p == 0 else server.unix_url})
    hosts.wait()
    with RedisNonce.attach("rec", url=server.url) as e:
        assert e.record("kraken.counter", 2).read() == [1800, 5400]
        e.unlink()


@pytest.mark.parametrize("mix", ["sync", "async", "mixed"])
def test_sections_never_overlap_across_hosts(server: RedisServer, hosts: Hosts, tmp_path: Any,
                                             mix: str) -> None:
    """serialized()/aserialized() on 3 hosts: no overlap; nonces increase in entry order."""
    shared = tmp_path / "shared"
    shared.mkdir()
    start_at = time.time() + 2.0
    total = 0
    for h in range(3):
        for p in range(2):
            use_async = mix == "async" or (mix == "mixed" and h == 2)
            spec: dict[str, Any] = {"mode": "section", "name": f"sec-{mix}", "n": 25,
                                    "url": server.url if p == 0 else server.unix_url,
                                    "shared": str(shared), "start_at": start_at,
                                    "hold_s": 0.001}
            if use_async:
                spec.update({"async": True, "tasks": 4, "n": 6})
            total += spec["n"] * spec.get("tasks", 1)
            hosts.start(h, spec)
    hosts.wait()
    entries = [line.split() for line in (shared / "log").read_text().splitlines()]
    nonces = [int(n) for n, _tag in entries]
    assert len(nonces) == total
    assert all(b > a for a, b in itertools.pairwise(nonces)), "not in entry order"
    assert len({tag.split(".")[0] for _n, tag in entries}) == 6  # every process entered
    with RedisNonce.attach(f"sec-{mix}", url=server.url) as e:
        st = e.stats()
        assert st["section_entries"] == total and st["section_queue"] == 0
        assert st["section_waits"] > 0 and st["lease_lost"] == 0
        e.unlink()


def test_holder_killed_inside(server: RedisServer, hosts: Hosts, tmp_path: Any) -> None:
    """SIGKILL a holder after 3 leases inside: the waiting host enters within lease_s + bound."""
    base = {"name": "killed", "url": server.url, "lease_s": LEASE_S}
    holder = hosts.start(0, {**base, "mode": "hold", "out": str(tmp_path / "holder"),
                             "go": str(tmp_path / "never")})
    held = _wait_file(str(tmp_path / "holder"))
    waiter_out = str(tmp_path / "waiter")
    hosts.start(1, {**base, "mode": "enter", "url": server.unix_url, "out": waiter_out,
                    "timeout": 60})
    _wait_queue(server.url, "killed", 1)
    time.sleep(3 * LEASE_S)  # renewed: the waiter must still be outside
    assert not os.path.exists(waiter_out)
    killed_at = time.time()
    os.kill(holder.pid, signal.SIGKILL)
    entered = _wait_file(waiter_out)
    holder.wait(10)
    hosts.procs.remove(holder)
    hosts.wait()
    delay = entered["t"] - killed_at
    assert 0 < delay <= LEASE_S + BOUND_S, delay
    assert entered["nonce"] > held["nonce"]
    with RedisNonce.attach("killed", url=server.url) as e:
        e.unlink()


def _queue_length(url: str, name: str) -> int:
    with RedisNonce.attach(name, url=url) as e:
        n = e.stats()["section_queue"]
        assert isinstance(n, int)
        return n


def _wait_queue(url: str, name: str, length: int) -> None:
    deadline = time.monotonic() + 30
    while _queue_length(url, name) < length:
        assert time.monotonic() < deadline, "waiter never queued"
        time.sleep(0.01)


def test_waiter_killed_while_queued(server: RedisServer, hosts: Hosts, tmp_path: Any) -> None:
    """A waiter SIGKILLed in the queue delays the next one by at most about lease_s."""
    base = {"name": "deadwaiter", "url": server.url, "lease_s": LEASE_S}
    hosts.start(0, {**base, "mode": "hold", "out": str(tmp_path / "a"), "go": str(tmp_path / "go")})
    a_in = _wait_file(str(tmp_path / "a"))
    b = hosts.start(1, {**base, "mode": "enter", "out": str(tmp_path / "b"), "timeout": 60})
    _wait_queue(server.url, "deadwaiter", 1)
    hosts.start(2, {**base, "mode": "enter", "url": server.unix_url, "out": str(tmp_path / "c"),
                    "timeout": 60})
    _wait_queue(server.url, "deadwaiter", 2)
    os.kill(b.pid, signal.SIGKILL)  # dead, still first in the queue
    b.wait(10)
    hosts.procs.remove(b)
    (tmp_path / "go").write_text("")
    a_done = _wait_file(str(tmp_path / "a.done"))
    c = _wait_file(str(tmp_path / "c"))
    hosts.wait()
    assert not os.path.exists(tmp_path / "b")
    assert c["nonce"] > a_in["nonce"]
    assert 0 < c["t"] - a_done["t_left"] <= LEASE_S + BOUND_S
    with RedisNonce.attach("deadwaiter", url=server.url) as e:
        assert e.stats()["section_queue"] == 0
        e.unlink()


def test_paused_holder_rejected_as_stale(server: RedisServer, hosts: Hosts, tmp_path: Any) -> None:
    """SIGSTOP a holder past its lease; the next host enters and sends; the paused one,
    continued, sends its older nonce and the exchange rejects it (fencing token)."""
    with ServerProcess() as kraken:
        key, secret = kraken.register("paused")
        base = {"key": key, "secret": secret, "kraken": kraken.url, "url": server.url,
                "lease_s": LEASE_S, "send": True}
        a = hosts.start(0, {**base, "mode": "hold", "out": str(tmp_path / "a"),
                            "go": str(tmp_path / "go")})
        a_in = _wait_file(str(tmp_path / "a"))
        hosts.start(1, {**base, "mode": "enter", "url": server.unix_url,
                        "out": str(tmp_path / "b"), "timeout": 30})
        name = api_key_name(key)
        _wait_queue(server.url, name, 1)  # B waits behind A
        os.kill(a.pid, signal.SIGSTOP)  # paused inside, before sending
        paused_at = time.time()
        b = _wait_file(str(tmp_path / "b"))
        assert b["t"] - paused_at <= LEASE_S + BOUND_S
        assert b["nonce"] > a_in["nonce"]
        assert b["errors"] == []  # the new holder's call is accepted
        (tmp_path / "go").write_text("")
        os.kill(a.pid, signal.SIGCONT)  # the paused holder wakes up and sends
        a_done = _wait_file(str(tmp_path / "a.done"))
        hosts.wait()
        assert a_done["errors"] == ["EAPI:Invalid nonce"]  # stale: rejected, not reordered
        assert a_done["lost"] is True  # and the holder learnt it had lost the lease
        stats = kraken.stats()["keys"]["paused"]
        assert stats["accepted"] == 1 and stats["invalid_nonce"] == 1
        assert stats["last_nonce"] == b["nonce"]
    with RedisNonce.for_api_key(key, url=server.url) as e:
        assert e.stats()["lease_lost"] == 1
        e.unlink()


def test_redis_killed_and_restarted_from_aof(tmp_path: Any) -> None:
    """appendfsync always: SIGKILL of redis-server loses no value, even far ahead of the clock."""
    with RedisServer(str(tmp_path / "aof"), aof=True) as srv:
        e = RedisNonce.attach("aof", url=srv.unix_url, lease_s=LEASE_S)
        e.jump_forward(3_600 * 10**9)  # an hour ahead: the clock cannot cover a loss
        last = max(e.next() for _ in range(500))
        with e.serialized() as n:
            last = max(last, n)
        srv.kill()
        srv.start()  # same directory, same socket: loads the AOF
        after = e.next()
        assert after == last + 1
        assert e.stats()["recreated"] is False
        with e.serialized(timeout=5) as n2:
            assert n2 > after
        e.unlink()


def test_redis_killed_without_persistence_regresses(tmp_path: Any) -> None:
    """The same without persistence: values ahead of the clock are lost (documented; doctor warns).

    This shows the AOF test above can fail: nothing but the AOF keeps the value.
    """
    with RedisServer(str(tmp_path / "plain")) as srv:
        e = RedisNonce.attach("plain", url=srv.unix_url)
        e.jump_forward(3_600 * 10**9)
        last = e.next()
        assert any(f.check == "ahead" and f.status == "warn" for f in e.doctor())
        srv.kill()
        srv.start()
        after = e.next()
        assert after < last  # continues from the server clock, an hour below
        assert e.stats()["recreated"] is True
        e.unlink()


def test_kraken_api_from_three_hosts_on_one_key(server: RedisServer, hosts: Hosts) -> None:
    """KrakenAPI(url=...) on 3 hosts, one key, at the local Kraken test server: 0 invalid
    nonces and at most one request of the key in flight."""
    with ServerProcess() as kraken:
        key, secret = kraken.register("hosts")
        start_at = time.time() + 2.0
        for h in range(3):
            hosts.start(h, {"mode": "kraken", "name": "kr-hosts", "key": key, "secret": secret,
                            "kraken": kraken.url, "n": 15, "start_at": start_at,
                            "url": server.url if h != 1 else server.unix_url})
        hosts.wait()
        ks = kraken.stats()["keys"]["hosts"]
    assert ks["accepted"] == 45, ks
    assert ks["invalid_nonce"] == 0 and ks["max_inflight"] == 1, ks
