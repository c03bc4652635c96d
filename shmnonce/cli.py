"""Command line: ``shmnonce status|next|jump|unlink NAME [--state-dir D]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from ._engine import ShmNonce
from ._errors import NonceError

__all__ = ["main"]


def _int_ns(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _status(args: argparse.Namespace) -> int:
    with ShmNonce.attach(args.name, args.state_dir) as eng:
        stats = dict(eng.stats())
    if args.json:
        print(json.dumps(stats, sort_keys=True))
    else:
        width = max(len(k) for k in stats)
        for key, value in stats.items():
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
    eng = ShmNonce.attach(args.name, args.state_dir)
    eng.unlink()
    print(f"unlinked {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; extension commands add sub-parsers to it."""
    parser = argparse.ArgumentParser(
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

    add("status", _status, "show the sequence's values and counters").add_argument(
        "--json", action="store_true", help="print one JSON object"
    )
    add("next", _next, "issue one value and print it")
    add("jump", _jump, "set the last value to max(last, now) + NS and print it").add_argument(
        "ns", metavar="NS", type=_int_ns, help="nanoseconds to jump ahead"
    )
    add("unlink", _unlink, "destroy the segment and the persisted state")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except (NonceError, ValueError, OSError) as exc:
        print(f"shmnonce: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
