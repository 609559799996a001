"""The ``steadygrad`` command line.

``main(argv)`` parses the arguments and runs one subcommand. A subcommand is a module of this
package listed in :data:`COMMANDS` with two functions:

* ``add_parser(subparsers) -> argparse.ArgumentParser``: adds its parser (with a one-line
  ``help=`` for ``steadygrad --help``);
* ``run(args) -> int``: does the work and returns the exit code.

A subcommand reports a problem with the user's input by raising :class:`CommandError`; ``main``
prints it as one line ``steadygrad: error: ...`` on stderr and returns 2. Argument errors found
by argparse are reported the same way (no usage block, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = ["COMMANDS", "CommandError", "int_at_least", "main", "nonnegative_int", "positive_int"]

PROG = "steadygrad"

# Subcommand modules of this package, in the order ``steadygrad --help`` lists them.
COMMANDS: tuple[str, ...] = ("demo", "trace", "bench")


class CommandError(Exception):
    """A user error: printed as one line ``steadygrad: error: <message>``, exit code 2."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum``, with a one-line message otherwise."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`CommandError` (one line, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        if "expected one argument" in message:
            message += " (a value starting with '-' is written --option=VALUE, e.g. --start=-5,-2)"
        raise CommandError(message)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`COMMANDS` registered."""
    from .. import __version__

    parser = _Parser(
        prog=PROG,
        description="steadygrad: gradients that behave, for PyTorch. See what optimizers and clippers do.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line with ``argv`` (default ``sys.argv[1:]``) and returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if getattr(args, "run", None) is None:
            raise CommandError(f"a command is required ({', '.join(COMMANDS)}); see '{PROG} --help'")
        return int(args.run(args))
    except CommandError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
