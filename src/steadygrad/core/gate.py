"""The commit gate and non-finite values: the one set of helpers every front-end uses.

A step that must leave no trace (non-finite gradients, a GradScaler skip) is decided on the
device: the caller computes a 0-d gate (non-zero: commit, 0: skip) and hands it to the
transforms in :class:`~steadygrad.core.transform.StepContext`. Each stateful transform then
*selects* between its new and its old state (``torch.where``, or an EMA whose decay and rate are
selected as ``(β, 1 − β)`` or ``(1, 0)``), so that a closed gate leaves the state bit-for-bit
unchanged for finite inputs; callers zero bad gradients first (:func:`zero_unless_`). Nothing here
reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .tensorlist import Scalar, add_scalar_, addcmul_, dtypes, mul_scalar_, on_device

__all__ = [
    "advance_",
    "combine_gates",
    "commit_select",
    "count_nonfinite",
    "ema_",
    "ema_square_",
    "gate_ema",
    "gate_ema_per_tensor",
    "gate_increment",
    "gate_open_per_tensor",
    "nonfinite_counts",
    "scaled_rate",
    "zero_unless_",
]


def combine_gates(outer: Tensor | None, ok: Tensor | None) -> Tensor | None:
    """The gate that commits only where both do (``None`` commits)."""
    if outer is None:
        return ok
    if ok is None:
        return outer
    return (on_device(outer, ok.device) != 0) & (ok != 0)


def commit_select(gate: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` if the step commits, else ``old`` (a shared statistic under the commit gate).

    Without a gate (``None``) returns ``new``. Branch-free (``torch.where``), on ``new``'s device
    and dtype; ``old`` may live elsewhere (a fresh state is created on the CPU).
    """
    if gate is None:
        return new
    open_ = on_device(gate, new.device) != 0
    return torch.where(open_, new, on_device(old, new.device).to(new.dtype))


def gate_ema(beta: Scalar, gate: Tensor | None, device: torch.device) -> tuple[Scalar, Scalar]:
    """The ``(decay, rate)`` of an EMA ``v ← decay·v + rate·x`` under the commit gate.

    ``(β, 1 − β)`` without a gate (returned as given, numbers stay numbers); with a gate,
    0-d float64 tensors on ``device``: ``(β, 1 − β)`` where it is open and ``(1, 0)`` where it is
    closed, so that a closed gate leaves ``v`` bit-for-bit unchanged (for finite ``x``).
    """
    if gate is None:
        return beta, 1 - beta
    open_ = on_device(gate, device) != 0
    if isinstance(beta, Tensor):
        b = beta.to(device=device, dtype=torch.float64)
    else:
        b = torch.tensor(beta, dtype=torch.float64, device=device)
    return torch.where(open_, b, 1.0), torch.where(open_, 1 - b, 0.0)


def gate_ema_per_tensor(
    beta: Scalar, gate: Tensor | None, tensors: Sequence[Tensor]
) -> tuple[Scalar | list[Tensor], Scalar | list[Tensor]]:
    """:func:`gate_ema` for a list of tensors: numbers without a gate, else one ``(decay, rate)``
    0-d tensor per tensor, on its device (foreach operations take such lists)."""
    if gate is None:
        return beta, 1 - beta
    by_device = {d: gate_ema(beta, gate, d) for d in {t.device for t in tensors}}
    return [by_device[t.device][0] for t in tensors], [by_device[t.device][1] for t in tensors]


def gate_open_per_tensor(gate: Tensor | None, tensors: Sequence[Tensor]) -> Scalar | list[Tensor]:
    """1 without a gate, else one 0-d float64 tensor per tensor on its device: 1 where the gate is
    open, 0 where it is closed (a rate that freezes a sum, or an update, under a closed gate)."""
    if gate is None:
        return 1
    by_device = {d: (on_device(gate, d) != 0).to(torch.float64) for d in {t.device for t in tensors}}
    return [by_device[t.device] for t in tensors]


def gate_increment(gate: Tensor | None, counter: Tensor) -> Scalar:
    """What a step counter advances by under the commit gate: 1, or 1/0 as a tensor on the
    counter's device (reading a device gate into a CPU counter is a device-to-host copy)."""
    if gate is None:
        return 1
    return (on_device(gate, counter.device) != 0).to(counter.dtype)


def advance_(counters: Sequence[Tensor], gate: Tensor | None) -> None:
    """Step counters ``t ← t + 1`` in place, or ``t + gate`` under the commit gate."""
    if gate is None:
        add_scalar_(list(counters), 1.0)
    else:
        for c in counters:
            c.add_(gate_increment(gate, c))


def nonfinite_counts(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The number of inf/NaN elements of each tensor, as 0-d int64 tensors on its device."""
    return [torch.count_nonzero(torch.isfinite(t).logical_not_()) for t in tensors]


def count_nonfinite(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """The number of inf/NaN elements of all ``tensors``: a 0-d int64 tensor on the device of the
    first tensor (``device``, else the CPU, when there are none). Nothing is read on the host."""
    counts = nonfinite_counts(tensors)
    if not counts:
        return torch.zeros((), dtype=torch.int64, device=device)
    dev = counts[0].device
    if len(counts) == 1:
        return counts[0]
    return torch.stack([c.to(dev) for c in counts]).sum()


def zero_unless_(tensors: Sequence[Tensor], ok: Tensor) -> None:
    """Sets every element of every tensor to 0 where the 0-d ``ok`` is false (0), in place and on
    the device (``masked_fill_``: inf and NaN become 0 too, which a multiplication would not do)."""
    bad = ok == 0
    for t in tensors:
        t.masked_fill_(bad if bad.device == t.device else bad.to(t.device), 0)


def scaled_rate(rate: Scalar | list[Tensor], factor: float) -> Scalar | list[Tensor]:
    """``rate · factor`` for a rate that is a number, a 0-d tensor or one 0-d tensor per tensor."""
    if factor == 1:
        return rate
    if isinstance(rate, list):
        return [r * factor for r in rate]
    return rate * factor


def ema_(avg: list[Tensor], x: list[Tensor], beta: Scalar, gate: Tensor | None, scale: float = 1.0) -> None:
    """``m ← β·m + (1 − β)·s·x`` in place (``lerp`` for ``s = 1``), frozen under a closed gate.
    ``scale`` (``s``): a factor ``x`` still carries (:attr:`~steadygrad.core.transform.StepContext.scale`)."""
    decay, rate = gate_ema_per_tensor(beta, gate, avg)
    if scale == 1:
        torch._foreach_lerp_(avg, x, rate)
        return
    mul_scalar_(avg, decay)
    rate = scaled_rate(rate, scale)
    if isinstance(rate, Tensor):
        rate = [rate] * len(avg)
    if isinstance(rate, list):
        torch._foreach_addcmul_(avg, x, rate)
    else:
        torch._foreach_add_(avg, x, alpha=rate)


def ema_square_(avg: list[Tensor], x: list[Tensor], beta: Scalar, gate: Tensor | None, scale: float = 1.0) -> None:
    """``v ← β·v + (1 − β)·(s·x)²`` in place (``x`` widened to ``v``'s dtype), frozen under a
    closed gate: the second moment of RMSprop, Adam and OpenAI Five's clipping. ``scale``: as
    for :func:`ema_`."""
    if dtypes(x) != dtypes(avg) or len(dtypes(avg)) > 1:
        x = [u if u.dtype == v.dtype else u.to(v.dtype) for u, v in zip(x, avg)]
    decay, rate = gate_ema_per_tensor(beta, gate, avg)
    mul_scalar_(avg, decay)
    addcmul_(avg, x, x, scaled_rate(rate, scale * scale))
