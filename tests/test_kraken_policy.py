"""The Kraken guard's policy, run by its sync driver (call) and its asyncio driver (acall).

The policy (what to wait for, when to take a fresh nonce, what to retry, raise and
count) exists once; these tests run the same scripted scenarios through both
drivers and require identical traces. The engine is an in-process double
(``tests/_engine_double.py``) so that the async driver can be tested before and
independently of the shared-memory engine's ``aserialized()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmnonce.kraken as kraken_mod
from shmnonce import LockTimeout
from shmnonce.kraken import (
    INVALID_NONCE,
    LOCKOUT,
    RATE_LIMIT_EXCEEDED,
    KrakenGuard,
    KrakenInvalidNonceError,
    KrakenLockoutError,
    KrakenRateLimitError,
    RateLimit,
)
from tests._engine_double import DoubleEngine

pytestmark = pytest.mark.timeout(30)


class Client:
    key = "policy-test-key"


CLIENT = Client()  # the guard holds its client weakly: keep one alive


class SdkStyleError(Exception):
    """An exception a client raises for a Kraken error response."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = errors


def errors_of(result: Any) -> list[str]:
    return list(result.get("error", [])) if isinstance(result, dict) else []


async def aerrors_of(result: Any) -> list[str]:
    return errors_of(result)


def errors_of_exc(exc: BaseException) -> list[str] | None:
    return exc.errors if isinstance(exc, SdkStyleError) else None


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> dict[str, DoubleEngine]:
    """engine_for_key replaced by doubles, one per key, created on first use."""
    made: dict[str, DoubleEngine] = {}

    def fake(key: str | bytes, *, state_dir: object = None, url: object = None) -> DoubleEngine:
        k = key if isinstance(key, str) else key.decode()
        if k not in made:
            made[k] = DoubleEngine()
        return made[k]

    monkeypatch.setattr(kraken_mod, "engine_for_key", fake)
    return made


OK = {"error": [], "result": {"ok": True}}


def err(code: str) -> dict[str, Any]:
    return {"error": [code]}


# Each scenario: guard options, the scripted answers per attempt (a dict result or an
# exception to raise), and how many calls to make in a row.
SCENARIOS: dict[str, tuple[dict[str, Any], list[Any], int]] = {
    "ok": ({}, [OK], 1),
    "invalid_once_retried": ({}, [err(INVALID_NONCE), OK], 1),
    "invalid_twice_raises": ({}, [err(INVALID_NONCE), err(INVALID_NONCE)], 1),
    "invalid_no_retry": ({"invalid_nonce_retries": 0}, [err(INVALID_NONCE)], 1),
    "invalid_three_retries": ({"invalid_nonce_retries": 3},
                              [err(INVALID_NONCE)] * 3 + [OK], 1),
    "invalid_as_exception": ({}, [SdkStyleError([INVALID_NONCE]), OK], 1),
    "rate_limit_raises": ({}, [err(RATE_LIMIT_EXCEEDED)], 1),
    "rate_limit_returned": ({"raise_errors": False}, [err(RATE_LIMIT_EXCEEDED)], 1),
    "rate_limit_exception": ({}, [SdkStyleError([RATE_LIMIT_EXCEEDED])], 1),
    "lockout_raises": ({}, [err(LOCKOUT)], 1),
    "lockout_returned": ({"raise_errors": False}, [err(LOCKOUT)], 1),
    "transport_error_not_retried": ({}, [TimeoutError("read timed out")], 1),
    "other_kraken_error_returned": ({}, [err("EOrder:Insufficient funds")], 1),
    "other_kraken_exception_raised": ({}, [SdkStyleError(["EOrder:Insufficient funds"])], 1),
    "counter_wait_fresh_nonce": ({"rate_limit": RateLimit(1, 20.0, headroom=0)}, [OK, OK], 2),
    "burst_wait_fresh_nonce": ({"rate_limit": None,
                                "burst_guard": {"min_spacing_s": 0.05, "window_s": 30.0}},
                               [OK, OK], 2),
}


class Script:
    """The scripted server: answers attempts in order and records what was sent."""

    def __init__(self, guard: KrakenGuard, answers: list[Any]) -> None:
        self.guard = guard
        self.answers = list(answers)
        self.sent: list[int] = []

    def answer(self) -> Any:
        self.sent.append(self.guard.current_nonce())  # the nonce the client signs with
        item = self.answers.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def send(self) -> Any:
        return self.answer()

    async def asend(self) -> Any:
        await asyncio.sleep(0)
        return self.answer()


def run_scenario(name: str, mode: str, engines: dict[str, DoubleEngine]) -> dict[str, Any]:
    """Run a scenario through one driver; return a driver-independent trace."""
    options, answers, calls = SCENARIOS[name]
    client = Client()
    guard = KrakenGuard(client, **{"rate_limit": None, **options})
    engines.clear()
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(s)

    async def asleep(s: float) -> None:
        sleeps.append(s)
        await asyncio.sleep(s)

    guard._sleep = sleep
    guard._asleep = asleep
    script = Script(guard, answers)
    outcomes: list[Any] = []

    async def run_async() -> None:
        for _ in range(calls):
            try:
                outcomes.append(await guard.acall("Balance", script.asend, aerrors_of, errors_of_exc))
            except Exception as exc:
                outcomes.append(exc)

    if mode == "sync":
        for _ in range(calls):
            try:
                outcomes.append(guard.call("Balance", script.send, errors_of, errors_of_exc))
            except Exception as exc:
                outcomes.append(exc)
    else:
        asyncio.run(run_async())
    eng = engines[Client.key]
    entered = [n for _kind, n in eng.trace]
    assert {kind for kind, _n in eng.trace} == {mode if mode == "sync" else "async"}
    stats = guard.counter.stats()
    return {
        "outcomes": [type(o).__name__ if isinstance(o, BaseException) else o for o in outcomes],
        "errors_attr": [getattr(o, "errors", None) for o in outcomes],
        # per attempt: did it send the nonce issued on entering the section, or a fresh one
        "nonce_kinds": ["entry" if n in entered else "fresh" for n in script.sent],
        "increasing": script.sent == sorted(script.sent) and len(set(script.sent)) == len(script.sent),
        "sleeps": len(sleeps),
        "sleep_total_ok": all(s > 0 for s in sleeps),
        "events": {k: stats[k] for k in ("invalid_nonce", "retries", "invalid_nonce_raised",
                                         "rate_limit_errors", "lockouts", "transport_errors",
                                         "calls")},
        "unanswered": len(script.answers),
        "section_entries": len(entered),
        "max_holders": eng.max_holders,
    }


EXPECTED: dict[str, dict[str, Any]] = {
    "ok": {"outcomes": [OK], "nonce_kinds": ["entry"]},
    "invalid_once_retried": {"outcomes": [OK], "nonce_kinds": ["entry", "fresh"],
                             "events": {"invalid_nonce": 1, "retries": 1}},
    "invalid_twice_raises": {"outcomes": ["KrakenInvalidNonceError"],
                             "nonce_kinds": ["entry", "fresh"],
                             "events": {"invalid_nonce": 2, "retries": 1, "invalid_nonce_raised": 1}},
    "invalid_no_retry": {"outcomes": ["KrakenInvalidNonceError"], "nonce_kinds": ["entry"],
                         "events": {"invalid_nonce": 1, "retries": 0, "invalid_nonce_raised": 1}},
    "invalid_three_retries": {"outcomes": [OK], "nonce_kinds": ["entry", "fresh", "fresh", "fresh"],
                              "events": {"invalid_nonce": 3, "retries": 3}},
    "invalid_as_exception": {"outcomes": [OK], "nonce_kinds": ["entry", "fresh"]},
    "rate_limit_raises": {"outcomes": ["KrakenRateLimitError"],
                          "events": {"rate_limit_errors": 1}},
    "rate_limit_returned": {"outcomes": [err(RATE_LIMIT_EXCEEDED)],
                            "events": {"rate_limit_errors": 1}},
    "rate_limit_exception": {"outcomes": ["KrakenRateLimitError"]},
    "lockout_raises": {"outcomes": ["KrakenLockoutError"], "events": {"lockouts": 1}},
    "lockout_returned": {"outcomes": [err(LOCKOUT)], "events": {"lockouts": 1}},
    "transport_error_not_retried": {"outcomes": ["TimeoutError"], "nonce_kinds": ["entry"],
                                    "events": {"transport_errors": 1}},
    "other_kraken_error_returned": {"outcomes": [err("EOrder:Insufficient funds")],
                                    "nonce_kinds": ["entry"]},
    "other_kraken_exception_raised": {"outcomes": ["SdkStyleError"], "nonce_kinds": ["entry"],
                                      "events": {"transport_errors": 0}},
    "counter_wait_fresh_nonce": {"outcomes": [OK, OK], "nonce_kinds": ["entry", "fresh"],
                                 "sleeps": 1},
    "burst_wait_fresh_nonce": {"outcomes": [OK, OK], "nonce_kinds": ["entry", "fresh"],
                               "sleeps": 1},
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sync_and_async_drivers_run_the_same_policy(name: str, engines: dict[str, DoubleEngine]) -> None:
    sync = run_scenario(name, "sync", engines)
    asyn = run_scenario(name, "async", engines)
    assert sync == asyn
    for key, want in EXPECTED[name].items():
        if key == "events":
            assert {k: sync["events"][k] for k in want} == want
        else:
            assert sync[key] == want, key
    # invariants of every scenario
    assert sync["increasing"] and sync["unanswered"] == 0 and sync["max_holders"] == 1
    assert sync["section_entries"] == SCENARIOS[name][2]  # one section per call, retries inside
    assert sync["sleep_total_ok"]
    if sync["sleeps"] == 0:
        assert "sleeps" not in EXPECTED[name] or EXPECTED[name]["sleeps"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_raised_errors_carry_method_errors_and_response(mode: str, engines: dict[str, DoubleEngine]) -> None:
    guard = KrakenGuard(CLIENT, rate_limit=None)
    script = Script(guard, [err(INVALID_NONCE), err(INVALID_NONCE)])
    with pytest.raises(KrakenInvalidNonceError) as info:
        if mode == "sync":
            guard.call("AddOrder", script.send, errors_of, errors_of_exc)
        else:
            asyncio.run(guard.acall("AddOrder", script.asend, aerrors_of, errors_of_exc))
    e = info.value
    assert e.method == "AddOrder" and e.errors == [INVALID_NONCE] and e.response == err(INVALID_NONCE)
    assert str(script.sent[-1]) in str(e) and "shmnonce jump double" in str(e)
    script = Script(guard, [SdkStyleError([LOCKOUT])])
    with pytest.raises(KrakenLockoutError) as info2:
        if mode == "sync":
            guard.call("Balance", script.send, errors_of, errors_of_exc)
        else:
            asyncio.run(guard.acall("Balance", script.asend, aerrors_of, errors_of_exc))
    assert info2.value.response is None and isinstance(info2.value.__cause__, SdkStyleError)
    script = Script(guard, [SdkStyleError([RATE_LIMIT_EXCEEDED])])
    with pytest.raises(KrakenRateLimitError):
        guard.call("Balance", script.send, errors_of, errors_of_exc)


# --------------------------------------------------------------------------- asyncio specifics


def test_current_nonce_is_per_task(engines: dict[str, DoubleEngine]) -> None:
    """A task outside a call never sees the nonce of another task's call in progress.

    With a thread-local (the guard before asyncio support) both tasks of the loop's
    thread share it, and the second task would sign with the first one's nonce.
    """
    guard = KrakenGuard(CLIENT, rate_limit=None)

    async def main() -> tuple[int, int]:
        inside = asyncio.Event()
        release = asyncio.Event()
        seen: list[int] = []

        async def send() -> Any:
            seen.append(guard.current_nonce())
            inside.set()
            await release.wait()
            return OK

        call = asyncio.create_task(guard.acall("Balance", send, aerrors_of, errors_of_exc))
        await inside.wait()
        other = guard.current_nonce()  # this task is not in a call: a fresh value
        release.set()
        await call
        return seen[0], other

    in_call, other = asyncio.run(main())
    assert other != in_call and other > in_call


def heartbeat_lag(run: Callable[[], Any]) -> float:
    """Worst lag (s) of a 5 ms heartbeat task while ``run()`` (a coroutine) runs."""

    async def main() -> float:
        worst = 0.0
        stop = False

        async def beat() -> None:
            nonlocal worst
            while not stop:
                t = time.monotonic()
                await asyncio.sleep(0.005)
                worst = max(worst, time.monotonic() - t - 0.005)

        task = asyncio.create_task(beat())
        await asyncio.sleep(0.02)
        await run()
        stop = True
        await task
        return worst

    return asyncio.run(main())


def test_rate_limit_wait_does_not_block_the_loop(engines: dict[str, DoubleEngine]) -> None:
    """A 0.3 s counter wait in acall leaves the loop free; the sync driver would block it."""
    limit = RateLimit(1, 1 / 0.3, headroom=0)  # second call waits 0.3 s

    def fresh_guard() -> KrakenGuard:
        engines.clear()
        return KrakenGuard(CLIENT, rate_limit=limit)

    async def send() -> Any:
        return OK

    guard = fresh_guard()

    async def async_calls() -> None:
        for _ in range(2):
            await guard.acall("Balance", send, aerrors_of, errors_of_exc)

    lag = heartbeat_lag(async_calls)
    assert guard.counter.stats()["waits"] == 1
    assert lag < 0.05, lag

    blocking = fresh_guard()

    async def sync_calls_in_loop() -> None:  # the mistake the async driver avoids
        for _ in range(2):
            blocking.call("Balance", lambda: OK, errors_of, errors_of_exc)

    assert heartbeat_lag(sync_calls_in_loop) > 0.2  # the measurement can fail


def test_cancelled_during_rate_limit_wait_leaves_the_section(engines: dict[str, DoubleEngine]) -> None:
    guard = KrakenGuard(CLIENT, rate_limit=RateLimit(1, 1.0, headroom=0))  # second call: 1 s

    async def send() -> Any:
        return OK

    async def main() -> list[int]:
        await guard.acall("Balance", send, aerrors_of, errors_of_exc)
        waiting = asyncio.create_task(guard.acall("Balance", send, aerrors_of, errors_of_exc))
        await asyncio.sleep(0.1)  # now sleeping for the counter, inside the section
        eng = engines[Client.key]
        assert eng.holders == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert eng.holders == 0
        guard.rate_limit = None  # the next call must get in at once
        guard._engines.clear()
        t0 = time.monotonic()
        async with eng.aserialized(timeout=0.5):
            pass
        return [int((time.monotonic() - t0) * 1000)]

    assert asyncio.run(main())[0] < 100


def test_async_lock_timeout(engines: dict[str, DoubleEngine]) -> None:
    guard = KrakenGuard(CLIENT, rate_limit=None, lock_timeout=0.1)

    async def main() -> None:
        eng = guard.engine
        async with eng.aserialized():
            with pytest.raises(LockTimeout):
                await guard.acall("Balance", Script(guard, [OK]).asend, aerrors_of, errors_of_exc)

    asyncio.run(main())


def test_sync_driver_serializes_threads(engines: dict[str, DoubleEngine]) -> None:
    guard = KrakenGuard(CLIENT, rate_limit=None)
    inflight = 0
    worst = 0
    lock = threading.Lock()

    def send() -> Any:
        nonlocal inflight, worst
        with lock:
            inflight += 1
            worst = max(worst, inflight)
        time.sleep(0.005)
        with lock:
            inflight -= 1
        return OK

    threads = [threading.Thread(target=lambda: [guard.call("Balance", send, errors_of, errors_of_exc)
                                                for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == 1 and guard.counter.stats()["calls"] == 20


def test_routine_waits_log_below_warning(engines: dict[str, DoubleEngine],
                                         caplog: pytest.LogCaptureFixture) -> None:
    guard = KrakenGuard(CLIENT, rate_limit=RateLimit(1, 20.0, headroom=0))
    caplog.set_level(logging.DEBUG, logger="shmnonce")
    for _ in range(2):
        guard.call("Balance", lambda: OK, errors_of, errors_of_exc)
    waits = [r for r in caplog.records if r.name == "shmnonce" and "waits" in r.getMessage()]
    assert len(waits) == 1
    assert all(r.levelno < logging.WARNING for r in caplog.records if r.name == "shmnonce")
    assert Client.key not in caplog.text


@pytest.fixture
def no_engine_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SHMNONCE_URL", raising=False)
    yield
