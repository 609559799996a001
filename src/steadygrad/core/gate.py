"""The commit gate and non-finite values: the one set of helpers every front-end uses.

A step that must leave no trace (non-finite gradients, a GradScaler skip) is decided on the
device: the caller computes a 0-d gate (non-zero: commit, 0: skip) and hands it to the
transforms in :class:`~steadygrad.core.transform.StepContext`. Each stateful transform then
*selects* between its new and its old state (``torch.where``: :func:`select_`,
:func:`commit_select`), so that a closed gate leaves the state bit-for-bit unchanged whatever the
new values are: inf and NaN from a bad gradient, or 0/0 from a zeroed one in float16, where
``eps`` rounds to 0. A gate never multiplies (``NaN · 0`` is NaN). The new values are computed
with the very operations of an ungated step, so an open gate gives an ungated step's bits. Nothing
here reads a tensor on the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .tensorlist import Scalar, add_scalar_, addcmul_, copy_, dtypes, group_by_device_dtype, mul_scalar_, on_device

__all__ = [
    "advance_",
    "all_finite",
    "amp_skips",
    "amp_unscale_",
    "clones",
    "combine_gates",
    "commit_select",
    "count_nonfinite",
    "ema_",
    "ema_square_",
    "gate_increment",
    "nonfinite_counts",
    "select_",
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


def _open_masks(gate: Tensor, tensors: Sequence[Tensor]) -> dict[torch.device, Tensor]:
    return {d: on_device(gate, d) != 0 for d in {t.device for t in tensors}}


def clones(tensors: Sequence[Tensor]) -> list[Tensor]:
    """New copies of ``tensors``: where a gated update computes its new values, with the very
    in-place operations of the ungated one (an out-of-place foreach operation can round
    float16/bfloat16 differently on the CPU)."""
    return [t.clone() for t in tensors]


def select_(old: Sequence[Tensor], new: Sequence[Tensor], gate: Tensor | None) -> None:
    """``old ← new`` in place where the gate is open, ``old`` unchanged where it is closed
    (``torch.where``: inf/NaN in ``new`` do not reach ``old``). Without a gate a plain copy."""
    if gate is None:
        copy_(old, new)
        return
    masks = _open_masks(gate, old)
    # out= is not traced by torch.compile nor recorded by autograd (differentiable=True)
    traced = torch.compiler.is_compiling() or torch.is_grad_enabled()
    for o, n in zip(old, new):
        if traced:
            o.copy_(torch.where(masks[o.device], n, o))
        else:
            torch.where(masks[o.device], n, o, out=o)


def gate_increment(gate: Tensor | None, counter: Tensor) -> Scalar:
    """What a step counter advances by under the commit gate: 1, or 1/0 as a tensor on the
    counter's device (reading a device gate into a CPU counter is a device-to-host copy)."""
    if gate is None:
        return 1
    if gate.device.type == "meta" and counter.device.type != "meta":
        # A step of meta parameters computes shapes only: its gate has no value, and the step
        # counts, as torch counts its meta steps.
        return torch.ones((), dtype=counter.dtype, device=counter.device)
    return (on_device(gate, counter.device) != 0).to(counter.dtype)


def advance_(counters: Sequence[Tensor], gate: Tensor | None) -> None:
    """Step counters ``t ← t + 1`` in place, or ``t + 1`` / ``t + 0`` under an open / closed
    commit gate (exact: counters are whole numbers)."""
    if gate is None:
        add_scalar_(list(counters), 1.0)
        return
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for c in counters:
        by_kind.setdefault((c.device, c.dtype), []).append(c)
    for group in by_kind.values():
        torch._foreach_add_(group, gate_increment(gate, group[0]), alpha=1)


def amp_unscale_(grads: Sequence[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
    """torch's fused-AMP protocol (``GradScaler.step`` sets ``optimizer.grad_scale`` and
    ``optimizer.found_inf`` on an optimizer with ``_step_supports_amp_scaling``), as torch's fused
    kernels consume it: the gradients are divided by ``grad_scale`` in place, unless
    ``found_inf`` is non-zero, when they stay as they are and the step must change nothing.

    Returns:
        The commit gate (``found_inf == 0``, a 0-d bool tensor), or ``None`` without ``found_inf``.
        The division is by 1 (exact) where the gate is closed; nothing is read on the host.
    """
    gate = None if found_inf is None else found_inf == 0
    if grad_scale is not None and grads:
        divisor = grad_scale if gate is None else torch.where(gate, grad_scale, torch.ones_like(grad_scale))
        for (device, _), indices in group_by_device_dtype(list(grads)).items():
            torch._foreach_div_([grads[i] for i in indices], on_device(divisor, device))
    return gate


def amp_skips(amp: tuple[Tensor | None, Tensor | None] | None) -> bool:
    """Whether GradScaler's verdict (``amp = (grad_scale, found_inf)``, see :func:`amp_unscale_`)
    is to skip this step, read on the host (a device sync off the CPU): for the paths that read
    anyway (``nonfinite="raise"``'s check, the sparse rule)."""
    return amp is not None and amp[1] is not None and bool(amp[1] != 0)


# From this many elements a tensor's extremes come from ``torch.aminmax`` (one vectorised pass:
# ~20x faster on the CPU than the infinity norm's reduction for 10M float32 elements); smaller
# tensors share one foreach infinity norm per device and dtype (one call for all of them).
_AMINMAX_FROM = 1 << 14


def all_finite(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """A 0-d bool tensor: whether every element of every tensor is finite, from each tensor's
    extremes (NaN and inf propagate into a minimum, a maximum or a max-abs; finite values give
    finite ones): ``torch.aminmax`` for large real tensors, one foreach infinity norm per device
    and dtype for the rest. Never a count or an ``isfinite`` per element. On the first tensor's
    device (``device``, else the CPU, when there are none); nothing is read on the host."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    extremes: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    small = []
    for t in tensors:
        if t.numel() >= _AMINMAX_FROM and not t.is_complex():
            extremes.setdefault((t.device, t.dtype), []).extend(torch.aminmax(t))
        else:
            small.append(t)
    for (dev, _), indices in group_by_device_dtype(small).items():
        norms = torch._foreach_norm([small[i] for i in indices], math.inf)
        extremes.setdefault((dev, norms[0].dtype), []).extend(norms)
    first = tensors[0].device
    verdicts = [
        (values[0] if len(values) == 1 else torch.stack(values)).isfinite().all().to(first)
        for values in extremes.values()
    ]
    return verdicts[0] if len(verdicts) == 1 else torch.stack(verdicts).all()


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


def ema_(avg: list[Tensor], x: list[Tensor], beta: Scalar, gate: Tensor | None, scale: float = 1.0) -> None:
    """``m ← β·m + (1 − β)·s·x`` in place (``lerp`` for ``s = 1``), unchanged under a closed
    gate. ``scale`` (``s``): a factor ``x`` still carries (:attr:`~steadygrad.core.transform.StepContext.scale`)."""
    if gate is not None:
        new = clones(avg)
        ema_(new, x, beta, None, scale)
        select_(avg, new, gate)
    elif scale == 1:
        torch._foreach_lerp_(avg, x, 1 - beta)
    else:
        mul_scalar_(avg, beta)
        _add_scaled_(avg, x, (1 - beta) * scale)


def _add_scaled_(out: list[Tensor], x: list[Tensor], rate: Scalar) -> None:
    """``out ← out + rate·x`` in place (``rate`` a number or a 0-d tensor)."""
    if isinstance(rate, Tensor):
        torch._foreach_addcmul_(out, x, [rate] * len(out))
    else:
        torch._foreach_add_(out, x, alpha=rate)


def ema_square_(avg: list[Tensor], x: list[Tensor], beta: Scalar, gate: Tensor | None, scale: float = 1.0) -> None:
    """``v ← β·v + (1 − β)·(s·x)²`` in place (``x`` widened to ``v``'s dtype), unchanged under a
    closed gate: the second moment of RMSprop, Adam and OpenAI Five's clipping. ``scale``: as for
    :func:`ema_`."""
    if dtypes(x) != dtypes(avg) or len(dtypes(avg)) > 1:
        x = [u if u.dtype == v.dtype else u.to(v.dtype) for u, v in zip(x, avg)]
    if gate is not None:
        new = clones(avg)
        ema_square_(new, x, beta, None, scale)
        select_(avg, new, gate)
        return
    mul_scalar_(avg, beta)
    addcmul_(avg, x, x, (1 - beta) * (scale * scale))
