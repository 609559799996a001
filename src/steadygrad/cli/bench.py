"""``steadygrad bench``: time optimizer steps against torch.optim (the harness is
:mod:`steadygrad.apps.bench`; this module is only the command line around it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import CommandError

__all__ = ["add_parser", "configure", "main", "run"]

_DESCRIPTION = """\
Time one optimizer step of steadygrad (fused=True, and the reference path) against what a torch
user runs (clip_grad_norm_ + torch.optim with foreach=True, and fused=True where torch has it),
alternating them in each repetition, for each size x layout x case. Prints medians, the ratio
torch/steadygrad (> 1: steadygrad faster), ideal bytes per parameter, GB/s and the fraction of the
copy bandwidth measured in the same run, the first-step (compile) time, recompiles over 100
OneCycleLR steps and page faults per step. See docs/benchmarks.md.

modes (times on 2 cores of an AMD EPYC):
       --quick  1M transformer, 2 cases, 7 repeats (about 20 s)
       default  1M,10M x big,transformer, 8 cases, 15 repeats (about 3 min)
       --host   Adam on 4 and 500 tensors of 8 elements (tiny layout): the host
                cost of a step, 101 repeats (about 30 s)
       --full   1M,10M,100M x big,transformer, all 15 cases, 15 repeats
                (about 30 min, 11 GB of memory)"""


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``bench`` to ``parser`` (shared with benchmarks/run.py)."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick suite (1M, 2 cases, few repeats)")
    mode.add_argument("--host", action="store_true", help="the host-cost suite (Adam on 4 and 500 tiny tensors)")
    mode.add_argument("--full", action="store_true", help="the full suite (up to 100M, all cases)")
    parser.add_argument("--sizes", metavar="LIST", help="parameter counts, e.g. 1M,10M,100M (default: the mode's)")
    parser.add_argument("--layouts", metavar="LIST", help="big,transformer,tiny (default: the mode's)")
    parser.add_argument("--cases", metavar="LIST", help="cases, or 'all'; see --list-cases (default: the mode's)")
    parser.add_argument("--repeats", type=int, metavar="N", help="timed repetitions per contender (default: 15)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed steps after the first (default: 3)")
    parser.add_argument("--no-reference", action="store_true", help="skip steadygrad's reference (fused=False) path")
    parser.add_argument("--no-fused", action="store_true", help="skip steadygrad's fused=True path")
    parser.add_argument(
        "--recompile-steps",
        type=int,
        default=100,
        metavar="N",
        help="OneCycleLR steps of the recompile check of the fused path (0: skip; default: 100)",
    )
    parser.add_argument(
        "--new-grads",
        action="store_true",
        help="new gradient tensors at every step (as after torch's default zero_grad()) instead of "
        "writing into the previous ones",
    )
    parser.add_argument("--copy-mib", type=float, default=256, metavar="MIB", help="copy buffer size (default: 256)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--compile-cache",
        choices=("cold", "warm"),
        default="cold",
        help="cold: a fresh inductor cache for the run, so the first step is a full compile (default); "
        "warm: the usual on-disk cache",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=300,
        metavar="S",
        help="interrupt a first fused step (the compile) after S seconds and report it failed (0: no limit; "
        "default: 300)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the full report (every sample) as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown (for the docs)")
    parser.add_argument(
        "--from-json",
        metavar="FILE",
        help="run nothing: print (and with --markdown write) the tables of a saved --json report",
    )
    parser.add_argument("--list-cases", action="store_true", help="print the cases and their bytes per parameter")
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``bench`` with the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="time optimizer steps against torch.optim (ratios, GB/s, fraction of copy bandwidth)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return configure(parser)


def _list_cases() -> str:
    from ..apps.bench import CASES, MODES

    lines = [f"{'case':22s} {'B/param':>7s}  {'modes':20s}  what"]
    for name, case in CASES.items():
        modes = ",".join(m for m, settings in MODES.items() if name in settings["cases"]) or "--cases only"
        lines.append(f"{name:22s} {case.bytes_per_param:7d}  {modes:20s}  {case.describe()}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark described by ``args``; prints the table; writes ``--json``."""
    from ..apps import bench

    if args.list_cases:
        print(_list_cases())
        return 0
    if args.from_json:
        try:
            with open(args.from_json) as f:
                report = json.load(f)
            text = bench.format_report(report)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CommandError(f"--from-json: cannot read a report from {args.from_json}: {exc}") from None
        print(text)
        _write_markdown(args.markdown, report)
        return 0
    mode = "quick" if args.quick else "full" if args.full else "host" if args.host else "default"
    try:
        sizes = [bench.parse_size(s) for s in _csv(args.sizes)] if args.sizes else None
    except ValueError as exc:
        raise CommandError(f"--sizes: {exc}") from None
    layouts = _csv(args.layouts) if args.layouts else None
    for name in layouts or ():
        if name not in bench.LAYOUTS:
            raise CommandError(f"--layouts: unknown layout {name!r}; known: {', '.join(bench.LAYOUTS)}")
    cases = None
    if args.cases:
        cases = list(bench.CASES) if args.cases.strip() == "all" else _csv(args.cases)
        for name in cases:
            if name not in bench.CASES:
                raise CommandError(f"--cases: unknown case {name!r}; known: {', '.join(bench.CASES)}")
    for flag, value, low in (
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--threads", args.threads, 1),
    ):
        if value is not None and value < low:
            raise CommandError(f"{flag} must be at least {low}, got {value}")
    if args.recompile_steps < 0:
        raise CommandError(f"--recompile-steps must be at least 0, got {args.recompile_steps}")
    if args.compile_timeout < 0:
        raise CommandError(f"--compile-timeout must be at least 0, got {args.compile_timeout:g}")
    if args.copy_mib <= 0:
        raise CommandError(f"--copy-mib must be positive, got {args.copy_mib}")
    contenders = [
        c
        for c in bench.CONTENDERS
        if not (c == "sg_ref" and args.no_reference) and not (c == "sg_fused" and args.no_fused)
    ]
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path:
            try:
                open(path, "a").close()  # fail now, not after an hour of benchmarking
            except OSError as exc:
                raise CommandError(f"{flag}: cannot write {path}: {exc.strerror}") from None

    report = bench.run_benchmark(
        sizes,
        layouts,
        cases,
        mode=mode,
        repeats=args.repeats,
        warmup=args.warmup,
        contenders=contenders,
        recompile_steps=args.recompile_steps,
        copy_mib=args.copy_mib,
        threads=args.threads,
        compile_cache=args.compile_cache,
        compile_timeout=args.compile_timeout or None,
        new_grads=args.new_grads,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(bench.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    _write_markdown(args.markdown, report)
    return 0


def _write_markdown(path: str | None, report: dict[str, Any]) -> None:
    from ..apps.bench import format_markdown

    if path:
        with open(path, "w") as f:
            f.write(format_markdown(report) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m steadygrad.cli.bench`` / benchmarks/run.py: the ``bench`` command on its own,
    with the errors of ``steadygrad`` (one line ``steadygrad: error: ...``, exit code 2)."""
    from . import _Parser

    parser = configure(
        _Parser(prog="steadygrad bench", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    try:
        return run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    except CommandError as exc:
        print(f"steadygrad: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("steadygrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
