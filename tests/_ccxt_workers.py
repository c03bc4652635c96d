"""ccxt workloads for the ccxt tests, benchmarks and example, and a local Coincheck stand-in.

Workers build real ccxt exchanges (``ccxt.kraken``, ``ccxt.async_support.kraken``,
``ccxt.coincheck``) pointed at a local test server through ``exchange.urls['api']``,
with or without ``shmnonce.ccxt.install``, and make private calls:

* ``sync``: one exchange, ``calls`` calls one after the other;
* ``async``: one ``ccxt.async_support`` exchange shared by ``tasks`` tasks making
  ``calls`` calls each, while a heartbeat task measures how late the event loop
  wakes it (a loop blocked by a cross-process wait shows up as lag).

Processes are forked (exchange inherited from the parent), spawned, or started as
``python tests/_ccxt_workers.py worker`` (unrelated; spec as JSON on stdin, so the
credentials stay off argv). ``CoincheckServer`` is a stand-in for Coincheck's
private API (``ACCESS-NONCE`` strictly increasing per key, at most 2**63-1;
``ACCESS-SIGNATURE`` = HMAC-SHA256(secret, nonce + url + body), hex), run in its
own process like ``tests.kraken_server.ServerProcess``; it records nonces and
in-flight requests per key. Test code only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # unrelated worker: `python tests/_ccxt_workers.py worker`
    sys.path.insert(0, ROOT)

from tests.kraken_server import control  # noqa: E402

COINCHECK_MAX_NONCE = 9223372036854775807  # Coincheck's documented maximum ACCESS-NONCE
STANDIN_NONCE_ERROR = "stand-in: ACCESS-NONCE not above the last accepted one"


# --------------------------------------------------------------------------- exchanges


def make_exchange(spec: Mapping[str, Any], key: str, secret: str) -> Any:
    """A ccxt exchange for ``spec``: ``exchange`` kraken|coincheck, ``mode`` sync|async."""
    import ccxt

    name = spec.get("exchange", "kraken")
    if spec.get("mode", "sync") == "async":
        import ccxt.async_support as accxt

        cls = getattr(accxt, name)
    else:
        cls = getattr(ccxt, name)
    config: dict[str, Any] = {"apiKey": key, "secret": secret,
                              "enableRateLimit": bool(spec.get("enable_rate_limit", False))}
    if "ccxt_rate_limit_ms" in spec:
        config["rateLimit"] = spec["ccxt_rate_limit_ms"]
    exchange = cls(config)
    if name == "kraken":
        exchange.urls["api"] = {"public": spec["url"], "private": spec["url"]}
    else:
        exchange.urls["api"] = {"rest": spec["url"] + "/api"}
    session = getattr(exchange, "session", None)
    if session is not None and hasattr(session, "trust_env"):
        session.trust_env = False  # loopback only, whatever the environment's proxies
    if spec.get("install", True):
        from shmnonce.ccxt import install

        options = dict(spec.get("options", {}))
        if isinstance(options.get("rate_limit"), list):
            from shmnonce.kraken import RateLimit

            options["rate_limit"] = RateLimit(*options["rate_limit"])
        state_dir = None if options.get("url") else spec["state_dir"]  # url: Redis engine
        install(exchange, state_dir=state_dir, **options)
    return exchange


def private_call(exchange: Any) -> Any:
    """The private call the workloads make: a balance query, raw response."""
    if exchange.id == "kraken":
        return exchange.private_post_balance()
    return exchange.private_get_accounts_balance()


def _count(exceptions: dict[str, int], exc: BaseException) -> None:
    name = type(exc).__name__
    exceptions[name] = exceptions.get(name, 0) + 1


def _ready(spec: Mapping[str, Any]) -> str | None:
    """Tell the parent this worker is ready; the path whose appearance starts the run."""
    barrier = spec.get("barrier")
    if not barrier:
        return None
    with open(os.path.join(barrier, f"ready.{os.getpid()}"), "w"):
        pass
    return os.path.join(barrier, "go")


def _wait_start(spec: Mapping[str, Any]) -> None:
    """Wait at the start barrier (every worker of a pool starts together), if there is one."""
    go = _ready(spec)
    while go is not None and not os.path.exists(go):
        time.sleep(0.002)


def release(barrier: str, workers: int, timeout: float = 90.0) -> None:
    """Parent side of the barrier: wait until ``workers`` are ready, then start them all."""
    deadline = time.monotonic() + timeout
    while len([n for n in os.listdir(barrier) if n.startswith("ready.")]) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only some of {workers} workers got ready")
        time.sleep(0.01)
    with open(os.path.join(barrier, "go"), "w"):
        pass


def run_sync(spec: Mapping[str, Any], exchange: Any | None = None) -> dict[str, Any]:
    """``calls`` private calls from one sync exchange (built here unless inherited)."""
    own = exchange is None
    if exchange is None:
        exchange = make_exchange(spec, *spec["creds"])
    ok = 0
    exceptions: dict[str, int] = {}
    try:
        _wait_start(spec)
        t0 = time.time()
        for _ in range(int(spec["calls"])):
            try:
                private_call(exchange)
                ok += 1
            except Exception as exc:  # counted; the test decides
                _count(exceptions, exc)
        t1 = time.time()
    finally:
        if own:
            guard = getattr(exchange, "shmnonce", None)
            if guard is not None:
                guard.close()
    return {"pid": os.getpid(), "mode": "sync", "ok": ok, "exceptions": exceptions,
            "t0": t0, "t1": t1}


async def _run_async(spec: Mapping[str, Any]) -> dict[str, Any]:
    glue = None
    if spec.get("blocking_glue"):
        # The baseline of the loop-lag test: plain ccxt with hand-written glue that waits
        # for the key with the *sync* section, blocking the event loop meanwhile.
        from shmnonce import ShmNonce

        exchange = make_exchange({**spec, "install": False}, *spec["creds"])
        glue = ShmNonce.for_api_key(spec["creds"][0], state_dir=spec["state_dir"])
        box = {"nonce": 0}
        exchange.nonce = exchange.incrementing_nonce = lambda: box["nonce"]
    else:
        exchange = make_exchange(spec, *spec["creds"])
    # ccxt builds its aiohttp session and SSL context on first use, synchronously (about
    # 50-100 ms here): done before the measured window, as a bot does at start-up.
    exchange.open()
    ok = 0
    exceptions: dict[str, int] = {}
    lags: list[float] = []
    stop = asyncio.Event()
    period = float(spec.get("heartbeat_s", 0.005))

    async def heartbeat() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(period)
            lags.append(loop.time() - t - period)

    async def task() -> None:
        nonlocal ok
        for _ in range(int(spec["calls"])):
            try:
                if glue is None:
                    await private_call(exchange)
                else:
                    with glue.serialized() as nonce:  # blocks the loop while others hold it
                        box["nonce"] = nonce
                        await private_call(exchange)
                ok += 1
            except Exception as exc:
                _count(exceptions, exc)

    try:
        go = _ready(spec)
        while go is not None and not os.path.exists(go):
            await asyncio.sleep(0.002)
        beat = asyncio.ensure_future(heartbeat())
        t0 = time.time()
        await asyncio.gather(*(task() for _ in range(int(spec.get("tasks", 1)))))
        t1 = time.time()
        stop.set()
        await beat
    finally:
        await exchange.close()
        guard = getattr(exchange, "shmnonce", None)
        if guard is not None:
            guard.close()
        if glue is not None:
            glue.close()
    lags.sort()
    return {"pid": os.getpid(), "mode": "async", "ok": ok, "exceptions": exceptions,
            "t0": t0, "t1": t1, "max_lag_s": lags[-1] if lags else 0.0,
            "p99_lag_s": lags[int(len(lags) * 0.99)] if lags else 0.0, "beats": len(lags)}


def run_async(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``tasks`` tasks x ``calls`` private calls on one async exchange, loop lag measured."""
    return asyncio.run(_run_async(spec))


def public_echo(exchange: Any, params: dict[str, str]) -> Any:
    """The Kraken test server's public ``Echo`` through ccxt's request path (api as ccxt has it)."""
    import inspect

    api = inspect.getattr_static(type(exchange), "public_get_time").api
    return exchange.request("Echo", api, "GET", params)


def run_echo(spec: Mapping[str, Any], exchange: Any) -> dict[str, Any]:
    """Public calls whose answers must carry this process's own parameters."""
    _wait_start(spec)
    ok = mismatched = failed = 0
    t0 = time.time()
    for i in range(int(spec["calls"])):
        mine = {"pid": str(os.getpid()), "i": str(i)}
        try:
            res = public_echo(exchange, mine)
        except Exception:
            failed += 1
            continue
        if res.get("result") == mine:
            ok += 1
        else:
            mismatched += 1
    return {"pid": os.getpid(), "ok": ok, "mismatched": mismatched, "failed": failed,
            "exceptions": {}, "t0": t0, "t1": time.time()}


def run(spec: Mapping[str, Any], exchange: Any | None = None) -> dict[str, Any]:
    if spec.get("task") == "echo":
        return run_echo(spec, exchange if exchange is not None else make_exchange(
            spec, *spec["creds"]))
    if spec.get("mode", "sync") == "async":
        return run_async(spec)
    return run_sync(spec, exchange)


# --------------------------------------------------------------------------- processes


def _pipe_worker(spec: Mapping[str, Any], conn: Any, exchange: Any | None) -> None:
    try:
        conn.send(run(spec, exchange))
    except BaseException as exc:
        conn.send({"pid": os.getpid(), "fatal": repr(exc)})
        raise
    finally:
        conn.close()


class Pool:
    """Forked, spawned and unrelated ccxt worker processes; every one cleaned up by PID."""

    def __init__(self) -> None:
        self._mp: list[tuple[Any, Any]] = []
        self._sub: list[subprocess.Popen[str]] = []

    def fork(self, spec: Mapping[str, Any], exchange: Any | None = None) -> None:
        """A forked child; a sync ``exchange`` built (and installed) in the parent is inherited."""
        self._start("fork", spec, exchange)

    def spawn(self, spec: Mapping[str, Any]) -> None:
        self._start("spawn", spec, None)

    def _start(self, method: str, spec: Mapping[str, Any], exchange: Any | None) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context(method)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_pipe_worker, args=(dict(spec), send, exchange))
        proc.start()
        send.close()
        self._mp.append((proc, recv))

    def unrelated(self, spec: Mapping[str, Any]) -> None:
        """``python tests/_ccxt_workers.py worker``, spec on stdin."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(dict(spec)))
        proc.stdin.close()
        self._sub.append(proc)

    def results(self, timeout: float = 90.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out: list[dict[str, Any]] = []
        for proc, recv in self._mp:
            if not recv.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker {proc.pid} did not report")
            try:
                out.append(recv.recv())
            except EOFError:
                proc.join(5)
                raise RuntimeError(f"worker {proc.pid} died, exit code {proc.exitcode}") from None
            proc.join(max(0.0, deadline - time.monotonic()))
        for sub in self._sub:
            assert sub.stdout is not None
            text = sub.stdout.read()
            sub.wait(max(0.0, deadline - time.monotonic()))
            if sub.returncode != 0:
                raise RuntimeError(f"worker {sub.pid} exited {sub.returncode}")
            out.append(json.loads(text))
        fatal = [r for r in out if "fatal" in r]
        if fatal:
            raise RuntimeError(f"worker failed: {fatal}")
        return out

    def cleanup(self) -> None:
        for proc, recv in self._mp:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)
            recv.close()
            proc.close()
        for sub in self._sub:
            if sub.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sub.pid, signal.SIGKILL)
                sub.wait(5)
            if sub.stdout is not None:
                sub.stdout.close()
        self._mp, self._sub = [], []

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def totals(results: list[dict[str, Any]]) -> dict[str, Any]:
    exceptions: dict[str, int] = {}
    for r in results:
        for k, v in r["exceptions"].items():
            exceptions[k] = exceptions.get(k, 0) + v
    return {"ok": sum(r["ok"] for r in results), "exceptions": exceptions,
            "t0": min(r["t0"] for r in results), "t1": max(r["t1"] for r in results)}


def run_pool(spec: dict[str, Any],
             sync_kinds: tuple[str, ...] = ("fork", "spawn", "unrelated"),
             inherited: Any | None = None, async_spec: dict[str, Any] | None = None,
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sync processes of the given kinds (+ an unrelated async one), started at a barrier.

    ``fork`` children inherit ``inherited`` (an exchange built and used in the parent).
    """
    barrier = tempfile.mkdtemp(dir=os.path.dirname(spec["state_dir"]))
    spec = {**spec, "barrier": barrier}
    with Pool() as pool:
        for kind in sync_kinds:
            if kind == "fork":
                pool.fork(spec, inherited)
            elif kind == "spawn":
                pool.spawn(spec)
            else:
                pool.unrelated(spec)
        if async_spec is not None:
            pool.unrelated({**spec, **async_spec, "mode": "async"})
        release(barrier, len(sync_kinds) + (async_spec is not None))
        results = pool.results()
    # the processes did run at the same time (a late starter would hide the race)
    assert max(r["t0"] for r in results) < min(r["t1"] for r in results), results
    return totals(results), results


def kraken_spec(srv: Any, creds: tuple[str, str], state_dir: str, **kw: Any
                ) -> dict[str, Any]:
    return {"exchange": "kraken", "url": srv.url, "creds": list(creds), "state_dir": state_dir,
            "install": True, "options": {"rate_limit": None}, "calls": 20, **kw}


RATE = (10, 5.0, 1.0)  # max counter, decay per second, headroom: a fast tier for the test


def rate_pool(server: Any, state_dir: str, calls: int,
              async_spec: dict[str, Any] | None = None) -> tuple[float, float, dict[str, Any]]:
    """3 sync processes (+ an async one) with ccxt's default throttle on, shmnonce's model on.

    Returns (wall time, the model's bound, the server's key stats).
    """
    server.configure(latency_s=0.02, rate_max=RATE[0], rate_decay=RATE[1])
    key, secret = server.register("A")
    spec = kraken_spec(server, (key, secret), state_dir, calls=calls, enable_rate_limit=True,
                       options={"rate_limit": list(RATE)})
    out, _ = run_pool(spec, ("fork", "spawn", "unrelated"), async_spec=async_spec)
    n = out["ok"]
    assert out["exceptions"] == {}
    # The model admits max - headroom at once, then one call per 1/decay s; calls are
    # serialized, so each adds the server's latency (and client overhead) to the span.
    bound = max(0.0, n - (RATE[0] - RATE[2])) / RATE[1] + n * (0.02 + 0.02) + 1.0
    return out["t1"] - out["t0"], bound, server.stats()["keys"]["A"]


# --------------------------------------------------------------------------- Coincheck stand-in


class _CoinKey:
    def __init__(self, label: str, secret: str) -> None:
        self.label = label
        self.secret = secret
        self.last_nonce = 0
        self.accepted = self.invalid_nonce = self.bad_signature = 0
        self.inflight = self.max_inflight = 0
        self.max_nonce_digits = 0

    def snapshot(self) -> dict[str, Any]:
        return {"last_nonce": self.last_nonce, "accepted": self.accepted,
                "invalid_nonce": self.invalid_nonce, "bad_signature": self.bad_signature,
                "max_inflight": self.max_inflight, "max_nonce_digits": self.max_nonce_digits}


class _CoinHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _CoinServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silent."""

    def _send(self, obj: object, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length).decode() if length else ""

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/_test/stats":
            with self.server.lock:
                self._send({"requests": self.server.requests,
                            "keys": {k.label: k.snapshot() for k in self.server.keys.values()}})
        elif path == "/api/accounts/balance":
            self._private(path, "")
        elif path == "/api/ticker":
            self._send({"last": 1.0, "bid": 1.0, "ask": 1.0, "high": 1.0, "low": 1.0,
                        "volume": 1.0, "timestamp": int(time.time())})
        else:
            self._send({"success": False, "error": "not found"}, 404)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        if path.startswith("/_test/"):
            cfg = json.loads(body or "{}")
            with self.server.lock:
                if path == "/_test/register":
                    self.server.keys[cfg["key"]] = _CoinKey(cfg["label"], cfg["secret"])
                elif path == "/_test/configure":
                    self.server.latency_s = float(cfg.get("latency_s", self.server.latency_s))
            self._send({"ok": True})
        else:
            self._private(path, body)

    def _private(self, path: str, body: str) -> None:
        srv = self.server
        key = self.headers.get("ACCESS-KEY", "")
        nonce_s = self.headers.get("ACCESS-NONCE", "")
        sign = self.headers.get("ACCESS-SIGNATURE", "")
        url = f"http://{self.headers.get('Host', '')}{self.path}"
        error: str | None = None
        with srv.lock:
            srv.requests += 1
            ks = srv.keys.get(key)
            if ks is None:
                error = "invalid authentication"
            else:
                expected = hmac.new(ks.secret.encode(), (nonce_s + url + body).encode(),
                                    hashlib.sha256).hexdigest()
                if not nonce_s.isdigit() or not hmac.compare_digest(sign, expected):
                    ks.bad_signature += 1
                    error = "invalid authentication"
                elif int(nonce_s) <= ks.last_nonce or int(nonce_s) > COINCHECK_MAX_NONCE:
                    ks.invalid_nonce += 1
                    error = STANDIN_NONCE_ERROR
                else:
                    ks.last_nonce = int(nonce_s)
                    ks.max_nonce_digits = max(ks.max_nonce_digits, len(nonce_s))
                    ks.accepted += 1
                ks.inflight += 1
                ks.max_inflight = max(ks.max_inflight, ks.inflight)
            latency = srv.latency_s
        try:
            if latency > 0:
                time.sleep(latency)
        finally:
            if ks is not None:
                with srv.lock:
                    ks.inflight -= 1
        if error is not None:
            self._send({"success": False, "error": error})
        else:
            self._send({"success": True, "jpy": "1000.0", "btc": "0.5"})


class _CoinServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CoinHandler)
        self.lock = threading.Lock()
        self.keys: dict[str, _CoinKey] = {}
        self.latency_s = 0.0
        self.requests = 0


def serve_coincheck() -> None:
    server = _CoinServer()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda s, f: stop.set())
    signal.signal(signal.SIGINT, lambda s, f: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    print(f"READY http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


class CoincheckServer:
    """The Coincheck stand-in in its own process, started and stopped by PID."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve-coincheck"],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"stand-in did not start: {line!r}")
        self.url = line.split(" ", 1)[1]
        if latency_s:
            control(self.url, "/_test/configure", {"latency_s": latency_s})

    def register(self, label: str) -> tuple[str, str]:
        key, secret = "cc-" + os.urandom(12).hex(), os.urandom(24).hex()
        control(self.url, "/_test/register", {"label": label, "key": key, "secret": secret})
        return key, secret

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = control(self.url, "/_test/stats")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> CoincheckServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    if sys.argv[1:] == ["worker"]:
        print(json.dumps(run(json.loads(sys.stdin.read()))), flush=True)
    elif sys.argv[1:] == ["serve-coincheck"]:
        serve_coincheck()
    else:
        raise SystemExit("usage: _ccxt_workers.py worker|serve-coincheck")


if __name__ == "__main__":
    main()
