"""Child-process workers for the section tests (run as ``python -m tests._section_workers``)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import resource
import sys
import threading
import time
from collections.abc import Iterator

from shmnonce import LockTimeout, ShmNonce


@contextlib.contextmanager
def observed(marker: str, logfd: int, line: bytes) -> Iterator[None]:
    """Inside a section: create ``marker`` with O_EXCL (an overlap writes OVERLAP), log ``line``."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        os.write(logfd, b"OVERLAP " + line)
        yield
        return
    os.write(logfd, line)
    try:
        yield
    finally:
        os.close(fd)
        os.unlink(marker)


def many_keys(state_dir: str, nkeys: int, nthreads: int, markers: str, log: str, go: str,
              seed: int, out: str) -> None:
    """Under RLIMIT_NOFILE 1024: attach ``nkeys`` sequences; ``nthreads`` threads each
    enter every key's section once (in its own random order), logging ``key ticket nonce``."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    engines = [ShmNonce.attach(f"k{i}", state_dir) for i in range(nkeys)]
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND)
    errors: list[str] = []
    peak = [0]
    done = threading.Event()

    def count_fds() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))
            time.sleep(0.01)

    def run(rng: random.Random) -> None:
        order = list(range(nkeys))
        rng.shuffle(order)
        try:
            for k in order:
                with engines[k].enter(timeout=120) as section:
                    line = b"%d %d %d %d\n" % (k, section.ticket, section.nonce, os.getpid())
                    with observed(os.path.join(markers, f"m{k}"), logfd, line):
                        pass
        except BaseException as exc:
            errors.append(repr(exc))

    with open(out + ".ready", "w"):
        pass
    while not os.path.exists(go):
        time.sleep(0.001)
    monitor = threading.Thread(target=count_fds)
    monitor.start()
    threads = [threading.Thread(target=run, args=(random.Random(seed * 1000 + i),))
               for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    monitor.join()
    with open(out, "w") as fh:
        json.dump({"errors": errors, "peak_fds": peak[0], "nkeys": nkeys,
                   "limit": resource.getrlimit(resource.RLIMIT_NOFILE)}, fh)
    for e in engines:
        e.close()


def async_mix(name: str, state_dir: str, ntasks: int, nthreads: int, rounds: int, marker: str,
              log: str, go: str, hold: float) -> None:
    """``ntasks`` asyncio tasks and ``nthreads`` threads each enter ``rounds`` times."""
    eng = ShmNonce.attach(name, state_dir)
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND)
    pid = os.getpid()
    while not os.path.exists(go):
        time.sleep(0.001)

    def sync_worker(i: int) -> None:
        for _ in range(rounds):
            with eng.enter(timeout=60) as s:
                line = b"%d %d %d t%d\n" % (s.nonce, s.ticket, pid, i)
                with observed(marker, logfd, line):
                    time.sleep(hold)

    async def task(i: int) -> None:
        for _ in range(rounds):
            async with eng.aserialized(timeout=60) as nonce:
                line = b"%d - %d a%d\n" % (nonce, pid, i)
                with observed(marker, logfd, line):
                    await asyncio.sleep(hold)

    async def main() -> None:
        await asyncio.gather(*(task(i) for i in range(ntasks)))

    threads = [threading.Thread(target=sync_worker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    asyncio.run(main())
    for t in threads:
        t.join()
    eng.close()


def hold_cycles(name: str, state_dir: str, cycles: int, hold: float, gap: float, out: str) -> None:
    """Hold the section ``cycles`` times for ``hold`` s, ``gap`` s apart; log the times."""
    eng = ShmNonce.attach(name, state_dir)
    spans = []
    for _ in range(cycles):
        with eng.serialized(timeout=60):
            t0 = time.monotonic()
            if not spans:
                with open(out + ".ready", "w"):
                    pass
            time.sleep(hold)
            spans.append((t0, time.monotonic()))
        time.sleep(gap)
    with open(out, "w") as fh:
        json.dump(spans, fh)
    eng.close()


def async_waiters(name: str, state_dir: str, ntasks: int, ready: str) -> None:
    """Queue ``ntasks`` tasks for the section (held elsewhere), say so, wait to be killed."""
    eng = ShmNonce.attach(name, state_dir)
    eng.next()  # nothing pending on the counter lock when the kill comes

    async def task() -> None:
        async with eng.aserialized():
            await asyncio.sleep(3600)

    async def main() -> None:
        tasks = [asyncio.create_task(task()) for _ in range(ntasks)]
        await asyncio.sleep(0.2)
        with open(ready, "w"):
            pass
        await asyncio.gather(*tasks)

    asyncio.run(main())


def timeout_probe(name: str, state_dir: str, out: str) -> None:
    """Try the section once with a short timeout; write 'entered' or 'timeout'."""
    eng = ShmNonce.attach(name, state_dir)
    try:
        with eng.serialized(timeout=0.2):
            res = "entered"
    except LockTimeout:
        res = "timeout"
    with open(out, "w") as fh:
        fh.write(res)


def main(argv: list[str]) -> None:
    cmd, *args = argv
    if cmd == "many_keys":
        many_keys(args[0], int(args[1]), int(args[2]), args[3], args[4], args[5], int(args[6]),
                  args[7])
    elif cmd == "async_mix":
        async_mix(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), args[5], args[6],
                  args[7], float(args[8]))
    elif cmd == "hold_cycles":
        hold_cycles(args[0], args[1], int(args[2]), float(args[3]), float(args[4]), args[5])
    elif cmd == "async_waiters":
        async_waiters(args[0], args[1], int(args[2]), args[3])
    elif cmd == "timeout_probe":
        timeout_probe(args[0], args[1], args[2])
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
