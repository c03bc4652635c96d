"""An asyncio bot: several tasks in several processes share one Kraken API key.

Every process runs an event loop with ``--tasks`` tasks; each task makes
``--calls`` private Balance calls through python-kraken-sdk's ``SpotAsyncClient``
with ``shmnonce.kraken_sdk.install``. All calls of the key, from every task of
every process, go through the key's section one at a time, in nonce order, and
share one rate-limit counter; a task waiting for the section or for the rate
limit never blocks its loop. A heartbeat task in each process measures how late
the loop runs it (the "loop lag"), which stays in milliseconds while other
processes hold the key's section.

The key comes from the environment, never from the command line:
``KRAKEN_API_KEY``/``KRAKEN_API_SECRET``.

Against the local test server (no real account needed)::

    python tests/kraken_server.py serve          # prints READY http://127.0.0.1:PORT
    python examples/async_bot.py --url http://127.0.0.1:PORT --test-server

``--test-server`` registers the key with the test server's control endpoint,
inventing a random one when the variables are not set. Against Kraken itself,
set the variables and drop both options (Balance only reads).
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

from kraken.spot import SpotAsyncClient

from shmnonce.kraken import KrakenError
from shmnonce.kraken_sdk import install


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
    body = json.dumps({"label": "bot", "key": key, "secret": secret}).encode()
    req = urllib.request.Request(url + "/_test/register", data=body, method="POST")
    with opener.open(req, timeout=10) as resp:
        resp.read()


async def bot(index: int, key: str, secret: str, args: dict[str, Any]) -> dict[str, Any]:
    """One process's loop: ``tasks`` tasks of ``calls`` calls, and a heartbeat."""
    rate_limit = None if args["rate_limit"] == "none" else args["rate_limit"]
    client = install(SpotAsyncClient(key=key, secret=secret, url=args["url"]),
                     args["state_dir"], rate_limit=rate_limit)
    ok = 0
    errors: list[str] = []
    worst_lag = 0.0
    running = True

    async def heartbeat() -> None:
        nonlocal worst_lag
        while running:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            worst_lag = max(worst_lag, time.monotonic() - t - 0.005)

    async def task() -> None:
        nonlocal ok
        for _ in range(args["calls"]):
            try:
                await client.request("POST", "/0/private/Balance")
            except KrakenError as exc:
                errors.append(type(exc).__name__)
            else:
                ok += 1

    beat = asyncio.create_task(heartbeat())
    try:
        await asyncio.gather(*(task() for _ in range(args["tasks"])))
        stats = client.shmnonce.stats()
    finally:
        running = False
        await beat
        await client.close()
    return {"process": index, "pid": os.getpid(), "ok": ok, "errors": errors,
            "sequence": stats["sequence"], "max_loop_lag_ms": round(worst_lag * 1000, 1)}


def process(index: int, key: str, secret: str, args: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(bot(index, key, secret, args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="asyncio Kraken bot in several processes")
    parser.add_argument("--url", default="https://api.kraken.com")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5, help="tasks per process")
    parser.add_argument("--calls", type=int, default=2, help="calls per task")
    parser.add_argument("--rate-limit", default="starter",
                        choices=["starter", "intermediate", "pro", "none"])
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--test-server", action="store_true",
                        help="register the key with the local test server")
    args = parser.parse_args(argv)

    key, secret = credentials(make_up=args.test_server)
    if args.test_server:
        register_with_test_server(args.url, key, secret)
    shared = {"url": args.url, "tasks": args.tasks, "calls": args.calls,
              "state_dir": args.state_dir, "rate_limit": args.rate_limit}
    jobs = [(i, key, secret, shared) for i in range(args.processes)]
    with multiprocessing.get_context("spawn").Pool(args.processes, maxtasksperchild=1) as pool:
        results = pool.starmap(process, jobs, chunksize=1)
    for r in sorted(results, key=lambda r: r["process"]):
        print(f"process {r['process']} pid {r['pid']} ({r['sequence']}): {r['ok']} ok, "
              f"{len(r['errors'])} errors {sorted(set(r['errors']))}, "
              f"max loop lag {r['max_loop_lag_ms']} ms")
    total_ok = sum(r["ok"] for r in results)
    total_err = sum(len(r["errors"]) for r in results)
    print(f"total: {total_ok} ok, {total_err} errors")
    return 0 if total_err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
