"""An in-process engine double implementing ``shmnonce._protocol.NonceEngine``.

For unit tests of code written against the engine protocol (the Kraken guard's
policy, its sync and asyncio drivers) without the shared-memory engine: sections
exclude threads (``serialized``) and tasks of one loop (``aserialized``) of this
process only, records are the segment's record class over a bytearray. It makes
no cross-process claim; the end-to-end tests use real engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType

from shmnonce import LockTimeout
from shmnonce.shm.segment import RECORDS, SegmentRecord


class DoubleEngine:
    """One sequence in this process; records every section entry in ``trace``."""

    def __init__(self, name: str = "double", start: int = 10**18) -> None:
        self.name = name
        self._last = start
        self._lock = threading.Lock()
        self._section = threading.Lock()
        self._asection: asyncio.Lock | None = None
        self._buf = bytearray(1024)
        self._record_lock = threading.Lock()
        self.created_at = time.time_ns()
        self.closed = False
        self.trace: list[tuple[str, int]] = []
        self.holders = 0
        self.max_holders = 0

    def next(self) -> int:
        with self._lock:
            self._last += 1
            return self._last

    def peek(self) -> int:
        return self._last

    def enter(self, timeout: float | None = None) -> object:  # pragma: no cover - unused
        raise NotImplementedError

    def _held(self, kind: str, nonce: int) -> None:
        self.holders += 1
        self.max_holders = max(self.max_holders, self.holders)
        self.trace.append((kind, nonce))

    @contextlib.contextmanager
    def serialized(self, timeout: float | None = None) -> Iterator[int]:
        if not self._section.acquire(timeout=-1 if timeout is None else timeout):
            raise LockTimeout("double: section timeout")
        try:
            nonce = self.next()
            self._held("sync", nonce)
            yield nonce
        finally:
            self.holders -= 1
            self._section.release()

    @contextlib.asynccontextmanager
    async def aserialized(self, timeout: float | None = None) -> AsyncIterator[int]:
        if self._asection is None:
            self._asection = asyncio.Lock()
        lock = self._asection
        try:
            await asyncio.wait_for(lock.acquire(), timeout)
        except TimeoutError:
            raise LockTimeout("double: section timeout") from None
        try:
            nonce = self.next()
            self._held("async", nonce)
            yield nonce
        finally:
            self.holders -= 1
            lock.release()

    def jump_forward(self, delta_ns: int) -> int:
        with self._lock:
            self._last = max(self._last, time.time_ns()) + delta_ns
            return self._last

    def stats(self) -> Mapping[str, object]:
        return {"name": self.name, "last_nonce": self._last, "total_issued": 0,
                "created_at": self.created_at}

    def record(self, name: str, fields: int) -> SegmentRecord:
        offset, capacity = RECORDS[name]
        view = memoryview(self._buf)[offset - 256: offset - 256 + 8 * (capacity + 2)]
        return SegmentRecord(name, fields, capacity, view, self._record_lock)  # type: ignore[arg-type]

    def close(self) -> None:
        self.closed = True

    def unlink(self) -> None:
        self.closed = True

    def __enter__(self) -> DoubleEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

