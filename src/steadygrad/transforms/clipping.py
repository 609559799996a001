"""Gradient clipping transforms: by value, by norm, by running second moment (OpenAI Five), by
unit-wise ratio to the weights (AGC) and by update RMS (Adafactor).

Each algorithm is one ``*_update`` function on lists of tensors with explicit state, and one
:class:`~steadygrad.core.transform.Transform` factory around it (the house style of
:mod:`steadygrad.transforms.adaptive`). Norms come from :mod:`steadygrad.core.norms`.

Conventions shared by every clipping transform
-----------------------------------------------
The adaptive clippers of :mod:`steadygrad.transforms.adaptive_clipping` (``zclip``, ``autoclip``)
follow the same rules, and :class:`steadygrad.Clipper` relies on them.

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
    Lists aligned with the updates, as in :mod:`steadygrad.transforms.adaptive`. Field names never
    reuse torch.optim's state keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``square_avg``,
    ``sum``, ``momentum_buffer``, ...): a clipper chained before an optimizer's transform comes
    first in the chain, so it would take the plain key and push the optimizer's to ``"1.step"``
    (see :mod:`steadygrad.core.state`), breaking checkpoint compatibility with torch.optim.
    :func:`clip_by_moment` therefore uses optax's names, ``count`` (steps seen, per parameter)
    and ``nu`` (the second moment). Step counters live on the parameter's device (like torch's
    ``capturable``) in :func:`~steadygrad.core.tensorlist.scalar_dtype`, so that the commit gate
    can advance them without a host sync; second moments are kept in float32 or wider
    (:func:`~steadygrad.core.norms.wide_dtype`).

The commit gate (skipping a step without a host sync)
    ``update`` reads :func:`~steadygrad.core.transform.commit_gate` once. Per-parameter state is
    updated with the gate folded in (an EMA decay ``where(open, β, 1)`` and rate
    ``where(open, 1 − β, 0)``, a counter advanced by the gate); shared statistics are replaced by
    :func:`commit_select` ``(gate, new, old)``. With a closed gate (0) and finite updates (the
    caller zeroes bad gradients first, as :class:`steadygrad.Clipper` does) the whole state stays
    bit-for-bit unchanged. The updates themselves are still clipped; discarding them is the
    caller's business.

No host reads
    Nothing in an ``update`` reads a tensor's value on the host or branches on it in Python: the
    first step of :func:`clip_by_moment` passes through an infinite threshold, not an ``if``.
    Statistics stay tensors. The ``*_update`` functions run under
    ``torch.compile(fullgraph=True)``.

Hyperparameters
    Python numbers or 0-d tensors, validated when the transform is built (``ValueError`` naming
    the argument; a tensor is read once there). The ``*_update`` functions do not validate.

``*_update`` functions
    ``*_update(updates, ..., *, hyperparameters) -> (updates, fraction)``: ``fraction`` is the
    ungated statistic of this step; the factory folds it into the state with
    :func:`commit_select`. Value, global-norm and moment clipping run unchanged on a single flat
    tensor (a list of one); ``scope="tensor"``, unit-ratio and update-RMS clipping need the
    tensor structure (per tensor or per unit decisions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.norms import (
    check_norm_type,
    check_threshold,
    clip_coefficient,
    scale_,
    tensor_norms,
    total_norm,
    wide_dtype,
)
from ..core.tensorlist import Scalar, addcmul_, advance_, bias_correction, gate_ema_per_tensor, on_device, scalar_dtype
from ..core.transform import Transform, commit_gate

__all__ = [
    "AGC_DIV_EPS",
    "SCOPES",
    "ClipByMomentState",
    "ClipState",
    "clip_by_moment",
    "clip_by_norm",
    "clip_by_unit_ratio",
    "clip_by_value",
    "clamp_to_threshold_",
    "clip_update_rms",
    "commit_select",
    "fraction_of",
    "moment_clip_update",
    "moment_threshold",
    "new_fraction",
    "norm_clip_update",
    "rms_clip_update",
    "unit_ratio_clip_update",
    "value_clip_update",
]

#: The floor of a unit's gradient norm in AGC's division (Brock et al.; timm and optax use it too).
AGC_DIV_EPS = 1e-6

SCOPES = ("global", "tensor")


# --------------------------------------------------------------------------------------------
# Shared helpers (used by adaptive_clipping too)
# --------------------------------------------------------------------------------------------


class ClipState(NamedTuple):
    """State of the clippers without per-parameter state (value, norm, unit ratio, update RMS):
    the statistic of the last committed step (see the module docstring)."""

    fraction_clipped: Tensor


def new_fraction(params: Sequence[Tensor] = ()) -> Tensor:
    """A fresh ``fraction_clipped``: 0-d float32 zero on the device of the first parameter."""
    device = params[0].device if len(params) else None
    return torch.zeros((), dtype=torch.float32, device=device)


def commit_select(gate: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` if the step commits, else ``old`` (a shared statistic under the commit gate).

    Without a gate (``None``) returns ``new``. Branch-free (``torch.where``), on ``new``'s device
    and dtype; ``old`` may live elsewhere (a fresh state is created on the CPU).
    """
    if gate is None:
        return new
    open_ = on_device(gate, new.device) != 0
    return torch.where(open_, new, on_device(old, new.device).to(new.dtype))


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


def _check_beta(beta: Any, name: str = "beta") -> float:
    number: float | None = None
    if isinstance(beta, Tensor) and beta.numel() == 1 and beta.dtype.is_floating_point:
        number = float(beta)
    elif isinstance(beta, (int, float)) and not isinstance(beta, bool):
        number = float(beta)
    if number is None or not (0.0 <= number < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {beta!r}")
    return number


def _as_0d(value: Scalar) -> Scalar:
    """Tensor hyperparameters as 0-d tensors (a 1-element tensor of any shape is accepted)."""
    return value.reshape(()) if isinstance(value, Tensor) else value


# --------------------------------------------------------------------------------------------
# By value
# --------------------------------------------------------------------------------------------


def value_clip_update(updates: list[Tensor], *, limit: Scalar) -> tuple[list[Tensor], Tensor]:
    """Element-wise clipping to ``[-limit, limit]``, in place on ``updates``.

    .. math::
        u \\leftarrow \\min(\\max(u, -c), c)

    Returns:
        ``(updates, fraction)``: the fraction of elements with ``|u| > limit``.
    """
    counts = [torch.count_nonzero(u.abs() > limit) for u in updates]
    total = sum(u.numel() for u in updates)
    if isinstance(limit, Tensor):
        torch._foreach_clamp_max_(updates, [limit] * len(updates))
        torch._foreach_clamp_min_(updates, [-limit] * len(updates))
    else:
        torch._foreach_clamp_max_(updates, limit)
        torch._foreach_clamp_min_(updates, -limit)
    return updates, fraction_of(counts, total)


def clip_by_value(limit: Scalar) -> Transform:
    """Clips every element to ``[-limit, limit]``.

    .. math::
        u_i \\leftarrow \\operatorname{clamp}(u_i, -c, c)

    ``fraction_clipped``: the fraction of elements with ``|u| > limit``. NaN passes through
    (as in torch). Works on a single flat tensor too.

    Args:
        limit: ``c > 0`` (a number or a 0-d tensor; ``inf`` clips nothing).

    Raises:
        ValueError: ``limit`` is ``<= 0``, NaN or not a number.

    Differences: equals ``torch.nn.utils.clip_grad_value_(params, limit)`` and optax's
    ``clip(limit)``. Both accept a negative limit (torch then sets every element to ``limit``);
    here a non-positive limit raises.
    """
    check_threshold(limit, "limit")
    limit = _as_0d(limit)

    def init(params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update(updates, state, params=None):
        gate = commit_gate()
        updates, fraction = value_clip_update(updates, limit=limit)
        return updates, ClipState(commit_select(gate, fraction, state.fraction_clipped))

    return Transform(init, update, "elements")


# --------------------------------------------------------------------------------------------
# By norm
# --------------------------------------------------------------------------------------------


def norm_clip_update(
    updates: list[Tensor],
    *,
    max_norm: Scalar,
    norm_type: float = 2.0,
    scope: str = "global",
    norm: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Clipping by p-norm, in place on ``updates``: torch's ``clip_grad_norm_`` rule.

    .. math::
        n = \\|u\\|_p,\\qquad c = \\min\\Big(1, \\frac{\\text{max\\_norm}}{n + 10^{-6}}\\Big),
        \\qquad u \\leftarrow c\\,u

    with ``n`` the norm of all updates together (``scope="global"``) or of each tensor alone
    (``scope="tensor"``). Norms and coefficients are computed in float32 or wider
    (:mod:`steadygrad.core.norms`); float16/bfloat16 updates are scaled in float32.

    Args:
        norm: ``scope="global"`` only: the global norm if the caller already has it (adaptive
            clippers compute it for their statistics), else it is computed here.

    Returns:
        ``(updates, fraction)``: the fraction of norms (1 for global) whose coefficient is
        below 1.
    """
    if scope == "global":
        n = total_norm(updates, norm_type) if norm is None else norm
        coef = clip_coefficient(n, max_norm)
        scale_(updates, coef)
        return updates, (coef < 1).to(torch.float32)
    if scope != "tensor":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    coefs = [clip_coefficient(n, max_norm) for n in tensor_norms(updates, norm_type)]
    for u, c in zip(updates, coefs):
        scale_([u], c)
    return updates, fraction_of([c < 1 for c in coefs], len(coefs))


def clip_by_norm(max_norm: Scalar, norm_type: float = 2.0, scope: str = "global") -> Transform:
    """Rescales the updates whose p-norm exceeds ``max_norm`` (Pascanu et al., 2013).

    .. math::
        n = \\|u\\|_p,\\qquad u \\leftarrow u \\cdot \\min\\Big(1,
        \\frac{\\text{max\\_norm}}{n + 10^{-6}}\\Big)

    ``scope="global"``: ``n`` is the norm of all the updates as one vector (one coefficient for
    all of them); ``scope="tensor"``: each tensor is clipped by its own norm (this needs the
    tensor structure: it is not the same on a flat buffer). ``p`` is any number ``> 0`` or
    ``inf`` (max-abs). After clipping, the norm is ``max_norm·n/(n + 1e-6)``, i.e. ``max_norm``
    up to a relative ``1e-6/n``.

    ``fraction_clipped``: global scope 1.0 if the step was clipped (coefficient below 1) else
    0.0; tensor scope the fraction of tensors clipped.

    Args:
        max_norm: the largest norm allowed (``> 0``; a number or a 0-d tensor).
        norm_type: ``p`` (a number ``> 0``, ``inf`` or ``"inf"``).
        scope: ``"global"`` or ``"tensor"``.

    Raises:
        ValueError: ``max_norm <= 0`` or NaN, a bad ``norm_type`` or an unknown ``scope``.

    Differences: ``scope="global"`` equals ``torch.nn.utils.clip_grad_norm_`` (torch's
    ``+1e-6`` and its multiplication by a coefficient of exactly 1 when nothing is clipped),
    except that norms accumulate in float32 or wider. optax's ``clip_by_global_norm`` has no
    ``1e-6`` (it scales by ``max_norm/n``) and is L2 only. torch and timm have no per-tensor
    scope (one calls ``clip_grad_norm_`` per tensor, which ``scope="tensor"`` equals); optax's
    ``clip_by_block_rms`` bounds each tensor's RMS instead (:func:`clip_update_rms`). For a norm
    global across ranks (FSDP shards) use :func:`steadygrad.clip_grad_norm_` with
    ``process_group``.
    """
    check_threshold(max_norm, "max_norm")
    p = check_norm_type(norm_type)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    max_norm = _as_0d(max_norm)

    def init(params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update(updates, state, params=None):
        gate = commit_gate()
        updates, fraction = norm_clip_update(updates, max_norm=max_norm, norm_type=p, scope=scope)
        return updates, ClipState(commit_select(gate, fraction, state.fraction_clipped))

    return Transform(init, update, "elements" if scope == "global" else "tensors")


# --------------------------------------------------------------------------------------------
# By running second moment (OpenAI Five)
# --------------------------------------------------------------------------------------------


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


def moment_clip_update(
    updates: list[Tensor],
    nu: list[Tensor],
    count: list[Tensor],
    *,
    k: Scalar,
    beta: Scalar,
    gate: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """OpenAI Five's clipping, in place on ``updates``, ``nu`` and ``count``.

    With ``t`` this step (``count = t − 1`` committed steps before it), per element:

    .. math::
        \\hat v = \\frac{v}{1 - \\beta^{t-1}},\\quad
        u \\leftarrow \\operatorname{clamp}\\big(g, -k\\sqrt{\\hat v}, k\\sqrt{\\hat v}\\big)
        \\;(t > 1;\\ u = g \\text{ at } t = 1),\\quad
        v \\leftarrow \\beta v + (1-\\beta)\\, g^2,\\quad t \\leftarrow t + 1

    where ``g`` is the *unclipped* update. The first step's threshold is ``+inf`` (computed as
    ``sqrt(v + inf)``), not a Python branch.

    Args:
        gate: the commit gate (``None`` = commit): ``v`` and ``count`` advance only where it is
            open (``decay = where(open, β, 1)``, ``rate = where(open, 1−β, 0)``, ``count += open``),
            so a closed gate with finite updates leaves them bit-for-bit unchanged.

    Returns:
        ``(updates, fraction)``: the fraction of elements with ``|g| > k·sqrt(v̂)``.
    """
    if not (len(updates) == len(nu) == len(count)):
        raise ValueError(f"moment_clip_update: {len(updates)} updates, {len(nu)} nu and {len(count)} count tensors")
    threshold = moment_threshold(nu, count, k=k, beta=beta)

    # v from the raw gradient (before it is clipped below), widened to v's dtype.
    raw = [u if u.dtype == v.dtype else u.to(v.dtype) for u, v in zip(updates, nu)]
    decay, rate = gate_ema_per_tensor(beta, gate, nu)
    torch._foreach_mul_(nu, decay)
    addcmul_(nu, raw, raw, rate)
    advance_(count, gate)

    return updates, clamp_to_threshold_(updates, threshold)


def moment_threshold(nu: list[Tensor], count: list[Tensor], *, k: Scalar, beta: Scalar) -> list[Tensor]:
    """The OpenAI Five limit per element, from the state *before* this step (a new list).

    .. math::
        \\tau = k\\sqrt{\\frac{v}{1 - \\beta^{c}}}\\;(c > 0), \\qquad \\tau = +\\infty\\;(c = 0)

    with ``c`` the steps counted so far (per tensor). Branch-free: the first step's limit is
    ``sqrt(v + inf)``. Used by :func:`moment_clip_update` and by the optimizers' ``moment_clip``
    (:func:`steadygrad.scale_by_adam`, :func:`steadygrad.scale_by_rms`), which pass their own
    second moment and step counters.
    """
    first = [c == 0 for c in count]
    corrections = bias_correction(beta, count)
    scales = [torch.where(f, 1.0, bc).rsqrt() * k for f, bc in zip(first, corrections)]
    floors = [torch.where(f, math.inf, 0.0) for f in first]
    threshold = torch._foreach_add(nu, floors)
    torch._foreach_sqrt_(threshold)
    torch._foreach_mul_(threshold, scales)
    return threshold


def clamp_to_threshold_(updates: list[Tensor], threshold: list[Tensor]) -> Tensor:
    """``u ← clamp(u, −τ, τ)`` in place (``threshold`` is consumed); returns the fraction of
    elements with ``|u| > τ`` as a 0-d float32 tensor."""
    counts = [torch.count_nonzero(u.abs() > thr) for u, thr in zip(updates, threshold)]
    total = sum(u.numel() for u in updates)
    torch._foreach_clamp_max_(updates, threshold)
    torch._foreach_neg_(threshold)
    torch._foreach_clamp_min_(updates, threshold)
    return fraction_of(counts, total)


def clip_by_moment(k: Scalar = 5.0, beta: Scalar = 0.999) -> Transform:
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
    ``β = β2`` when the gradient is the same.
    """
    check_threshold(k, "k")
    _check_beta(beta)
    k = _as_0d(k)
    beta = _as_0d(beta)

    def init(params: Sequence[Tensor]) -> ClipByMomentState:
        return ClipByMomentState(
            count=[torch.zeros((), dtype=scalar_dtype(), device=p.device) for p in params],
            nu=[torch.zeros_like(p, dtype=wide_dtype(p.dtype), memory_format=torch.preserve_format) for p in params],
            fraction_clipped=new_fraction(params),
        )

    def update(updates, state, params=None):
        gate = commit_gate()
        updates, fraction = moment_clip_update(updates, state.nu, state.count, k=k, beta=beta, gate=gate)
        return updates, state._replace(fraction_clipped=commit_select(gate, fraction, state.fraction_clipped))

    return Transform(init, update, "elements")


# --------------------------------------------------------------------------------------------
# Adaptive gradient clipping (AGC, NFNets)
# --------------------------------------------------------------------------------------------


def _unit_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The L2 norm of each unit of each tensor in torch's ``(out, in, ...)`` layout.

    A tensor of 2 or more dimensions has ``shape[0]`` units (its slices along dim 0): the result
    has shape ``(out, 1, ..., 1)``. A 0-D or 1-D tensor is one unit: the result has shape
    ``(1,) * ndim``. One reduction per tensor over dims ``1..`` (not one per unit: a model's
    embedding has tens of thousands of rows, and a graph with a node per row takes minutes to
    compile), accumulated in float32 or wider.
    """
    out = []
    for t in tensors:
        wide = None if wide_dtype(t.dtype) == t.dtype else wide_dtype(t.dtype)
        if t.dim() <= 1:
            out.append(torch.linalg.vector_norm(t, 2, dtype=wide).reshape((1,) * t.dim()))
        else:
            out.append(torch.linalg.vector_norm(t, 2, dim=tuple(range(1, t.dim())), keepdim=True, dtype=wide))
    return out


def unit_ratio_clip_update(
    updates: list[Tensor], params: Sequence[Tensor], *, clip_factor: Scalar, eps: Scalar
) -> tuple[list[Tensor], Tensor]:
    """AGC, in place on ``updates``; units in torch's layout (see :func:`clip_by_unit_ratio`).

    .. math::
        m = \\lambda \\max(\\|W_u\\|, \\epsilon),\\qquad
        G_u \\leftarrow G_u \\cdot \\frac{m}{\\max(\\|G_u\\|, 10^{-6})}
        \\;\\text{ if } \\|G_u\\| > m

    Returns:
        ``(updates, fraction)``: the fraction of units clipped.
    """
    if len(params) != len(updates):
        raise ValueError(f"unit_ratio_clip_update: {len(updates)} updates but {len(params)} params")
    g_norms = _unit_norms(updates)
    w_norms = _unit_norms(params)
    counts = []
    units = 0
    for u, gn, wn in zip(updates, g_norms, w_norms):
        limit = torch.clamp(wn.to(gn.dtype), min=eps) * clip_factor
        clipped = gn > limit
        coef = torch.where(clipped, limit / torch.clamp(gn, min=AGC_DIV_EPS), 1.0)
        # ``coef`` has u's number of dimensions, so u is multiplied in coef's (wide) dtype.
        if torch.compiler.is_compiling() and u.is_contiguous():
            # The same product over the flattened tensor, the coefficient indexed by element:
            # compiled, every loop of the step is then one-dimensional, so the writes of the
            # optimizer's state fuse into the loop that computes it (no temporaries).
            u.view(-1).mul_(coef.expand(u.shape).reshape(-1))
        else:
            u.mul_(coef)
        counts.append(torch.count_nonzero(clipped))
        units += gn.numel()
    return updates, fraction_of(counts, units)


def clip_by_unit_ratio(clip_factor: Scalar = 0.01, eps: Scalar = 1e-3) -> Transform:
    """Adaptive gradient clipping (AGC): Brock, De, Smith and Simonyan, *High-Performance
    Large-Scale Image Recognition Without Normalization* (NFNets), 2021.

    Each unit's gradient is kept below ``λ`` times the unit's weight norm:

    .. math::
        m_u = \\lambda \\cdot \\max(\\|W_u\\|_2, \\epsilon),\\qquad
        G_u \\leftarrow
        \\begin{cases} G_u \\cdot \\dfrac{m_u}{\\max(\\|G_u\\|_2,\\, 10^{-6})} & \\|G_u\\|_2 > m_u \\\\
        G_u & \\text{otherwise} \\end{cases}

    A unit is one output row in torch's layout: for a weight of shape ``(out, in, ...)`` (Linear
    ``(out, in)``, Conv2d ``(out, in/groups, kh, kw)``) the norms reduce over dims ``1..``, one
    per output unit; a 0-D or 1-D tensor (a bias, a gain) is a single unit. ``eps`` keeps
    zero-initialised weights (biases, the last layer of many inits) from freezing.

    Needs ``params`` in ``update``. Needs the tensor structure (not for a flat buffer).

    Excluding parameters: the paper does not clip the final classifier layer. Build the clipper
    over the parameters to clip only, e.g.
    ``sg.Clipper([p for n, p in model.named_parameters() if not n.startswith("fc.")],
    sg.clip_by_unit_ratio(0.01))``; in a :class:`steadygrad.optim.Transformed` optimizer, give
    the final layer its own parameter group with a chain without this transform.

    ``fraction_clipped``: the fraction of units clipped at the last committed step.

    Args:
        clip_factor: ``λ > 0`` (0.01 for the NFNets; the paper finds that larger batches need smaller values).
        eps: ``ε > 0``, the floor of the weight norm (1e-3).

    Raises:
        ValueError: ``clip_factor <= 0``, ``eps <= 0`` or NaN; in ``update``, ``params`` is
            ``None``.

    Differences: equals timm's ``adaptive_clip_grad`` (``norm_type=2``), which also reduces over
    dims ``1..`` and treats ≤1-D tensors as one unit; timm keeps a unit whose norm equals the
    limit as it is, as here. optax's ``adaptive_grad_clip`` assumes JAX's ``(in, out)`` layout
    and reduces over axis 0 by default (on a torch weight that is one unit per *input* column:
    the wrong units); with ``axis=(1, ..., ndim-1)`` it equals this transform.
    """
    check_threshold(clip_factor, "clip_factor")
    check_threshold(eps, "eps")
    clip_factor = _as_0d(clip_factor)
    eps = _as_0d(eps)

    def init(params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "clip_by_unit_ratio needs the parameters (the weight norms): update(updates, state, params)"
            )
        gate = commit_gate()
        updates, fraction = unit_ratio_clip_update(updates, params, clip_factor=clip_factor, eps=eps)
        return updates, ClipState(commit_select(gate, fraction, state.fraction_clipped))

    return Transform(init, update, "units")


# --------------------------------------------------------------------------------------------
# Update clipping (Adafactor)
# --------------------------------------------------------------------------------------------


def rms_clip_update(updates: list[Tensor], *, d: Scalar) -> tuple[list[Tensor], Tensor]:
    """Adafactor's update clipping, per tensor, in place on ``updates``.

    .. math::
        \\operatorname{RMS}(U) = \\frac{\\|U\\|_2}{\\sqrt{\\operatorname{numel}(U)}},\\qquad
        U \\leftarrow \\frac{U}{\\max\\big(1, \\operatorname{RMS}(U)/d\\big)}

    Returns:
        ``(updates, fraction)``: the fraction of tensors with ``RMS(U) > d``.
    """
    norms = tensor_norms(updates, 2.0)
    flags = []
    for u, n in zip(updates, norms):
        rms = n / math.sqrt(max(u.numel(), 1))
        ratio = rms / d
        flags.append(ratio > 1)
        scale_([u], 1 / torch.clamp(ratio, min=1.0))
    return updates, fraction_of(flags, len(flags))


def clip_update_rms(d: Scalar = 1.0) -> Transform:
    """Update clipping of Adafactor: Shazeer and Stern, *Adafactor: Adaptive Learning Rates with
    Sublinear Memory Cost*, 2018.

    Each tensor's update is scaled down so that its root mean square is at most ``d``:

    .. math::
        U \\leftarrow \\frac{U}{\\max\\big(1, \\operatorname{RMS}(U)/d\\big)},\\qquad
        \\operatorname{RMS}(U) = \\sqrt{\\operatorname{mean}(U^2)}

    Adafactor applies it to the *update* (after the preconditioner, before the learning rate):
    put it after the scaling in a chain, ``chain(scale_by_rms(), clip_update_rms(1.0),
    scale_by_lr())``. In a :class:`steadygrad.Clipper` it clips each gradient tensor's RMS. A
    zero-element tensor has RMS 0. Needs the tensor structure (per-tensor decisions).

    ``fraction_clipped``: the fraction of tensors whose RMS exceeded ``d``.

    Args:
        d: the clipping threshold ``d > 0`` (1.0 in the paper).

    Raises:
        ValueError: ``d <= 0`` or NaN.

    Differences: equals optax's ``clip_by_block_rms(d)`` and the update clipping of the
    Adafactor implementations in transformers and timm (``U / max(1, RMS(U)/d)``); the RMS is
    computed in float32 or wider.
    """
    check_threshold(d, "d")
    d = _as_0d(d)

    def init(params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update(updates, state, params=None):
        gate = commit_gate()
        updates, fraction = rms_clip_update(updates, d=d)
        return updates, ClipState(commit_select(gate, fraction, state.fraction_clipped))

    return Transform(init, update, "tensors")
