"""Clipping by running second moment: OpenAI Five's per-element ``±k·sqrt(v)`` rule.

:func:`moment_clip_` is the rule, written once: :func:`clip_by_moment` runs it with a second
moment of its own, and ``moment_clip=`` of :class:`steadygrad.optim.Adam` / ``RMSprop`` runs it
with the optimizer's ``exp_avg_sq`` / ``square_avg`` (no extra memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ...core.gate import advance_, commit_select, ema_square_
from ...core.norms import wide_dtype
from ...core.tensorlist import Scalar, bias_correction, host_steps, per_element, scalar_dtype
from ...core.transform import PLAIN, Transform
from ...core.validate import check_range
from .common import element_fraction, new_fraction

__all__ = [
    "ClipByMoment",
    "ClipByMomentState",
    "clip_by_moment",
    "moment_clip_",
    "moment_clip_update",
    "moment_threshold",
]


def moment_threshold(
    nu: list[Tensor], count: list[Tensor], *, k: Scalar, beta: Scalar, segments: Any = None
) -> list[Tensor]:
    """The OpenAI Five limit per element, from the state *before* this step (a new list).

    .. math::
        \\tau = k\\sqrt{\\frac{v}{1 - \\beta^{c}}}\\;(c > 0), \\qquad \\tau = +\\infty\\;(c = 0)

    with ``c`` the steps counted so far (per tensor). Branch-free on the device: the first step's
    limit is ``sqrt(v + inf)``; with counters on the CPU (read as torch.optim reads its ``step``)
    the per-tensor factors are Python numbers. With ``segments`` the counters are per-parameter
    tables (:attr:`~steadygrad.core.transform.StepContext.segments`).
    """
    counts = host_steps(count) if not isinstance(beta, Tensor) and not isinstance(k, Tensor) else None
    if counts is not None:
        scales = [k / math.sqrt(1 - beta**c) if c > 0 else 1.0 for c in counts]
        floors = [0.0 if c > 0 else math.inf for c in counts]
    else:
        first = [c == 0 for c in count]
        corrections = bias_correction(beta, count)
        scales = [torch.where(f, 1.0, bc).rsqrt() * k for f, bc in zip(first, corrections)]
        floors = [torch.where(f, math.inf, 0.0) for f in first]
        scales, floors = per_element(scales, segments), per_element(floors, segments)
    threshold = torch._foreach_add(nu, floors)
    torch._foreach_sqrt_(threshold)
    torch._foreach_mul_(threshold, scales)
    return threshold


def clamp_to_threshold_(
    updates: list[Tensor], threshold: list[Tensor], shards: Any = None, sizes: Any = None
) -> Tensor:
    """``u ← clamp(u, −τ, τ)`` in place (``threshold`` is consumed); returns the fraction of
    elements with ``|u| > τ`` as a 0-d float32 tensor (of whole tensors with ``shards``, of
    ``sizes`` elements per tensor if given: :attr:`~steadygrad.core.transform.StepContext.sizes`)."""
    counts = [torch.count_nonzero(u.abs() > thr) for u, thr in zip(updates, threshold)]
    sizes = [u.numel() for u in updates] if sizes is None else sizes
    torch._foreach_clamp_max_(updates, threshold)
    torch._foreach_neg_(threshold)
    torch._foreach_clamp_min_(updates, threshold)
    return element_fraction(counts, sizes, shards)


def moment_clip_(
    updates: list[Tensor],
    nu: list[Tensor],
    count: list[Tensor],
    *,
    k: Scalar,
    beta: Scalar,
    gate: Tensor | None = None,
    shards: Any = None,
    sizes: Any = None,
    segments: Any = None,
) -> Tensor:
    """OpenAI Five's clipping, in place on ``updates`` and ``nu``; ``count`` is read, not advanced.

    With ``c`` = ``count`` the committed steps before this one, per element:

    .. math::
        \\hat v = \\frac{v}{1 - \\beta^{c}},\\quad
        u \\leftarrow \\operatorname{clamp}\\big(g, -k\\sqrt{\\hat v}, k\\sqrt{\\hat v}\\big)
        \\;(c > 0;\\ u = g \\text{ at } c = 0),\\quad
        v \\leftarrow \\beta v + (1-\\beta)\\, g^2

    where ``g`` is the *unclipped* update: the limit comes from the steps before this one, and
    ``v`` learns from the raw gradient (:func:`~steadygrad.core.gate.ema_square_`, frozen under a
    closed gate). The caller advances ``count``.

    Returns:
        the fraction of elements with ``|g| > k·sqrt(v̂)`` (of whole tensors with ``shards``, the
        local shards' layout of :attr:`~steadygrad.core.transform.StepContext.shards`).
    """
    if not (len(updates) == len(nu) == len(count)):
        raise ValueError(f"moment_clip_: {len(updates)} updates, {len(nu)} nu and {len(count)} count tensors")
    threshold = moment_threshold(nu, count, k=k, beta=beta, segments=segments)
    ema_square_(nu, updates, beta, gate)
    return clamp_to_threshold_(updates, threshold, shards, sizes)


def moment_clip_update(
    updates: list[Tensor],
    nu: list[Tensor],
    count: list[Tensor],
    *,
    k: Scalar,
    beta: Scalar,
    gate: Tensor | None = None,
    shards: Any = None,
    sizes: Any = None,
    segments: Any = None,
) -> tuple[list[Tensor], Tensor]:
    """:func:`clip_by_moment`'s step: :func:`moment_clip_` with its own counters, which advance
    (by the gate). Returns ``(updates, fraction)``."""
    fraction = moment_clip_(
        updates, nu, count, k=k, beta=beta, gate=gate, shards=shards, sizes=sizes, segments=segments
    )
    advance_(count, gate)
    return updates, fraction


class ClipByMomentState(NamedTuple):
    """State of :func:`clip_by_moment`.

    Attributes:
        count: per parameter, the number of committed steps so far (0-d, on the parameter's
            device, :func:`~steadygrad.core.tensorlist.scalar_dtype`).
        nu: per parameter, the EMA of the squared *unclipped* gradient (float32 or wider).
        fraction_clipped: shared, the fraction of elements clipped at the last committed step.
    """

    count: list[Tensor]
    nu: list[Tensor]
    fraction_clipped: Tensor


@dataclass(frozen=True)
class ClipByMoment(Transform):
    """OpenAI Five's clipping with a second moment of its own; see :func:`clip_by_moment`."""

    k: Any = 5.0
    beta: Any = 0.999
    structure: ClassVar[str] = "elements"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_range("k", self.k, low_open=True, finite=False))
        object.__setattr__(self, "beta", check_range("beta", self.beta, 0.0, 1.0))

    def init(self, params: Sequence[Tensor]) -> ClipByMomentState:
        return ClipByMomentState(
            count=[torch.zeros((), dtype=scalar_dtype(), device=p.device) for p in params],
            nu=[torch.zeros_like(p, dtype=wide_dtype(p.dtype), memory_format=torch.preserve_format) for p in params],
            fraction_clipped=new_fraction(params),
        )

    def update(self, updates, state, params=None, ctx=PLAIN):
        gate = ctx.gate
        k, beta = ctx.value(self.k), ctx.value(self.beta)
        updates, fraction = moment_clip_update(
            updates,
            state.nu,
            state.count,
            k=k,
            beta=beta,
            gate=gate,
            shards=ctx.shards,
            sizes=ctx.sizes,
            segments=ctx.segments,
        )
        return updates, state._replace(fraction_clipped=commit_select(gate, fraction, state.fraction_clipped))


def clip_by_moment(k: float | Tensor = 5.0, beta: float | Tensor = 0.999) -> ClipByMoment:
    """Per-element clipping to ``±k`` running standard deviations: OpenAI Five's rule.

    Berner et al., *Dota 2 with Large Scale Deep Reinforcement Learning* (2019), §3.2 / appendix:
    "Gradients are additionally clipped per parameter to be within between ±5√v where v is the
    running estimate of the second moment of the (unclipped) gradient." Written out, per element,
    with ``t`` this step of the parameter:

    .. math::
        \\hat v_{t-1} = \\frac{v_{t-1}}{1-\\beta^{t-1}},\\qquad
        u_t = \\operatorname{clamp}\\big(g_t, -k\\sqrt{\\hat v_{t-1}}, +k\\sqrt{\\hat v_{t-1}}\\big)
        \\;(t > 1),\\quad u_1 = g_1,\\qquad
        v_t = \\beta v_{t-1} + (1-\\beta)\\, g_t^2

    * The limit uses only the steps *before* this one, so a spike cannot raise its own limit;
    * ``v`` is updated with the *unclipped* gradient, so a clipped element still teaches ``v``
      (a threshold cannot freeze at 0) and a second spike right after the first meets a limit
      that has seen the first one;
    * the first step of each parameter passes unclipped (there is no estimate yet);
    * counters are per parameter: a parameter without a gradient on a step is not stepped.

    Warm-up: with ``β = 0.999`` the bias-corrected ``v̂`` is the plain mean of ``g²`` over the
    first steps, so the limit is usable from step 2 on; a Gaussian element is clipped with
    probability about ``P(|z| > k)`` (``5.7e-7`` for ``k = 5``) once ``v̂`` has settled, more
    while it rests on few samples. An element whose gradient has been exactly 0 on every earlier
    step has ``v̂ = 0``: its first non-zero gradient is clipped to 0 (it does reach ``v``, so the
    next one is not). Rarely active features (embedding rows) see this once per row.

    ``fraction_clipped``: the fraction of elements clipped at the last committed step.

    Args:
        k: the limit in running standard deviations (``> 0``; 5 in the paper).
        beta: the EMA decay of ``v`` (in ``[0, 1)``; the default is Adam's usual ``β2``).

    Raises:
        ValueError: ``k <= 0`` or NaN, or ``beta`` outside ``[0, 1)``.

    Differences: OpenAI did not publish code; other readings (one scalar for the whole model, an
    EMA of ``sqrt(mean g²)``, updating ``v`` before clipping, updating it with the clipped
    gradient) are discussed in ``docs/choosing-a-clipper.md``. torch, optax and timm have no
    equivalent. Under Adam, ``v`` here is the same quantity as Adam's ``exp_avg_sq`` with
    ``β = β2`` when the gradient is the same; ``Adam(moment_clip=k)`` runs this very rule on it.
    """
    return ClipByMoment(k, beta)
