"""Adaptive scaling by running second moments: Adagrad, RMSProp and Adam.

Each algorithm is one function on lists of tensors with explicit state (``*_update``), written
with foreach operations so that it runs unchanged on many tensors or on one flat buffer, and one
transform class around it with a factory function (``scale_by_*``). The functions update the
state in place and return the updates as a :class:`~steadygrad.core.transform.Quotient`
``scale · num / den`` that ``update`` divides and an optimizer adds to its parameters with one
``addcdiv`` (torch.optim's last operation). They read the incoming updates and write them only
with ``moment_clip`` (the clipped gradient), so an optimizer hands them its gradients without a
copy, as torch.optim does (``writes_updates``).

The commit gate
    Each ``*_update`` takes ``gate`` (see :mod:`steadygrad.core.gate`): ``None`` commits; a 0-d
    tensor that is 0 leaves the state bit-for-bit unchanged. The updates are still computed; a
    caller that skips a step discards them.

Where eps goes
    torch.optim divides by ``sqrt(v) + eps``. TensorFlow, optax's ``adagrad``/``rmsprop`` and the
    d2l book divide by ``sqrt(v + eps)``. ``eps_in_sqrt=True`` selects the latter. The two differ
    visibly when ``v`` is small, i.e. early in training and for rarely active features.

Bias corrections and other per-tensor factors
    With step counters on the CPU (torch.optim's layout) they are Python floats, computed as
    torch.optim computes them; otherwise (counters on the device, or compiled) 0-d tensors that
    are never read on the host (:func:`~steadygrad.core.tensorlist.bias_correction`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..core.gate import advance_, clones, commit_select, ema_, ema_square_, select_
from ..core.tensorlist import (
    Scalar,
    add_scalar_,
    add_scalars_,
    addcmul_,
    bias_correction,
    copy_,
    host_scalar,
    host_steps,
    new_steps,
    per_element,
    zeros_like,
)
from ..core.transform import PLAIN, Quotient, Transform, apply_scale
from ..core.validate import check_betas, check_bool, check_range
from ..core.workspace import Scratch, compute_into
from .clipping.common import new_fraction
from .clipping.moment import moment_clip_

__all__ = [
    "ScaleByAdam",
    "ScaleByAdamState",
    "ScaleByRms",
    "ScaleByRmsState",
    "ScaleByRss",
    "ScaleByRssState",
    "adam_update",
    "rms_update",
    "rss_sparse_update_",
    "rss_update",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_rss",
]


def _denominator(v: list[Tensor], eps: Scalar, eps_in_sqrt: bool, scratch: Scratch | None = None) -> list[Tensor]:
    """A new list ``sqrt(v) + eps``, or ``sqrt(v + eps)`` with ``eps_in_sqrt`` (large tensors in
    ``scratch`` when given: :mod:`steadygrad.core.workspace`)."""
    if eps_in_sqrt:
        den = compute_into(
            scratch, lambda x, out: torch.add(x, eps, out=out), lambda xs: torch._foreach_add(xs, eps), v
        )
        torch._foreach_sqrt_(den)
    else:
        den = compute_into(scratch, torch.sqrt, torch._foreach_sqrt, v)
        add_scalar_(den, eps)
    return den


def _moment_clip_or_ema(
    grads: list[Tensor],
    v: list[Tensor],
    steps: list[Tensor],
    beta: Scalar,
    gate: Tensor | None,
    k: Scalar | None,
    scale: float = 1.0,
    shards: Any = None,
    sizes: Any = None,
    segments: Any = None,
) -> Tensor | None:
    """The second moment's EMA from the raw gradient (``scale · grads``); with ``k``, OpenAI Five's
    clipping of the gradient (in place) with this very moment, from the steps before this one
    (which needs the factor applied: ``scale`` must be 1)."""
    if k is None:
        ema_square_(v, grads, beta, gate, scale)
        return None
    if scale != 1:
        raise ValueError("moment_clip writes the gradients: apply the pending factor first")
    return moment_clip_(grads, v, steps, k=k, beta=beta, gate=gate, shards=shards, sizes=sizes, segments=segments)


# --------------------------------------------------------------------------------------------
# Adagrad
# --------------------------------------------------------------------------------------------


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the step counters and the sums of squared gradients."""

    step: list[Tensor]
    sum: list[Tensor]


def rss_update(
    grads: list[Tensor],
    sums: list[Tensor],
    steps: list[Tensor],
    *,
    eps: Scalar,
    lr_decay: Scalar,
    eps_in_sqrt: bool,
    gate: Tensor | None = None,
    scale: float = 1.0,
    scratch: Scratch | None = None,
    segments: Any = None,
) -> Quotient:
    """Adagrad's scaling: updates ``sums`` and ``steps`` in place, returns the updates.

    .. math::
        t \\leftarrow t + 1,\\quad s \\leftarrow s + g^2,\\quad
        u = \\frac{g}{(1 + (t-1)\\,\\text{lr\\_decay})\\,(\\sqrt{s} + \\epsilon)}

    ``scale``: the gradient is ``scale · grads`` (a clipping coefficient folded in, see
    :attr:`~steadygrad.core.transform.StepContext.scale`). ``scratch``: kept memory for the
    denominator (:mod:`steadygrad.core.workspace`). ``segments``: the counters are per-parameter
    tables (:attr:`~steadygrad.core.transform.StepContext.segments`).
    """
    advance_(steps, gate)
    if gate is None:
        addcmul_(sums, grads, grads, scale * scale)
    else:
        new = clones(sums)
        addcmul_(new, grads, grads, scale * scale)
        select_(sums, new, gate)
    den = _denominator(sums, eps, eps_in_sqrt, scratch)
    if not isinstance(lr_decay, Tensor) and lr_decay == 0:
        return Quotient(grads, den, scale)
    counts = None if isinstance(lr_decay, Tensor) else host_steps(steps)
    if counts is not None:
        return Quotient(grads, den, [scale / ((t - 1) * lr_decay + 1) for t in counts])
    factors = [scale / ((s.to(torch.float64) - 1) * lr_decay + 1) for s in steps]
    return Quotient(grads, den, per_element(factors, segments))


@torch.no_grad()
def rss_sparse_update_(
    param: Tensor,
    grad: Tensor,
    sums: Tensor,
    step: Tensor,
    *,
    lr: Scalar,
    lr_decay: Scalar,
    eps: Scalar,
    eps_in_sqrt: bool = False,
    maximize: bool = False,
) -> None:
    """Adagrad's step for one parameter with a sparse (COO) gradient, on the entries it holds:
    torch.optim.Adagrad's sparse rule, in place on ``param``, ``sums`` and ``step``.

    .. math::
        t \\leftarrow t + 1,\\quad s_I \\leftarrow s_I + g_I^2,\\quad
        p_I \\leftarrow p_I - \\frac{\\text{lr}}{1 + (t-1)\\,\\text{lr\\_decay}}
            \\cdot \\frac{g_I}{\\sqrt{s_I} + \\epsilon}

    over the indices ``I`` of the (coalesced) gradient; every other entry of ``s`` and ``p`` is
    untouched. ``eps_in_sqrt``: :math:`\\sqrt{s_I + \\epsilon}`. The learning rate is read on the
    host (as torch reads its CPU ``step``); no weight decay (torch refuses it with sparse
    gradients too).
    """
    step.add_(1)
    t = float(step)
    rate = float(lr) / (1 + (t - 1) * float(lr_decay))
    g = (grad.neg() if maximize else grad).coalesce()
    values = g._values()
    sums.add_(_like_sparse(g, values.pow(2)))
    rows = sums.sparse_mask(g)._values()
    den = rows.add(eps).sqrt_() if eps_in_sqrt else rows.sqrt().add_(eps)
    param.add_(_like_sparse(g, values / den), alpha=-rate)


def _like_sparse(g: Tensor, values: Tensor) -> Tensor:
    """A sparse tensor with the (coalesced) indices of ``g`` and these values; valid by
    construction, so torch's invariant checks are explicitly off (no per-call check, no warning)."""
    return torch.sparse_coo_tensor(g._indices(), values, g.shape, check_invariants=False, is_coalesced=True)


class _Scaling(Transform):
    """What the three scalings share: per element, new updates (they read the gradients they are
    given), computed as a :class:`Quotient` by ``update_pending``; ``update`` finishes it.

    A pending factor on the gradients (:attr:`~steadygrad.core.transform.StepContext.scale`, e.g.
    ``clip=sg.clip_by_norm(...)``'s coefficient) is folded into the arithmetic where that is
    exact and free: a number known on the host (a CPU tensor is read, as torch.optim reads its
    CPU ``step``) and number hyperparameters; the scaling then reads the unscaled
    gradients and no scaled copy exists. Otherwise the factor is applied first."""

    structure: ClassVar[str] = "elements"
    writes_updates: ClassVar[bool] = False
    fresh_updates: ClassVar[bool] = True
    takes_scale: ClassVar[bool] = True

    def update(self, updates, state, params=None, ctx=PLAIN):
        pending, state = self.update_pending(updates, state, params, ctx)
        return pending.materialize(), state

    def _fold(self, updates: list[Tensor], ctx: Any, foldable: bool, *hypers: Any) -> tuple[list[Tensor], Any, float]:
        """``(updates, ctx, s)``: the pending factor as a number ``s`` to fold in (1.0: none), or
        applied to the updates when it cannot be (``foldable`` false, a tensor hyperparameter, a
        factor that cannot be read without a device sync)."""
        if ctx.scale is None:
            return updates, ctx, 1.0
        value = host_scalar(ctx.scale)
        if value is not None and foldable and not any(isinstance(h, Tensor) for h in hypers):
            return updates, ctx.with_scale(None), float(value)
        updates, ctx = apply_scale(updates, ctx)
        return updates, ctx, 1.0


class _MomentClipped(_Scaling):
    """RMSprop's and Adam's ``moment_clip`` option (a field of the subclass): OpenAI Five's
    clipping against their own second moment, in place on the updates they are given."""

    moment_clip: Any

    @property
    def writes_updates(self) -> bool:  # type: ignore[override]
        return self.moment_clip is not None

    def _check_moment_clip(self) -> None:
        if self.moment_clip is not None:
            object.__setattr__(self, "moment_clip", check_range("moment_clip", self.moment_clip, low_open=True))


@dataclass(frozen=True)
class ScaleByRss(_Scaling):
    """Adagrad's scaling; see :func:`scale_by_rss`."""

    initial_accumulator_value: Any = 0.0
    eps: Any = 1e-10
    lr_decay: Any = 0.0
    eps_in_sqrt: bool = False

    def __post_init__(self) -> None:
        check_range("initial_accumulator_value", self.initial_accumulator_value)
        object.__setattr__(self, "eps", check_range("eps", self.eps, low_open=True))
        object.__setattr__(self, "lr_decay", check_range("lr_decay", self.lr_decay))
        check_bool("eps_in_sqrt", self.eps_in_sqrt)

    def init(self, params: Sequence[Tensor]) -> ScaleByRssState:
        return ScaleByRssState(step=new_steps(params), sum=zeros_like(params, float(self.initial_accumulator_value)))

    def update_pending(self, updates, state, params=None, ctx=PLAIN):
        eps, lr_decay = ctx.value(self.eps), ctx.value(self.lr_decay)
        updates, ctx, scale = self._fold(updates, ctx, True, eps, lr_decay)
        pending = rss_update(
            updates,
            state.sum,
            state.step,
            eps=eps,
            lr_decay=lr_decay,
            eps_in_sqrt=self.eps_in_sqrt,
            gate=ctx.gate,
            scale=scale,
            scratch=ctx.scratch,
            segments=ctx.segments,
        )
        return pending, state


def scale_by_rss(
    initial_accumulator_value: float = 0.0,
    eps: float | Tensor = 1e-10,
    lr_decay: float | Tensor = 0.0,
    eps_in_sqrt: bool = False,
) -> ScaleByRss:
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
    return ScaleByRss(initial_accumulator_value, eps, lr_decay, eps_in_sqrt)


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
    moment_clip_fraction: Tensor | None = None


def rms_update(
    grads: list[Tensor],
    square_avg: list[Tensor],
    grad_avg: list[Tensor] | None,
    steps: list[Tensor],
    *,
    alpha: Scalar,
    eps: Scalar,
    eps_in_sqrt: bool,
    gate: Tensor | None = None,
    moment_clip: Scalar | None = None,
    scale: float = 1.0,
    scratch: Scratch | None = None,
    shards: Any = None,
    sizes: Any = None,
    segments: Any = None,
) -> tuple[Quotient, Tensor | None]:
    """RMSProp's scaling: updates the state in place, returns the updates; centered iff
    ``grad_avg`` is given. ``scale``: the gradient is ``scale · grads`` (as for
    :func:`rss_update`; 1 with ``moment_clip``); ``scratch``: as for :func:`rss_update`; ``shards``:
    the local shards' layout, and ``sizes`` (:attr:`~steadygrad.core.transform.StepContext.sizes`),
    for ``moment_clip``'s statistic; ``segments``: the counters are per-parameter tables
    (:attr:`~steadygrad.core.transform.StepContext.segments`).

    .. math::
        v \\leftarrow \\alpha v + (1-\\alpha) g^2,\\quad
        \\bar g \\leftarrow \\alpha \\bar g + (1-\\alpha) g,\\quad
        u = \\frac{g}{\\sqrt{v - \\bar g^2} + \\epsilon}

    With ``moment_clip = k``, ``g`` is first clipped per element (in place) to ``±k·sqrt(v̂)``
    with ``v̂ = v / (1 − α^(t−1))`` from the steps before this one (the first step passes), ``v`` is
    updated from the *unclipped* ``g`` and ``ḡ`` and ``u`` use the clipped one
    (:func:`~steadygrad.transforms.clipping.moment.moment_clip_`).

    Returns:
        ``(updates, fraction)``: the fraction of elements clipped (``None`` without moment_clip).
    """
    fraction = _moment_clip_or_ema(grads, square_avg, steps, alpha, gate, moment_clip, scale, shards, sizes, segments)
    advance_(steps, gate)
    if grad_avg is not None:
        ema_(grad_avg, grads, alpha, gate, scale)
        v = compute_into(
            scratch,
            partial(torch.addcmul, value=-1),
            partial(torch._foreach_addcmul, value=-1),
            square_avg,
            grad_avg,
            grad_avg,
        )
        if eps_in_sqrt:
            add_scalar_(v, eps)
            torch._foreach_sqrt_(v)
        else:
            torch._foreach_sqrt_(v)
            add_scalar_(v, eps)
        den = v
    else:
        den = _denominator(square_avg, eps, eps_in_sqrt, scratch)
    return Quotient(grads, den, scale), fraction


@dataclass(frozen=True)
class ScaleByRms(_MomentClipped):
    """RMSProp's scaling; see :func:`scale_by_rms`."""

    alpha: Any = 0.99
    eps: Any = 1e-8
    centered: bool = False
    eps_in_sqrt: bool = False
    moment_clip: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_range("alpha", self.alpha, 0.0, 1.0))
        object.__setattr__(self, "eps", check_range("eps", self.eps, low_open=True))
        check_bool("centered", self.centered)
        check_bool("eps_in_sqrt", self.eps_in_sqrt)
        self._check_moment_clip()

    def init(self, params: Sequence[Tensor]) -> ScaleByRmsState:
        return ScaleByRmsState(
            step=new_steps(params),
            square_avg=zeros_like(params),
            grad_avg=zeros_like(params) if self.centered else None,
            moment_clip_fraction=None if self.moment_clip is None else new_fraction(params),
        )

    def update_pending(self, updates, state, params=None, ctx=PLAIN):
        if self.centered and state.grad_avg is None:
            raise ValueError("scale_by_rms(centered=True) got a state without grad_avg")
        alpha, eps, moment_clip = ctx.value(self.alpha), ctx.value(self.eps), ctx.value(self.moment_clip)
        updates, ctx, scale = self._fold(updates, ctx, moment_clip is None, alpha, eps)
        gate = ctx.gate
        pending, fraction = rms_update(
            updates,
            state.square_avg,
            state.grad_avg if self.centered else None,
            state.step,
            alpha=alpha,
            eps=eps,
            eps_in_sqrt=self.eps_in_sqrt,
            gate=gate,
            moment_clip=moment_clip,
            scale=scale,
            scratch=ctx.scratch,
            shards=ctx.shards,
            sizes=ctx.sizes,
            segments=ctx.segments,
        )
        if fraction is not None:
            state = state._replace(moment_clip_fraction=commit_select(gate, fraction, state.moment_clip_fraction))
        return pending, state


def scale_by_rms(
    alpha: float | Tensor = 0.99,
    eps: float | Tensor = 1e-8,
    centered: bool = False,
    eps_in_sqrt: bool = False,
    moment_clip: float | Tensor | None = None,
) -> ScaleByRms:
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
    update use the clipped gradient. The rule is :func:`steadygrad.transforms.clipping.moment.moment_clip_`, the one
    :func:`steadygrad.clip_by_moment` runs. The state then holds ``moment_clip_fraction``.

    Differences: equals ``torch.optim.RMSprop`` without momentum and lr (compose with
    :func:`trace` and :func:`scale_by_lr`). optax's ``scale_by_rms(decay, eps,
    eps_in_sqrt=True)`` is ``alpha=decay, eps_in_sqrt=True``; optax's ``scale_by_stddev`` is the
    centered form with eps inside the root. TensorFlow 1 starts ``v`` at 1; here it starts at 0
    as in torch and optax.
    """
    return ScaleByRms(alpha, eps, centered, eps_in_sqrt, moment_clip)


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
    moment_clip_fraction: Tensor | None = None


def _sqrt_of(values: list[Tensor], scratch: Scratch | list[Tensor] | None) -> list[Tensor]:
    """``sqrt(values)``: in a workspace's :class:`~steadygrad.core.workspace.Scratch`, in a list of
    tensors the step owns and no longer needs, or new."""
    if scratch is None or isinstance(scratch, Scratch):
        return compute_into(scratch, torch.sqrt, torch._foreach_sqrt, values)
    copy_(scratch, values)
    torch._foreach_sqrt_(scratch)
    return scratch


def _adam_quotient(
    exp_avg: list[Tensor],
    second: list[Tensor],
    bc1: list[Any],
    bc2: list[Any],
    eps: Scalar,
    eps_in_sqrt: bool,
    scratch: Scratch | list[Tensor] | None = None,
    segments: Any = None,
) -> Quotient:
    """Adam's update ``m/(1−β1^t) / (sqrt(v/(1−β2^t)) + eps)`` as the quotient
    ``sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + eps·sqrt(1−β2^t))``: the second bias correction moves
    into the numerator's factor, which saves a pass over ``v`` (with ``eps_in_sqrt``:
    ``1/(1−β1^t) · m / sqrt(v/(1−β2^t) + eps)``). The denominator goes into ``scratch`` if given.
    With ``segments`` the bias corrections are per-parameter tables, gathered per element once
    combined."""
    if eps_in_sqrt:
        den = compute_into(
            scratch if isinstance(scratch, Scratch) else None,
            torch.div,
            torch._foreach_div,
            second,
            per_element(bc2, segments),
        )
        add_scalar_(den, eps)
        torch._foreach_sqrt_(den)
        return Quotient(exp_avg, den, per_element([1 / b1 for b1 in bc1], segments))
    if not bc1 or isinstance(bc1[0], float):
        roots = [math.sqrt(b2) for b2 in bc2]
    else:
        roots = [b2.sqrt() for b2 in bc2]
    den = _sqrt_of(second, scratch)
    add_scalars_(den, per_element([eps * r for r in roots], segments))
    return Quotient(exp_avg, den, per_element([r / b1 for r, b1 in zip(roots, bc1)], segments))


def adam_update(
    grads: list[Tensor],
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
    scratch: Scratch | list[Tensor] | None = None,
    scale: float = 1.0,
    shards: Any = None,
    sizes: Any = None,
    segments: Any = None,
) -> tuple[Quotient, Tensor | None]:
    """Adam's scaling: updates the state in place, returns the updates; amsgrad iff
    ``max_exp_avg_sq`` is given. ``scratch``: where the denominator goes, a workspace's
    :class:`~steadygrad.core.workspace.Scratch` or tensors the caller owns and no longer needs once
    the moments are updated (``grads`` themselves), else new tensors. ``scale``: the gradient is
    ``scale · grads`` (as for :func:`rss_update`; 1 with ``moment_clip``); ``shards`` as for
    :func:`rms_update`, and ``sizes`` and ``segments``.

    .. math::
        m \\leftarrow \\beta_1 m + (1-\\beta_1) g,\\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2,\\quad
        u = \\frac{m / (1-\\beta_1^t)}{\\sqrt{v / (1-\\beta_2^t)} + \\epsilon}

    With ``moment_clip = k``, ``g`` is clipped per element (in place) to ``±k·sqrt(v̂)`` with
    ``v̂ = v / (1 − β2^(t−1))`` from the steps before this one (the first step passes); ``v`` is
    updated from the *unclipped* ``g`` and ``m`` from the clipped one
    (:func:`~steadygrad.transforms.clipping.moment.moment_clip_`).

    Returns:
        ``(updates, fraction)``: the fraction of elements clipped (``None`` without moment_clip).
    """
    # This step's bias corrections (t = count + 1) from the counters before they advance: no
    # scalar op then waits for the advance, and compiled, all the element-wise work is one loop.
    # (Under a closed commit gate the counters stay, and the discarded updates use t = count + 1.)
    bc1 = bias_correction(beta1, steps, offset=-1)
    bc2 = bias_correction(beta2, steps, offset=-1)
    fraction = _moment_clip_or_ema(grads, exp_avg_sq, steps, beta2, gate, moment_clip, scale, shards, sizes, segments)
    advance_(steps, gate)
    ema_(exp_avg, grads, beta1, gate, scale)
    if max_exp_avg_sq is not None:
        torch._foreach_maximum_(max_exp_avg_sq, exp_avg_sq)
        second = max_exp_avg_sq
    else:
        second = exp_avg_sq
    return _adam_quotient(exp_avg, second, bc1, bc2, eps, eps_in_sqrt, scratch, segments), fraction


@dataclass(frozen=True)
class ScaleByAdam(_MomentClipped):
    """Adam's scaling; see :func:`scale_by_adam`."""

    betas: Any = (0.9, 0.999)
    eps: Any = 1e-8
    amsgrad: bool = False
    eps_in_sqrt: bool = False
    moment_clip: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", check_betas(self.betas))
        object.__setattr__(self, "eps", check_range("eps", self.eps, low_open=True))
        check_bool("amsgrad", self.amsgrad)
        check_bool("eps_in_sqrt", self.eps_in_sqrt)
        self._check_moment_clip()

    def init(self, params: Sequence[Tensor]) -> ScaleByAdamState:
        return ScaleByAdamState(
            step=new_steps(params),
            exp_avg=zeros_like(params),
            exp_avg_sq=zeros_like(params),
            max_exp_avg_sq=zeros_like(params) if self.amsgrad else None,
            moment_clip_fraction=None if self.moment_clip is None else new_fraction(params),
        )

    def update_pending(self, updates, state, params=None, ctx=PLAIN):
        if self.amsgrad and state.max_exp_avg_sq is None:
            raise ValueError("scale_by_adam(amsgrad=True) got a state without max_exp_avg_sq")
        beta1, beta2 = ctx.value(self.betas)
        eps, moment_clip = ctx.value(self.eps), ctx.value(self.moment_clip)
        updates, ctx, scale = self._fold(updates, ctx, moment_clip is None, beta1, beta2, eps)
        gate = ctx.gate
        pending, fraction = adam_update(
            updates,
            state.exp_avg,
            state.exp_avg_sq,
            state.max_exp_avg_sq if self.amsgrad else None,
            state.step,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            eps_in_sqrt=self.eps_in_sqrt,
            gate=gate,
            moment_clip=moment_clip,
            scratch=ctx.scratch if ctx.scratch is not None else updates if _reuse(updates, ctx) else None,
            scale=scale,
            shards=ctx.shards,
            sizes=ctx.sizes,
            segments=ctx.segments,
        )
        if fraction is not None:
            state = state._replace(moment_clip_fraction=commit_select(gate, fraction, state.moment_clip_fraction))
        return pending, state


def _reuse(updates: list[Tensor], ctx: Any) -> bool:
    """Whether to compute in the incoming updates once they are dead: on the CPU, when the step
    owns them. A new parameter-sized buffer costs page faults there at every step (the allocator
    returns large blocks to the system), more than the copy into the old one; an accelerator's
    caching allocator makes the new buffer free, and compiled, the buffer never exists."""
    return ctx.writable and bool(updates) and updates[0].device.type == "cpu" and not torch.compiler.is_compiling()


def scale_by_adam(
    betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
    eps: float | Tensor = 1e-8,
    amsgrad: bool = False,
    eps_in_sqrt: bool = False,
    moment_clip: float | Tensor | None = None,
) -> ScaleByAdam:
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
    amsgrad the limit still uses ``v``, not its maximum. The rule is
    :func:`steadygrad.transforms.clipping.moment.moment_clip_`, the one :func:`steadygrad.clip_by_moment`
    runs. The state then holds ``moment_clip_fraction``. See :func:`steadygrad.clip_by_moment` for the rule
    with its own ``v``.

    Differences: equals ``torch.optim.Adam`` without lr and weight decay. optax's
    ``scale_by_adam(b1, b2, eps, eps_root)`` equals this with ``eps_in_sqrt=False`` and
    ``eps_root=0``, or with ``eps_in_sqrt=True`` when optax's ``eps=0, eps_root=eps``. optax's
    ``scale_by_amsgrad`` keeps the maximum of the *bias-corrected* second moment, torch (and this
    transform) the maximum of the raw one; the two differ while the bias correction changes.
    """
    return ScaleByAdam(betas, eps, amsgrad, eps_in_sqrt, moment_clip)
