"""What every clipping rule shares: the ``fraction_clipped`` statistic and its state, exact counts,
and clipping by a global norm to a limit that is a tensor (ZClip, AutoClip).

Conventions shared by every clipping transform (one module per rule in this package)
-------------------------------------------------------------------------------------
In place
    ``update`` clips ``updates`` in place and returns them (the in-place rule of
    :mod:`steadygrad.core.transform`); ``params`` are read, never written.

``fraction_clipped`` — the statistic every clipper reports
    Every clipping transform's state is a named tuple with a field ``fraction_clipped``: a 0-d
    float32 tensor, shared by all the parameters (not a list), on the device of the first update.
    It holds the statistic of the last *committed* step (0 before the first one): the fraction of
    this transform's clipping decisions that clipped, where the decision is

    ==========================================  ===============================================
    transform                                   one decision per
    ==========================================  ===============================================
    :func:`clip_by_value`                       element (``|g| > limit``)
    :func:`clip_by_moment`                      element (``|g| > k·sqrt(v̂)``)
    :func:`clip_by_norm`, ``scope="global"``    step: 0 or 1 (the coefficient is below 1)
    :func:`clip_by_norm`, ``scope="tensor"``    tensor (its coefficient is below 1)
    :func:`clip_by_unit_ratio`                  unit (row of a weight; a bias is one unit)
    :func:`clip_update_rms`                     tensor (``RMS(U) > d``)
    ``zclip``, ``autoclip``                     step: 0 or 1
    ==========================================  ===============================================

    The counts are taken over the tensors handed to this step (a parameter without a gradient
    does not count), in the real view of complex tensors. Counts are exact integers (int64); the
    fraction is computed in float64 and stored as float32.

Per-parameter state
    Lists aligned with the updates. Field names never reuse torch.optim's state keys (``step``,
    ``exp_avg``, ``exp_avg_sq``, ``square_avg``, ``sum``, ``momentum_buffer``, ...): a clipper
    chained before an optimizer's transform comes first in the chain, so it would take the plain
    key and push the optimizer's to ``"1.step"`` (see :mod:`steadygrad.core.state`), breaking
    checkpoint compatibility with torch.optim. :func:`clip_by_moment` therefore uses optax's
    names, ``count`` and ``nu``.

The commit gate (skipping a step without a host sync)
    ``update`` reads ``ctx.gate`` once. Per-parameter state is updated with the gate folded in
    (:mod:`steadygrad.core.gate`); shared statistics are replaced by ``commit_select(gate, new,
    old)``. With a closed gate (0) and finite updates the whole state stays bit-for-bit unchanged.
    The updates themselves are still clipped; discarding them is the caller's business.

No host reads
    Nothing in an ``update`` reads a tensor's value on the host or branches on it in Python.
    Statistics stay tensors, and every ``update`` runs under ``torch.compile(fullgraph=True)``.

Hyperparameters
    Python numbers or 0-d tensors, validated when the transform is built
    (:mod:`steadygrad.core.validate`: ``ValueError`` naming the option and the value).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ...core.norms import norm_dtype, shard_sum

__all__ = ["ClipState", "admits", "element_fraction", "fraction_of", "new_fraction", "stat_device", "stat_dtype"]


class ClipState(NamedTuple):
    """State of the clippers without other state (value, norm, unit ratio, update RMS): the
    statistic of the last committed step."""

    fraction_clipped: Tensor


def new_fraction(params: Sequence[Tensor] = ()) -> Tensor:
    """A fresh ``fraction_clipped``: 0-d float32 zero on the device of the first parameter."""
    device = params[0].device if len(params) else None
    return torch.zeros((), dtype=torch.float32, device=device)


def fraction_of(counts: Sequence[Tensor], total: int, device: torch.device | None = None) -> Tensor:
    """``sum(counts) / total`` as a 0-d float32 tensor (0 when ``total`` is 0).

    ``counts`` are 0-d integer (or boolean) tensors, possibly on several devices; they are summed
    exactly in int64 on the device of the first one (or ``device`` when there are none).
    """
    if not counts or total == 0:
        dev = counts[0].device if counts else device
        return torch.zeros((), dtype=torch.float32, device=dev)
    dev = counts[0].device
    summed = torch.stack([c.to(device=dev, dtype=torch.int64) for c in counts]).sum()
    return (summed.to(torch.float64) / total).to(torch.float32)


def element_fraction(counts: Sequence[Tensor], sizes: Sequence[int | Tensor], shards: Any = None) -> Tensor:
    """The fraction ``Σ counts / Σ sizes`` of per-element (or per-unit) counts of tensors whose
    elements are ``sizes`` (numbers, or 0-d tensors: :attr:`~steadygrad.core.transform.StepContext.sizes`);
    with ``shards`` (local shards of DTensors,
    :attr:`~steadygrad.core.transform.StepContext.shards`) over the whole tensors, summed over the
    ranks that hold their shards, so that every rank reports the same statistic."""
    if shards is None and not any(isinstance(s, Tensor) for s in sizes):
        return fraction_of(counts, sum(sizes))
    total = shard_sum(list(sizes), shards)
    summed = shard_sum(list(counts), shards)
    return torch.where(total > 0, summed / torch.clamp(total, min=1), 0.0).to(torch.float32)


def stat_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The dtype of norm statistics for ``params`` (float32, or float64 if any is float64 or
    complex128)."""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, norm_dtype(p.dtype))
    return dtype


def stat_device(params: Sequence[Tensor]) -> torch.device:
    return params[0].device if len(params) else torch.device("cpu")


def admits(norm: Tensor, gate: Tensor | None) -> Tensor:
    """Whether this step's norm enters the statistics: finite, and the gate (if any) open."""
    finite = torch.isfinite(norm)
    if gate is None:
        return finite
    return finite & (gate.to(norm.device) != 0)
