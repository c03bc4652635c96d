"""The command line's conveniences, run as a subprocess as a user would run them:
--version, --json before or after the command, durations for jump, a closed stdout
pipe, key-name from standard input, and the library's logging."""

from __future__ import annotations

import importlib.metadata
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

import shmnonce
from shmnonce import ShmNonce
from shmnonce.cli import EXIT_BROKEN_PIPE, parse_duration_ns

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = [sys.executable, "-m", "shmnonce"]
KEY = "kZ7tQ2x+9wVbN4mLs0pR8eYh3cUaJ6dFgTiK1oXyB5nW/vE+qMrS2lHjC4uGfD7z"  # shape of a Kraken key


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODULE, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
        input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stderr == "", r.stderr
    return r.stdout


# --------------------------------------------------------------------------- --version


def test_version_matches_package_metadata() -> None:
    out = ok(cli("--version"))
    assert out == f"shmnonce {shmnonce.__version__}\n"
    assert shmnonce.__version__ == importlib.metadata.version("shmnonce")


# --------------------------------------------------------------------------- --json


def _json_cases(state_dir: str, tmp: str) -> list[tuple[list[str], set[str]]]:
    legacy = os.path.join(tmp, "legacy.txt")
    with open(legacy, "w") as fh:
        fh.write("1700000000000\n")
    return [
        (["next", "j"], {"name", "state_dir", "nonce"}),
        (["jump", "j", "1s"], {"name", "state_dir", "last_nonce", "jump_ns"}),
        (["status", "j"], {"name", "last_nonce", "persisted_ceiling", "attached"}),
        (["import-legacy", "j", legacy], {"name", "applied", "files"}),
        (["doctor", "j"], {"ok", "checks", "counts"}),
        (["drop-segment", "j"], {"name", "segment_found", "segment_intact", "resumes_above"}),
        (["unlink", "j"], {"name", "existed"}),
    ]


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_or_after_the_command(state_dir: str, tmp_path: object, where: str) -> None:
    for args, keys in _json_cases(state_dir, str(tmp_path)):
        full = ["--json", *args] if where == "before" else [*args, "--json"]
        out = ok(cli(*full, "--state-dir", state_dir))
        assert out.count("\n") == 1, out
        data = json.loads(out)
        assert isinstance(data, dict) and set(data) >= keys, (args, data)
    out = ok(cli(*(["--json", "key-name"] if where == "before" else ["key-name", "--json"]),
                 stdin=KEY + "\n"))
    assert json.loads(out) == {"name": ShmNonce.for_api_key(KEY, state_dir).name}


def test_json_values_and_text_output(state_dir: str) -> None:
    nonce = json.loads(ok(cli("--json", "next", "v", "--state-dir", state_dir)))
    assert nonce["name"] == "v" and nonce["state_dir"] == os.path.realpath(state_dir)
    text = int(ok(cli("next", "v", "--state-dir", state_dir)))  # text: the bare value
    assert text > nonce["nonce"]
    jump = json.loads(ok(cli("jump", "v", "2s", "--json", "--state-dir", state_dir)))
    assert jump["jump_ns"] == 2 * 10**9 and jump["last_nonce"] >= text + 2 * 10**9
    with ShmNonce.attach("v", state_dir) as eng:
        assert eng.stats()["last_nonce"] == jump["last_nonce"]
    status = json.loads(ok(cli("status", "v", "--state-dir", state_dir, "--json")))
    assert status["last_nonce"] == jump["last_nonce"] and status["total_issued"] == 2
    assert json.loads(ok(cli("unlink", "v", "--json", "--state-dir", state_dir)))["existed"]
    assert not json.loads(ok(cli("--json", "unlink", "v", "--state-dir", state_dir)))["existed"]


def test_state_dir_before_the_command(state_dir: str) -> None:
    first = int(ok(cli("--state-dir", state_dir, "next", "sd")))
    with ShmNonce.attach("sd", state_dir) as eng:
        assert eng.stats()["last_nonce"] == first
    # after the command wins, as the later one
    other = state_dir + "-other"
    try:
        ok(cli("--state-dir", state_dir, "next", "sd", "--state-dir", other))
        assert os.path.exists(os.path.join(other, "sd.lock"))
    finally:
        ShmNonce.attach("sd", other).unlink()


def test_errors_stay_one_line_with_json(state_dir: str) -> None:
    r = cli("--json", "status", "missing", "--state-dir", state_dir)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("shmnonce: error: no sequence")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0), ("5000000000", 5 * 10**9), ("5_000_000_000", 5 * 10**9),
        ("60s", 60 * 10**9), ("5m", 300 * 10**9), ("1h", 3600 * 10**9), ("250ms", 250 * 10**6),
        ("1h30m", 5400 * 10**9), ("1m30s", 90 * 10**9), ("1.5s", 1_500_000_000),
        ("2d", 172_800 * 10**9), ("7us", 7000), ("42ns", 42), ("0s", 0), ("1h0m1ns", 3600 * 10**9 + 1),
    ],
)
def test_parse_duration(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "invalid duration"), ("abc", "invalid duration"), ("5", None), ("5x", "invalid duration"),
        ("1.5", "invalid duration"), ("s", "invalid duration"), ("1h 30m", "invalid duration"),
        ("0.5ns", "whole number"), ("-5", "must be >= 0"), ("-5s", "must be >= 0"),
        ("1e9", "invalid duration"), ("5S", "invalid duration"), (" 5s", "invalid duration"),
    ],
)
def test_parse_duration_rejects(text: str, why: str | None) -> None:
    if why is None:  # a control: valid
        assert parse_duration_ns(text) == 5
        return
    with pytest.raises(ValueError, match=why):
        parse_duration_ns(text)


def test_jump_takes_durations(state_dir: str) -> None:
    before = time.time_ns()
    last = int(ok(cli("jump", "d", "1h30m", "--state-dir", state_dir)))
    after = time.time_ns()
    assert before + 5400 * 10**9 <= last <= after + 5400 * 10**9
    # from the last value, as the value is ahead of the clock now
    assert int(ok(cli("jump", "d", "250ms", "--state-dir", state_dir))) == last + 250 * 10**6
    assert int(ok(cli("jump", "d", "1000", "--state-dir", state_dir))) == last + 250 * 10**6 + 1000


@pytest.mark.parametrize(("arg", "expect"), [("90x", "invalid duration '90x'"),
                                             ("1.5", "invalid duration"), ("0.5ns", "whole number")])
def test_jump_bad_duration_is_one_line_usage_error(state_dir: str, arg: str, expect: str) -> None:
    r = cli("jump", "d", arg, "--state-dir", state_dir)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and expect in r.stderr
    assert "--help" in r.stderr
    assert not os.path.exists(state_dir), "a refused jump created state"


# --------------------------------------------------------------------------- closed stdout


def into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is already gone: the first write gets EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([*MODULE, *args], stdout=w, stderr=subprocess.PIPE, text=True,
                              timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    finally:
        os.close(w)


@pytest.mark.parametrize(
    "args",
    [["status", "p", "--json"], ["status", "p"], ["next", "p"], ["--json", "doctor"], ["--help"],
     ["--version"], ["jump", "--help"]],
)
def test_closed_stdout_exits_141_quietly(state_dir: str, args: list[str]) -> None:
    ok(cli("next", "p", "--state-dir", state_dir))
    r = into_closed_pipe(*args, "--state-dir", state_dir) if "--help" not in args and \
        "--version" not in args else into_closed_pipe(*args)
    assert r.stderr == "", r.stderr  # no BrokenPipeError traceback, no "Exception ignored"
    assert r.returncode == EXIT_BROKEN_PIPE == 141


def test_status_into_head_as_in_a_shell(state_dir: str) -> None:
    """The command of the issue: one character reaches head, nothing reaches stderr."""
    ok(cli("next", "h", "--state-dir", state_dir))
    cmd = (f"set -o pipefail; {sys.executable} -m shmnonce status h --json "
           f"--state-dir {state_dir} | head -c1")
    for _ in range(5):
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.stdout == "{" and r.stderr == "", r
        # 0 when the output fitted in the pipe before head left, else 141: both are quiet
        assert r.returncode in (0, 141), r


def test_closed_stdout_on_an_error_still_reports_the_error(state_dir: str) -> None:
    r = into_closed_pipe("status", "missing", "--state-dir", state_dir)
    assert r.returncode == 1 and r.stderr.startswith("shmnonce: error: no sequence"), r


# --------------------------------------------------------------------------- key-name


def test_key_name_from_stdin_matches_the_library(state_dir: str) -> None:
    expected = ShmNonce.for_api_key(KEY, state_dir).name
    for given in (KEY, KEY + "\n", KEY + "\r\n", f"  {KEY}\t\n", f"{KEY}\nTHE-SECRET\n"):
        r = cli("key-name", stdin=given)
        assert ok(r) == expected + "\n", repr(given)
        assert KEY not in r.stdout + r.stderr and "THE-SECRET" not in r.stdout + r.stderr
    # bytes that are not UTF-8 are hashed as given
    r = subprocess.run([*MODULE, "key-name"], input=b"\xff\xfekey\n", capture_output=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.decode().strip() == ShmNonce.for_api_key(
        b"\xff\xfekey", state_dir).name


@pytest.mark.parametrize("stdin", ["", "\n", "   \n" + KEY + "\n"])
def test_key_name_without_a_key_on_the_first_line(stdin: str) -> None:
    r = cli("key-name", stdin=stdin)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and "no API key on standard input" in r.stderr
    assert KEY not in r.stderr


def test_key_name_without_input() -> None:
    r = subprocess.run([*MODULE, "key-name"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, stdin=subprocess.DEVNULL)  # at end of file
    assert r.returncode == 1 and "no API key on standard input" in r.stderr, r
    # descriptor 0 closed: Python starts with sys.stdin None
    r = subprocess.run(["bash", "-c", f"exec 0<&-; exec {sys.executable} -m shmnonce key-name"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r
    assert "no standard input" in r.stderr, r


def test_key_name_refuses_the_key_as_an_argument_without_echoing_it() -> None:
    r = cli("key-name", KEY, stdin=KEY + "\n")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and "standard input" in r.stderr and "--help" in r.stderr
    assert KEY not in r.stderr


def test_key_name_on_a_terminal_reads_without_echo(state_dir: str) -> None:
    """Typed at a terminal, the key is read by getpass: the terminal never shows it."""
    master, slave = os.openpty()
    # a new session whose controlling terminal is the pty, as in a login shell
    boot = ("import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
            "os.execv(sys.executable, [sys.executable, '-m', 'shmnonce', 'key-name'])")
    proc = subprocess.Popen([sys.executable, "-c", boot], stdin=slave, stdout=slave, stderr=slave,
                            cwd=ROOT)
    os.close(slave)
    seen = b""
    try:
        def read_until(done: bytes | None) -> None:
            nonlocal seen
            deadline = time.monotonic() + 30
            while done is None or done not in seen:
                assert time.monotonic() < deadline, seen
                if not select.select([master], [], [], 0.5)[0]:
                    continue
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the other side closed
                    chunk = b""
                if not chunk:
                    return
                seen += chunk

        read_until(b"API key (not echoed): ")
        os.write(master, KEY.encode() + b"\n")
        read_until(None)
        assert proc.wait(timeout=30) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = seen.decode()
    assert ShmNonce.for_api_key(KEY, state_dir).name in text
    assert KEY not in text, "the key was echoed or printed"


def test_ctrl_c_exits_130_without_traceback() -> None:
    proc = subprocess.Popen([*MODULE, "key-name"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until it blocks reading the key (Python's SIGINT handler is set)
            with open(f"/proc/{proc.pid}/wchan") as fh:
                if "pipe_read" in fh.read():
                    break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and out == b"" and err == b"", (proc.returncode, out, err)


# --------------------------------------------------------------------------- logging

WARN_EVENT = r"""
import sys
{setup}
from shmnonce import ShmNonce
eng = ShmNonce.attach("lg", sys.argv[1])
eng.next()
eng.close()
"""


def test_library_prints_nothing_without_logging_configuration(state_dir: str) -> None:
    """A clock regression is logged at WARNING; an application that configured no logging
    gets nothing on stderr (no last-resort output); one that did gets the record."""
    def run(setup: str) -> subprocess.CompletedProcess[str]:
        with ShmNonce.attach("lg", state_dir) as eng:
            eng.next()  # the segment remembers this clock reading: the child's is 1 h behind
        return subprocess.run(
            ["faketime", "-f", "-1h", sys.executable, "-c", WARN_EVENT.format(setup=setup), state_dir],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )

    quiet = run("")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    configured = run("import logging; logging.basicConfig(level=logging.INFO)")
    assert configured.returncode == 0, configured.stderr
    assert "WARNING:shmnonce:clock regression on sequence 'lg'" in configured.stderr


def test_cli_shows_library_warnings_as_lines(state_dir: str) -> None:
    """The CLI (an application) shows the library's warnings, one prefixed line each."""
    ok(cli("next", "cw", "--state-dir", state_dir))
    r = subprocess.run(["faketime", "-f", "-1h", *MODULE, "next", "cw", "--state-dir", state_dir],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and int(r.stdout) > 0, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmnonce: warning: clock regression"), r.stderr


def test_routine_section_wait_is_logged_below_warning(eng: ShmNonce) -> None:
    """A long wait for the section (another caller's rate-limit sleep) is routine: INFO.

    serialized() logs waits longer than 5 s; hold the section 5.5 s in another thread.
    """
    import logging
    import threading

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("shmnonce")
    handler, old_level = Keep(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    held = threading.Event()

    def holder() -> None:
        with eng.serialized():
            held.set()
            time.sleep(5.5)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        with eng.serialized():
            pass
    finally:
        t.join()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    waits = [r for r in records if "waited" in r.getMessage()]
    assert waits, [r.getMessage() for r in records]
    assert all(r.levelno < logging.WARNING for r in waits), [(r.levelname, r.getMessage()) for r in waits]

