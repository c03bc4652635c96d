"""A redis-server of the test's own: started in a temporary directory, stopped by PID.

Test code only. ``RedisServer`` starts Debian's ``redis-server`` on a free loopback
port and on a unix socket inside its directory, with or without an AOF
(``appendfsync always``), optionally with ``requirepass`` and extra config lines
(ACL users). ``kill()`` is SIGKILL (no shutdown save); ``start()`` again reuses the
directory, so a restart loads whatever the AOF kept.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

import redis

__all__ = ["REDIS_SERVER", "RedisServer", "free_port"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _self_signed(directory: str) -> None:
    """A self-signed certificate for 127.0.0.1 (openssl), as cert.pem and key.pem."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", os.path.join(directory, "key.pem"), "-out", os.path.join(directory, "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process in ``directory`` (started by the constructor)."""

    def __init__(self, directory: str, *, aof: bool = False, password: str | None = None,
                 extra: Sequence[str] = (), tls: bool = False) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.aof = aof
        self.tls = tls
        self.tls_port = 0
        self.cert = os.path.join(directory, "cert.pem")
        if tls:
            _self_signed(directory)
        self.password = password
        self.extra = list(extra)
        self.socket = os.path.join(directory, "redis.sock")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def _config(self) -> str:
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f"unixsocket {self.socket}", "unixsocketperm 700",
            f"dir {self.dir}", 'save ""', "daemonize no", f"logfile {self.dir}/redis.log",
            "protected-mode no",
        ]
        if self.aof:
            lines += ["appendonly yes", "appendfsync always", "appenddirname aof"]
        else:
            lines += ["appendonly no"]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        if self.tls:
            lines += [f"tls-port {self.tls_port}", f"tls-cert-file {self.cert}",
                      f"tls-key-file {self.dir}/key.pem", f"tls-ca-cert-file {self.cert}",
                      "tls-auth-clients no"]
        lines += self.extra
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        """Start (again) on a new free port; the directory, and so any AOF, is kept."""
        for _attempt in range(5):
            self.port = free_port()
            self.tls_port = free_port() if self.tls else 0
            conf = os.path.join(self.dir, "redis.conf")
            with open(conf, "w") as f:
                f.write(self._config())
            self.proc = subprocess.Popen([REDIS_SERVER, conf], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_ready(timeout):
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start; see {self.dir}/redis.log")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=self.socket, password=self.password)
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.exceptions.BusyLoadingError:
                    pass
                except (redis.exceptions.ConnectionError, FileNotFoundError):
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _auth(self) -> str:
        return "" if self.password is None else f":{self.password}@"

    @property
    def url(self) -> str:
        """``redis://`` on the loopback port (with the password, if any)."""
        return f"redis://{self._auth()}127.0.0.1:{self.port}/0"

    @property
    def tls_url(self) -> str:
        """``rediss://`` on the TLS port, verifying the server with its self-signed cert."""
        return f"rediss://{self._auth()}127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.cert}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self._auth()}{self.socket}?db=0"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket, password=self.password,
                           decode_responses=True)

    def kill(self) -> None:
        """SIGKILL by PID: no shutdown, no final save."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
