"""ZClip (Kumar et al., 2025): clipping of the global L2 norm by its z-score against an EMA mean
and variance.

The rule is :func:`zclip_update`, a function with explicit state; :func:`zclip` makes it a
transform. It follows the conventions of :mod:`steadygrad.transforms.clipping.common` (in place,
``fraction_clipped``, commit gate, no host reads, validation) and of
:mod:`steadygrad.transforms.clipping.autoclip` for state, non-finite norms and where it differs
from the paper; the one difference from the per-element rules is that :func:`zclip_update`
takes the commit gate and returns the new state (its statistics are gated inside).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ...core.gate import commit_select
from ...core.norms import portable_group, total_norm
from ...core.tensorlist import Scalar
from ...core.transform import PLAIN, Transform
from ...core.validate import check_int, check_range
from .common import admits, new_fraction, stat_device, stat_dtype
from .norm import clip_to_limit

__all__ = ["ZClip", "ZClipState", "zclip", "zclip_update"]


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
    norm: Tensor | None = None,
    shards: Any = None,
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
        norm: the global L2 norm of ``updates`` if the caller has it (computed here otherwise).
    """
    norm = total_norm(updates, 2.0, process_group, shards=shards) if norm is None else norm
    device = norm.device
    dtype = torch.promote_types(state.norm_mean.dtype, norm.dtype)
    n = norm.to(dtype)

    def on(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype)

    count = state.num_norms.to(device)
    buf = on(state.warmup_norms)
    mu, var = on(state.norm_mean), on(state.norm_var)
    admit = admits(n, gate)
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
    updates, fraction = clip_to_limit(updates, n, limit)

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


@dataclass(frozen=True)
class ZClip(Transform):
    """ZClip; see :func:`zclip`."""

    alpha: Any = 0.97
    z_threshold: Any = 2.5
    warmup_steps: int = 25
    eps: Any = 1e-6
    max_norm: Any = None
    process_group: Any = None
    structure: ClassVar[str] = "elements"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_range("alpha", self.alpha, 0.0, 1.0, low_open=True))
        object.__setattr__(self, "z_threshold", check_range("z_threshold", self.z_threshold, low_open=True))
        object.__setattr__(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, 1))
        object.__setattr__(self, "eps", check_range("eps", self.eps, low_open=True))
        if self.max_norm is not None:
            object.__setattr__(self, "max_norm", check_range("max_norm", self.max_norm, low_open=True, finite=False))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "process_group": portable_group(self.process_group)}

    def init(self, params: Sequence[Tensor]) -> ZClipState:
        dtype, device = stat_dtype(params), stat_device(params)
        return ZClipState(
            num_norms=torch.zeros((), dtype=torch.int64, device=device),
            warmup_norms=torch.zeros(self.warmup_steps, dtype=dtype, device=device),
            norm_mean=torch.zeros((), dtype=dtype, device=device),
            norm_var=torch.zeros((), dtype=dtype, device=device),
            last_norm=torch.zeros((), dtype=dtype, device=device),
            threshold=torch.full((), math.inf, dtype=dtype, device=device),
            fraction_clipped=new_fraction(params),
        )

    def update(self, updates, state, params=None, ctx=PLAIN):
        if state.warmup_norms.shape != (self.warmup_steps,):
            raise ValueError(
                f"zclip(warmup_steps={self.warmup_steps}) got a state with {tuple(state.warmup_norms.shape)} "
                "warm-up slots (a checkpoint made with another warmup_steps?)"
            )
        return zclip_update(
            updates,
            state,
            alpha=ctx.value(self.alpha),
            z_threshold=ctx.value(self.z_threshold),
            eps=ctx.value(self.eps),
            max_norm=ctx.value(self.max_norm),
            process_group=self.process_group,
            gate=ctx.gate,
            norm=ctx.norm if self.process_group is None else None,
            shards=ctx.shards,
        )


def zclip(
    alpha: float | Tensor = 0.97,
    z_threshold: float | Tensor = 2.5,
    warmup_steps: int = 25,
    eps: float | Tensor = 1e-6,
    max_norm: float | Tensor | None = None,
    process_group: Any = None,
) -> ZClip:
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
    return ZClip(alpha, z_threshold, warmup_steps, eps, max_norm, process_group)
