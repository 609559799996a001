"""The small transforms every optimizer is built from: momentum, weight decay and step size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.tensorlist import Scalar, gate_ema_per_tensor, gate_open_per_tensor, zeros_like
from ..core.transform import EmptyState, Transform, commit_gate, group_hyperparameter

__all__ = ["TraceState", "add_decayed_weights", "scale", "scale_by_lr", "trace"]


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer of each parameter."""

    momentum_buffer: list[Tensor]


def trace(momentum: Scalar, nesterov: bool = False) -> Transform:
    """Heavy-ball momentum (Polyak, 1964), optionally Nesterov's (Sutskever et al., 2013).

    .. math::
        b_t = \\mu\\, b_{t-1} + u_t,\\qquad
        u'_t = b_t \\;\\text{or, with nesterov,}\\; u'_t = u_t + \\mu\\, b_t

    ``b`` starts at zero, so the first step gives ``b_1 = u_1`` as torch's SGD (without
    dampening) and RMSprop do. Equals optax's ``trace(decay=momentum, nesterov=nesterov)``.
    Under a closed commit gate ``b`` stays unchanged.
    """

    def init(params: Sequence[Tensor]) -> TraceState:
        return TraceState(momentum_buffer=zeros_like(params))

    def update(updates, state, params=None):
        buf = state.momentum_buffer
        gate = commit_gate()
        torch._foreach_mul_(buf, gate_ema_per_tensor(momentum, gate, buf)[0])
        torch._foreach_add_(
            buf, updates if gate is None else torch._foreach_mul(updates, gate_open_per_tensor(gate, buf))
        )
        if nesterov:
            torch._foreach_add_(updates, torch._foreach_mul(buf, momentum))
        else:
            torch._foreach_copy_(updates, buf)
        return updates, state

    return Transform(init, update, "elements")


def add_decayed_weights(weight_decay: Scalar) -> Transform:
    """Adds ``weight_decay · p`` to the updates: :math:`u \\leftarrow u + \\lambda p`.

    Where it stands in a chain decides the kind of weight decay:

    * before the adaptive scaling it is L2 regularisation ("coupled", torch's ``weight_decay`` of
      Adagrad, RMSprop and Adam): ``chain(add_decayed_weights(wd), scale_by_adam(), scale_by_lr())``;
    * after it, right before :func:`scale_by_lr`, it is decoupled weight decay (Loshchilov and
      Hutter, 2019; torch's AdamW, ``p ← p·(1 − lr·λ)``):
      ``chain(scale_by_adam(), add_decayed_weights(wd), scale_by_lr())``.

    Needs ``params`` in ``update``. Equals optax's ``add_decayed_weights``.
    """

    def init(params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters: update(updates, state, params)")
        if isinstance(weight_decay, Tensor):
            torch._foreach_add_(updates, torch._foreach_mul(list(params), weight_decay))
        elif weight_decay != 0:
            torch._foreach_add_(updates, list(params), alpha=weight_decay)
        return updates, state

    return Transform(init, update, "elements")


def scale(factor: Scalar) -> Transform:
    """Multiplies the updates by a constant: :math:`u \\leftarrow c\\,u`."""

    def init(params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(updates, state, params=None):
        torch._foreach_mul_(updates, factor)
        return updates, state

    return Transform(init, update, "elements")


def scale_by_lr(lr: Scalar | None = None) -> Transform:
    """The descent step: :math:`u \\leftarrow -\\text{lr}\\cdot u`.

    Args:
        lr: a number or 0-d tensor; ``None`` (the default) reads ``lr`` from the optimizer's
            parameter group at every step, so LR schedulers and ``param_groups`` edits take
            effect as in torch.optim.

    Equals optax's ``scale_by_learning_rate(lr)`` (which also flips the sign).
    """

    def init(params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(updates, state, params=None):
        rate = group_hyperparameter("lr") if lr is None else lr
        torch._foreach_mul_(updates, -rate)
        return updates, state

    return Transform(init, update, "elements")
