"""Adaptive scaling by running second moments: Adagrad, RMSProp and Adam.

Each algorithm is one function on lists of tensors with explicit state (``*_update``), written
with foreach operations so that it runs unchanged on many tensors or on one flat buffer, and one
:class:`~steadygrad.core.transform.Transform` factory around it. The functions follow the in-place
rule of :mod:`steadygrad.core.transform`: they update the state and overwrite ``updates``.

The commit gate
    Each ``*_update`` takes ``gate`` (see :mod:`steadygrad.core.transform`): ``None`` commits;
    a 0-d tensor that is 0 leaves the state bit-for-bit unchanged (the EMA rates and the step
    increment are multiplied by the gate). The updates are still computed; a caller that skips a
    step discards them. The factories read :func:`~steadygrad.core.transform.commit_gate`.

Where eps goes
    torch.optim divides by ``sqrt(v) + eps``. TensorFlow, optax's ``adagrad``/``rmsprop`` and the
    d2l book divide by ``sqrt(v + eps)``. ``eps_in_sqrt=True`` selects the latter. The two differ
    visibly when ``v`` is small, i.e. early in training and for rarely active features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.tensorlist import (
    Scalar,
    addcmul_,
    advance_,
    bias_correction,
    gate_ema_per_tensor,
    gate_open_per_tensor,
    new_steps,
    zeros_like,
)
from ..core.transform import Transform, commit_gate
from .clipping import clamp_to_threshold_, commit_select, moment_threshold, new_fraction

__all__ = [
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "adam_update",
    "rms_update",
    "rss_update",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_rss",
]


def _denominator(v: list[Tensor], eps: Scalar, eps_in_sqrt: bool) -> list[Tensor]:
    """A new list ``sqrt(v) + eps``, or ``sqrt(v + eps)`` with ``eps_in_sqrt``."""
    if eps_in_sqrt:
        den = torch._foreach_add(v, eps)
        torch._foreach_sqrt_(den)
    else:
        den = torch._foreach_sqrt(v)
        torch._foreach_add_(den, eps)
    return den


# --------------------------------------------------------------------------------------------
# Adagrad
# --------------------------------------------------------------------------------------------


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the step counters and the sums of squared gradients."""

    step: list[Tensor]
    sum: list[Tensor]


def rss_update(
    updates: list[Tensor],
    sums: list[Tensor],
    steps: list[Tensor],
    *,
    eps: Scalar,
    lr_decay: float,
    eps_in_sqrt: bool,
    gate: Tensor | None = None,
) -> list[Tensor]:
    """Adagrad's scaling, in place on ``updates``, ``sums`` and ``steps``.

    .. math::
        t \\leftarrow t + 1,\\quad s \\leftarrow s + g^2,\\quad
        u = \\frac{g}{(1 + (t-1)\\,\\text{lr\\_decay})\\,(\\sqrt{s} + \\epsilon)}
    """
    advance_(steps, gate)
    addcmul_(sums, updates, updates, gate_open_per_tensor(gate, sums))
    torch._foreach_div_(updates, _denominator(sums, eps, eps_in_sqrt))
    if isinstance(lr_decay, Tensor) or lr_decay != 0:
        torch._foreach_div_(updates, [(s.to(torch.float64) - 1) * lr_decay + 1 for s in steps])
    return updates


def scale_by_rss(
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    lr_decay: float = 0.0,
    eps_in_sqrt: bool = False,
) -> Transform:
    """Adagrad (Duchi, Hazan and Singer, 2011): scale by the root of the sum of squared gradients.

    .. math::
        s_t = s_{t-1} + g_t^2,\\qquad
        u_t = \\frac{g_t}{(1 + (t-1)\\,\\text{lr\\_decay})\\,(\\sqrt{s_t} + \\epsilon)}

    With ``eps_in_sqrt=True`` the denominator is :math:`\\sqrt{s_t + \\epsilon}`.

    Args:
        initial_accumulator_value: the starting value of ``s`` (torch 0; optax 0.1).
        eps: added to the denominator (torch 1e-10; optax 1e-7, inside the root).
        lr_decay: torch's learning-rate decay, applied here as a factor on the update.
        eps_in_sqrt: put ``eps`` under the square root.

    Differences: equals ``torch.optim.Adagrad`` (without the learning rate, see
    :func:`scale_by_lr`). optax's ``scale_by_rss`` is ``initial_accumulator_value=0.1,
    eps=1e-7, eps_in_sqrt=True`` and returns 0 where the accumulator is 0; here that case gives
    ``0 / eps = 0`` too unless ``eps`` is 0, which the optimizers refuse.
    """

    def init(params: Sequence[Tensor]) -> ScaleByRssState:
        return ScaleByRssState(step=new_steps(params), sum=zeros_like(params, initial_accumulator_value))

    def update(updates, state, params=None):
        updates = rss_update(
            updates, state.sum, state.step, eps=eps, lr_decay=lr_decay, eps_in_sqrt=eps_in_sqrt, gate=commit_gate()
        )
        return updates, state

    return Transform(init, update, "elements")


# --------------------------------------------------------------------------------------------
# RMSProp
# --------------------------------------------------------------------------------------------


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: step counters, the running mean of g², when centered the
    running mean of g, and with ``moment_clip`` the fraction of elements clipped at the last step
    (``None`` when unused)."""

    step: list[Tensor]
    square_avg: list[Tensor]
    grad_avg: list[Tensor] | None
    fraction_clipped: Tensor | None = None


def rms_update(
    updates: list[Tensor],
    square_avg: list[Tensor],
    grad_avg: list[Tensor] | None,
    steps: list[Tensor],
    *,
    alpha: Scalar,
    eps: Scalar,
    eps_in_sqrt: bool,
    gate: Tensor | None = None,
    moment_clip: Scalar | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    """RMSProp's scaling, in place on ``updates`` and the state; centered iff ``grad_avg`` is given.

    .. math::
        v \\leftarrow \\alpha v + (1-\\alpha) g^2,\\quad
        \\bar g \\leftarrow \\alpha \\bar g + (1-\\alpha) g,\\quad
        u = \\frac{g}{\\sqrt{v - \\bar g^2} + \\epsilon}

    With ``moment_clip = k``, ``g`` is first clipped per element to ``±k·sqrt(v̂)`` with
    ``v̂ = v / (1 − α^(t−1))`` from the steps before this one (the first step passes), ``v`` is
    updated from the *unclipped* ``g`` and ``ḡ`` and ``u`` use the clipped one.

    Returns:
        ``(updates, fraction)``: the fraction of elements clipped (``None`` without moment_clip).
    """
    threshold = None if moment_clip is None else moment_threshold(square_avg, steps, k=moment_clip, beta=alpha)
    advance_(steps, gate)
    decay, rate = gate_ema_per_tensor(alpha, gate, square_avg)
    torch._foreach_mul_(square_avg, decay)
    addcmul_(square_avg, updates, updates, rate)
    fraction = None if threshold is None else clamp_to_threshold_(updates, threshold)
    if grad_avg is not None:
        torch._foreach_lerp_(grad_avg, updates, rate)
        v = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)
    else:
        v = square_avg
    torch._foreach_div_(updates, _denominator(v, eps, eps_in_sqrt))
    return updates, fraction


def scale_by_rms(
    alpha: float = 0.99,
    eps: float = 1e-8,
    centered: bool = False,
    eps_in_sqrt: bool = False,
    moment_clip: Scalar | None = None,
) -> Transform:
    """RMSProp (Hinton, Lecture 6e, 2012; centered: Graves, 2013): scale by the root of an
    exponential moving average of g².

    .. math::
        v_t = \\alpha v_{t-1} + (1-\\alpha) g_t^2,\\qquad
        u_t = \\frac{g_t}{\\sqrt{v_t} + \\epsilon}

    Centered: :math:`\\bar g_t = \\alpha \\bar g_{t-1} + (1-\\alpha) g_t` and the denominator is
    :math:`\\sqrt{v_t - \\bar g_t^2} + \\epsilon`. With ``eps_in_sqrt=True`` eps moves under the root.

    ``moment_clip=k`` clips each gradient element to ``±k·sqrt(v̂)`` first (OpenAI Five's rule,
    see :func:`steadygrad.clip_by_moment`) with this transform's own ``v`` as the second moment:
    ``v̂ = v/(1 − α^(t−1))`` from the steps before this one, and ``v`` updated from the
    *unclipped* gradient, so the clipping needs no memory of its own. ``ḡ`` (centered) and the
    update use the clipped gradient. The state then holds ``fraction_clipped``.

    Differences: equals ``torch.optim.RMSprop`` without momentum and lr (compose with
    :func:`trace` and :func:`scale_by_lr`). optax's ``scale_by_rms(decay, eps,
    eps_in_sqrt=True)`` is ``alpha=decay, eps_in_sqrt=True``; optax's ``scale_by_stddev`` is the
    centered form with eps inside the root. TensorFlow 1 starts ``v`` at 1; here it starts at 0
    as in torch and optax.
    """

    def init(params: Sequence[Tensor]) -> ScaleByRmsState:
        return ScaleByRmsState(
            step=new_steps(params),
            square_avg=zeros_like(params),
            grad_avg=zeros_like(params) if centered else None,
            fraction_clipped=None if moment_clip is None else new_fraction(params),
        )

    def update(updates, state, params=None):
        if centered and state.grad_avg is None:
            raise ValueError("scale_by_rms(centered=True) got a state without grad_avg")
        gate = commit_gate()
        updates, fraction = rms_update(
            updates,
            state.square_avg,
            state.grad_avg if centered else None,
            state.step,
            alpha=alpha,
            eps=eps,
            eps_in_sqrt=eps_in_sqrt,
            gate=gate,
            moment_clip=moment_clip,
        )
        if fraction is not None:
            state = state._replace(fraction_clipped=commit_select(gate, fraction, state.fraction_clipped))
        return updates, state

    return Transform(init, update, "elements")


# --------------------------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step counters, first and second moments, with amsgrad the
    running maximum of the second moment, and with ``moment_clip`` the fraction of elements
    clipped at the last step (``None`` when unused)."""

    step: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    max_exp_avg_sq: list[Tensor] | None
    fraction_clipped: Tensor | None = None


def adam_update(
    updates: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    max_exp_avg_sq: list[Tensor] | None,
    steps: list[Tensor],
    *,
    beta1: Scalar,
    beta2: Scalar,
    eps: Scalar,
    eps_in_sqrt: bool,
    gate: Tensor | None = None,
    moment_clip: Scalar | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    """Adam's scaling, in place on ``updates`` and the state; amsgrad iff ``max_exp_avg_sq`` is given.

    .. math::
        m \\leftarrow \\beta_1 m + (1-\\beta_1) g,\\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2,\\quad
        u = \\frac{m / (1-\\beta_1^t)}{\\sqrt{v / (1-\\beta_2^t)} + \\epsilon}

    With ``moment_clip = k``, ``g`` is clipped per element to ``±k·sqrt(v̂)`` with
    ``v̂ = v / (1 − β2^(t−1))`` from the steps before this one (the first step passes); ``v`` is
    updated from the *unclipped* ``g`` and ``m`` from the clipped one.

    Returns:
        ``(updates, fraction)``: the fraction of elements clipped (``None`` without moment_clip).
    """
    threshold = None if moment_clip is None else moment_threshold(exp_avg_sq, steps, k=moment_clip, beta=beta2)
    # This step's bias corrections (t = count + 1) from the counters before they advance: no
    # scalar op then waits for the advance, and compiled, all the element-wise work is one loop.
    # (Under a closed commit gate the counters stay, and the discarded updates use t = count + 1.)
    bc1 = bias_correction(beta1, steps, offset=-1)
    bc2 = bias_correction(beta2, steps, offset=-1)
    advance_(steps, gate)
    decay, rate = gate_ema_per_tensor(beta2, gate, exp_avg_sq)
    torch._foreach_mul_(exp_avg_sq, decay)
    addcmul_(exp_avg_sq, updates, updates, rate)
    fraction = None if threshold is None else clamp_to_threshold_(updates, threshold)
    torch._foreach_lerp_(exp_avg, updates, gate_ema_per_tensor(beta1, gate, exp_avg)[1])
    if max_exp_avg_sq is not None:
        torch._foreach_maximum_(max_exp_avg_sq, exp_avg_sq)
        second = max_exp_avg_sq
    else:
        second = exp_avg_sq
    if eps_in_sqrt:
        den = torch._foreach_div(second, bc2)
        torch._foreach_add_(den, eps)
        torch._foreach_sqrt_(den)
    else:
        den = torch._foreach_sqrt(second)
        torch._foreach_div_(den, torch._foreach_sqrt(bc2))
        torch._foreach_add_(den, eps)
    torch._foreach_copy_(updates, exp_avg)
    torch._foreach_div_(updates, bc1)
    torch._foreach_div_(updates, den)
    return updates, fraction


def scale_by_adam(
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
    eps_in_sqrt: bool = False,
    moment_clip: Scalar | None = None,
) -> Transform:
    """Adam (Kingma and Ba, 2015), with AMSGrad (Reddi, Kale and Kumar, 2018) as an option.

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t,\\qquad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2,\\qquad
        u_t = \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t / (1-\\beta_2^t)} + \\epsilon}

    AMSGrad replaces :math:`v_t` in the denominator by :math:`\\max_{s \\le t} v_s` (the raw,
    not bias-corrected, second moment, as torch). With ``eps_in_sqrt=True`` the denominator is
    :math:`\\sqrt{v_t/(1-\\beta_2^t) + \\epsilon}`.

    ``moment_clip=k`` is OpenAI Five's setting (Berner et al., 2019: Adam, with gradients
    "clipped per parameter to be within ±5√v where v is the running estimate of the second moment
    of the (unclipped) gradient"): each gradient element is clipped to ``±k·sqrt(v̂)`` with Adam's
    own ``v`` (``v̂ = v/(1 − β2^(t−1))``, the steps before this one; the first step passes), ``v``
    is updated from the *unclipped* gradient and ``m`` from the clipped one. No extra memory. With
    amsgrad the limit still uses ``v``, not its maximum. The state then holds
    ``fraction_clipped``. See :func:`steadygrad.clip_by_moment` for the rule with its own ``v``.

    Differences: equals ``torch.optim.Adam`` without lr and weight decay. optax's
    ``scale_by_adam(b1, b2, eps, eps_root)`` equals this with ``eps_in_sqrt=False`` and
    ``eps_root=0``, or with ``eps_in_sqrt=True`` when optax's ``eps=0, eps_root=eps``. optax's
    ``scale_by_amsgrad`` keeps the maximum of the *bias-corrected* second moment, torch (and this
    transform) the maximum of the raw one; the two differ while the bias correction changes.
    """
    beta1, beta2 = betas

    def init(params: Sequence[Tensor]) -> ScaleByAdamState:
        return ScaleByAdamState(
            step=new_steps(params),
            exp_avg=zeros_like(params),
            exp_avg_sq=zeros_like(params),
            max_exp_avg_sq=zeros_like(params) if amsgrad else None,
            fraction_clipped=None if moment_clip is None else new_fraction(params),
        )

    def update(updates, state, params=None):
        if amsgrad and state.max_exp_avg_sq is None:
            raise ValueError("scale_by_adam(amsgrad=True) got a state without max_exp_avg_sq")
        gate = commit_gate()
        updates, fraction = adam_update(
            updates,
            state.exp_avg,
            state.exp_avg_sq,
            state.max_exp_avg_sq if amsgrad else None,
            state.step,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            eps_in_sqrt=eps_in_sqrt,
            gate=gate,
            moment_clip=moment_clip,
        )
        if fraction is not None:
            state = state._replace(fraction_clipped=commit_select(gate, fraction, state.fraction_clipped))
        return updates, state

    return Transform(init, update, "elements")
