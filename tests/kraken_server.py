"""Local Kraken-compatible REST test server and the client workloads that drive it.

The server is test code only. It binds to 127.0.0.1 on an ephemeral port and
implements what the Kraken tests need to be able to fail:

* ``API-Sign`` verified exactly as Kraken does: HMAC-SHA512 keyed with the
  base64-decoded secret over ``urlpath + SHA256(nonce + urlencoded body)``;
* per key, the last accepted nonce; a nonce not above it is rejected with
  ``EAPI:Invalid nonce`` (checked on arrival, before the latency sleep, so a
  request that overtakes an earlier-issued one is caught);
* Kraken's REST call counter per key (cost 1; 2 for ledger/trade history;
  AddOrder/CancelOrder outside it), continuously decaying, with
  ``EAPI:Rate limit exceeded`` when a call would take it above the maximum;
* an optional ``EGeneral:Temporary lockout`` after repeated invalid nonces;
* configurable error answers per method (``fail_methods``), for "never retried";
* configurable latency and, per key and globally, the maximum number of
  requests in flight at once.

Run as a separate process (``serve``) so that test processes can fork without
a server thread in them. ``ServerProcess`` starts and stops it by PID and talks
to its ``/_test/*`` control endpoints. API keys and secrets are registered over
HTTP and never printed or written to a file; statistics are keyed by a label.

The module also holds the client-side workload (``run_calls``) used by forked,
spawned and unrelated (``python tests/kraken_server.py worker``) processes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COST_2 = frozenset({"Ledgers", "QueryLedgers", "TradesHistory", "QueryTrades"})
COST_0 = frozenset({"AddOrder", "CancelOrder"})


def call_cost(method: str) -> int:
    """Kraken's documented REST call-counter cost of a private method."""
    if method in COST_0:
        return 0
    return 2 if method in COST_2 else 1


def new_credentials() -> tuple[str, str]:
    """A random test key and base64 secret (Kraken secrets are 64 bytes, base64)."""
    key = "test-" + base64.urlsafe_b64encode(os.urandom(30)).decode().rstrip("=")
    return key, base64.b64encode(os.urandom(64)).decode()


def kraken_signature(urlpath: str, body: str, nonce: str, secret_b64: str) -> str:
    """Kraken's API-Sign: HMAC-SHA512(b64decode(secret), urlpath + SHA256(nonce + body))."""
    message = urlpath.encode() + hashlib.sha256((nonce + body).encode()).digest()
    mac = hmac.new(base64.b64decode(secret_b64), message, hashlib.sha512)
    return base64.b64encode(mac.digest()).decode()


# --------------------------------------------------------------------------- server


class _KeyState:
    """Everything the server keeps for one API key."""

    def __init__(self, label: str, secret: str) -> None:
        self.label = label
        self.secret = secret
        self.last_nonce = 0
        self.level = 0.0
        self.level_t = time.monotonic()
        self.inflight = 0
        self.max_inflight = 0
        self.accepted = 0
        self.invalid_nonce = 0
        self.bad_signature = 0
        self.rate_limited = 0
        self.lockout_rejections = 0
        self.invalid_nonce_times: list[float] = []
        self.locked_until = 0.0
        self.max_level = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "last_nonce": self.last_nonce,
            "accepted": self.accepted,
            "invalid_nonce": self.invalid_nonce,
            "bad_signature": self.bad_signature,
            "rate_limited": self.rate_limited,
            "lockout_rejections": self.lockout_rejections,
            "max_inflight": self.max_inflight,
            "max_level": round(self.max_level, 4),
        }


class _ServerState:
    """Shared state of the server; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, _KeyState] = {}
        self.latency_s = 0.0
        self.rate_max: float | None = None
        self.rate_decay = 0.0
        self.lockout_after = 0
        self.lockout_window_s = 60.0
        self.lockout_s = 5.0
        self.fail_methods: dict[str, str] = {}
        self.inflight = 0
        self.max_inflight = 0
        self.inflight_keys: dict[str, int] = {}
        self.max_distinct_keys_inflight = 0
        self.requests = 0

    def configure(self, cfg: Mapping[str, Any]) -> None:
        for name in ("latency_s", "rate_max", "rate_decay", "lockout_after",
                     "lockout_window_s", "lockout_s", "fail_methods"):
            if name in cfg:
                setattr(self, name, cfg[name])

    def reset_stats(self) -> None:
        self.max_inflight = self.inflight
        self.max_distinct_keys_inflight = len(self.inflight_keys)
        self.requests = 0
        for ks in self.keys.values():
            ks.max_inflight = ks.inflight
            ks.accepted = ks.invalid_nonce = ks.bad_signature = 0
            ks.rate_limited = ks.lockout_rejections = 0
            ks.max_level = ks.level

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "max_inflight": self.max_inflight,
            "max_distinct_keys_inflight": self.max_distinct_keys_inflight,
            "keys": {ks.label: ks.snapshot() for ks in self.keys.values()},
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr log."""

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
        st = self.server.state
        if path == "/_test/stats":
            with st.lock:
                self._send(st.snapshot())
        elif path == "/0/public/Time":
            now = time.time()
            self._send({"error": [], "result": {"unixtime": int(now), "rfc1123": ""}})
        elif path == "/0/public/Echo":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            time.sleep(self.server.state.latency_s)
            self._send({"error": [], "result": {k: v[0] for k, v in query.items()}})
        elif path.startswith("/0/public/"):
            self._send({"error": [], "result": {}})
        else:
            self._send({"error": ["EGeneral:Unknown method"]}, 404)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        if path.startswith("/_test/"):
            self._control(path, json.loads(body or "{}"))
        elif path.startswith("/0/private/"):
            self._private(path, body)
        else:
            self._send({"error": ["EGeneral:Unknown method"]}, 404)

    def _control(self, path: str, cfg: dict[str, Any]) -> None:
        st = self.server.state
        with st.lock:
            if path == "/_test/register":
                st.keys[cfg["key"]] = _KeyState(cfg["label"], cfg["secret"])
            elif path == "/_test/configure":
                st.configure(cfg)
            elif path == "/_test/prime":
                ks = next(k for k in st.keys.values() if k.label == cfg["label"])
                ks.last_nonce = int(cfg["nonce"])
            elif path == "/_test/reset":
                st.reset_stats()
            else:
                self._send({"error": ["unknown control"]}, 404)
                return
        self._send({"ok": True})

    def _private(self, path: str, body: str) -> None:
        st = self.server.state
        method = path.rsplit("/", 1)[-1]
        key = self.headers.get("API-Key", "")
        sign = self.headers.get("API-Sign", "")
        fields = urllib.parse.parse_qs(body, keep_blank_values=True)
        nonce_s = fields.get("nonce", [""])[0]
        error: str | None = None
        with st.lock:
            st.requests += 1
            ks = st.keys.get(key)
            now = time.monotonic()
            if ks is None:
                error = "EAPI:Invalid key"
            elif ks.locked_until > now:
                ks.lockout_rejections += 1
                error = "EGeneral:Temporary lockout"
            elif not nonce_s.isdigit() or not hmac.compare_digest(
                sign, kraken_signature(path, body, nonce_s, ks.secret)
            ):
                ks.bad_signature += 1
                error = "EAPI:Invalid signature"
            elif int(nonce_s) <= ks.last_nonce:
                ks.invalid_nonce += 1
                error = "EAPI:Invalid nonce"
                if st.lockout_after:
                    ks.invalid_nonce_times = [
                        t for t in ks.invalid_nonce_times if now - t < st.lockout_window_s
                    ] + [now]
                    if len(ks.invalid_nonce_times) >= st.lockout_after:
                        ks.locked_until = now + st.lockout_s
                        ks.invalid_nonce_times = []
            else:
                ks.last_nonce = int(nonce_s)
                if st.rate_max is not None:
                    ks.level = max(0.0, ks.level - st.rate_decay * (now - ks.level_t))
                    ks.level_t = now
                    cost = call_cost(method)
                    if ks.level + cost > st.rate_max + 1e-9:
                        ks.rate_limited += 1
                        error = "EAPI:Rate limit exceeded"
                    else:
                        ks.level += cost
                        ks.max_level = max(ks.max_level, ks.level)
                if error is None and method in st.fail_methods:
                    error = st.fail_methods[method]
                elif error is None:
                    ks.accepted += 1
            label = ks.label if ks is not None else "?"
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
            st.inflight_keys[label] = st.inflight_keys.get(label, 0) + 1
            st.max_distinct_keys_inflight = max(
                st.max_distinct_keys_inflight, len(st.inflight_keys)
            )
            if ks is not None:
                ks.inflight += 1
                ks.max_inflight = max(ks.max_inflight, ks.inflight)
            latency = st.latency_s
        try:
            if latency > 0:
                time.sleep(latency)
        finally:
            with st.lock:
                st.inflight -= 1
                st.inflight_keys[label] -= 1
                if not st.inflight_keys[label]:
                    del st.inflight_keys[label]
                if ks is not None:
                    ks.inflight -= 1
        if error is not None:
            self._send({"error": [error]})
        elif method == "Balance":
            self._send({"error": [], "result": {"ZUSD": "1000.0000", "XXBT": "0.5000000000"}})
        else:
            self._send({"error": [], "result": {"method": method}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__((host, port), _Handler)
        self.state = _ServerState()


def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve until SIGTERM/SIGINT; print ``READY <url>`` once listening."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the test server binds to loopback only")
    server = _Server(host, port)
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    print(f"READY http://{host}:{server.server_address[1]}", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


# --------------------------------------------------------------------------- control client

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def control(url: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
    """POST (payload) or GET (no payload) a control endpoint and return its JSON."""
    data = None if payload is None else json.dumps(dict(payload)).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    with _OPENER.open(req, timeout=10) as resp:
        return json.loads(resp.read())


class ServerProcess:
    """The test server in its own process, started and stopped by PID."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "serve"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"test server did not start: {line!r}")
        self.url = line.split(" ", 1)[1]
        self.labels: dict[str, str] = {}
        if latency_s:
            self.configure(latency_s=latency_s)

    def register(self, label: str, key: str | None = None, secret: str | None = None
                 ) -> tuple[str, str]:
        """Register (or create) credentials under ``label``; returns (key, secret)."""
        if key is None or secret is None:
            key, secret = new_credentials()
        control(self.url, "/_test/register", {"label": label, "key": key, "secret": secret})
        return key, secret

    def configure(self, **cfg: Any) -> None:
        control(self.url, "/_test/configure", cfg)

    def prime(self, label: str, nonce: int) -> None:
        """Set the last accepted nonce of a key (another client used larger nonces)."""
        control(self.url, "/_test/prime", {"label": label, "nonce": nonce})

    def reset(self) -> None:
        control(self.url, "/_test/reset", {})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = control(self.url, "/_test/stats")
        return result

    def stop(self) -> None:
        """Terminate by PID, escalate to SIGKILL, close the pipe."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- client workload


def make_client(spec: Mapping[str, Any], key: str, secret: str) -> Any:
    """Build the client a spec asks for: ``shmnonce``, ``installed``, ``sdk`` or ``plain``."""
    import krakenex

    kind = spec.get("client", "shmnonce")
    options = dict(spec.get("options", {}))
    if "rate_limit" in options and isinstance(options["rate_limit"], list):
        from shmnonce.kraken import RateLimit

        mx, decay, headroom = options["rate_limit"]
        options["rate_limit"] = RateLimit(mx, decay, headroom)
    if kind == "sdk":
        from kraken.spot import User

        from shmnonce.kraken_sdk import install as install_sdk

        return install_sdk(User(key=key, secret=secret, url=spec["url"]),
                           state_dir=spec["state_dir"], **options)
    if kind == "plain":
        api: Any = krakenex.API(key, secret)
    elif kind == "installed":
        from shmnonce.kraken import install

        api = install(krakenex.API(key, secret), state_dir=spec["state_dir"], **options)
    else:
        from shmnonce.kraken import KrakenAPI

        api = KrakenAPI(key, secret, state_dir=spec["state_dir"], **options)
    api.uri = spec["url"]
    api.session.trust_env = False
    return api


def make_clients(spec: Mapping[str, Any]) -> list[Any]:
    """One client per (key, secret) pair in ``spec['creds']``."""
    return [make_client(spec, key, secret) for key, secret in spec["creds"]]


def close_clients(clients: list[Any]) -> None:
    """Close HTTP sessions and detach from the sequences."""
    for api in clients:
        if hasattr(api, "close"):
            api.close()
        guard = getattr(api, "shmnonce", None)
        if guard is not None:
            guard.close()


def one_call(api: Any, method: str) -> Any:
    if hasattr(api, "query_private"):
        return api.query_private(method)
    # python-kraken-sdk client: request() returns the result or raises
    return {"error": [], "result": api.request("POST", f"/0/private/{method}")}


def run_calls(spec: Mapping[str, Any], clients: list[Any] | None = None) -> dict[str, Any]:
    """Make ``spec['calls']`` private calls per client, alternating between the clients.

    ``start_at`` (wall-clock seconds) lines processes up so their first calls
    collide. ``clients`` are prebuilt clients (fork-inherited); otherwise they
    are built from ``spec``. ``global_lock`` names a sequence whose section is
    held around every call (the single-lock baseline). Returns outcome counts, timing and shared stats.
    """
    own = clients is None
    clients = make_clients(spec) if clients is None else clients
    global_lock = None
    if spec.get("global_lock"):
        from shmnonce import ShmNonce

        global_lock = ShmNonce.attach(spec["global_lock"], spec["state_dir"])
    errors: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    ok = 0
    try:
        delay = float(spec.get("start_at", 0.0)) - time.time()
        if delay > 0:
            time.sleep(delay)
        t0 = time.time()
        method = spec.get("method", "Balance")
        for _ in range(int(spec["calls"])):
            for api in clients:
                try:
                    if global_lock is None:
                        res = one_call(api, method)
                    else:  # baseline: one lock around every call of every key
                        with global_lock.serialized():
                            res = one_call(api, method)
                except Exception as exc:  # counted; the test decides
                    name = type(exc).__name__
                    exceptions[name] = exceptions.get(name, 0) + 1
                    continue
                if res.get("error"):
                    for err in res["error"]:
                        errors[err] = errors.get(err, 0) + 1
                else:
                    ok += 1
        t1 = time.time()
    finally:
        if own:
            close_clients(clients)
        if global_lock is not None:
            global_lock.close()
    return {"pid": os.getpid(), "ok": ok, "errors": errors, "exceptions": exceptions,
            "t0": t0, "t1": t1}


def run_limiter(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Acquire a shared CallCounter or StartupBurstGuard ``spec['n']`` times.

    Returns the ``time.monotonic_ns()`` (system-wide) of each admission, so the
    parent can check the merged admissions of all processes against the model.
    """
    from shmnonce import ShmNonce
    from shmnonce.kraken.ratelimit import CallCounter, RateLimit, StartupBurstGuard

    eng = ShmNonce.attach(spec["name"], state_dir=spec["state_dir"])
    try:
        obj: Any
        if spec["kind"] == "counter":
            obj = CallCounter(eng, RateLimit(*spec["limit"]))
        else:
            obj = StartupBurstGuard(eng, **spec["guard"])
        delay = float(spec.get("start_at", 0.0)) - time.time()
        if delay > 0:
            time.sleep(delay)
        times: list[int] = []
        waited = 0.0
        for _ in range(int(spec["n"])):
            waited += obj.acquire()
            times.append(time.monotonic_ns())
    finally:
        eng.close()
    return {"pid": os.getpid(), "times": times, "waited": waited}


def run_echo(spec: Mapping[str, Any], clients: list[Any]) -> dict[str, Any]:
    """Public ``Echo`` calls whose answers must carry this process's own parameters."""
    api = clients[0]
    delay = float(spec.get("start_at", 0.0)) - time.time()
    if delay > 0:
        time.sleep(delay)
    ok = mismatched = failed = 0
    for i in range(int(spec["calls"])):
        mine = {"pid": str(os.getpid()), "i": str(i)}
        try:
            if hasattr(api, "query_public"):
                res = api.query_public("Echo", mine, timeout=5)
            else:  # python-kraken-sdk
                res = {"result": api.request("GET", "/0/public/Echo", params=dict(mine),
                                             timeout=5, auth=False)}
        except Exception:
            failed += 1
            continue
        if res.get("result") == mine:
            ok += 1
        else:
            mismatched += 1
    return {"pid": os.getpid(), "ok": ok, "mismatched": mismatched, "failed": failed}


def run_async_calls(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec['tasks']`` asyncio tasks per key, each making ``spec['calls']`` private calls
    through python-kraken-sdk's ``SpotAsyncClient`` under ``shmnonce.kraken_sdk.install``
    (``spec['install']`` False: the plain SDK client, the baseline).

    A 5 ms heartbeat task measures the loop's worst lag meanwhile (``max_lag_s``).
    """
    import asyncio

    from kraken.spot import SpotAsyncClient

    from shmnonce.kraken_sdk import install as install_sdk

    options = dict(spec.get("options", {}))
    errors: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    ok = 0
    worst = 0.0

    async def main() -> tuple[float, float]:
        nonlocal ok, worst
        clients = [SpotAsyncClient(key=k, secret=s, url=spec["url"]) for k, s in spec["creds"]]
        if spec.get("install", True):
            clients = [install_sdk(c, spec["state_dir"], **options) for c in clients]
        running = True

        async def beat() -> None:
            nonlocal worst
            while running:
                t = time.monotonic()
                await asyncio.sleep(0.005)
                worst = max(worst, time.monotonic() - t - 0.005)

        async def task(client: Any) -> None:
            nonlocal ok
            for _ in range(int(spec["calls"])):
                try:
                    await client.request("POST", f"/0/private/{spec.get('method', 'Balance')}")
                except Exception as exc:  # counted; the test decides
                    exceptions[type(exc).__name__] = exceptions.get(type(exc).__name__, 0) + 1
                else:
                    ok += 1

        heartbeat = asyncio.create_task(beat())
        try:
            delay = float(spec.get("start_at", 0.0)) - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.time()
            await asyncio.gather(*(task(c) for c in clients for _ in range(int(spec["tasks"]))))
            t1 = time.time()
        finally:
            running = False
            await heartbeat
            for c in clients:
                await c.close()
                if hasattr(c, "shmnonce"):
                    c.shmnonce.close()
        return t0, t1

    t0, t1 = asyncio.run(main())
    return {"pid": os.getpid(), "ok": ok, "errors": errors, "exceptions": exceptions,
            "t0": t0, "t1": t1, "max_lag_s": worst}


def run_task(spec: Mapping[str, Any], clients: list[Any] | None = None) -> dict[str, Any]:
    """Dispatch a worker spec: ``task`` is ``calls`` (default), ``async_calls``, ``limiter``
    or ``echo``."""
    task = spec.get("task", "calls")
    if task == "limiter":
        return run_limiter(spec)
    if task == "async_calls":
        return run_async_calls(spec)
    if task == "echo":
        return run_echo(spec, clients if clients is not None else make_clients(spec))
    return run_calls(spec, clients)


def _pipe_worker(spec: Mapping[str, Any], conn: Any, clients: list[Any] | None) -> None:
    """multiprocessing target: run the workload and send the result (or the error)."""
    try:
        conn.send(run_task(spec, clients))
    except BaseException as exc:
        conn.send({"pid": os.getpid(), "fatal": repr(exc)})
        raise
    finally:
        if clients is not None:
            close_clients(clients)
        conn.close()


def _worker_main() -> None:
    """``worker`` mode: JSON spec on stdin (so credentials stay off argv), JSON result out."""
    spec = json.loads(sys.stdin.read())
    print(json.dumps(run_task(spec)), flush=True)


class Workers:
    """Fork-inherited, spawned and unrelated worker processes; every one cleaned up by PID."""

    def __init__(self) -> None:
        self._mp: list[tuple[Any, Any]] = []  # (process, receiving connection)
        self._sub: list[subprocess.Popen[str]] = []

    def fork(self, spec: Mapping[str, Any], clients: list[Any] | None = None) -> None:
        """A forked child; ``clients`` built in the parent are inherited, not rebuilt."""
        self._start("fork", spec, clients)

    def spawn(self, spec: Mapping[str, Any]) -> None:
        """A spawned child (fresh interpreter, builds its own clients)."""
        self._start("spawn", spec, None)

    def _start(self, method: str, spec: Mapping[str, Any], clients: list[Any] | None) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context(method)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_pipe_worker, args=(dict(spec), send, clients))
        proc.start()
        send.close()
        self._mp.append((proc, recv))

    def unrelated(self, spec: Mapping[str, Any]) -> None:
        """``python tests/kraken_server.py worker``: a separately started program."""
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), root) if p)
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(dict(spec)))
        proc.stdin.close()
        self._sub.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._mp] + [p.pid for p in self._sub]

    def results(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Collect every worker's result; raise if one failed or timed out."""
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
        """Kill by PID whatever is still running; close pipes."""
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

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def totals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum worker results: ok count, error and exception counts, time span."""
    errors: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["exceptions"].items():
            exceptions[k] = exceptions.get(k, 0) + v
    return {
        "ok": sum(r["ok"] for r in results),
        "errors": errors,
        "exceptions": exceptions,
        "t0": min(r["t0"] for r in results),
        "t1": max(r["t1"] for r in results),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run the server on loopback")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=0)
    sub.add_parser("worker", help="run a workload spec read from stdin")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.host, args.port)
    else:
        _worker_main()


if __name__ == "__main__":
    main()
