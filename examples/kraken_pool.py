"""Several worker processes, two Kraken API keys, private Balance calls.

Every worker uses one of the two keys through ``shmnonce.kraken.KrakenAPI``:
calls of one key are serialized across all workers (so Kraken never sees an
older nonce after a newer one) and share one rate-limit counter, while the two
keys proceed independently.

Keys come from the environment, never from the command line:
``KRAKEN_API_KEY_1``/``KRAKEN_API_SECRET_1`` and ``KRAKEN_API_KEY_2``/``KRAKEN_API_SECRET_2``.

Against the local test server (no real account needed)::

    python tests/kraken_server.py serve          # prints READY http://127.0.0.1:PORT
    python examples/kraken_pool.py --url http://127.0.0.1:PORT --test-server

``--test-server`` registers the keys with the test server's control endpoint,
inventing random ones when the variables are not set. Against Kraken itself,
set the variables and drop both options (Balance only reads).
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import sys
import urllib.parse
import urllib.request
from typing import Any

from shmnonce.kraken import KrakenAPI, KrakenError


def credentials(make_up: bool) -> list[tuple[str, str]]:
    """The two (key, secret) pairs from the environment, or random ones for the test server."""
    pairs = []
    for i in (1, 2):
        key = os.environ.get(f"KRAKEN_API_KEY_{i}", "")
        secret = os.environ.get(f"KRAKEN_API_SECRET_{i}", "")
        if not (key and secret):
            if not make_up:
                raise SystemExit(f"set KRAKEN_API_KEY_{i} and KRAKEN_API_SECRET_{i}")
            key = "example-" + os.urandom(12).hex()
            secret = base64.b64encode(os.urandom(64)).decode()
        pairs.append((key, secret))
    return pairs


def register_with_test_server(url: str, pairs: list[tuple[str, str]]) -> None:
    """Tell the local test server the keys (loopback URLs only)."""
    host = urllib.parse.urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("--test-server is for the local test server only")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for i, (key, secret) in enumerate(pairs, 1):
        body = json.dumps({"label": f"key{i}", "key": key, "secret": secret}).encode()
        req = urllib.request.Request(url + "/_test/register", data=body, method="POST")
        with opener.open(req, timeout=10) as resp:
            resp.read()


def worker(index: int, key: str, secret: str, args: dict[str, Any]) -> dict[str, Any]:
    """Make ``calls`` private Balance calls with one key; report counts, never the key."""
    api = KrakenAPI(key, secret, args["state_dir"], rate_limit=args["rate_limit"])
    api.uri = args["url"]
    ok, errors = 0, []
    try:
        for _ in range(args["calls"]):
            try:
                result = api.query_private("Balance")
            except KrakenError as exc:
                errors.append(type(exc).__name__)
                continue
            if result.get("error"):
                errors.extend(result["error"])
            else:
                ok += 1
        stats = api.stats()
    finally:
        api.close()
    return {"worker": index, "pid": os.getpid(), "key": index % 2 + 1, "ok": ok,
            "errors": errors, "sequence": stats["sequence"], "waits": stats["waits"],
            "invalid_nonce": stats["invalid_nonce"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kraken Balance from a pool of processes")
    parser.add_argument("--url", default="https://api.kraken.com")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5, help="calls per worker")
    parser.add_argument("--rate-limit", default="starter",
                        choices=["starter", "intermediate", "pro"])
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--test-server", action="store_true",
                        help="register the keys with the local test server")
    args = parser.parse_args(argv)

    pairs = credentials(make_up=args.test_server)
    if args.test_server:
        register_with_test_server(args.url, pairs)
    shared = {"url": args.url, "calls": args.calls, "state_dir": args.state_dir,
              "rate_limit": args.rate_limit}
    jobs = [(i, *pairs[i % 2], shared) for i in range(args.workers)]
    # one task per process, so every worker is its own process
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        results = pool.starmap(worker, jobs, chunksize=1)
    for r in sorted(results, key=lambda r: r["worker"]):
        print(f"worker {r['worker']} pid {r['pid']} key {r['key']} ({r['sequence']}): "
              f"{r['ok']} ok, {len(r['errors'])} errors {sorted(set(r['errors']))}")
    total_ok = sum(r["ok"] for r in results)
    total_err = sum(len(r["errors"]) for r in results)
    print(f"total: {total_ok} ok, {total_err} errors")
    return 0 if total_err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
