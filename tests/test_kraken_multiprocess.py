"""Kraken workloads from forked (clients inherited), spawned and unrelated processes, two keys.

Each test runs four worker processes of the three kinds; every process
alternates between keys A and B, so each key is used by every kind of process
at once. The baselines (plain krakenex; shmnonce without its limiter) show that
the same workloads do produce the errors the guarded runs must not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kraken_server import (
    ServerProcess,
    Workers,
    close_clients,
    make_clients,
    one_call,
    totals,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess() as srv:
        yield srv


def run_mixed(srv: ServerProcess, state_dir: str, calls: int, client: str = "shmnonce",
              options: dict[str, Any] | None = None, unrelated_client: str | None = None,
              ) -> dict[str, Any]:
    """2 forked (inheriting the clients built in the parent), 1 spawned, 1 unrelated process."""
    creds = [srv.register(label) for label in ("A", "B")]
    spec: dict[str, Any] = {
        "url": srv.url, "creds": creds, "state_dir": state_dir, "client": client,
        "options": options or {}, "calls": calls, "start_at": time.time() + 2.0,
    }
    inherited = make_clients(spec)
    try:
        if client != "plain":
            # A call in the parent leaves a pooled keep-alive connection and attached
            # engines behind; both forked children inherit the same client objects, so
            # without the after-fork hook they would share one TCP connection.
            for api in inherited:
                one_call(api, "Balance")
            srv.reset()
        with Workers() as w:
            w.fork(spec, inherited)
            w.fork(spec, inherited)
            w.spawn(spec)
            w.unrelated({**spec, "client": unrelated_client or client})
            results = w.results(timeout=90)
    finally:
        close_clients(inherited)
    out = totals(results)
    out["server"] = srv.stats()
    out["pids"] = sorted({r["pid"] for r in results})
    return out


def test_plain_krakenex_baseline_gets_invalid_nonces(server: ServerProcess,
                                                     state_dir: str) -> None:
    """The workload can fail: millisecond nonces from several processes collide and reorder."""
    server.configure(latency_s=0.01)
    out = run_mixed(server, state_dir, calls=15, client="plain")
    invalid = sum(k["invalid_nonce"] for k in out["server"]["keys"].values())
    assert invalid > 0
    assert out["errors"].get("EAPI:Invalid nonce", 0) == invalid


def test_shmnonce_no_invalid_nonce_one_in_flight_per_key(server: ServerProcess,
                                                         state_dir: str) -> None:
    server.configure(latency_s=0.01)
    calls = 15
    out = run_mixed(server, state_dir, calls=calls, options={"rate_limit": None},
                    unrelated_client="installed")
    assert len(out["pids"]) == 4
    assert out["exceptions"] == {} and out["errors"] == {}
    assert out["ok"] == 4 * 2 * calls
    st = out["server"]
    for label in ("A", "B"):
        ks = st["keys"][label]
        assert ks["invalid_nonce"] == 0 and ks["bad_signature"] == 0
        assert ks["accepted"] == 4 * calls
        assert ks["max_inflight"] == 1  # serialized per key across all processes
    assert st["max_distinct_keys_inflight"] == 2  # the two keys did not wait for each other


def test_burst_without_limiter_gets_rate_limit_errors(server: ServerProcess,
                                                      state_dir: str) -> None:
    """The baseline: the same burst with the limiter off exceeds the server's counter."""
    server.configure(latency_s=0.005, rate_max=5, rate_decay=20.0)
    out = run_mixed(server, state_dir, calls=6, options={"rate_limit": None})
    limited = sum(k["rate_limited"] for k in out["server"]["keys"].values())
    assert limited > 0
    assert out["exceptions"].get("KrakenRateLimitError", 0) == limited


def test_limiter_prevents_rate_limit_errors(server: ServerProcess, state_dir: str) -> None:
    server.configure(latency_s=0.005, rate_max=5, rate_decay=20.0)
    t0 = time.time()
    out = run_mixed(server, state_dir, calls=6, options={"rate_limit": [5, 20.0, 1.0]})
    assert out["exceptions"] == {} and out["errors"] == {}
    st = out["server"]
    for label in ("A", "B"):
        ks = st["keys"][label]
        assert ks["rate_limited"] == 0 and ks["invalid_nonce"] == 0
        assert ks["accepted"] == 24 and ks["max_level"] <= 5
    # 24 calls per key at capacity 4 and 20/s: at least (24 - 4) / 20 = 1 s, keys in parallel
    assert out["t1"] - out["t0"] >= 0.95
    assert out["t1"] - t0 < 30


def test_python_kraken_sdk_and_krakenex_share_a_key(server: ServerProcess,
                                                    state_dir: str) -> None:
    pytest.importorskip("kraken.spot")
    server.configure(latency_s=0.01)
    out = run_mixed(server, state_dir, calls=10, client="sdk",
                    options={"rate_limit": None}, unrelated_client="shmnonce")
    assert out["exceptions"] == {} and out["errors"] == {}
    st = out["server"]
    for label in ("A", "B"):
        ks = st["keys"][label]
        assert ks["invalid_nonce"] == 0 and ks["bad_signature"] == 0
        assert ks["accepted"] == 40 and ks["max_inflight"] == 1
    assert st["max_distinct_keys_inflight"] == 2


@pytest.mark.parametrize("client", ["shmnonce", "sdk"])
def test_forked_children_get_their_own_connections(server: ServerProcess, state_dir: str,
                                                   client: str) -> None:
    """A keep-alive connection pooled before fork must not be shared by the children.

    Public calls are not serialized, so two children writing to one inherited
    TCP connection would read each other's answers (the echo would not match).
    """
    if client == "sdk":
        pytest.importorskip("kraken.spot")
    server.configure(latency_s=0.005)
    spec = {"task": "echo", "url": server.url, "creds": [server.register("A")],
            "state_dir": state_dir, "client": client, "options": {}, "calls": 40,
            "start_at": time.time() + 1.0}
    clients = make_clients(spec)
    try:
        one_call(clients[0], "Balance")  # leaves a pooled keep-alive connection
        with Workers() as w:
            w.fork(spec, clients)
            w.fork(spec, clients)
            results = w.results(timeout=60)
    finally:
        close_clients(clients)
    assert [(r["ok"], r["mismatched"], r["failed"]) for r in results] == [(40, 0, 0)] * 2
