"""Helpers on lists of tensors shared by every algorithm.

The math of each transform is written once with ``torch._foreach_*`` operations on aligned lists
(parameters, updates, state). The same code runs on a list of many tensors and on one flat buffer
per (device, dtype) group. Scalar hyperparameters may be Python numbers or 0-d tensors; the
helpers here hide the few foreach operations that accept only one of the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "addcmul_",
    "as_real",
    "bias_correction",
    "from_real",
    "group_by_device_dtype",
    "new_steps",
    "scalar_dtype",
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


def group_by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The indices of ``tensors`` grouped by (device, dtype), in first-seen order.

    foreach kernels run one fused launch per group; norms are reduced per group in a wide dtype
    and then combined.
    """
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


def addcmul_(out: list[Tensor], a: list[Tensor], b: list[Tensor], value: Scalar) -> None:
    """``out ← out + value·a·b`` in place, for a number or a 0-d tensor ``value``."""
    if isinstance(value, Tensor):
        torch._foreach_addcmul_(out, torch._foreach_mul(a, value), b)
    else:
        torch._foreach_addcmul_(out, a, b, value=value)


def bias_correction(beta: Scalar, steps: Sequence[Tensor], offset: int = 0) -> list[Tensor]:
    """``1 − beta^(t − offset)`` per step counter ``t``, as 0-d float64 tensors.

    Computed in double precision from the counters, never read on the host: torch.optim computes
    the same value with Python floats after a ``.item()`` per parameter.
    """
    exponents = [s.to(torch.float64) - offset if offset else s.to(torch.float64) for s in steps]
    if isinstance(beta, Tensor):
        beta = beta.to(torch.float64)
        return [1 - beta**e for e in exponents]
    return [1 - torch.pow(beta, e) for e in exponents]
