"""Cost of checking the live record on the hot path: the candidates of issue 8.

Not a pytest module: ``python bench/record_checks.py`` prints, for each way of
storing and checking the record, the best time per update over alternating rounds
(so that all see the same machine load). Each variant is the record part of
``next()``: unpack, compare with the clock, check, write back. The chosen design
(two copies compared as memoryviews) is the one in src/shmnonce/shm/segment.py.
"""

from __future__ import annotations

import mmap
import struct
import time
import zlib
from collections.abc import Callable

ROUNDS = 300
CALLS = 2000
BIG = 2**63
REG_NS = 1_000_000

buf = mmap.mmap(-1, 8192)
now_ns = time.time_ns
crc32 = zlib.crc32
R7 = struct.Struct("<7Q")
R6 = struct.Struct("<6Q")
R5 = struct.Struct("<5Q")
R10 = struct.Struct("<10Q")
Q = struct.Struct("<Q")


def gen_brackets() -> Callable[[], int]:
    """Version 1: gen, five fields, gen. Detects a torn write, not a flipped field."""
    R7.pack_into(buf, 0, 1, 5, BIG, 0, 0, 0, 1)

    def update() -> int:
        g, last, limit, total, prev, reg, g2 = R7.unpack_from(buf, 0)
        now = now_ns()
        v = last + 1
        if now > v:
            v = now
        if g != g2 or v > limit or now < prev - REG_NS:
            raise AssertionError
        R7.pack_into(buf, 0, g + 1, v, limit, total + 1, now, reg, g + 1)
        return v
    return update


def crc() -> Callable[[], int]:
    """Five fields and the CRC-32 of them, checked and rewritten."""
    view = memoryview(buf)[1024:1064]
    R5.pack_into(buf, 1024, 5, BIG, 0, 0, 0)
    Q.pack_into(buf, 1064, crc32(view))

    def update() -> int:
        last, limit, total, prev, reg, check = R6.unpack_from(buf, 1024)
        now = now_ns()
        v = last + 1
        if now > v:
            v = now
        if check != crc32(view) or v > limit or now < prev - REG_NS:
            raise AssertionError
        R5.pack_into(buf, 1024, v, limit, total + 1, now, reg)
        Q.pack_into(buf, 1064, crc32(view))
        return v
    return update


def mirror_tuples() -> Callable[[], int]:
    """Two copies, compared as tuples (a second unpack)."""
    R10.pack_into(buf, 2048, 5, BIG, 0, 0, 0, 5, BIG, 0, 0, 0)

    def update() -> int:
        rec = R5.unpack_from(buf, 2048)
        last, limit, total, prev, reg = rec
        now = now_ns()
        v = last + 1
        if now > v:
            v = now
        if rec != R5.unpack_from(buf, 2088) or v > limit or now < prev - REG_NS:
            raise AssertionError
        total += 1
        R10.pack_into(buf, 2048, v, limit, total, now, reg, v, limit, total, now, reg)
        return v
    return update


def mirror_views() -> Callable[[], int]:
    """Two copies, compared as memoryviews of u64 (the design in _segment.py)."""
    a = memoryview(buf)[3072:3112].cast("Q")
    b = memoryview(buf)[3112:3152].cast("Q")
    R10.pack_into(buf, 3072, 5, BIG, 0, 0, 0, 5, BIG, 0, 0, 0)

    def update() -> int:
        last, limit, total, prev, reg = R5.unpack_from(buf, 3072)
        now = now_ns()
        v = last + 1
        if now > v:
            v = now
        if a != b or v > limit or now < prev - REG_NS:
            raise AssertionError
        total += 1
        R10.pack_into(buf, 3072, v, limit, total, now, reg, v, limit, total, now, reg)
        return v
    return update


def main() -> None:
    variants = {
        "version 1: gen, 5 fields, gen (fields not checked)": gen_brackets(),
        "CRC-32 of the fields, checked and rewritten": crc(),
        "two copies compared as tuples": mirror_tuples(),
        "two copies compared as memoryviews (chosen)": mirror_views(),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(ROUNDS):
        for label, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            best[label] = min(best[label], (time.perf_counter() - t0) / CALLS * 1e9)
    base = best["version 1: gen, 5 fields, gen (fields not checked)"]
    print("| record update | ns | vs version 1 |\n|---|---:|---:|")
    for label, ns in best.items():
        print(f"| {label} | {ns:,.0f} | +{ns - base:,.0f} |")


if __name__ == "__main__":
    main()
