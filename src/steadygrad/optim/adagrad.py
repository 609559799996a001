"""Adagrad as a drop-in for ``torch.optim.Adagrad``."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

from torch import Tensor

from ..core.state import Replicated
from ..core.transform import Hyper, Transform, chain
from ..core.validate import Flag, Range
from ..transforms.adaptive import ScaleByRss, rss_sparse_update_
from ..transforms.basic import AddDecayedWeights, ScaleByLr
from .base import ParamsT, TransformOptimizer, hyper_or_zero

__all__ = ["Adagrad", "adagrad_sparse_step"]


def adagrad_sparse_step(group: Mapping[str, Any], params: list[Tensor], state: MutableMapping[Any, dict]) -> None:
    """Adagrad's step for parameters with sparse gradients (``nn.Embedding(sparse=True)``), as
    torch's: only the rows the gradient holds change (:func:`~steadygrad.transforms.adaptive.rss_sparse_update_`).

    Raises:
        RuntimeError: the group has ``weight_decay != 0`` (torch's error: a decayed gradient is dense).
    """
    if group["weight_decay"] != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    for p in params:
        entry = state[p]
        rss_sparse_update_(
            p,
            p.grad,
            entry["sum"],
            entry["step"],
            lr=group["lr"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            eps_in_sqrt=bool(group.get("eps_in_sqrt", False)),
            maximize=bool(group["maximize"]),
        )


class Adagrad(TransformOptimizer):
    """Adagrad (Duchi, Hazan and Singer, 2011) with torch.optim's signature, defaults and state.

    .. math::
        g \\leftarrow g + \\lambda p,\\quad s \\leftarrow s + g^2,\\quad
        p \\leftarrow p - \\frac{\\text{lr}}{1 + (t-1)\\,\\text{lr\\_decay}}
            \\cdot \\frac{g}{\\sqrt{s} + \\epsilon}

    The chain is ``add_decayed_weights(weight_decay) → scale_by_rss → scale_by_lr``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (number or 1-element tensor), ``>= 0``.
        lr_decay: ``>= 0``.
        weight_decay: L2 penalty, ``>= 0``.
        initial_accumulator_value: starting value of ``s``, ``>= 0``.
        eps: ``> 0`` (torch accepts 0, which divides 0 by 0 for a zero gradient).
        foreach: accepted for compatibility; the list implementation is always used.
        maximize: ascend instead of descend.
        differentiable: record the step for autograd (higher-order gradients through it; see
            :class:`~steadygrad.optim.TransformOptimizer`); not with ``fused`` or ``clip``.
        fused: ``True`` compiles the step over flat buffers (:mod:`steadygrad.kernels.fused`).
        eps_in_sqrt: denominator ``sqrt(s + eps)`` (TensorFlow, optax, d2l).
        clip: a clipping transform applied to the gradients (of all groups together) before the
            update, e.g. ``sg.clip_by_norm(1.0)``; see :class:`~steadygrad.optim.TransformOptimizer`.
        nonfinite: a step with an inf/NaN gradient: ``"ignore"`` (torch's behaviour: it goes
            through), ``"skip"`` (parameters, state, step counters and ``clip=``'s state stay
            bit-identical; decided on the device, no host sync) or ``"raise"`` (``RuntimeError``
            naming the parameter; one host read per step). See
            :class:`~steadygrad.optim.TransformOptimizer`.

    Sparse gradients (``nn.Embedding(sparse=True)``) are stepped as torch steps them: only the rows
    they hold change (:func:`adagrad_sparse_step`; no ``weight_decay``, ``clip=`` or
    ``nonfinite='skip'/'raise'`` with them; ``fused=True`` hands them to this reference rule).

    Differences from torch: NaN or out-of-range hyperparameters and ``eps <= 0`` raise
    ``ValueError``. State is created for every parameter at construction, as torch does for
    Adagrad.
    """

    HYPERPARAMETERS = {
        "lr": Range(),
        "lr_decay": Range(),
        "weight_decay": Range(),
        "initial_accumulator_value": Range(),
        "eps": Range(low_open=True),
        "maximize": Flag(),
        "eps_in_sqrt": Flag(),
    }
    EXTRAS = {"eps_in_sqrt": False}
    INIT_OPTIONS = ("initial_accumulator_value",)
    SPARSE_STEP = staticmethod(adagrad_sparse_step)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        eps_in_sqrt: bool = False,
        clip: Transform | None = None,
        nonfinite: Literal["ignore", "skip", "raise"] = "ignore",
    ) -> None:
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            eps=eps,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
            eps_in_sqrt=eps_in_sqrt,
        )
        super().__init__(params, defaults, clip=clip, nonfinite=nonfinite)
        # torch creates Adagrad's state for every parameter at construction.
        for g, group in zip(self.program().groups, self.param_groups):
            g.layout.ensure(self.state, group["params"], Replicated(self.state, group["params"]))

    def build_transform(self, group: Mapping[str, Any]) -> Transform:
        decay = hyper_or_zero(group, "weight_decay")
        rss = ScaleByRss(
            group["initial_accumulator_value"],
            Hyper("eps"),
            hyper_or_zero(group, "lr_decay"),
            self.option(group, "eps_in_sqrt"),
        )
        return chain(*([AddDecayedWeights(decay)] if decay else []), rss, ScaleByLr())
