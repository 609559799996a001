"""Step-time benchmark: steadygrad's optimizers against what a torch user runs today.

One *case* is an optimizer with a clipping rule (``"adam+moment_clip"``, ``"rmsprop+norm"``, ...).
For a number of parameters and a layout of them in tensors, each case builds its *contenders* on
identical parameters and gradients:

==================  =========================================================================
``sg_fused``        ``steadygrad.optim.<Opt>(..., clip=..., fused=True)``: the compiled step
``sg_ref``          the same with ``fused=False``: the default path (grouped foreach calls)
``torch_foreach``   ``torch.nn.utils.clip_grad_norm_`` (or ``clip_grad_value_``, or nothing)
                    then ``torch.optim.<Opt>(foreach=True)``
``torch_fused``     the same with ``torch.optim.<Opt>(fused=True)`` where torch has it on CPU
                    (Adagrad, Adam, AdamW; not RMSprop)
``copy``            ``dst.copy_(src)`` of a large float32 buffer: the memory bandwidth
==================  =========================================================================

and times one ``step`` of each, alternating them within every repetition (the starting contender
rotates), with the gradients written into the existing ``.grad`` tensors in place (untimed) before
every step, as a backward pass would. Reported per contender: the median (and quartiles) in ms, the
ideal bytes per parameter of its algorithm, the achieved GB/s (ideal bytes / time) and its fraction
of the copy bandwidth measured in the same repetitions, minor page faults per step in steady state
and the time of its first step (for ``sg_fused``: the compile). Per case: ratios torch time /
steadygrad time (> 1: steadygrad is faster; ``torch_foreach/sg_ref`` compares the two defaults)
and, for ``sg_fused``, the compiles seen during 100 steps of a fresh optimizer driven by
``torch.optim.lr_scheduler.OneCycleLR``.

The ideal-bytes model (:func:`bytes_per_param`): an optimizer step on float32 parameters must read
the parameter, the gradient and every state tensor once and write the parameter and every state
tensor once, 4 bytes each. A clipper adds what it must read before the step can start: a global norm
one more read of the gradient (+4), a unit-wise ratio (AGC) a read of the gradient and the
parameter (+8); ``clip_by_moment`` keeps its own second moment (+8, read and write); clipping by
value and ``moment_clip=`` (the optimizer's own second moment) add nothing. The copy moves 8 bytes
per element (4 read, 4 written).

Entry points: :func:`run_benchmark` (returns a JSON-ready dict), :func:`format_report` (the table),
``steadygrad bench`` (:mod:`steadygrad.cli.bench`) and ``benchmarks/run.py``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CASES",
    "CONTENDERS",
    "DEFAULT_CASES",
    "LAYOUTS",
    "MODES",
    "QUICK_CASES",
    "Case",
    "bytes_per_param",
    "format_markdown",
    "format_report",
    "layout_shapes",
    "machine_info",
    "measure_copy_bandwidth",
    "parse_size",
    "run_benchmark",
]

# Hyperparameters of the clippers (the same for steadygrad and the torch baselines).
MAX_NORM = 1.0  # random N(0, 1) gradients have norm ~sqrt(n): every step is clipped
CLIP_VALUE = 1.0
MOMENT_K = 5.0
UNIT_RATIO = 0.01

CONTENDERS = ("sg_fused", "sg_ref", "torch_foreach", "torch_fused", "copy")
STEADYGRAD = ("sg_fused", "sg_ref")
TORCH = ("torch_foreach", "torch_fused")

# torch.optim classes that accept fused=True for CPU tensors in torch 2.13 (RMSprop has no fused).
TORCH_FUSED_CPU = ("Adagrad", "Adam", "AdamW")


# ------------------------------------------------------------------------------------------------
# Sizes and layouts
# ------------------------------------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9, "B": 10**9}


def parse_size(text: str | int) -> int:
    """``"1M"`` → 1_000_000; also ``"20k"``, ``"2.5M"``, ``"1e6"``, ``"10_000_000"``."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([kKmMgGB]?)\s*", str(text))
        if match is None:
            raise ValueError(f"not a size: {text!r} (examples: 20k, 1M, 2.5M, 1e6, 10_000_000)")
        value = round(float(match.group(1).replace("_", "")) * _SUFFIX[match.group(2)])
    if value < 1:
        raise ValueError(f"a size must be at least 1, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """1_000_000 → ``"1M"``, 20_000 → ``"20k"``, 1_234_567 → ``"1.23M"``."""
    for div, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def big_layout(n: int) -> list[tuple[int, ...]]:
    """Four big tensors: three ``(rows, 1024)`` matrices and a 1-D remainder (exactly ``n``)."""
    cols = 1024 if n >= 4 * 4 * 1024 else 4
    rows = max(1, n // 4 // cols)
    shapes: list[tuple[int, ...]] = [(rows, cols)] * 3
    rest = n - 3 * rows * cols
    if rest < 1:
        raise ValueError(f"the big layout needs at least 16 parameters, got {n}")
    return shapes + [(rest,)]


def transformer_layout(n: int, blocks: int = 31) -> list[tuple[int, ...]]:
    """A GPT-2-like decoder sized to ``n`` parameters (within 1 % from 50k on): 500 tensors.

    Token embedding ``(vocab, d)``, position embedding ``(2d, d)``; per block LayerNorm weight and
    bias ``(d,)`` twice, q/k/v/o projections ``(d, d)`` with biases, MLP ``(4d, d)`` and ``(d, 4d)``
    with biases (16 tensors); a final LayerNorm. The blocks hold about 70 % of the parameters, the
    embeddings the rest; ``d`` is a multiple of 8 and ``vocab`` absorbs the remainder. Below about
    50k parameters fewer blocks are used (fewer tensors).
    """
    for nb in range(blocks, 0, -1):
        d = max(8, 8 * round(math.sqrt(0.7 * n / (12 * nb)) / 8))
        per_block = 12 * d * d + 13 * d
        fixed = nb * per_block + 2 * d * d + 2 * d  # blocks, position embedding, final LayerNorm
        vocab = round((n - fixed) / d)
        if vocab >= 8:
            break
    else:
        raise ValueError(f"the transformer layout needs at least ~2k parameters, got {n}")
    shapes: list[tuple[int, ...]] = [(vocab, d), (2 * d, d)]
    for _ in range(nb):
        shapes += [(d,), (d,)]  # ln_1
        for _ in range(4):  # q, k, v, o
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # MLP
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def tiny_layout(n: int) -> list[tuple[int, ...]]:
    """Tensors of 8 elements (the last one holds the remainder): a step's host cost, which
    grows with the number of tensors, with next to no memory traffic. ``32``: 4 tensors,
    ``4000``: 500."""
    shapes: list[tuple[int, ...]] = [(8,)] * (n // 8)
    if n % 8:
        shapes.append((n % 8,))
    return shapes


LAYOUTS: dict[str, Callable[[int], list[tuple[int, ...]]]] = {
    "big": big_layout,
    "transformer": transformer_layout,
    "tiny": tiny_layout,
}


def layout_shapes(layout: str, n: int) -> list[tuple[int, ...]]:
    """The tensor shapes of ``layout`` (``"big"``, ``"transformer"`` or ``"tiny"``) for about ``n``
    parameters."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](n)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ------------------------------------------------------------------------------------------------
# Cases and the bytes model
# ------------------------------------------------------------------------------------------------

# Bytes an ideal float32 step moves per parameter: read p, g and each state tensor; write p and
# each state tensor (4 bytes each).
_STATE_TENSORS = {"Adagrad": 1, "RMSprop": 1, "Adam": 2, "AdamW": 2}
# Extra bytes per parameter of a clipping rule (see the module docstring).
CLIP_BYTES = {None: 0, "value": 0, "moment_clip": 0, "norm": 4, "unit_ratio": 8, "moment": 8}


def bytes_per_param(
    optimizer: str,
    clip: str | None = None,
    *,
    centered: bool = False,
    momentum: float = 0.0,
    amsgrad: bool = False,
    element_size: int = 4,
) -> int:
    """Bytes per parameter an ideal step of ``optimizer`` with ``clip`` must move.

    ``(3 + 2·states)·element_size``: Adagrad and RMSprop 20, Adam and AdamW 28 for float32;
    RMSprop ``centered`` (grad_avg) and ``momentum > 0`` (momentum_buffer) +8 each, Adam
    ``amsgrad`` (max_exp_avg_sq) +8. ``clip``: ``"norm"`` (global norm: one more read of g) +4,
    ``"unit_ratio"`` (per-unit norms of g and p) +8, ``"moment"`` (clip_by_moment's own second
    moment) +8, ``"value"`` and ``"moment_clip"`` (the optimizer's own second moment) +0.
    """
    if optimizer not in _STATE_TENSORS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(_STATE_TENSORS)}")
    if clip not in CLIP_BYTES:
        raise ValueError(f"unknown clip {clip!r}; known: {', '.join(str(k) for k in CLIP_BYTES)}")
    states = _STATE_TENSORS[optimizer]
    if optimizer == "RMSprop":
        states += int(bool(centered)) + int(momentum > 0)
    if optimizer in ("Adam", "AdamW"):
        states += int(bool(amsgrad))
    return (3 + 2 * states) * element_size + CLIP_BYTES[clip] * element_size // 4


@dataclass(frozen=True)
class Case:
    """An optimizer with a clipping rule, and what a torch user would run instead.

    ``clip``: ``None``, ``"norm"`` (``sg.clip_by_norm``), ``"value"`` (``sg.clip_by_value``),
    ``"moment"`` (``sg.clip_by_moment``, own state), ``"moment_clip"`` (``moment_clip=`` on
    RMSprop/Adam/AdamW), ``"unit_ratio"`` (``sg.clip_by_unit_ratio``). ``torch_clip``: what runs
    before the torch optimizer: ``"norm"`` (``clip_grad_norm_``), ``"value"``
    (``clip_grad_value_``) or ``None``.
    """

    name: str
    optimizer: str
    clip: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_clip(self) -> str | None:
        if self.clip is None:
            return None
        return "value" if self.clip == "value" else "norm"

    @property
    def bytes_per_param(self) -> int:
        return bytes_per_param(self.optimizer, self.clip, **self.options)

    @property
    def torch_bytes_per_param(self) -> int:
        return bytes_per_param(self.optimizer, self.torch_clip, **self.options)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        sg_clip = {
            None: "",
            "norm": f", clip=sg.clip_by_norm({MAX_NORM})",
            "value": f", clip=sg.clip_by_value({CLIP_VALUE})",
            "moment": f", clip=sg.clip_by_moment({MOMENT_K})",
            "moment_clip": f", moment_clip={MOMENT_K}",
            "unit_ratio": f", clip=sg.clip_by_unit_ratio({UNIT_RATIO})",
        }[self.clip]
        torch_clip = {
            None: "",
            "norm": f"clip_grad_norm_({MAX_NORM}) + ",
            "value": f"clip_grad_value_({CLIP_VALUE}) + ",
        }
        return (
            f"sg.optim.{self.optimizer}({opts}{', ' if opts and sg_clip else ''}{sg_clip.lstrip(', ')}) "
            f"vs {torch_clip[self.torch_clip]}torch.optim.{self.optimizer}({opts})"
        )


def _cases() -> dict[str, Case]:
    cases = [
        Case("adagrad", "Adagrad"),
        Case("adagrad+norm", "Adagrad", "norm"),
        Case("rmsprop", "RMSprop"),
        Case("rmsprop+norm", "RMSprop", "norm"),
        Case("rmsprop+moment_clip", "RMSprop", "moment_clip"),
        Case("rmsprop_cm+norm", "RMSprop", "norm", {"centered": True, "momentum": 0.9}),
        Case("adam", "Adam"),
        Case("adam+norm", "Adam", "norm"),
        Case("adam+value", "Adam", "value"),
        Case("adam+moment_clip", "Adam", "moment_clip"),
        Case("adam+moment", "Adam", "moment"),
        Case("adam+unit_ratio", "Adam", "unit_ratio"),
        Case("adam_amsgrad+norm", "Adam", "norm", {"amsgrad": True}),
        Case("adamw", "AdamW"),
        Case("adamw+norm", "AdamW", "norm"),
        Case("adamw+moment_clip", "AdamW", "moment_clip"),
    ]
    return {c.name: c for c in cases}


CASES: dict[str, Case] = _cases()
QUICK_CASES = ("rmsprop+moment_clip", "adam+moment_clip")
DEFAULT_CASES = (
    "adagrad+norm",
    "rmsprop+norm",
    "rmsprop+moment_clip",
    "adam",
    "adam+norm",
    "adam+moment_clip",
    "adam+moment",
    "adamw+norm",
)

# Settings of the modes; explicit arguments of run_benchmark / the CLI override them.
MODES: dict[str, dict[str, Any]] = {
    "quick": dict(sizes=(10**6,), layouts=("transformer",), cases=QUICK_CASES, repeats=7, warmup=2),
    "default": dict(sizes=(10**6, 10**7), layouts=("big", "transformer"), cases=DEFAULT_CASES, repeats=15, warmup=3),
    # no copy between the steps: a 256 MiB copy would evict the host code and data of the steps
    "host": dict(sizes=(32, 4000), layouts=("tiny",), cases=("adam",), repeats=101, warmup=10, copy=False),
    "full": dict(
        sizes=(10**6, 10**7, 10**8),
        layouts=("big", "transformer"),
        cases=tuple(CASES),
        repeats=15,
        warmup=3,
    ),
}


# ------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------


try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]


def _minflt() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _dynamo_counts() -> dict[str, int]:
    """Compile counters of torch._dynamo: frames converted, graphs compiled
    (``stats.unique_graphs``, which every compile and recompile increments), graph breaks."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - dynamo unavailable
        return dict.fromkeys(("frames", "graphs", "graph_breaks", "fxgraph_cache_hit", "fxgraph_cache_miss"), 0)
    return {
        "frames": int(counters["frames"]["total"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
    }


def vec_isa_probe() -> float | None:
    """Seconds inductor spends probing the CPU's vector instruction sets (it builds and runs a
    small C++ program per candidate: AVX-512, AVX2, ...). Inductor does this once per machine and
    cache directory and keeps the result on disk; a later process only loads it. Measured apart,
    before :func:`compiler_startup`, so that the start-up is what every fresh process pays."""
    try:
        from torch._inductor import cpu_vec_isa

        t0 = time.perf_counter()
        cpu_vec_isa.valid_vec_isa_list()
        return time.perf_counter() - t0
    except Exception:  # pragma: no cover - another torch layout, or no compiler
        return None


def compiler_startup() -> float | None:
    """Seconds to compile and run a one-line function with ``torch.compile``: what the first
    compile of a process pays once (imports, the compile workers, the C++ toolchain, headers for a
    cold cache) before any step-specific work. Measured before the cases so that their first-step
    times are the compile of the step itself; a user's first step in a fresh process costs both."""
    try:
        fn = torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True, dynamic=False)
        x = torch.ones(1000)
        t0 = time.perf_counter()
        fn(x)
        return time.perf_counter() - t0
    except Exception:  # pragma: no cover - no compiler
        return None
    finally:
        _reset_dynamo()


def _reset_dynamo() -> None:
    """Forget every compiled graph of this process, as a fresh process would (files stay)."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # pragma: no cover - dynamo unavailable
        pass


# Words of steadygrad's warnings when fused=True does not run compiled (kernels/fused.py).
_NOT_COMPILED = ("eager", "falls back", "fall back", "reference path")


def _compiled(first_step_compiles: dict[str, int] | None, caught: Sequence[str]) -> bool:
    """Whether a fused step ran compiled: its first step (after a dynamo reset) compiled a graph
    and nothing warned of a fallback to eager or to the reference path."""
    if not first_step_compiles or first_step_compiles.get("graphs", 0) < 1:
        return False
    return not any(word in w for w in caught for word in _NOT_COMPILED)


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


class _CopyBuffers:
    """A large float32 source and destination for measuring the copy bandwidth."""

    def __init__(self, mib: float) -> None:
        self.numel = max(1, int(mib * 2**20) // 4)
        self.src = torch.rand(self.numel)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in

    def step(self) -> None:
        self.dst.copy_(self.src)


def measure_copy_bandwidth(mib: float = 256, repeats: int = 15, buffers: _CopyBuffers | None = None) -> dict[str, Any]:
    """The median GB/s of ``dst.copy_(src)`` on ``mib`` MiB float32 buffers (8 bytes per element:
    4 read, 4 written).

    Also, alternating with it, three other streams over the same buffers, for reading the
    fractions (``"others"``, GB/s counted the same way): ``dst.mul_(s)`` in place (8 B/element),
    ``dst.add_(src)`` in place (12 B) and ``src.sum()`` (4 B, read only). A copy's destination is
    read into the cache before it is written (write-allocate) unless the stores bypass the cache,
    so the copy moves more than the 8 bytes it is credited with; an in-place update does not,
    which is why an optimizer step, which updates its tensors in place, can exceed 100 % of the
    copy bandwidth.
    """
    buf = buffers or _CopyBuffers(mib)
    src, dst = buf.src, buf.dst
    streams: dict[str, tuple[int, Callable[[], Any]]] = {
        "copy": (8, buf.step),
        "scale_inplace": (8, lambda: dst.mul_(1.0)),
        "add_inplace": (12, lambda: dst.add_(src, alpha=1e-30)),
        "sum": (4, src.sum),
    }
    samples: dict[str, list[float]] = {k: [] for k in streams}
    for _ in range(repeats):
        for name, (_, fn) in streams.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "MiB": buf.numel * 4 / 2**20,
        "repeats": repeats,
        "ms": 1e3 * med["copy"],
        "GBps": 8 * buf.numel / med["copy"] / 1e9,
        "samples_ms": [1e3 * s for s in samples["copy"]],
        "others": {
            name: {"bytes_per_element": b, "GBps": b * buf.numel / med[name] / 1e9}
            for name, (b, _) in streams.items()
            if name != "copy"
        },
    }


def _cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, with the family and model numbers (a virtual machine often
    shows only "AMD EPYC"; family 25 model 17 is Zen 4)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _cache_sizes() -> dict[str, str]:
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
            out[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = size
    except OSError:
        pass
    return out


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _git_revision() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{'+dirty' if dirty else ''}" if rev else None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, caches, memory, versions."""
    from ... import __version__

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        mem_gib = None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "caches": _cache_sizes(),
        "memory_GiB": round(mem_gib, 1) if mem_gib else None,
        "platform": platform.platform(),
        "load_average": _load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "steadygrad": __version__,
        "git": _git_revision(),
    }


# ------------------------------------------------------------------------------------------------
# Contenders
# ------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """A contender that cannot be built here (e.g. fused=True not implemented yet)."""


@dataclass
class _Contender:
    name: str
    step: Callable[[], Any]
    bytes_per_param: int
    params: list[Tensor] | None = None  # None for the copy
    optimizer: Any = None
    samples: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    first_step_s: float | None = None
    first_step_compiles: dict[str, int] | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def write_grads(self, grads: list[Tensor], new: bool = False) -> None:
        """The gradients of the next step: written into the ``.grad`` tensors in place (a
        backward pass accumulating into zeroed gradients), or with ``new`` as new tensors (a
        backward pass after torch's default ``zero_grad()``, which sets them to ``None``)."""
        if self.params is None:
            return
        if new:
            for p, g in zip(self.params, grads):
                p.grad = g.clone()
        else:
            # p.grad is read every time: a fused optimizer may have turned it into a view.
            torch._foreach_copy_([p.grad for p in self.params], grads)


def _make_params(base: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    params = [torch.nn.Parameter(b.clone()) for b in base]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def _sg_clipper(case: Case) -> Any:
    import steadygrad as sg

    return {
        None: None,
        "moment_clip": None,
        "norm": lambda: sg.clip_by_norm(MAX_NORM),
        "value": lambda: sg.clip_by_value(CLIP_VALUE),
        "moment": lambda: sg.clip_by_moment(MOMENT_K),
        "unit_ratio": lambda: sg.clip_by_unit_ratio(UNIT_RATIO),
    }[case.clip]


def make_steadygrad_optimizer(case: Case, params: list[Tensor], fused: bool) -> torch.optim.Optimizer:
    """``sg.optim.<Opt>(params, **options, clip=..., moment_clip=..., fused=...)`` for ``case``.

    Raises :class:`Unavailable` when this version of steadygrad refuses the combination.
    """
    import steadygrad as sg

    kwargs: dict[str, Any] = dict(case.options)
    clipper = _sg_clipper(case)
    if clipper is not None:
        kwargs["clip"] = clipper()
    if case.clip == "moment_clip":
        kwargs["moment_clip"] = MOMENT_K
    if fused:
        kwargs["fused"] = True
    try:
        return getattr(sg.optim, case.optimizer)(params, **kwargs)
    except (TypeError, ValueError) as exc:
        if fused and "fused" in str(exc):
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
        raise


def make_torch_step(case: Case, params: list[Tensor], impl: str) -> tuple[torch.optim.Optimizer, Callable[[], Any]]:
    """What a torch user runs: ``clip_grad_norm_`` / ``clip_grad_value_`` (foreach) and
    ``torch.optim.<Opt>(foreach=True)`` or ``(fused=True)``."""
    cls = getattr(torch.optim, case.optimizer)
    if impl == "fused" and case.optimizer not in TORCH_FUSED_CPU:
        raise Unavailable(f"torch.optim.{case.optimizer} has no fused implementation")
    opt = cls(params, **case.options, **({"fused": True} if impl == "fused" else {"foreach": True}))
    clip = case.torch_clip
    if clip == "norm":
        clip_fn = torch.nn.utils.clip_grad_norm_

        def step() -> None:
            clip_fn(params, MAX_NORM, foreach=True)
            opt.step()

    elif clip == "value":
        clip_fn = torch.nn.utils.clip_grad_value_

        def step() -> None:
            clip_fn(params, CLIP_VALUE, foreach=True)
            opt.step()

    else:
        step = opt.step
    return opt, step


def _build(name: str, case: Case, base: list[Tensor], grads: list[Tensor], copy: _CopyBuffers) -> _Contender:
    if name == "copy":
        return _Contender(name, copy.step, 8)
    params = _make_params(base, grads)
    if name in STEADYGRAD:
        opt = make_steadygrad_optimizer(case, params, fused=name == "sg_fused")
        return _Contender(name, opt.step, case.bytes_per_param, params, opt)
    opt, step = make_torch_step(case, params, "fused" if name == "torch_fused" else "foreach")
    return _Contender(name, step, case.torch_bytes_per_param, params, opt)


def _fail(c: _Contender, exc: BaseException) -> None:
    c.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
    c.params = c.optimizer = None
    c.step = lambda: None


# ------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------


class _TimeLimit(BaseException):
    """Raised in the main thread when a first step exceeds its time limit. A BaseException, so
    that no ``except Exception`` on the way (a compile fallback) swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupts the block with :class:`_TimeLimit` after ``seconds`` (SIGALRM; a no-op off
    the main thread, on platforms without it, or with ``None``)."""
    usable = (
        seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _TimeLimit(f"the first step (compile) took longer than {seconds:g} s; interrupted")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _messages(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """The distinct messages of caught warnings, one line each (deprecations left out)."""
    return sorted(
        {
            " ".join(str(w.message).split())[:300]
            for w in caught
            if not issubclass(w.category, (DeprecationWarning, FutureWarning))
        }
    )


def _one_cycle(opt: torch.optim.Optimizer, case: Case, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    lr = opt.param_groups[0]["lr"]
    cycle = case.optimizer in ("Adam", "AdamW") or case.options.get("momentum", 0) > 0
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=10 * float(lr), total_steps=steps, cycle_momentum=cycle)


def recompile_check(case: Case, base: list[Tensor], grads: list[Tensor], steps: int = 100) -> dict[str, Any]:
    """A fresh ``fused=True`` optimizer driven by ``OneCycleLR`` for ``steps`` steps.

    Returns the time and compiles of its first step (after another instance has compiled the same
    layout in this process: the compile cache) and the compiles of the ``steps − 1`` later ones,
    in which only the learning rate (and Adam's beta1, RMSprop's momentum when used) change.
    """
    params = _make_params(base, grads)
    opt = make_steadygrad_optimizer(case, params, fused=True)
    sched = _one_cycle(opt, case, steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = _dynamo_counts()
        t0 = time.perf_counter()
        opt.step()
        first = time.perf_counter() - t0
        sched.step()
        after_first = _dynamo_counts()
        for _ in range(steps - 1):
            opt.step()
            sched.step()
        after = _dynamo_counts()
    later = _delta(after, after_first)
    return {
        "scheduler": "OneCycleLR",
        "cycle_momentum": sched.cycle_momentum,
        "steps": steps,
        "first_step_s": first,
        "first_step_compiles": _delta(after_first, before),
        "later_compiles": later,
        "recompiles": max(later["frames"], later["graphs"]),
        "warnings": _messages(caught),
    }


def bench_case(
    case: Case,
    shapes: Sequence[tuple[int, ...]],
    base: list[Tensor],
    grads: list[Tensor],
    copy: _CopyBuffers,
    *,
    contenders: Sequence[str] = CONTENDERS,
    repeats: int = 15,
    warmup: int = 3,
    recompile_steps: int = 100,
    compile_timeout: float | None = 300,
    new_grads: bool = False,
) -> dict[str, Any]:
    """Builds the contenders of ``case`` on copies of ``base`` (parameters) and ``grads``, times
    them alternating, frees them and returns the case's JSON record. ``new_grads``: see
    :meth:`_Contender.write_grads`.

    ``compile_timeout``: seconds after which the first ``sg_fused`` step (the compile) is
    interrupted and the contender reported as failed (``None``: no limit; needs the main thread).
    """
    n = sum(_numel(s) for s in shapes)
    if "sg_fused" in contenders:
        # Each case compiles as in a fresh process: dynamo keeps at most 8 graphs per code object
        # (torch._dynamo.config.recompile_limit), and every fused optimizer runs the same one.
        _reset_dynamo()
    built: dict[str, _Contender] = {}
    skipped: dict[str, str] = {}
    for name in contenders:
        try:
            built[name] = _build(name, case, base, grads, copy)
        except Unavailable as exc:
            skipped[name] = str(exc)
    # First step (compile for sg_fused), then warm-up; warnings (a fused step falling back to the
    # reference path, a compile failure) are recorded with the contender.
    for c in built.values():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                c.write_grads(grads, new_grads)
                before = _dynamo_counts()
                t0 = time.perf_counter()
                with _time_limit(compile_timeout if c.name == "sg_fused" else None):
                    c.step()
                c.first_step_s = time.perf_counter() - t0
                c.first_step_compiles = _delta(_dynamo_counts(), before)
                for _ in range(warmup):
                    c.write_grads(grads, new_grads)
                    c.step()
            except (Exception, _TimeLimit) as exc:  # a contender that breaks is reported, the others go on
                _fail(c, exc)
        c.warnings = _messages(caught)
    live = [c for c in built.values() if c.error is None]
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(live) if live else 0
            for c in live[k:] + live[:k]:
                if c.error is not None:
                    continue
                c.write_grads(grads, new_grads)
                f0 = _minflt()
                t0 = time.perf_counter()
                try:
                    c.step()
                except Exception as exc:
                    _fail(c, exc)
                    continue
                t = time.perf_counter() - t0
                c.faults.append(_minflt() - f0)
                c.samples.append(t)
    finally:
        if gc_was_enabled:
            gc.enable()

    copy_s = statistics.median(built["copy"].samples) if "copy" in built and built["copy"].samples else None
    copy_gbps = 8 * copy.numel / copy_s / 1e9 if copy_s else None
    record: dict[str, Any] = {
        "case": case.name,
        "optimizer": case.optimizer,
        "clip": case.clip,
        "torch_clip": case.torch_clip,
        "options": dict(case.options),
        "description": case.describe(),
        "n_params": n,
        "n_tensors": len(shapes),
        "bytes_per_param": case.bytes_per_param,
        "repeats": repeats,
        "warmup": warmup,
        "copy_GBps": copy_gbps,
        "contenders": {},
        "ratios": {},
        "recompile_check": None,
    }
    medians: dict[str, float] = {}
    for name in contenders:
        if name in skipped:
            record["contenders"][name] = {"available": False, "error": skipped[name]}
            continue
        c = built[name]
        entry: dict[str, Any] = {"available": c.error is None, "error": c.error, "warnings": c.warnings}
        if c.error is None and c.samples:
            q1, med, q3 = _quantiles(c.samples)
            medians[name] = med
            elements = copy.numel if name == "copy" else n
            gbps = c.bytes_per_param * elements / med / 1e9
            entry.update(
                ms=1e3 * med,
                ms_q1=1e3 * q1,
                ms_q3=1e3 * q3,
                ms_min=1e3 * min(c.samples),
                samples_ms=[1e3 * s for s in c.samples],
                bytes_per_param=c.bytes_per_param,
                GBps=gbps,
                bw_fraction=gbps / copy_gbps if copy_gbps else None,
                minflt_per_step=statistics.mean(c.faults) if c.faults else None,
                first_step_s=c.first_step_s,
                first_step_compiles=c.first_step_compiles,
            )
            if name == "sg_fused":
                entry["compiled"] = _compiled(c.first_step_compiles, c.warnings)
        record["contenders"][name] = entry
    for t in TORCH:
        for s in STEADYGRAD:
            if t in medians and s in medians:
                record["ratios"][f"{t}/{s}"] = medians[t] / medians[s]
    fused_ok = "sg_fused" in medians
    built.clear()  # free the case before the next one (100M x several state buffers)
    live.clear()
    c = None
    if fused_ok and recompile_steps > 0:
        gc.collect()
        try:
            record["recompile_check"] = recompile_check(case, base, grads, recompile_steps)
        except Exception as exc:
            record["recompile_check"] = {"error": f"{type(exc).__name__}: {exc}"}
    gc.collect()  # optimizers hold reference cycles: collect them before the next case
    return record


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _resolve(mode: str, value: Any, key: str) -> Any:
    return MODES[mode][key] if value is None else value


def run_benchmark(
    sizes: Sequence[int | str] | None = None,
    layouts: Sequence[str] | None = None,
    cases: Sequence[str] | None = None,
    *,
    mode: str = "default",
    repeats: int | None = None,
    warmup: int | None = None,
    contenders: Sequence[str] = CONTENDERS,
    recompile_steps: int = 100,
    copy_mib: float = 256,
    threads: int | None = None,
    compile_cache: str = "cold",
    compile_timeout: float | None = 300,
    new_grads: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs every (size, layout, case) and returns the report (JSON-ready).

    Args:
        sizes, layouts, cases, repeats, warmup: ``None`` takes the value of ``mode``
            (``"quick"``, ``"default"``, ``"host"`` or ``"full"``, see :data:`MODES`).
        contenders: a subset of :data:`CONTENDERS` (``"copy"`` is always added: the fractions of
            bandwidth need it; but in the ``"host"`` mode, which times tiny tensors with warm
            caches).
        recompile_steps: steps of the OneCycleLR check of ``sg_fused`` (0: skip it).
        copy_mib: size of each copy buffer (>= 256 MiB keeps it past the caches).
        threads: ``torch.set_num_threads`` for the run (``None``: leave it).
        compile_cache: ``"cold"``: inductor's on-disk cache is a fresh temporary directory for
            the run (removed after), so the first fused step of each case is a full compile, as
            on a user's first run; ``"warm"``: the usual cache (``TORCHINDUCTOR_CACHE_DIR`` or
            inductor's default), where a repeated run mostly loads compiled kernels.
        compile_timeout: seconds after which a first fused step (the compile) is interrupted and
            ``sg_fused`` reported as failed for that case (``None``: no limit).
        new_grads: the gradients of every step are new tensors (as after torch's default
            ``zero_grad()``), not written into the previous ones.
        progress: called with one line per case (e.g. ``print`` to stderr).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    sizes = [parse_size(s) for s in _resolve(mode, sizes, "sizes")]
    layouts = list(_resolve(mode, layouts, "layouts"))
    cases = list(_resolve(mode, cases, "cases"))
    repeats = int(_resolve(mode, repeats, "repeats"))
    warmup = int(_resolve(mode, warmup, "warmup"))
    for name in layouts:
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    for name in cases:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise ValueError(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    with_copy = MODES[mode].get("copy", True)
    contenders = [c for c in CONTENDERS if (c in contenders and c != "copy") or (c == "copy" and with_copy)]
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if compile_cache not in ("cold", "warm"):
        raise ValueError(f"compile_cache must be 'cold' or 'warm', got {compile_cache!r}")
    if threads is not None:
        torch.set_num_threads(threads)

    start = time.perf_counter()
    copy = _CopyBuffers(copy_mib)
    report: dict[str, Any] = {
        "schema": "steadygrad.bench/2",
        "machine": machine_info(),
        "settings": {
            "mode": mode,
            "sizes": sizes,
            "layouts": layouts,
            "cases": cases,
            "contenders": contenders,
            "repeats": repeats,
            "warmup": warmup,
            "recompile_steps": recompile_steps,
            "copy_MiB": copy_mib,
            "compile_cache": compile_cache,
            "compile_timeout_s": compile_timeout,
            "new_grads": new_grads,
            "seed": seed,
            "dtype": "float32",
            "clip": {"max_norm": MAX_NORM, "clip_value": CLIP_VALUE, "moment_k": MOMENT_K, "unit_ratio": UNIT_RATIO},
        },
        "bytes_model": {
            "per_param": {name: bytes_per_param(name) for name in _STATE_TENSORS},
            "extra": {
                "RMSprop centered": 8,
                "RMSprop momentum": 8,
                "Adam amsgrad": 8,
                **{f"clip {k}": v for k, v in CLIP_BYTES.items() if k is not None},
            },
            "copy": 8,
        },
        "copy": measure_copy_bandwidth(buffers=copy, repeats=max(repeats, 10)),
        "results": [],
    }
    total = len(sizes) * len(layouts) * len(cases)
    done = 0
    with _inductor_cache(compile_cache if "sg_fused" in contenders else "warm"):
        if "sg_fused" in contenders:
            report["vec_isa_probe_s"] = vec_isa_probe()
            report["compiler_startup_s"] = compiler_startup()
        for size, layout, name, record in _run_cases(
            sizes, layouts, cases, copy, contenders, repeats, warmup, recompile_steps, seed, compile_timeout, new_grads
        ):
            report["results"].append(record)
            done += 1
            if progress is not None:
                progress(f"[{done}/{total}] {format_size(size)} {layout} {name}: {record['seconds']:.1f} s")
    report["load_average_end"] = _load_average()
    report["elapsed_s"] = time.perf_counter() - start
    return report


@contextlib.contextmanager
def _inductor_cache(kind: str) -> Iterator[str | None]:
    """``"cold"``: a fresh ``TORCHINDUCTOR_CACHE_DIR`` for the block (removed after)."""
    if kind != "cold":
        yield None
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = tempfile.mkdtemp(prefix="steadygrad-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
        shutil.rmtree(path, ignore_errors=True)


def _run_cases(
    sizes: Sequence[int],
    layouts: Sequence[str],
    cases: Sequence[str],
    copy: _CopyBuffers,
    contenders: Sequence[str],
    repeats: int,
    warmup: int,
    recompile_steps: int,
    seed: int,
    compile_timeout: float | None,
    new_grads: bool = False,
) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
    """Yields ``(size, layout, case, record)``; one size x layout's tensors live at a time."""
    for size in sizes:
        for layout in layouts:
            shapes = layout_shapes(layout, size)
            gen = torch.Generator().manual_seed(seed)
            base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for name in cases:
                t0 = time.perf_counter()
                record = bench_case(
                    CASES[name],
                    shapes,
                    base,
                    grads,
                    copy,
                    contenders=contenders,
                    repeats=repeats,
                    warmup=warmup,
                    recompile_steps=recompile_steps,
                    compile_timeout=compile_timeout,
                    new_grads=new_grads,
                )
                record.update(size=size, size_label=format_size(size), layout=layout, seconds=time.perf_counter() - t0)
                yield size, layout, name, record
            del base, grads
            gc.collect()


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """The report as readable tables (one row per size × layout × case)."""
    m = report["machine"]
    s = report["settings"]
    load = m.get("load_average")
    lines = [
        f"steadygrad bench: {m['cpu']}, {m['threads']} torch threads ({m['cpu_count']} CPUs), "
        f"torch {m['torch']}, steadygrad {m['steadygrad']}{' @ ' + m['git'] if m.get('git') else ''}",
        f"copy bandwidth: {report['copy']['GBps']:.1f} GB/s ({report['copy']['MiB']:.0f} MiB float32 copy, "
        f"8 B/element, median of {report['copy']['repeats']}); medians of {s['repeats']} alternating repetitions",
    ]
    if report.get("compiler_startup_s") is not None:
        lines.append(
            f"compiler start-up (first torch.compile of the process, {s.get('compile_cache', 'warm')} cache): "
            f"{report['compiler_startup_s']:.1f} s, not included in the compile column"
        )
    if report.get("vec_isa_probe_s") is not None:
        lines.append(
            f"inductor's probe of the CPU's vector instruction sets: {report['vec_isa_probe_s']:.1f} s "
            "(once per machine and inductor cache directory; not in the start-up above)"
        )
    others = report["copy"].get("others")
    if others:
        lines.append(
            "same buffers, same accounting: "
            + ", ".join(f"{k} {v['GBps']:.1f} GB/s ({v['bytes_per_element']} B)" for k, v in others.items())
        )
    if load:
        end = report.get("load_average_end")
        lines.append(
            f"load average at start {'/'.join(f'{x:.1f}' for x in load)}"
            + (f", at end {'/'.join(f'{x:.1f}' for x in end)}" if end else "")
            + f" ({m['cpu_count']} CPUs; this run itself adds up to {m['threads']})"
        )
    lines.append("")
    header = [
        "size",
        "layout",
        "case",
        "B/p",
        "copy",
        "sg_fused ms",
        "bw",
        "sg_ref ms",
        "ref x foreach",
        "foreach ms",
        "bw",
        "fused ms",
        "bw",
        "x foreach",
        "x fused",
        "compile s",
        "recomp",
        "flt/step",
    ]
    rows = []
    for r in report["results"]:
        c = r["contenders"]

        def ms(name: str, c: dict[str, Any] = c) -> str:
            e = c.get(name)
            if e is None:
                return ""
            return _fmt(e.get("ms"), ".2f", "n/a" if not e.get("available") else "-")

        def bw(name: str, c: dict[str, Any] = c) -> str:
            e = c.get(name) or {}
            return _fmt(e.get("bw_fraction"), ".0%", "")

        fused = c.get("sg_fused") or {}
        rc = r.get("recompile_check") or {}
        rows.append(
            [
                r["size_label"],
                r["layout"],
                r["case"],
                str(r["bytes_per_param"]),
                _fmt(r["copy_GBps"], ".1f"),
                ms("sg_fused"),
                bw("sg_fused"),
                ms("sg_ref"),
                _fmt(r["ratios"].get("torch_foreach/sg_ref"), ".2f"),
                ms("torch_foreach"),
                bw("torch_foreach"),
                ms("torch_fused"),
                bw("torch_fused"),
                _fmt(r["ratios"].get("torch_foreach/sg_fused"), ".2f"),
                _fmt(r["ratios"].get("torch_fused/sg_fused"), ".2f"),
                "eager" if fused.get("compiled") is False else _fmt(fused.get("first_step_s"), ".1f"),
                _fmt(rc.get("recompiles"), "d"),
                _fmt(fused.get("minflt_per_step", (c.get("sg_ref") or {}).get("minflt_per_step")), ".0f"),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    left = {0, 1, 2}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        )

    lines.append(line(header))
    lines.append(line(["-" * w for w in widths]))
    lines += [line(row) for row in rows]
    lines += [
        "",
        "B/p: ideal bytes per parameter of the steadygrad step; copy: GB/s of the copy measured in the case's "
        "repetitions; bw: ideal bytes / time as a fraction of it; ref x foreach: torch foreach time / sg_ref time "
        "(the default path against torch's default); x foreach / x fused: torch time / sg_fused time "
        "(> 1: steadygrad faster); compile s: first fused step; "
        "recomp: compiles in the OneCycleLR steps after the first; flt/step: minor page faults per steadygrad step.",
    ]
    unavailable = {
        name: e["error"]
        for r in report["results"]
        for name, e in r["contenders"].items()
        if not e.get("available") and e.get("error")
    }
    for name, error in unavailable.items():
        lines.append(f"{name} unavailable: {error}")
    seen: set[tuple[str, str]] = set()
    for r in report["results"]:
        for name, e in r["contenders"].items():
            for w in e.get("warnings") or ():
                if (name, w) not in seen:
                    seen.add((name, w))
                    lines.append(f"{name} warned ({r['size_label']} {r['layout']} {r['case']}): {w}")
    lines.append(f"\nelapsed: {report.get('elapsed_s', 0):.0f} s")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (for docs/benchmarks.md), with the machine above it."""
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"{m['cpu']}, {m['threads']} torch threads ({m['cpu_count']} CPUs, L3 {m['caches'].get('L3', '?')}), "
        f"torch {m['torch']}, steadygrad {m['steadygrad']}{' @ ' + m['git'] if m.get('git') else ''}; "
        f"medians of {s['repeats']} alternating repetitions; copy bandwidth {report['copy']['GBps']:.1f} GB/s "
        f"at the start of the run, per case in the table"
        + (
            f"; compiler start-up {report['compiler_startup_s']:.1f} s ({s.get('compile_cache', 'warm')} cache)"
            if report.get("compiler_startup_s") is not None
            else ""
        )
        + (
            f", plus {report['vec_isa_probe_s']:.1f} s once per machine for inductor's CPU instruction-set probe"
            if report.get("vec_isa_probe_s") is not None
            else ""
        )
        + ".",
        "",
        "| size | layout | case | B/param | copy GB/s | sg fused ms | bw | sg ref ms | ref × foreach "
        "| torch foreach ms | bw | torch fused ms | bw | × foreach | × fused | compile s | recompiles | faults/step |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        c = r["contenders"]

        def get(name: str, key: str, spec: str, c: dict[str, Any] = c) -> str:
            e = c.get(name) or {}
            if not e:
                return ""
            if not e.get("available", True) and key == "ms":
                return "n/a"
            return _fmt(e.get(key), spec, "")

        fused = c.get("sg_fused") or {}
        rc = r.get("recompile_check") or {}
        compile_s = "eager" if fused.get("compiled") is False else _fmt(fused.get("first_step_s"), ".1f", "")
        cells = [
            r["size_label"],
            r["layout"],
            f"`{r['case']}`",
            str(r["bytes_per_param"]),
            _fmt(r["copy_GBps"], ".1f", ""),
            get("sg_fused", "ms", ".2f"),
            get("sg_fused", "bw_fraction", ".0%"),
            get("sg_ref", "ms", ".2f"),
            _fmt(r["ratios"].get("torch_foreach/sg_ref"), ".2f", ""),
            get("torch_foreach", "ms", ".2f"),
            get("torch_foreach", "bw_fraction", ".0%"),
            get("torch_fused", "ms", ".2f"),
            get("torch_fused", "bw_fraction", ".0%"),
            _fmt(r["ratios"].get("torch_foreach/sg_fused"), ".2f", ""),
            _fmt(r["ratios"].get("torch_fused/sg_fused"), ".2f", ""),
            compile_s,
            _fmt(rc.get("recompiles"), "d", ""),
            get("sg_fused", "minflt_per_step", ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
