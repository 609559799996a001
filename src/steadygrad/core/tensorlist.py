"""Helpers on lists of tensors shared by every algorithm.

The math of each transform is written once with ``torch._foreach_*`` operations on aligned lists
(parameters, updates, state). The same code runs on a list of many tensors and on one flat buffer
per (device, dtype) group. Scalar hyperparameters may be Python numbers or 0-d tensors; the
helpers here hide the few foreach operations that accept only one of the two.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PLAIN_TYPES",
    "add_scalar_",
    "add_scalars_",
    "addcmul_",
    "any_complex",
    "any_empty",
    "as_real",
    "bias_correction",
    "copy_",
    "devices",
    "dtypes",
    "from_real",
    "group_by_device_dtype",
    "host_readable",
    "host_scalar",
    "host_steps",
    "mul_scalar_",
    "new_steps",
    "on_device",
    "per_element",
    "scalar_dtype",
    "split_like",
    "types",
    "working_copy",
    "zeros_like",
]

Scalar = float | Tensor


def scalar_dtype() -> torch.dtype:
    """The dtype of step counters: float64 if that is the default dtype, else float32 (as torch)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_steps(params: Sequence[Tensor]) -> list[Tensor]:
    """One step counter per parameter: a 0-d CPU tensor holding 0, as torch.optim stores it."""
    dtype = scalar_dtype()
    return [torch.zeros((), dtype=dtype) for _ in params]


def zeros_like(params: Sequence[Tensor], fill: float = 0.0) -> list[Tensor]:
    """A new tensor per parameter, filled with ``fill`` (``fill + fill·i`` for complex ones, as
    torch's Adagrad initialises its accumulator), in the parameter's dtype, device and layout."""
    out = []
    for p in params:
        value = complex(fill, fill) if p.is_complex() else fill
        out.append(torch.full_like(p, value, memory_format=torch.preserve_format))
    return out


_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")


# Per-step checks over long lists of tensors: C-level loops eagerly (``map`` with ``attrgetter``,
# several times faster than a generator over 500 tensors), plain loops under torch.compile, which
# does not trace ``attrgetter``.


def dtypes(tensors: Sequence[Tensor]) -> set[torch.dtype]:
    """The dtypes of ``tensors``."""
    if torch.compiler.is_compiling():
        return {t.dtype for t in tensors}
    return set(map(_DTYPE, tensors))


def devices(tensors: Sequence[Tensor]) -> set[torch.device]:
    """The devices of ``tensors``."""
    if torch.compiler.is_compiling():
        return {t.device for t in tensors}
    return set(map(_DEVICE, tensors))


def types(tensors: Sequence[Any]) -> set[type]:
    """The Python types of ``tensors`` (``Tensor``, ``Parameter``, ``DTensor``, ...)."""
    if torch.compiler.is_compiling():
        return {type(t) for t in tensors}
    return set(map(type, tensors))


def any_empty(tensors: Sequence[Tensor]) -> bool:
    """Whether one of ``tensors`` has no elements."""
    if torch.compiler.is_compiling():
        return any(t.numel() == 0 for t in tensors)
    return 0 in map(Tensor.numel, tensors)


def any_complex(tensors: Sequence[Tensor]) -> bool:
    """Whether one of ``tensors`` is complex."""
    if torch.compiler.is_compiling():
        return any(t.is_complex() for t in tensors)
    return any(map(Tensor.is_complex, tensors))


def group_by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The indices of ``tensors`` grouped by (device, dtype), in first-seen order.

    foreach kernels run one fused launch per group; norms are reduced per group in a wide dtype
    and then combined.
    """
    if tensors and len(dtypes(tensors)) == 1 and len(devices(tensors)) == 1:
        return {(tensors[0].device, tensors[0].dtype): list(range(len(tensors)))}
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def as_real(t: Tensor) -> Tensor:
    """A real view of ``t``: ``torch.view_as_real`` for complex tensors, ``t`` itself otherwise.

    Complex parameters are optimised as pairs of real numbers, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


def from_real(t: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`as_real` for a tensor computed on the real view of ``like``."""
    if like.is_complex() and not t.is_complex():
        return torch.view_as_complex(t.contiguous() if t.stride(-1) != 1 else t)
    return t


# Dtypes whose CPU kernels give the same bits for a Python number and a 0-d tensor of the dtype.
_TENSOR_SCALAR_DTYPES = (torch.float32, torch.float64)


def _cpu_scalar(value: Scalar, tensors: Sequence[Tensor]) -> Scalar:
    """``value`` as a 0-d CPU tensor of the tensors' dtype where that gives the same bits (all on
    the CPU, one dtype, float32 or float64, outside ``torch.compile``), else ``value`` itself.

    torch's CPU foreach kernels are a loop over the tensors; given a Python number, ``mul_`` and
    ``add_`` wrap it into a new tensor *for every element of the list* (about 4× the per-tensor
    cost of the operation itself on small tensors), given a 0-d CPU tensor they do not (torch.optim
    adds its ``step`` counters this way)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not tensors or torch.compiler.is_compiling():
        return value
    if torch._C._len_torch_dispatch_stack():  # a fake/meta/debug mode: a number, no shared tensor
        return value
    first = tensors[0]
    if first.dtype not in _TENSOR_SCALAR_DTYPES or not first.is_cpu or len(dtypes(tensors)) != 1:
        return value
    # (A 0-d CPU tensor is a scalar for tensors on any device, so the first one decides.)
    return _scalar_tensor(value, math.copysign(1.0, value), first.dtype)


@functools.lru_cache(maxsize=256)
def _scalar_tensor(value: float, sign: float, dtype: torch.dtype) -> Tensor:
    """A 0-d CPU tensor holding ``value``, shared (it is only ever read); ``sign`` keeps 0.0 and
    -0.0, which compare equal, apart. Made on the CPU and outside inference mode whatever the
    caller's context (a ``torch.device`` default, ``inference_mode``), as it outlives it."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype, device="cpu")


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i] ← src[i]`` in place: one ``torch._foreach_copy_``, or one ``copy_`` per tensor
    where autograd records the step (``differentiable=True``: the foreach copy has no derivative)."""
    if torch.is_grad_enabled():
        for d, s in zip(dst, src):
            d.copy_(s)
    else:
        torch._foreach_copy_(list(dst), list(src))


def mul_scalar_(tensors: list[Tensor], value: Scalar) -> None:
    """``t ← t·value`` in place for every tensor (a number, a 0-d tensor or one per tensor), as
    ``torch._foreach_mul_`` computes it, without its per-tensor cost of wrapping a number."""
    torch._foreach_mul_(tensors, _cpu_scalar(value, tensors))


def add_scalar_(tensors: list[Tensor], value: Scalar) -> None:
    """``t ← t + value`` in place for every tensor (a number or a 0-d tensor), as
    ``torch._foreach_add_`` computes it, without its per-tensor cost of wrapping a number. A 0-d
    tensor is never read on the host (``alpha`` selects the overload that takes it as a tensor)."""
    value = _cpu_scalar(value, tensors)
    if isinstance(value, Tensor):
        torch._foreach_add_(tensors, value, alpha=1)
    else:
        torch._foreach_add_(tensors, value)


def add_scalars_(tensors: list[Tensor], values: Sequence[Scalar]) -> None:
    """``t_i ← t_i + values[i]`` in place: one number for all when the values are equal numbers
    (the usual case: every tensor has stepped as often), else one per tensor."""
    first = values[0] if values else 0.0
    if all(isinstance(v, (int, float)) for v in values) and all(v == first for v in values):
        add_scalar_(tensors, first)
    else:
        torch._foreach_add_(tensors, list(values))


def addcmul_(out: list[Tensor], a: list[Tensor], b: list[Tensor], value: Scalar | list[Tensor]) -> None:
    """``out ← out + value·a·b`` in place, for a number, a 0-d tensor or one 0-d tensor per element."""
    if isinstance(value, (Tensor, list)):
        torch._foreach_addcmul_(out, torch._foreach_mul(a, value), b)
    else:
        torch._foreach_addcmul_(out, a, b, value=value)


@torch.library.custom_op("steadygrad::bias_correction", mutates_args=())
def _bias_correction_op(beta: Tensor, steps: list[Tensor], offset: int) -> list[Tensor]:
    return [1 - beta.to(s.device, torch.float64) ** (s.to(torch.float64) - offset) for s in steps]


@_bias_correction_op.register_fake
def _(beta: Tensor, steps: list[Tensor], offset: int) -> list[Tensor]:
    return [torch.empty(s.shape, dtype=torch.float64, device=s.device) for s in steps]


_CPU = torch.device("cpu")

#: Tensor types steadygrad runs torch's kernels on directly (no subclass dispatch).
PLAIN_TYPES: frozenset[type] = frozenset((Tensor, torch.nn.Parameter))


def host_readable(tensors: Sequence[Tensor]) -> bool:
    """Whether a value computed from these tensors can be read on the host at no device sync:
    plain CPU tensors (or parameters) outside ``torch.compile``. Helpers that take a cheaper
    path once they know a value (the norms' overflow pass, a Clipper's count of non-finite
    elements) read it only then; elsewhere they stay branch-free."""
    return not torch.compiler.is_compiling() and devices(tensors) == {_CPU} and types(tensors) <= PLAIN_TYPES


def host_scalar(value: Scalar) -> float | None:
    """``value`` as a Python number when reading it costs no device sync: a number, or a 0-d (or
    1-element) CPU tensor that needs no gradient, outside ``torch.compile``; else ``None``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if (
        isinstance(value, Tensor)
        and value.device.type == "cpu"
        and value.numel() == 1
        and not value.requires_grad
        and not torch.compiler.is_compiling()
    ):
        return value.item()
    return None


def host_steps(steps: Sequence[Tensor]) -> list[float] | None:
    """The values of step counters as Python floats when reading them costs no device sync (0-d
    CPU tensors, outside ``torch.compile``), else ``None``.

    torch.optim reads its CPU ``step`` tensors the same way (``.item()``) to compute bias
    corrections with Python floats; a scalar list then goes into one foreach call instead of a
    tensor operation per parameter."""
    if (
        torch.compiler.is_compiling()
        or not steps
        or any(s.device.type != "cpu" or s.requires_grad or s.dim() for s in steps)
    ):
        return None
    return [s.item() for s in steps]


def bias_correction(beta: Scalar, steps: Sequence[Tensor], offset: int = 0) -> list[Tensor] | list[float]:
    """``1 − beta^(t − offset)`` per step counter ``t``: Python floats computed as torch.optim does
    when the counters are CPU tensors and ``beta`` a number (:func:`host_steps`), else 0-d float64
    tensors computed on the counters' device, never read on the host. A counter may be a table of
    one count per parameter (:attr:`~steadygrad.core.transform.StepContext.segments`): one value
    per entry then, to be gathered per element with :func:`per_element`.

    Under ``torch.compile`` a table goes through one opaque op (``steadygrad::bias_correction``):
    gathered per element, its ``pow`` would otherwise be inlined and computed for every element.
    (A 0-d value is computed once before the loops by the fused step's graph pass,
    :class:`steadygrad.kernels.fused._ScalarsFirst`; left to itself, inductor would evaluate the
    scalar ``pow`` once per vector of 16 elements: 32 ms instead of 5 ms for an Adam step on 10M
    parameters on 2 CPU cores.)
    """
    if not isinstance(beta, Tensor):
        values = host_steps(steps)
        if values is not None:
            return [1 - beta ** (t - offset) for t in values]
    if torch.compiler.is_compiling() and any(s.dim() for s in steps):
        base = beta if isinstance(beta, Tensor) else torch.tensor(beta, dtype=torch.float64)
        return list(_bias_correction_op(base, list(steps), offset))
    exponents = [s.to(torch.float64) - offset if offset else s.to(torch.float64) for s in steps]
    if isinstance(beta, Tensor):
        beta = beta.to(torch.float64)
        return [1 - beta**e for e in exponents]
    return [1 - torch.pow(beta, e) for e in exponents]


def per_element(values: Sequence[Any], segments: Sequence[Tensor] | None) -> list[Any]:
    """Per-counter values (one per tensor: a number, a 0-d tensor, or a table with one value per
    parameter) for element-wise use: a table is gathered through the tensor's ``segments`` (the
    parameter of each element, :attr:`~steadygrad.core.transform.StepContext.segments`); the
    others are returned as they are."""
    if segments is None:
        return list(values)
    return [v[s] if isinstance(v, Tensor) and v.dim() else v for v, s in zip(values, segments)]


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` (a no-op when it is there already)."""
    return t if t.device == device else t.to(device)


def working_copy(grads: Sequence[Tensor], maximize: bool) -> list[Tensor]:
    """The updates a chain starts from: new tensors holding the gradients (negated to maximize),
    which the chain may consume under the in-place rule while ``.grad`` stays untouched."""
    return list(torch._foreach_neg(list(grads))) if maximize else [g.clone() for g in grads]


def split_like(flat: Sequence[Tensor], groups: Sequence[Sequence[Tensor]]) -> list[list[Tensor]]:
    """``flat`` cut into consecutive lists as long as the lists of ``groups``."""
    out, start = [], 0
    for group in groups:
        out.append(list(flat[start : start + len(group)]))
        start += len(group)
    return out
