"""``steadygrad trace``: run optimizers on a 2-D test function, print where they end, plot their paths.

Each SPEC is an optimizer in call syntax (:mod:`steadygrad.apps.trace.spec`), run in float64 from the
same start for ``--steps`` steps on a function of :mod:`steadygrad.apps.trace`. For each, the
spec and ``epoch N, x1: %f, x2: %f`` are printed (the d2l book's format); with ``--out`` all
trajectories are drawn on one contour plot.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from ..apps.trace import FUNCTIONS, Objective, get_function, trajectory
from ..apps.trace.spec import OPTIMIZER, TRANSFORM, OptimizerSpec, SpecError, parse_optimizer, registry
from . import CommandError, nonnegative_int, positive_int

__all__ = ["add_parser", "parse_start", "run"]

FORMATS = ("png", "svg", "pdf")

_DESCRIPTION = """\
Run optimizers on a 2-D test function from the same start, print where each one ends (in the
format of the d2l book) and, with --out, draw all trajectories on one contour plot.

Each SPEC is an optimizer in call syntax, quoted for the shell, e.g.
  "adagrad(lr=0.4, eps=1e-6, eps_in_sqrt=True)"  "rmsprop(0.4, alpha=0.9)"  "adam(lr=0.1, betas=(0.9, 0.99))"
Values may be numbers, True/False/None, strings, tuples, lists and calls of transforms
(clip=zclip(z_threshold=2.5)); nothing else is evaluated. Positional values follow the
optimizer's signature after the parameters (lr first)."""


def _epilog() -> str:
    functions = "\n".join(
        f"  {f.name:<11} {f.formula}; start ({f.start[0]:g}, {f.start[1]:g})" for f in FUNCTIONS.values()
    )
    return (
        f"optimizers: {', '.join(registry(OPTIMIZER))} (sgd is torch.optim.SGD, for comparison)\n"
        f"transforms (for clip=): {', '.join(registry(TRANSFORM)) or '(none yet)'}\n"
        f"functions:\n{functions}\n\n"
        "example (d2l, section 12.7):\n"
        '  steadygrad trace "adagrad(lr=0.4, eps=1e-6, eps_in_sqrt=True)" \\\n'
        '                   "rmsprop(lr=0.4, alpha=0.9, eps=1e-6, eps_in_sqrt=True)" --out d2l.png\n'
        "  epoch 20, x1: -2.382563, x2: -0.158591   (after the first spec's line)"
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``trace`` with the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "trace",
        help="run optimizers on a 2-D test function; print the end points, plot the trajectories",
        description=_DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="an optimizer in call syntax (see above)")
    parser.add_argument(
        "-f",
        "--function",
        default="d2l",
        metavar="NAME",
        help=f"the test function: {', '.join(FUNCTIONS)} (default: d2l)",
    )
    parser.add_argument("-n", "--steps", type=positive_int, default=20, metavar="N", help="steps (default: 20)")
    parser.add_argument(
        "--start",
        metavar="X1,X2",
        help="start point, e.g. --start=-5,-2 (write '=' before a negative value; default: the function's)",
    )
    parser.add_argument(
        "-o", "--out", metavar="FILE", help=f"write the plot to FILE ({', '.join(FORMATS)}; needs matplotlib)"
    )
    parser.add_argument("--loss", action="store_true", help="add a panel with f(x) per step (log scale)")
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the spiky function's gradient spikes (default: 0)"
    )
    return parser


def parse_start(text: str) -> tuple[float, float]:
    """``"X1,X2"`` -> two finite floats; :class:`CommandError` otherwise."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x1, x2 = (float(p) for p in parts)
    except ValueError:
        raise CommandError(f"--start: expected two numbers X1,X2 (e.g. --start=-5,-2), got {text!r}") from None
    if not (math.isfinite(x1) and math.isfinite(x2)):
        raise CommandError(f"--start: the coordinates must be finite, got {text!r}")
    return x1, x2


def _check_out(path: str) -> str:
    """Refuses an output path that cannot be written, before any work is done."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise CommandError(f"--out {path}: the file name must end in .{', .'.join(FORMATS)}")
    if os.path.isdir(path):
        raise CommandError(f"--out {path}: is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"--out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CommandError(f"--out {path}: not writable")
    return ext


def _format_point(x1: float, x2: float) -> str:
    return f"x1: {x1:f}, x2: {x2:f}"


def run(args: argparse.Namespace) -> int:
    try:
        objective: Objective = get_function(args.function)
    except KeyError as exc:
        raise CommandError(exc.args[0]) from None
    start = parse_start(args.start) if args.start is not None else objective.start
    try:
        specs: list[OptimizerSpec] = [parse_optimizer(text) for text in args.specs]
    except SpecError as exc:
        raise CommandError(str(exc)) from None
    if args.out is not None:
        _check_out(args.out)

    trajectories = []
    for spec in specs:
        try:
            points = trajectory(objective, spec.build, args.steps, start, seed=args.seed)
        except SpecError as exc:
            raise CommandError(str(exc)) from None
        trajectories.append(points)
        x1, x2 = points[-1].tolist()
        print(spec.text)
        print(f"epoch {args.steps}, {_format_point(x1, x2)}")
    sys.stdout.flush()

    if args.out is None:
        return 0
    from ..apps.trace.plot import MATPLOTLIB_MISSING, plot_trajectories, save_figure

    try:
        title = f"{objective.name}: {objective.formula}; {args.steps} steps"
        fig = plot_trajectories(objective, trajectories, [s.text for s in specs], title=title, loss_panel=args.loss)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        print(f"steadygrad: error: {args.out} not written: {MATPLOTLIB_MISSING}", file=sys.stderr)
        return 1
    try:
        save_figure(fig, args.out)
    except OSError as exc:
        raise CommandError(f"--out {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {args.out}")
    return 0
