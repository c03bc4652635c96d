"""Command line: ``shmnonce status|next|jump|unlink|import-legacy|doctor ... [--state-dir D]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import _repair
from ._ceiling import read_ceiling
from ._engine import NoSegment, ShmNonce
from ._errors import NonceError, StateError
from ._legacy import LegacyImport, LegacyImportError, import_legacy
from ._paths import default_state_dir, resolve_state_dir, segment_name, validate_name
from ._segment import SIZE

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (sub-parsers too) whose usage errors are one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.splitlines())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


class _UnknownSequence(Exception):
    """``status`` of a name that has no state in the state directory."""


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


def _int_ns(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


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
    from ._procinfo import find_holder, read_segment, scan_attached

    _require_existing(args.name, args.state_dir)
    sd = resolve_state_dir(args.state_dir, args.name, create=False)
    seg_name = segment_name(args.name, sd)
    base = os.path.join(sd, args.name)
    holder = None
    try:
        eng = ShmNonce._inspect(args.name, sd)
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
            seg = read_segment(eng.segment_name, SIZE)  # a snapshot; the engine keeps its own
            holder = None if seg is None else find_holder(seg, base + ".queue", scan.processes)
    stats["attached"] = [p.as_dict() for p in scan.processes]
    stats["attached_uninspectable"] = scan.uninspectable
    stats["lock_holder"] = None if holder is None else holder.as_dict()
    if args.json:
        print(json.dumps(stats, sort_keys=True))
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
        print(f"{key:<{width}}  {value}")
    return 0


def _next(args: argparse.Namespace) -> int:
    with ShmNonce.attach(args.name, args.state_dir) as eng:
        print(eng.next())
    return 0


def _jump(args: argparse.Namespace) -> int:
    with ShmNonce.attach(args.name, args.state_dir) as eng:
        print(eng.jump_forward(args.ns))
    return 0


def _unlink(args: argparse.Namespace) -> int:
    # works on damaged state too, which attach would refuse
    existed = _repair.destroy(args.name, args.state_dir)
    print(f"unlinked {args.name}" if existed else f"{args.name}: nothing to unlink")
    return 0


def _drop_segment(args: argparse.Namespace) -> int:
    res = _repair.drop_segment(args.name, args.state_dir, force=args.force)
    if not res.segment_found:
        print(f"{args.name}: no segment; persisted ceiling {res.persisted_ceiling}")
    else:
        print(f"dropped the segment of {args.name}; the next attach resumes above "
              f"{res.persisted_ceiling}")
    return 0


def _import_legacy(args: argparse.Namespace) -> int:
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
        print(json.dumps(report.as_dict(), sort_keys=True))
        return
    for f in report.files:
        if f.ok:
            conv = f" = {f.value_ns} ns" if f.unit == "ms" else ""
            print(f"ok   {f.path}: {f.raw} ({f.unit}){conv}")
        else:
            print(f"BAD  {f.path}: {f.error}")
    if report.applied:
        change = "raised" if report.raised else "already above every value, unchanged"
        print(
            f"sequence {report.name}: {change}; last value {report.after} "
            f"(was {report.before}, highest legacy value {report.highest_ns})"
        )


def _doctor(args: argparse.Namespace) -> int:
    from ._doctor import run_doctor

    report = run_doctor(args.name, args.state_dir)
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        for f in report.findings:
            seq = f"[{f.sequence}] " if f.sequence else ""
            print(f"{f.status.upper():<5}  {f.check:<14}  {seq}{f.message}")
        print(
            f"summary: {report.count('ok')} ok, {report.count('warn')} warning(s), "
            f"{report.count('error')} error(s)"
        )
    return 0 if report.ok else 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; extension commands add sub-parsers to it."""
    parser = _Parser(
        prog="shmnonce",
        description="Inspect and operate host-wide nonce sequences.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("name", metavar="NAME", help="sequence name")
        p.add_argument(
            "--state-dir", metavar="D", default=None,
            help="state directory (default: $SHMNONCE_STATE_DIR, $XDG_STATE_HOME/shmnonce, "
            "~/.local/state/shmnonce)",
        )
        p.set_defaults(func=func)
        return p

    add(
        "status", _status,
        "show an existing sequence's values, counters, attached processes and lock holder "
        "(creates nothing)",
    ).add_argument("--json", action="store_true", help="print one JSON object")
    add("next", _next, "issue one value and print it")
    add("jump", _jump, "set the last value to max(last, now) + NS and print it").add_argument(
        "ns", metavar="NS", type=_int_ns, help="nanoseconds to jump ahead"
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
    imp.add_argument("--json", action="store_true", help="print one JSON object")
    doc_help = (
        "check the state directory, the persisted ceilings, the clock and leftover "
        "segments (read-only); exit 2 if a check fails"
    )
    doc = sub.add_parser("doctor", help=doc_help, description=doc_help)
    doc.add_argument("name", metavar="NAME", nargs="?", default=None,
                     help="sequence name (default: every sequence in the state directory)")
    doc.add_argument("--state-dir", metavar="D", default=None, help="state directory")
    doc.add_argument("--json", action="store_true", help="print one JSON object")
    doc.set_defaults(func=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except (NonceError, ValueError, OSError, _UnknownSequence) as exc:
        text = " ".join(str(exc).splitlines())
        print(f"shmnonce: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
