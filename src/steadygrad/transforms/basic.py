"""The small transforms every optimizer is built from: momentum, weight decay and step size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..core.gate import clones, select_
from ..core.tensorlist import copy_, mul_scalar_, zeros_like
from ..core.transform import PLAIN, Dense, EmptyState, Hyper, Transform
from ..core.validate import check_bool, check_range

__all__ = [
    "AddDecayedWeights",
    "Scale",
    "ScaleByLr",
    "Trace",
    "TraceState",
    "add_decayed_weights",
    "scale",
    "scale_by_lr",
    "trace",
]


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer of each parameter."""

    momentum_buffer: list[Tensor]


@dataclass(frozen=True)
class Trace(Transform):
    """Heavy-ball momentum; see :func:`trace`."""

    momentum: Any
    nesterov: bool = False
    structure: ClassVar[str] = "elements"

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", check_range("momentum", self.momentum, 0.0, 1.0))
        check_bool("nesterov", self.nesterov)

    def init(self, params: Sequence[Tensor]) -> TraceState:
        return TraceState(momentum_buffer=zeros_like(params))

    def _advance(self, updates: list[Tensor], state: TraceState, ctx: Any) -> tuple[list[Tensor], Any]:
        momentum = ctx.value(self.momentum)
        buf = state.momentum_buffer
        if ctx.gate is None:
            mul_scalar_(buf, momentum)
            torch._foreach_add_(buf, updates)
        else:
            new = clones(buf)
            mul_scalar_(new, momentum)
            torch._foreach_add_(new, updates)
            select_(buf, new, ctx.gate)
        return buf, momentum

    def update(self, updates, state, params=None, ctx=PLAIN):
        buf, momentum = self._advance(updates, state, ctx)
        if self.nesterov:
            torch._foreach_add_(updates, torch._foreach_mul(buf, momentum))
        else:
            copy_(updates, buf)
        return updates, state

    def update_pending(self, updates, state, params=None, ctx=PLAIN):
        if self.nesterov:
            return super().update_pending(updates, state, params, ctx)
        buf, _ = self._advance(updates, state, ctx)
        return Dense(list(buf)), state  # read-only: added to the parameters, no copy


def trace(momentum: float | Tensor | Hyper, nesterov: bool = False) -> Trace:
    """Heavy-ball momentum (Polyak, 1964), optionally Nesterov's (Sutskever et al., 2013).

    .. math::
        b_t = \\mu\\, b_{t-1} + u_t,\\qquad
        u'_t = b_t \\;\\text{or, with nesterov,}\\; u'_t = u_t + \\mu\\, b_t

    ``b`` starts at zero, so the first step gives ``b_1 = u_1`` as torch's SGD (without
    dampening) and RMSprop do. Equals optax's ``trace(decay=momentum, nesterov=nesterov)``.
    Under a closed commit gate ``b`` stays unchanged.

    Args:
        momentum: ``μ`` in ``[0, 1)``.
        nesterov: Nesterov's variant.
    """
    return Trace(momentum, nesterov)


@dataclass(frozen=True)
class AddDecayedWeights(Transform):
    """``u ← u + λ·p``; see :func:`add_decayed_weights`."""

    weight_decay: Any
    structure: ClassVar[str] = "elements"
    writes_updates: ClassVar[bool] = False  # out of place when the updates are not writable

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_decay", check_range("weight_decay", self.weight_decay))

    def init(self, params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(self, updates, state, params=None, ctx=PLAIN):
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters: update(updates, state, params)")
        weight_decay = ctx.value(self.weight_decay)
        if isinstance(weight_decay, Tensor):
            decay = torch._foreach_mul(list(params), weight_decay)
            if not ctx.writable:
                return torch._foreach_add(updates, decay), state
            torch._foreach_add_(updates, decay)
        elif weight_decay != 0:
            if not ctx.writable:  # torch's coupled weight decay: g + λp, the gradients untouched
                return torch._foreach_add(updates, list(params), alpha=weight_decay), state
            torch._foreach_add_(updates, list(params), alpha=weight_decay)
        return updates, state

    def linear(self, ctx=PLAIN):
        return 1.0, ctx.value(self.weight_decay)


def add_decayed_weights(weight_decay: float | Tensor | Hyper) -> AddDecayedWeights:
    """Adds ``weight_decay · p`` to the updates: :math:`u \\leftarrow u + \\lambda p`.

    Where it stands in a chain decides the kind of weight decay:

    * before the adaptive scaling it is L2 regularisation ("coupled", torch's ``weight_decay`` of
      Adagrad, RMSprop and Adam): ``chain(add_decayed_weights(wd), scale_by_adam(), scale_by_lr())``;
    * after it, right before :func:`scale_by_lr`, it is decoupled weight decay (Loshchilov and
      Hutter, 2019; torch's AdamW, ``p ← p·(1 − lr·λ)``):
      ``chain(scale_by_adam(), add_decayed_weights(wd), scale_by_lr())``.

    Needs ``params`` in ``update``. Equals optax's ``add_decayed_weights``.

    Args:
        weight_decay: ``λ >= 0``.
    """
    return AddDecayedWeights(weight_decay)


@dataclass(frozen=True)
class Scale(Transform):
    """``u ← c·u``; see :func:`scale`."""

    factor: Any
    structure: ClassVar[str] = "elements"

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", check_range("factor", self.factor, -float("inf")))

    def init(self, params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(self, updates, state, params=None, ctx=PLAIN):
        mul_scalar_(updates, ctx.value(self.factor))
        return updates, state

    def linear(self, ctx=PLAIN):
        return ctx.value(self.factor), 0.0


def scale(factor: float | Tensor | Hyper) -> Scale:
    """Multiplies the updates by a constant: :math:`u \\leftarrow c\\,u` (``c`` finite)."""
    return Scale(factor)


@dataclass(frozen=True)
class ScaleByLr(Transform):
    """The descent step ``u ← −lr·u``; see :func:`scale_by_lr`."""

    lr: Any = Hyper("lr")
    structure: ClassVar[str] = "elements"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", check_range("lr", self.lr))

    def init(self, params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(self, updates, state, params=None, ctx=PLAIN):
        mul_scalar_(updates, -ctx.value(self.lr))
        return updates, state

    def linear(self, ctx=PLAIN):
        return -ctx.value(self.lr), 0.0


def scale_by_lr(lr: float | Tensor | Hyper | None = None) -> ScaleByLr:
    """The descent step: :math:`u \\leftarrow -\\text{lr}\\cdot u`.

    Args:
        lr: a number or 0-d tensor ``>= 0``; ``None`` (the default) is ``Hyper("lr")``: the ``lr``
            of the optimizer's parameter group, read at every step, so LR schedulers and
            ``param_groups`` edits take effect as in torch.optim.

    Equals optax's ``scale_by_learning_rate(lr)`` (which also flips the sign).
    """
    return ScaleByLr(Hyper("lr") if lr is None else lr)
