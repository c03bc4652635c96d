"""Worker processes for the Redis "hosts" tests: ``python -m tests.redis_worker`` reads
a JSON spec on stdin (credentials travel there, never in argv or a file).

Each "host" is a process that shares nothing with the others but the Redis server:
``host_command()`` starts it in its own mount namespace with a private ``/dev/shm``
(``unshare -m`` + a tmpfs) where that works, and with its own state directory.

Modes (``spec["mode"]``):

``next``     ``n`` calls of ``next()``; the values go to ``out`` (one per line).
``section``  ``n`` sections with ``serialized()`` (or ``aserialized()`` in ``tasks``
             asyncio tasks with ``"async": true``): inside, an O_EXCL marker in
             ``shared`` (an overlap fails it), the nonce appended to ``shared/log``.
``record``   ``n`` read-modify-writes of the record ``kraken.counter`` (+1, +3).
``hold``     enter, write ``{"nonce": n, "t": time}`` to ``out``, then wait until
             ``go`` exists; with ``send`` sign a Kraken private call with the nonce and
             write the server's answer; leave.
``enter``    wait for the section (``timeout``), write ``{"nonce", "t"}`` to ``out``,
             optionally send (as in ``hold``), leave.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unshare_works() -> bool:
    """Whether ``unshare -m`` with a tmpfs on /dev/shm works here (root, not blocked)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    res = subprocess.run([exe, "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm && true"],
                         capture_output=True, timeout=30)
    return res.returncode == 0


def host_command(isolated: bool) -> list[str]:
    """The command that starts a worker as a separate "host"."""
    cmd = [sys.executable, "-m", "tests.redis_worker"]
    if not isolated:
        return cmd
    script = 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", *cmd]


def start_host(spec: dict[str, Any], state_dir: str, isolated: bool) -> subprocess.Popen[bytes]:
    """Start one worker "host" (PID = the Python worker: unshare and sh exec)."""
    env = dict(os.environ, SHMNONCE_STATE_DIR=state_dir, PYTHONPATH=ROOT)
    env.pop("SHMNONCE_URL", None)
    proc = subprocess.Popen(host_command(isolated), stdin=subprocess.PIPE, cwd=ROOT, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    return proc


def _private(spec: dict[str, Any], nonce: int) -> list[str]:
    from tests.kraken_server import kraken_signature

    path = "/0/private/Balance"
    body = urllib.parse.urlencode({"nonce": str(nonce)})
    req = urllib.request.Request(spec["kraken"] + path, data=body.encode(), method="POST")
    req.add_header("API-Key", spec["key"])
    req.add_header("API-Sign", kraken_signature(path, body, str(nonce), spec["secret"]))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        errors: list[str] = json.loads(resp.read())["error"]
        return errors


def _engine(spec: dict[str, Any]) -> Any:
    from shmnonce.redis import RedisNonce

    if "key" in spec:
        return RedisNonce.for_api_key(spec["key"], url=spec["url"], lease_s=spec.get("lease_s", 10.0))
    return RedisNonce.attach(spec["name"], url=spec["url"], lease_s=spec.get("lease_s", 10.0))


def _wait_start(spec: dict[str, Any]) -> None:
    start = spec.get("start_at")
    if start is not None:
        time.sleep(max(0.0, start - time.time()))


def _inside(shared: str, tag: str, nonce: int, hold_s: float) -> None:
    """The observer: O_EXCL marker (fails on overlap), nonce appended in entry order."""
    marker = os.path.join(shared, "inside")
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with open(os.path.join(shared, "log"), "a") as log:
            log.write(f"{nonce} {tag}\n")
        if hold_s:
            time.sleep(hold_s)
    finally:
        os.close(fd)
        os.unlink(marker)


async def _ainside(shared: str, tag: str, nonce: int, hold_s: float) -> None:
    marker = os.path.join(shared, "inside")
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with open(os.path.join(shared, "log"), "a") as log:
            log.write(f"{nonce} {tag}\n")
        await asyncio.sleep(hold_s)  # another task of this loop may try to enter meanwhile
    finally:
        os.close(fd)
        os.unlink(marker)


def main() -> None:
    spec = json.load(sys.stdin)
    eng = _engine(spec)
    mode = spec["mode"]
    tag = f"{os.getpid()}"
    try:
        if mode == "next":
            _wait_start(spec)
            values = [eng.next() for _ in range(spec["n"])]
            with open(spec["out"], "w") as f:
                f.write("\n".join(map(str, values)) + "\n")
                f.write(f"shm_private {int(not os.listdir('/dev/shm'))}\n")
        elif mode == "record":
            rec = eng.record("kraken.counter", 2)
            _wait_start(spec)
            for _ in range(spec["n"]):
                rec.update(lambda v: ([(v or [0, 0])[0] + 1, (v or [0, 0])[1] + 3], None))
        elif mode == "section" and not spec.get("async"):
            _wait_start(spec)
            for _ in range(spec["n"]):
                with eng.serialized(timeout=60) as nonce:
                    _inside(spec["shared"], tag, nonce, spec.get("hold_s", 0.0))
        elif mode == "section":
            async def task(i: int) -> None:
                for _ in range(spec["n"]):
                    async with eng.aserialized(timeout=60) as nonce:
                        await _ainside(spec["shared"], f"{tag}.{i}", nonce, spec.get("hold_s", 0.0))

            async def run() -> None:
                _wait_start(spec)
                await asyncio.gather(*(task(i) for i in range(spec["tasks"])))

            asyncio.run(run())
        elif mode in ("hold", "enter"):
            ticket = eng.enter(timeout=spec.get("timeout"))
            info: dict[str, Any] = {"nonce": ticket.nonce, "t": time.time()}
            if mode == "hold":
                with open(spec["out"] + ".tmp", "w") as f:
                    json.dump(info, f)
                os.rename(spec["out"] + ".tmp", spec["out"])
                while not os.path.exists(spec["go"]):
                    time.sleep(0.01)
            if spec.get("send"):
                info["errors"] = _private(spec, ticket.nonce)
            ticket.leave()
            info["t_left"] = time.time()
            info["lost"] = ticket.lost
            out = spec["out"] + (".done" if mode == "hold" else "")
            with open(out + ".tmp", "w") as f:
                json.dump(info, f)
            os.rename(out + ".tmp", out)
        elif mode == "kraken":  # krakenex through KrakenAPI(url=...), as a bot on this host would
            from shmnonce.kraken import KrakenAPI

            api = KrakenAPI(spec["key"], spec["secret"], url=spec["url"], rate_limit=None)
            api.uri = spec["kraken"]
            api.session.trust_env = False
            _wait_start(spec)
            try:
                for _ in range(spec["n"]):
                    errors = api.query_private("Balance")["error"]
                    assert errors == [], errors
            finally:
                api.close()
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        eng.close()


if __name__ == "__main__":
    main()
