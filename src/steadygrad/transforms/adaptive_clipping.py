"""Adaptive clipping of the global gradient norm: ZClip and AutoClip.

Both clip the global L2 norm ``n`` of the updates (:func:`steadygrad.core.norms.total_norm`, one
all-reduce with ``process_group``) to a threshold learnt from the norms seen so far, with torch's
coefficient ``min(1, threshold / (n + 1e-6))`` (:func:`~steadygrad.transforms.clipping.norm_clip_update`).
Each is written once as a function with explicit state (:func:`zclip_update`,
:func:`autoclip_update`) and wrapped by a :class:`~steadygrad.core.transform.Transform` factory
(:func:`zclip`, :func:`autoclip`). They follow the conventions of
:mod:`steadygrad.transforms.clipping` (in place, ``fraction_clipped``, commit gate, no host reads,
validation); the one difference is that the ``*_update`` functions take the commit gate and
return the new state (their statistics must be gated inside), not only the fraction.

No host sync
    The whole update is tensor arithmetic: no ``.item()``, no Python branch on a tensor value, so
    it runs under ``torch.compile(fullgraph=True)`` (ZClip and bounded AutoClip; the unbounded
    AutoClip history grows by one slot per call, a new shape each step).

State
    Named tuples of single tensors shared by all parameters (see :mod:`steadygrad.core.transform`);
    an optimizer or a :class:`~steadygrad.Clipper` stores them in its shared slot, so they are in
    its ``state_dict`` and a resumed run equals one that never stopped. Counters are int64, the
    statistics float32 or wider (the promotion of float32 with the parameters' and the norm's
    :func:`~steadygrad.core.norms.norm_dtype`: float64 gradients keep float64 statistics), and
    ``fraction_clipped`` is the 0-d float32 of the clipping conventions: 1 when this step's
    coefficient was below 1, else 0 (one decision per step, as ``clip_by_norm(scope="global")``).
    ``last_norm`` (the pre-clip norm) and ``threshold`` (the limit applied, ``inf`` when none)
    report the step. A state made by ``init([])`` lives on the CPU in float32 and moves to the
    norm's device and dtype at the first update. Field names avoid torch.optim's per-parameter
    keys (``step``, ``exp_avg``, ...), so a clipper in front of an optimizer in a chain leaves the
    optimizer's keys unprefixed.

Non-finite norms
    A NaN or infinite norm never enters the statistics (ZClip's mean, variance and warm-up
    buffer, AutoClip's history): for them the step is skipped. The updates are returned unchanged
    (scaling cannot repair a NaN, and the coefficient of an infinite norm, 0, would turn the
    infinite entries into NaN); the non-finite values are left to the caller
    (``Clipper(nonfinite=...)``, ``skip_nonfinite()``, ``GradScaler``). ``last_norm`` reports the
    non-finite norm, ``threshold`` the limit that finite updates would have met, and
    ``fraction_clipped`` is 0. Under the commit gate (:func:`~steadygrad.core.transform.gated`) a
    closed gate leaves every field bit-for-bit unchanged; the one exception is the unbounded
    AutoClip history, whose buffer gains one unused ``inf`` slot per call (its capacity follows
    the number of calls, which the host knows without a sync), while its valid entries and count
    are unchanged.

Where we follow the published rules and where we differ
    ZClip (Kumar et al., 2025, arXiv:2504.02507; PyPI ``zclip``), z-score mode with adaptive
    scaling. We follow the formulas, the population variance of the warm-up norms, the raw
    (pre-clip) norms in the warm-up buffer, the EMA fed with the clipped norm (the adaptive
    threshold) on a spike, the variance updated with the new mean, the ``eps`` in
    ``z = (n − μ)/(σ + eps)``, the coefficient ``threshold/(n + 1e-6)`` and, with ``max_norm``,
    the package's fixed cap at every step (warm-up included) that does not feed the statistics.
    We differ: ``max_norm`` defaults to ``None`` (pure ZClip; the package's recent default is
    1.0); the statistics are tensors, not Python floats read with ``.item()`` every step; they
    are in the ``state_dict``; a non-finite norm is skipped (in the package one NaN makes μ NaN
    forever and ends clipping); the warm-up collects the first N *finite* norms.

    AutoClip (Seetharaman et al., 2020, arXiv:2007.14469): threshold = the p-th percentile of the
    observed pre-clip global norms, the current one included (the paper's code appends, then
    calls ``np.percentile``), with numpy's default linear interpolation. We follow the paper's
    p = 10 and whole history by default; ``history=H`` keeps the last H norms. The PyPI
    ``autoclip`` package differs from the paper (the 0.9 quantile of the last 1000 norms of each
    parameter separately, an ``inf`` stored in its history after one infinite gradient) and has
    no ``state_dict``; we keep one global norm, skip non-finite norms and bound the history only
    when asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.norms import check_threshold, norm_dtype, total_norm
from ..core.transform import Transform, commit_gate
from .clipping import commit_select, new_fraction, norm_clip_update

__all__ = [
    "AutoClipState",
    "ZClipState",
    "autoclip",
    "autoclip_update",
    "zclip",
    "zclip_update",
]

Scalar = float | Tensor


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> Scalar:
    """Validates a hyperparameter (a number, or a 1-element tensor read once here) and returns
    it, a tensor reshaped to 0-d. ``ValueError`` naming ``name`` when ``ok`` fails or it is NaN."""
    number: float | None = None
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        number = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or math.isnan(number) or not ok(number):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value.reshape(()) if isinstance(value, Tensor) else value


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _stat_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the parameters' norm (float32, or float64 if any is float64/complex128)."""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, norm_dtype(p.dtype))
    return dtype


def _stat_device(params: Sequence[Tensor]) -> torch.device:
    return params[0].device if len(params) else torch.device("cpu")


def _admits(norm: Tensor, gate: Tensor | None) -> Tensor:
    """Whether this step's norm enters the statistics: finite, and the gate (if any) open."""
    finite = torch.isfinite(norm)
    if gate is None:
        return finite
    return finite & (gate.to(norm.device) != 0)


def _clip(updates: list[Tensor], norm: Tensor, limit: Tensor) -> tuple[list[Tensor], Tensor]:
    """Clips ``updates`` (global norm ``norm``) to ``limit`` in place with torch's coefficient;
    returns them and the fraction clipped (0/1). A non-finite norm leaves them unchanged: the
    coefficient is then computed from norm 0 and limit inf, i.e. exactly 1."""
    finite = torch.isfinite(norm)
    safe_norm = torch.where(finite, norm, torch.zeros_like(norm))
    safe_limit = torch.where(finite, limit, torch.full_like(limit, math.inf))
    return norm_clip_update(updates, max_norm=safe_limit, norm=safe_norm)


# --------------------------------------------------------------------------------------------
# ZClip
# --------------------------------------------------------------------------------------------


class ZClipState(NamedTuple):
    """State of :func:`zclip`, single tensors shared by all parameters.

    Attributes:
        num_norms: int64, the finite norms committed so far; the statistics exist once it
            reaches ``warmup_steps``.
        warmup_norms: ``warmup_steps`` slots, the first finite norms, raw (pre-clip), in order;
            unused slots hold 0. Kept afterwards (it is small) so that the layout never changes.
        norm_mean: μ, the EMA of the (clipped) norm.
        norm_var: σ², the EMA of its squared deviation.
        last_norm: the pre-clip norm of the last committed step.
        threshold: the limit applied at the last committed step (``inf`` if none).
        fraction_clipped: float32, 1 if the last committed step was clipped, else 0.
    """

    num_norms: Tensor
    warmup_norms: Tensor
    norm_mean: Tensor
    norm_var: Tensor
    last_norm: Tensor
    threshold: Tensor
    fraction_clipped: Tensor


def zclip_update(
    updates: list[Tensor],
    state: ZClipState,
    *,
    alpha: Scalar,
    z_threshold: Scalar,
    eps: Scalar,
    max_norm: Scalar | None = None,
    process_group: Any = None,
    gate: Tensor | None = None,
) -> tuple[list[Tensor], ZClipState]:
    """One ZClip step: clips ``updates`` in place and returns them with the new state.

    With n the global L2 norm of ``updates`` and N = ``len(state.warmup_norms)``:

    * warm-up (fewer than N finite norms seen): n is stored; when the N-th arrives,
      μ = mean and σ² = population variance of the N norms. No adaptive clipping.
    * after it: :math:`z = (n - \\mu)/(\\sigma + \\epsilon)`; if :math:`z > z_{thr}` the limit is
      :math:`\\tau = \\mu + z_{thr}^2 \\sigma / z` and :math:`x = \\tau`, else :math:`x = n`; then
      :math:`\\mu \\leftarrow \\alpha\\mu + (1-\\alpha)x`,
      :math:`\\sigma^2 \\leftarrow \\alpha\\sigma^2 + (1-\\alpha)(x - \\mu)^2` with the new μ.
    * the limit applied is τ (or none), capped by ``max_norm`` at every step when given; the
      updates are scaled by ``min(1, limit/(n + 1e-6))``.

    Args:
        gate: the commit gate (``None`` = commit). A closed gate (0) leaves the state
            bit-for-bit unchanged; a non-finite n leaves the statistics unchanged and the
            updates as they are (see the module docstring).
    """
    norm = total_norm(updates, 2.0, process_group)
    device = norm.device
    dtype = torch.promote_types(state.norm_mean.dtype, norm.dtype)
    n = norm.to(dtype)

    def on(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype)

    count = state.num_norms.to(device)
    buf = on(state.warmup_norms)
    mu, var = on(state.norm_mean), on(state.norm_var)
    admit = _admits(n, gate)
    warmup_steps = buf.shape[0]

    # The limit, from the statistics of the steps before this one.
    in_warmup = count < warmup_steps
    sigma = torch.sqrt(var)
    z = (n - mu) / (sigma + eps)
    spike = (~in_warmup) & (z > z_threshold)  # False for a NaN norm
    tau = mu + (z_threshold * z_threshold) * sigma / torch.where(spike, z, torch.ones_like(z))
    limit = torch.where(spike, tau, torch.full_like(tau, math.inf))
    if max_norm is not None:
        limit = torch.minimum(limit, torch.as_tensor(max_norm, dtype=dtype, device=device))
    updates, fraction = _clip(updates, n, limit)

    # After the warm-up: the EMAs, fed with the clipped norm on a spike.
    x = torch.where(spike, tau, n)
    ema_mean = alpha * mu + (1 - alpha) * x
    ema_var = alpha * var + (1 - alpha) * (x - ema_mean) ** 2
    follow = admit & ~in_warmup

    # During it: n goes to slot `count`; μ and σ² start when the N-th norm arrives.
    collect = admit & in_warmup
    slot = torch.arange(warmup_steps, device=device) == count
    new_buf = torch.where(slot & collect, n, buf)
    new_count = count + admit.to(torch.int64)
    start = collect & (new_count == warmup_steps)
    buf_mean = new_buf.mean() if warmup_steps else mu
    buf_var = ((new_buf - buf_mean) ** 2).mean() if warmup_steps else var

    new_state = ZClipState(
        num_norms=new_count,
        warmup_norms=new_buf,
        norm_mean=torch.where(start, buf_mean, torch.where(follow, ema_mean, mu)),
        norm_var=torch.where(start, buf_var, torch.where(follow, ema_var, var)),
        last_norm=commit_select(gate, n, state.last_norm),
        threshold=commit_select(gate, limit, state.threshold),
        fraction_clipped=commit_select(gate, fraction, state.fraction_clipped),
    )
    return updates, new_state


def zclip(
    alpha: Scalar = 0.97,
    z_threshold: Scalar = 2.5,
    warmup_steps: int = 25,
    eps: Scalar = 1e-6,
    max_norm: Scalar | None = None,
    process_group: Any = None,
) -> Transform:
    """ZClip (Kumar et al., 2025, *ZClip: Adaptive Spike Mitigation for LLM Pre-Training*):
    clips the global L2 norm when its z-score against an EMA mean and variance marks a spike.

    .. math::
        z_t = \\frac{n_t - \\mu_{t-1}}{\\sigma_{t-1} + \\epsilon},\\qquad
        \\tau_t = \\mu_{t-1} + \\frac{z_{thr}^2\\,\\sigma_{t-1}}{z_t}\\ \\text{if}\\ z_t > z_{thr},\\qquad
        \\mu_t = \\alpha\\mu_{t-1} + (1-\\alpha)x_t,\\quad
        \\sigma_t^2 = \\alpha\\sigma_{t-1}^2 + (1-\\alpha)(x_t - \\mu_t)^2

    with :math:`x_t = \\tau_t` on a spike and :math:`n_t` otherwise; μ and σ² start as the mean
    and population variance of the first ``warmup_steps`` finite norms, during which there is no
    adaptive clipping. This is the paper's z-score mode with adaptive (reciprocal) scaling,
    :math:`\\tau = \\mu + z_{thr}\\sigma/(z/z_{thr})`: the larger the spike, the closer its limit
    to μ.

    ``fraction_clipped``: 1 if the step's coefficient was below 1, else 0.

    Args:
        alpha: EMA factor in (0, 1).
        z_threshold: the z-score above which a norm is a spike, > 0.
        warmup_steps: the number of finite norms that initialise μ and σ², >= 1.
        eps: added to σ in the z-score, > 0.
        max_norm: an optional fixed cap on the norm at every step, warm-up included (the
            package's ``max_grad_norm``); it does not feed the statistics. ``None``: no cap.
        process_group: the process group over which the norm is global (``None``: this rank's
            updates; see :func:`~steadygrad.core.norms.total_norm`).

    Raises:
        ValueError: a hyperparameter out of range (the message names it).

    Differences from the paper and the ``zclip`` package: see the module docstring and
    ``docs/adaptive-clipping.md``. A non-finite norm is skipped by the statistics and leaves the
    updates unchanged.
    """
    alpha = _check("alpha", alpha, lambda v: 0 < v < 1, "a number in (0, 1)")
    z_threshold = _check("z_threshold", z_threshold, lambda v: 0 < v < math.inf, "a finite number > 0")
    warmup_steps = _check_int("warmup_steps", warmup_steps, 1)
    eps = _check("eps", eps, lambda v: 0 < v < math.inf, "a finite number > 0")
    if max_norm is not None:
        check_threshold(max_norm, "max_norm")
        max_norm = max_norm.reshape(()) if isinstance(max_norm, Tensor) else max_norm

    def init(params: Sequence[Tensor]) -> ZClipState:
        dtype, device = _stat_dtype(params), _stat_device(params)
        return ZClipState(
            num_norms=torch.zeros((), dtype=torch.int64, device=device),
            warmup_norms=torch.zeros(warmup_steps, dtype=dtype, device=device),
            norm_mean=torch.zeros((), dtype=dtype, device=device),
            norm_var=torch.zeros((), dtype=dtype, device=device),
            last_norm=torch.zeros((), dtype=dtype, device=device),
            threshold=torch.full((), math.inf, dtype=dtype, device=device),
            fraction_clipped=new_fraction(params),
        )

    def update(updates, state, params=None):
        if state.warmup_norms.shape != (warmup_steps,):
            raise ValueError(
                f"zclip(warmup_steps={warmup_steps}) got a state with {tuple(state.warmup_norms.shape)} "
                "warm-up slots (a checkpoint made with another warmup_steps?)"
            )
        return zclip_update(
            updates,
            state,
            alpha=alpha,
            z_threshold=z_threshold,
            eps=eps,
            max_norm=max_norm,
            process_group=process_group,
            gate=commit_gate(),
        )

    return Transform(init, update, "elements")


# --------------------------------------------------------------------------------------------
# AutoClip
# --------------------------------------------------------------------------------------------


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`, single tensors shared by all parameters.

    Attributes:
        num_norms: int64, the finite norms committed so far (all of them, also beyond
            ``history``).
        norm_history: the norms. Without ``history``, norm i (0-based) is in slot i and the
            buffer grows by one slot per call (its length is the number of calls, at least
            ``num_norms``). With ``history=H`` it is a ring buffer of H slots: norm i in slot
            i mod H, the newest at ``(num_norms − 1) mod H``. Slots without a norm hold ``+inf``.
        last_norm: the pre-clip norm of the last committed step.
        threshold: the percentile applied at the last committed step.
        fraction_clipped: float32, 1 if the last committed step was clipped, else 0.
    """

    num_norms: Tensor
    norm_history: Tensor
    last_norm: Tensor
    threshold: Tensor
    fraction_clipped: Tensor


def _percentile_sorted(values: Tensor, k: Tensor, q: Scalar) -> Tensor:
    """The ``q``-quantile (q in [0, 1]) of the ``k`` smallest entries of the sorted 1-D ``values``,
    numpy's default linear interpolation: position ``h = q·(k − 1)``, ``lerp`` between the entries
    ``floor(h)`` and ``floor(h) + 1`` (clamped to ``k − 1``). ``inf`` when ``k`` is 0."""
    last = torch.clamp(k - 1, min=0)
    pos = last.to(torch.float64) * q
    floor = torch.floor(pos)
    lo = floor.to(torch.int64)
    hi = torch.minimum(lo + 1, last)
    # gather, not values[lo]: indexing by a tensor would read the index on the host.
    ends = values.gather(0, torch.stack([lo, hi]))
    value = torch.lerp(ends[0], ends[1], (pos - floor).to(values.dtype))
    return torch.where(k > 0, value, torch.full_like(value, math.inf))


def autoclip_update(
    updates: list[Tensor],
    state: AutoClipState,
    *,
    percentile: Scalar,
    history: int | None = None,
    process_group: Any = None,
    gate: Tensor | None = None,
) -> tuple[list[Tensor], AutoClipState]:
    """One AutoClip step: clips ``updates`` in place and returns them with the new state.

    The global L2 norm n of ``updates`` joins the history (if finite and committed); the limit
    is the ``percentile``-th percentile of the history (the last ``history`` norms, or all of
    them if ``None``) with numpy's linear interpolation; the updates are scaled by
    ``min(1, limit/(n + 1e-6))``. An empty history gives no limit.

    Args:
        history: must match the state's layout: ``None`` for a growing buffer, H for a ring
            buffer of H slots.
        gate: the commit gate (``None`` = commit), as in :func:`zclip_update`.
    """
    norm = total_norm(updates, 2.0, process_group)
    device = norm.device
    dtype = torch.promote_types(state.norm_history.dtype, norm.dtype)
    n = norm.to(dtype)

    count = state.num_norms.to(device)
    buf = state.norm_history.to(device=device, dtype=dtype)
    admit = _admits(n, gate)
    if history is None:
        buf = torch.cat([buf, torch.full((1,), math.inf, dtype=dtype, device=device)])
        index = count
    else:
        index = torch.remainder(count, history)
    slot = torch.arange(buf.shape[0], device=device) == index
    new_buf = torch.where(slot & admit, n, buf)
    new_count = count + admit.to(torch.int64)
    valid = new_count if history is None else torch.clamp(new_count, max=history)

    ordered = torch.sort(new_buf).values  # the +inf of unused slots sort last
    limit = _percentile_sorted(ordered, valid, percentile / 100)
    updates, fraction = _clip(updates, n, limit)
    new_state = AutoClipState(
        num_norms=new_count,
        norm_history=new_buf,
        last_norm=commit_select(gate, n, state.last_norm),
        threshold=commit_select(gate, limit, state.threshold),
        fraction_clipped=commit_select(gate, fraction, state.fraction_clipped),
    )
    return updates, new_state


def autoclip(percentile: Scalar = 10.0, history: int | None = None, process_group: Any = None) -> Transform:
    """AutoClip (Seetharaman, Wichern, Pardo and Le Roux, 2020, *AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks*): clips the global L2 norm to the p-th percentile
    of the norms observed so far, the current one included.

    .. math::
        \\tau_t = \\operatorname{percentile}_p(n_1, \\dots, n_t),\\qquad
        u \\leftarrow u \\cdot \\min\\Big(1, \\frac{\\tau_t}{n_t + 10^{-6}}\\Big)

    The percentile is numpy's default (``method="linear"``: position :math:`p/100\\cdot(k-1)` in
    the sorted k norms, linear interpolation between its neighbours), which the paper's code
    (``np.percentile``) and ``torch.quantile`` use. A step whose norm is itself the percentile
    (the first step; with p = 100 every new maximum) is scaled by ``n/(n + 1e-6)`` as in the
    paper's ``clip_grad_norm_`` call, and counts as clipped in ``fraction_clipped`` (coefficient
    below 1, the rule of :func:`~steadygrad.transforms.clipping.clip_by_norm`).

    Args:
        percentile: p in (0, 100]; the paper recommends 10.
        history: ``None`` keeps every norm (the paper; memory and a sort grow with the number of
            steps); an int H >= 1 keeps the last H norms in a ring buffer.
        process_group: the process group over which the norm is global (``None``: this rank's
            updates).

    Raises:
        ValueError: ``percentile`` outside (0, 100] or ``history`` < 1 (the message names it).

    Differences from the paper and the ``autoclip`` package: see the module docstring and
    ``docs/adaptive-clipping.md``. Non-finite norms do not enter the history and leave the
    updates unchanged.
    """
    percentile = _check("percentile", percentile, lambda v: 0 < v <= 100, "a number in (0, 100]")
    if history is not None:
        history = _check_int("history", history, 1)

    def init(params: Sequence[Tensor]) -> AutoClipState:
        dtype, device = _stat_dtype(params), _stat_device(params)
        return AutoClipState(
            num_norms=torch.zeros((), dtype=torch.int64, device=device),
            norm_history=torch.full((history or 0,), math.inf, dtype=dtype, device=device),
            last_norm=torch.zeros((), dtype=dtype, device=device),
            threshold=torch.full((), math.inf, dtype=dtype, device=device),
            fraction_clipped=new_fraction(params),
        )

    def update(updates, state, params=None):
        if history is not None and state.norm_history.shape != (history,):
            raise ValueError(
                f"autoclip(history={history}) got a state with a history of shape "
                f"{tuple(state.norm_history.shape)} (a checkpoint made with another history?)"
            )
        return autoclip_update(
            updates,
            state,
            percentile=percentile,
            history=history,
            process_group=process_group,
            gate=commit_gate(),
        )

    return Transform(init, update, "elements")
