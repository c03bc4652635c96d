"""Command line: ``shmnonce [--json] [--state-dir D] COMMAND ...`` (see docs/cli.md).

Every command exits 0 on success and otherwise prints one line on stderr and exits
non-zero: 1 for an error, 2 for a usage error or a failed ``doctor`` check, 141
(128 + SIGPIPE, as a shell reports a command killed by SIGPIPE) when the reader of
stdout went away before all output was written, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from ._errors import NonceError, StateError
from ._paths import api_key_name, default_state_dir, resolve_state_dir, segment_name, validate_name
from ._protocol import ENV_URL, NonceEngine, resolve_url
from .kraken.legacy import LegacyImport, LegacyImportError, import_legacy
from .ops import repair as _repair
from .shm.ceiling import read_ceiling
from .shm.engine import NoSegment, ShmNonce

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["EXIT_BROKEN_PIPE", "build_parser", "main", "parse_duration_ns"]

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""Exit status when stdout's reader went away (``| head``): what a shell reports for a
command killed by SIGPIPE, without the traceback or the signal."""
EXIT_INTERRUPTED = 128 + signal.SIGINT


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (sub-parsers too) whose usage errors are one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.splitlines())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        # argparse's own printing ignores write errors: a closed stdout would exit 0
        if file is None or file is sys.stdout:
            _out(self.format_help(), end="")
        else:
            file.write(self.format_help())


class _Version(argparse.Action):
    """``--version``, printed like every other output (see ``_out``)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: str = "print the version and exit") -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        _out(f"shmnonce {__version__}")
        parser.exit()


class _UnknownSequence(Exception):
    """``status`` of a name that has no state in the state directory."""


class _InputError(Exception):
    """Unusable standard input (``key-name``)."""


class _UsageError(Exception):
    """A usage error found after parsing: reported like argparse's, exit 2."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(message)
        self.command = command


class _StdoutClosed(Exception):
    """Writing to stdout failed with EPIPE: its reader is gone."""


def _out(line: str, end: str = "\n") -> None:
    """Print one line on stdout; a closed pipe becomes ``_StdoutClosed`` (see ``main``)."""
    try:
        print(line, end=end)
    except BrokenPipeError:
        raise _StdoutClosed from None


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise _StdoutClosed from None


def _emit(args: argparse.Namespace, data: dict[str, object], text: str) -> None:
    """Print ``data`` as one JSON object with ``--json``, else ``text``."""
    _out(json.dumps(data, sort_keys=True) if args.json else text)


def _redis_url(args: argparse.Namespace) -> str | None:
    """The Redis URL of ``--url`` (else ``$SHMNONCE_URL``), None for shared memory.

    The URL (it may hold a password) is never printed; errors name its scheme only.
    """
    url: str | None = getattr(args, "url", None) or os.environ.get(ENV_URL) or None
    if url is None:
        return None
    resolve_url(url, None)  # ValueError/ImportError naming the scheme or the extra
    if args.state_dir is not None:
        raise ValueError("--state-dir applies to shared memory, not to --url")
    return url


def _redis_only_shm(args: argparse.Namespace) -> None:
    if _redis_url(args) is not None:
        raise ValueError(f"{args.command} works on shared-memory sequences only (no --url)")


def _open_engine(args: argparse.Namespace) -> NonceEngine:
    """The sequence ``args.name``: on Redis with ``--url``, else in shared memory."""
    url = _redis_url(args)
    if url is not None:
        from .redis import RedisNonce

        return RedisNonce.attach(args.name, url)
    return ShmNonce.attach(args.name, args.state_dir)


def _require_existing(name: str, state_dir: str | None) -> None:
    """Raise ``_UnknownSequence`` unless ``NAME.lock`` or ``NAME.ceiling`` exists.

    Creates nothing (``resolve_state_dir`` would create the directory), so a
    mistyped name does not start a new sequence.
    """
    validate_name(name)
    raw = default_state_dir() if state_dir is None else state_dir
    if not raw:
        raise ValueError(f"invalid state_dir {state_dir!r}")
    path = os.path.realpath(os.path.expanduser(raw))
    for suffix in (".lock", ".ceiling"):
        try:
            os.lstat(os.path.join(path, name + suffix))
        except FileNotFoundError:
            continue
        return
    raise _UnknownSequence(
        f"no sequence {name!r} in {path} (neither {name}.lock nor {name}.ceiling exists); "
        "'next' or 'jump' starts one"
    )


_NS_PER_UNIT = {
    "ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9,
    "d": 86400 * 10**9,
}
_RAW_NS = re.compile(r"[0-9]+(?:_[0-9]+)*")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|ms|s|m|h|d))+")
_TERM = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h|d)")
DURATION_HELP = (
    "an integer number of nanoseconds, or a duration such as 60s, 5m, 1h30m, 250ms, 1.5s "
    "(units: ns, us, ms, s, m, h, d)"
)


def parse_duration_ns(text: str) -> int:
    """Nanoseconds in ``text``: a bare integer (ns) or terms like ``1h30m``, ``250ms``.

    Raises ``ValueError`` for anything else, for negative values and for a value
    that is not a whole number of nanoseconds (``0.5ns``).
    """
    if _RAW_NS.fullmatch(text):
        return int(text.replace("_", ""))
    if text.startswith("-") and (_RAW_NS.fullmatch(text[1:]) or _DURATION.fullmatch(text[1:])):
        raise ValueError("must be >= 0")
    if not _DURATION.fullmatch(text):
        raise ValueError(f"invalid duration {text!r}: expected {DURATION_HELP}")
    total = sum(
        (Fraction(num) * _NS_PER_UNIT[unit] for num, unit in _TERM.findall(text)), Fraction(0)
    )
    if total.denominator != 1:
        raise ValueError(f"invalid duration {text!r}: not a whole number of nanoseconds")
    return int(total)


def _duration_arg(text: str) -> int:
    try:
        return parse_duration_ns(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status_without_segment(name: str, state_dir: str) -> dict[str, object]:
    """The status of a sequence that has no segment, read from its ceiling file only."""
    ceiling = read_ceiling(os.path.join(state_dir, name + ".ceiling"))
    return {
        "name": name, "state_dir": state_dir, "segment": segment_name(name, state_dir),
        "segment_live": False, "last_nonce": None, "total_issued": None, "created_at": None,
        "clock_regressions": None,
        "persisted_ceiling": None if ceiling is None else ceiling.limit + 1,
        "note": "no live segment (dropped, or the host rebooted); the next attach creates one "
        "and resumes above the persisted ceiling",
    }


def _status(args: argparse.Namespace) -> int:
    """Status of an existing sequence; creates nothing (no segment, file or directory)."""
    from .ops.procinfo import find_holder, read_segment, scan_attached

    if _redis_url(args) is not None:
        with _open_engine(args) as reng:
            rstats = dict(reng.stats())
        _emit(args, rstats, "\n".join(f"{k:<18}  {v}" for k, v in sorted(rstats.items())))
        return 0
    _require_existing(args.name, args.state_dir)
    sd = resolve_state_dir(args.state_dir, args.name, create=False)
    seg_name = segment_name(args.name, sd)
    base = os.path.join(sd, args.name)
    holder = None
    try:
        eng = ShmNonce.inspect(args.name, sd)
    except NoSegment:
        eng = None
    except FileNotFoundError:  # a lock or queue file is missing
        if os.path.lexists(f"/dev/shm/{seg_name}"):
            raise StateError(
                f"segment /dev/shm/{seg_name} of {args.name!r} is live but its lock or queue "
                f"file in {sd} is missing (removed by hand?); attach refuses it: stop its users "
                f"and run 'shmnonce drop-segment {args.name} --state-dir {sd}'"
            ) from None
        eng = None
    if eng is None:
        stats = _status_without_segment(args.name, sd)
        scan = scan_attached(seg_name, base + ".lock", base + ".queue", exclude_pid=os.getpid())
    else:
        with eng:
            stats = dict(eng.stats())
            stats["segment_live"] = True
            scan = scan_attached(
                eng.segment_name, base + ".lock", base + ".queue", exclude_pid=os.getpid()
            )
            seg = read_segment(eng.segment_name)  # a snapshot; the engine keeps its own
            holder = None if seg is None else find_holder(seg, base + ".queue", scan.processes)
    stats["attached"] = [p.as_dict() for p in scan.processes]
    stats["attached_uninspectable"] = scan.uninspectable
    stats["lock_holder"] = None if holder is None else holder.as_dict()
    if args.json:
        _out(json.dumps(stats, sort_keys=True))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        if key == "attached":
            procs = ", ".join(
                f"{p.pid} ({p.name}, {p.username})" for p in scan.processes
            )
            value = f"{len(scan.processes)} process(es)" + (f": {procs}" if procs else "")
        elif key == "lock_holder":
            if holder is None:
                value = "none"
            elif holder.pid is None:
                value = f"unknown (ticket {holder.ticket}): {holder.note}"
            else:
                value = f"{holder.pid} ({holder.name}, {holder.username}), ticket {holder.ticket}"
        _out(f"{key:<{width}}  {value}")
    return 0


def _next(args: argparse.Namespace) -> int:
    with _open_engine(args) as eng:
        nonce = eng.next()
        state_dir = getattr(eng, "state_dir", None)
    _emit(args, {"name": args.name, "state_dir": state_dir, "nonce": nonce}, str(nonce))
    return 0


def _jump(args: argparse.Namespace) -> int:
    with _open_engine(args) as eng:
        last = eng.jump_forward(args.ns)
        state_dir = getattr(eng, "state_dir", None)
    data: dict[str, object] = {
        "name": args.name, "state_dir": state_dir, "last_nonce": last, "jump_ns": args.ns,
    }
    _emit(args, data, str(last))
    return 0


def _unlink(args: argparse.Namespace) -> int:
    if _redis_url(args) is not None:
        with _open_engine(args) as reng:
            reng.unlink()
        _emit(args, {"name": args.name, "unlinked": True}, f"unlinked {args.name}")
        return 0
    # works on damaged state too, which attach would refuse
    existed = _repair.destroy(args.name, args.state_dir)
    _emit(
        args, {"name": args.name, "existed": existed},
        f"unlinked {args.name}" if existed else f"{args.name}: nothing to unlink",
    )
    return 0


def _drop_segment(args: argparse.Namespace) -> int:
    _redis_only_shm(args)
    res = _repair.drop_segment(args.name, args.state_dir, force=args.force)
    if not res.segment_found:
        text = f"{args.name}: no segment; persisted ceiling {res.persisted_ceiling}"
    else:
        text = (f"dropped the segment of {args.name}; the next attach resumes above "
                f"{res.persisted_ceiling}")
    data: dict[str, object] = {
        "name": args.name, "segment_found": res.segment_found,
        "segment_intact": res.segment_intact,
        # every future value is above it (stats()'s persisted_ceiling is this + 1)
        "resumes_above": res.persisted_ceiling,
    }
    _emit(args, data, text)
    return 0


def _import_legacy(args: argparse.Namespace) -> int:
    _redis_only_shm(args)
    try:
        report = import_legacy(args.name, args.files, args.state_dir, skip_bad=args.skip_bad)
    except LegacyImportError as exc:
        _print_import(exc.report, args.json)
        raise
    _print_import(report, args.json)
    if not report.applied:
        print("shmnonce: warning: no usable value; the sequence was not changed", file=sys.stderr)
    return 0


def _print_import(report: LegacyImport, as_json: bool) -> None:
    if as_json:
        _out(json.dumps(report.as_dict(), sort_keys=True))
        return
    for f in report.files:
        if f.ok:
            conv = f" = {f.value_ns} ns" if f.unit == "ms" else ""
            _out(f"ok   {f.path}: {f.raw} ({f.unit}){conv}")
        else:
            _out(f"BAD  {f.path}: {f.error}")
    if report.applied:
        change = "raised" if report.raised else "already above every value, unchanged"
        _out(
            f"sequence {report.name}: {change}; last value {report.after} "
            f"(was {report.before}, highest legacy value {report.highest_ns})"
        )


def _doctor(args: argparse.Namespace) -> int:
    from .ops.doctor import DoctorReport, run_doctor

    url = _redis_url(args)
    if url is not None:
        from .redis import check_server

        report = DoctorReport(state_dir="")
        report.findings = check_server(url, [args.name] if args.name else [])
    else:
        report = run_doctor(args.name, args.state_dir)
    if args.json:
        _out(json.dumps(report.as_dict(), sort_keys=True))
    else:
        for f in report.findings:
            seq = f"[{f.sequence}] " if f.sequence else ""
            _out(f"{f.status.upper():<5}  {f.check:<14}  {seq}{f.message}")
        _out(
            f"summary: {report.count('ok')} ok, {report.count('warn')} warning(s), "
            f"{report.count('error')} error(s)"
        )
    return 0 if report.ok else 2


def _read_key() -> bytes:
    """One API key: the first line of stdin, or typed without echo on a terminal.

    Surrounding whitespace is removed, as ``krakenex.API.load_key`` does. The key is
    never printed, logged or put in an error message.
    """
    stdin = sys.stdin
    if stdin is None:
        raise _InputError("no standard input: pipe the API key into 'shmnonce key-name'")
    if stdin.isatty():
        try:
            line = getpass.getpass("API key (not echoed): ").encode()
        except EOFError:
            line = b""
    else:
        line = stdin.buffer.readline()
    key = line.strip()
    if not key:
        raise _InputError(
            "no API key on standard input: expected the key on the first line "
            "(e.g. 'shmnonce key-name < kraken.key')"
        )
    return key


def _key_name(args: argparse.Namespace) -> int:
    if args.stray:  # never echo them: one of them may be the key
        raise _UsageError(
            "key-name", f"key-name takes no arguments ({len(args.stray)} given, not shown): it reads the "
            "key from standard input, so that the key stays out of the shell history and ps"
        )
    name = api_key_name(_read_key())
    _emit(args, {"name": name}, name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; extension commands add sub-parsers to it.

    ``--json`` and ``--state-dir`` are accepted before and after the command: the
    sub-parsers' copies default to ``SUPPRESS`` so that they do not overwrite a value
    given before the command.
    """
    parser = _Parser(
        prog="shmnonce",
        description="Inspect and operate host-wide nonce sequences.",
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--json", action="store_true", default=False,
                        help="print one JSON object (also accepted after the command)")
    parser.add_argument("--state-dir", metavar="D", default=None,
                        help="state directory (also accepted after the command)")
    parser.add_argument("--url", metavar="URL", default=None,
                        help="a Redis sequence: redis://, rediss:// or unix:// (default: "
                             "$SHMNONCE_URL; unset: shared memory on this host)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state_dir_help = (
        "state directory (default: $SHMNONCE_STATE_DIR, $XDG_STATE_HOME/shmnonce, "
        "~/.local/state/shmnonce)"
    )

    def command(name: str, func: Callable[[argparse.Namespace], int], help_: str,
                state_dir: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print one JSON object")
        if state_dir:
            p.add_argument("--state-dir", metavar="D", default=argparse.SUPPRESS,
                           help=state_dir_help)
            p.add_argument("--url", metavar="URL", default=argparse.SUPPRESS,
                           help="a Redis sequence (default: $SHMNONCE_URL)")
        p.set_defaults(func=func)
        return p

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = command(name, func, help_)
        p.add_argument("name", metavar="NAME", help="sequence name")
        return p

    add(
        "status", _status,
        "show an existing sequence's values, counters, attached processes and lock holder "
        "(creates nothing)",
    )
    add("next", _next, "issue one value and print it")
    add("jump", _jump, "set the last value to max(last, now) + DURATION and print it").add_argument(
        "ns", metavar="DURATION", type=_duration_arg, help=f"how far ahead: {DURATION_HELP}"
    )
    add("unlink", _unlink, "destroy the segment and the persisted state (also when damaged)")
    add("drop-segment", _drop_segment,
        "remove only the shared-memory segment, as a reboot does; the persisted ceiling is "
        "kept (raised to the segment's bound when the segment is intact)").add_argument(
        "--force", action="store_true",
        help="even while processes are attached (their handles then raise StateError)")
    imp = add(
        "import-legacy", _import_legacy,
        "raise the sequence above the values in legacy nonce files (one integer each; "
        "13 digits = milliseconds, converted to ns)",
    )
    imp.add_argument("files", metavar="FILE", nargs="+", help="legacy nonce file")
    imp.add_argument(
        "--skip-bad", action="store_true",
        help="import the good files even if some are bad (default: change nothing)",
    )
    doc = command(
        "doctor", _doctor,
        "check the state directory, the persisted ceilings, the clock and leftover "
        "segments (read-only); exit 2 if a check fails",
    )
    doc.add_argument("name", metavar="NAME", nargs="?", default=None,
                     help="sequence name (default: every sequence in the state directory)")
    kn = command(
        "key-name", _key_name,
        "read an API key from the first line of standard input (typed without echo on a "
        "terminal) and print the name of its sequence; the key is never printed",
        state_dir=False,
    )
    kn.add_argument("stray", nargs="*", help=argparse.SUPPRESS)
    return parser


@contextlib.contextmanager
def _library_warnings() -> Iterator[None]:
    """Show the library's warnings (not its routine INFO/DEBUG records) as stderr lines."""
    logger = logging.getLogger("shmnonce")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("shmnonce: warning: %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse printed them
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    try:
        with _library_warnings():
            status: int = args.func(args)
        return status
    except _UsageError as exc:
        prog = f"shmnonce {exc.command}"
        print(f"{prog}: error: {exc} (see '{prog} --help')", file=sys.stderr)
        return 2
    except (NonceError, ValueError, OSError, _UnknownSequence, _InputError) as exc:
        text = " ".join(str(exc).splitlines())
        print(f"shmnonce: error: {text}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        status = _run(argv)
        _flush_stdout()
        return status
    except _StdoutClosed:
        # The reader of stdout went away: no traceback, and no second EPIPE when the
        # interpreter flushes stdout at exit (it then writes to /dev/null).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
