"""Several sync ccxt processes and one asyncio ccxt process sharing one Kraken API key.

Every process installs ``shmnonce.ccxt`` on its own exchange instance: the key's
private calls are serialized across all processes and tasks (Kraken never sees a
newer nonce before an older one) and share one call-counter model, while public
calls are not serialized. The async process runs ``--tasks`` tasks on one
``ccxt.async_support.kraken`` instance; waiting for the key never blocks its loop.

The key comes from the environment, never from the command line:
``KRAKEN_API_KEY`` and ``KRAKEN_API_SECRET``.

Against the local test server (no real account needed)::

    python tests/kraken_server.py serve          # prints READY http://127.0.0.1:PORT
    python examples/ccxt_pool.py --url http://127.0.0.1:PORT --test-server

``--test-server`` registers the key with the test server's control endpoint,
inventing a random one when the variables are not set. Against Kraken itself, set
the variables and drop both options (the calls are ``Balance``: read only).
Moving a key to shmnonce's nanosecond nonces is one-way: afterwards, clients of
the key without shmnonce (13-digit millisecond nonces) are rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async

from shmnonce.ccxt import install


def credentials(make_up: bool) -> tuple[str, str]:
    """The (key, secret) pair from the environment, or a random one for the test server."""
    key = os.environ.get("KRAKEN_API_KEY", "")
    secret = os.environ.get("KRAKEN_API_SECRET", "")
    if not (key and secret):
        if not make_up:
            raise SystemExit("set KRAKEN_API_KEY and KRAKEN_API_SECRET")
        key = "example-" + os.urandom(12).hex()
        secret = base64.b64encode(os.urandom(64)).decode()
    return key, secret


def register_with_test_server(url: str, key: str, secret: str) -> None:
    """Tell the local test server the key (loopback URLs only)."""
    if urllib.parse.urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("--test-server is for the local test server only")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = json.dumps({"label": "key", "key": key, "secret": secret}).encode()
    req = urllib.request.Request(url + "/_test/register", data=body, method="POST")
    with opener.open(req, timeout=10) as resp:
        resp.read()


def configure(exchange: Any, args: dict[str, Any]) -> Any:
    """Point the exchange at ``--url`` and install shmnonce on it."""
    exchange.enableRateLimit = args["ccxt_throttle"]
    if args["url"] is not None:
        exchange.urls["api"] = {"public": args["url"], "private": args["url"]}
    return install(exchange, state_dir=args["state_dir"], rate_limit=args["rate_limit"])


def sync_worker(index: int, key: str, secret: str, args: dict[str, Any]) -> dict[str, Any]:
    """``calls`` private Balance calls, one after the other; counts, never the key."""
    exchange = configure(ccxt.kraken({"apiKey": key, "secret": secret}), args)
    ok, errors = 0, []
    try:
        for _ in range(args["calls"]):
            try:
                exchange.private_post_balance()
                ok += 1
            except ccxt.BaseError as exc:  # InvalidNonce, DDoSProtection, ...
                errors.append(type(exc).__name__)
        stats = exchange.shmnonce.stats()
    finally:
        exchange.shmnonce.close()
    return {"worker": f"sync {index}", "pid": os.getpid(), "ok": ok, "errors": errors,
            "sequence": stats["sequence"]}


async def _async_worker(key: str, secret: str, args: dict[str, Any]) -> dict[str, Any]:
    exchange = configure(ccxt_async.kraken({"apiKey": key, "secret": secret}), args)
    ok, errors = 0, []
    worst_lag = 0.0

    async def heartbeat() -> None:  # shows that waiting for the key never blocks the loop
        nonlocal worst_lag
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            worst_lag = max(worst_lag, loop.time() - t - 0.01)

    async def task() -> None:
        nonlocal ok
        for _ in range(args["calls"]):
            try:
                await exchange.private_post_balance()
                ok += 1
            except ccxt.BaseError as exc:
                errors.append(type(exc).__name__)

    beat = asyncio.ensure_future(heartbeat())
    try:
        await asyncio.gather(*(task() for _ in range(args["tasks"])))
        stats = exchange.shmnonce.stats()
    finally:
        beat.cancel()
        await exchange.close()
        exchange.shmnonce.close()
    return {"worker": f"async x{args['tasks']} tasks", "pid": os.getpid(), "ok": ok,
            "errors": errors, "sequence": stats["sequence"], "worst_lag_ms": worst_lag * 1000}


def async_worker(key: str, secret: str, args: dict[str, Any]) -> dict[str, Any]:
    """``tasks`` tasks x ``calls`` private Balance calls on one async exchange."""
    return asyncio.run(_async_worker(key, secret, args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ccxt Kraken Balance from sync and async processes")
    parser.add_argument("--url", default=None, help="API base URL (default: Kraken's)")
    parser.add_argument("--sync-workers", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5, help="tasks in the async process")
    parser.add_argument("--calls", type=int, default=2, help="calls per sync worker and task")
    parser.add_argument("--rate-limit", default="starter",
                        choices=["starter", "intermediate", "pro", "none"])
    parser.add_argument("--no-ccxt-throttle", action="store_true",
                        help="enableRateLimit=False (with --rate-limit none: no waiting at all)")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--test-server", action="store_true",
                        help="register the key with the local test server")
    args = parser.parse_args(argv)
    if args.test_server and args.url is None:
        raise SystemExit("--test-server needs --url")

    key, secret = credentials(make_up=args.test_server)
    if args.test_server:
        register_with_test_server(args.url, key, secret)
    shared = {"url": args.url, "calls": args.calls, "tasks": args.tasks,
              "state_dir": args.state_dir, "ccxt_throttle": not args.no_ccxt_throttle,
              "rate_limit": None if args.rate_limit == "none" else args.rate_limit}
    t0 = time.monotonic()
    # spawn: every worker is a fresh process (the same works with fork)
    with multiprocessing.get_context("spawn").Pool(args.sync_workers + 1,
                                                   maxtasksperchild=1) as pool:
        sync = [pool.apply_async(sync_worker, (i, key, secret, shared))
                for i in range(args.sync_workers)]
        asyn = pool.apply_async(async_worker, (key, secret, shared))
        results = [r.get() for r in sync] + [asyn.get()]
    for r in results:
        lag = f", worst loop lag {r['worst_lag_ms']:.1f} ms" if "worst_lag_ms" in r else ""
        print(f"{r['worker']} pid {r['pid']} ({r['sequence']}): {r['ok']} ok, "
              f"{len(r['errors'])} errors {sorted(set(r['errors']))}{lag}")
    total_ok = sum(r["ok"] for r in results)
    total_err = sum(len(r["errors"]) for r in results)
    print(f"total: {total_ok} ok, {total_err} errors in {time.monotonic() - t0:.1f} s")
    return 0 if total_err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
