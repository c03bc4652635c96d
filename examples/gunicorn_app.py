"""Minimal WSGI app that issues shmnonce values from gunicorn workers.

Run (from the repository root)::

    SHMNONCE_STATE_DIR=/tmp/shmnonce-demo \\
        gunicorn -c examples/gunicorn_conf.py --chdir examples gunicorn_app:app

Endpoints (all return JSON):

``GET /nonce``
    ``{"pid", "nonce", "t0", "t1"}``: one ``next()``; ``t0``/``t1`` are
    ``time.monotonic_ns()`` just before and just after the call.
``GET /call[?hold_ms=N&tag=T]``
    A ``serialized()`` section standing in for an exchange request that must
    not run concurrently with any other (default hold: ``SHMNONCE_EXAMPLE_CALL_MS``).
    Returns ``{"pid", "nonce", "t_req", "t_enter", "t_exit", "collision"}``.
``GET /peek``
    ``{"pid", "last"}``.

Environment: ``SHMNONCE_EXAMPLE_NAME`` (sequence name, default
``gunicorn-example``), ``SHMNONCE_STATE_DIR`` (read by shmnonce itself),
``SHMNONCE_EXAMPLE_CALL_MS`` (default 2), ``SHMNONCE_EXAMPLE_OBSERVER_DIR``
(optional; see ``_observer.Observer``).

The engine is attached at import time. With ``preload_app = True`` that happens
once in the gunicorn master and every worker inherits it across ``fork()``;
with ``preload_app = False`` each worker imports the module and attaches itself.
Both are supported; no gunicorn hook is needed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from _observer import Observer  # examples/ is on sys.path (gunicorn --chdir examples)

from shmnonce import LockTimeout, ShmNonce

NAME = os.environ.get("SHMNONCE_EXAMPLE_NAME", "gunicorn-example")
CALL_MS = float(os.environ.get("SHMNONCE_EXAMPLE_CALL_MS", "2"))
MAX_HOLD_MS = 10_000.0
LOCK_TIMEOUT_S = 30.0

ENGINE = ShmNonce.attach(NAME)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


_obs_dir = os.environ.get("SHMNONCE_EXAMPLE_OBSERVER_DIR")
OBSERVER = Observer(_obs_dir) if _obs_dir else None


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _nonce() -> dict[str, Any]:
    t0 = time.monotonic_ns()
    n = ENGINE.next()
    t1 = time.monotonic_ns()
    return {"pid": os.getpid(), "nonce": n, "t0": t0, "t1": t1}


def _call(query: dict[str, list[str]]) -> dict[str, Any]:
    hold_ms = min(float(query.get("hold_ms", [CALL_MS])[0]), MAX_HOLD_MS)
    tag = query.get("tag", ["-"])[0]
    t_req = time.monotonic_ns()
    with ENGINE.serialized(timeout=LOCK_TIMEOUT_S) as nonce:
        t_enter = time.monotonic_ns()
        collision = OBSERVER.enter(nonce, tag) if OBSERVER else None
        time.sleep(hold_ms / 1000)  # the exchange request would go here
        if OBSERVER:
            OBSERVER.exit(nonce, tag)
        t_exit = time.monotonic_ns()
    return {
        "pid": os.getpid(),
        "nonce": nonce,
        "t_req": t_req,
        "t_enter": t_enter,
        "t_exit": t_exit,
        "collision": collision,
    }


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """WSGI entry point."""
    path = environ.get("PATH_INFO", "")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        if path == "/nonce":
            return _json(start_response, "200 OK", _nonce())
        if path == "/call":
            return _json(start_response, "200 OK", _call(query))
        if path == "/peek":
            return _json(start_response, "200 OK", {"pid": os.getpid(), "last": ENGINE.peek()})
    except LockTimeout as exc:
        return _json(start_response, "503 Service Unavailable", {"error": str(exc)})
    return _json(start_response, "404 Not Found", {"error": f"no route {path}"})
