"""RMSprop as a drop-in for ``torch.optim.RMSprop``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from ..core.transform import Hyper, Transform, chain
from ..core.validate import Flag, Optional, Range
from ..transforms.adaptive import ScaleByRms
from ..transforms.basic import AddDecayedWeights, ScaleByLr, Trace
from .base import ParamsT, TransformOptimizer, hyper_or_zero

__all__ = ["RMSprop"]


class RMSprop(TransformOptimizer):
    """RMSProp (Hinton, 2012; centered: Graves, 2013) with torch.optim's signature, defaults and state.

    .. math::
        g \\leftarrow g + \\lambda p,\\quad v \\leftarrow \\alpha v + (1-\\alpha) g^2,\\quad
        d = \\frac{g}{\\sqrt{v - \\bar g^2} + \\epsilon},\\quad
        b \\leftarrow \\mu b + d,\\quad p \\leftarrow p - \\text{lr}\\cdot b

    (:math:`\\bar g = 0` unless centered; without momentum :math:`p \\leftarrow p - \\text{lr}\\cdot d`.)
    The chain is ``add_decayed_weights → scale_by_rms → trace(momentum) → scale_by_lr``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (number or 1-element tensor), ``>= 0``.
        alpha: smoothing constant in ``[0, 1)`` (torch accepts ``alpha > 1``, which makes ``v``
            negative and the parameters NaN).
        eps: ``> 0``.
        weight_decay: L2 penalty, ``>= 0``.
        momentum: in ``[0, 1)``.
        centered: normalise by the estimated variance instead of the second moment.
        capturable: keep the step counters on the parameters' device (CUDA graphs).
        foreach: accepted for compatibility; the list implementation is always used.
        maximize: ascend instead of descend.
        differentiable: record the step for autograd (higher-order gradients through it; see
            :class:`~steadygrad.optim.TransformOptimizer`); not with ``fused`` or ``clip``.
        eps_in_sqrt: denominator ``sqrt(v - ḡ² + eps)`` (TensorFlow, optax, d2l).
        clip: a clipping transform applied to the gradients (of all groups together) before the
            update, e.g. ``sg.clip_by_norm(1.0)``; see :class:`~steadygrad.optim.TransformOptimizer`.
        moment_clip: ``k > 0`` clips each gradient element to ``±k·sqrt(v̂)`` with RMSprop's own
            ``square_avg`` as the second moment (OpenAI Five's rule; bias-corrected, fed by the
            unclipped gradient; see :func:`steadygrad.scale_by_rms`). No extra memory. The fraction
            clipped at the last step is in ``opt.shared_state()["group<i>"]["moment_clip_fraction"]``.
        fused: ``True`` compiles the step over flat buffers (:mod:`steadygrad.kernels.fused`);
            torch's RMSprop has no fused path.
        nonfinite: a step with an inf/NaN gradient: ``"ignore"`` (torch's behaviour: it goes
            through), ``"skip"`` (parameters, state, step counters and ``clip=``'s state stay
            bit-identical; decided on the device, no host sync) or ``"raise"`` (``RuntimeError``
            naming the parameter; one host read per step). See
            :class:`~steadygrad.optim.TransformOptimizer`.
    """

    HYPERPARAMETERS = {
        "lr": Range(),
        "alpha": Range(0.0, 1.0),
        "eps": Range(low_open=True),
        "weight_decay": Range(),
        "momentum": Range(0.0, 1.0),
        "centered": Flag(),
        "capturable": Flag(),
        "maximize": Flag(),
        "eps_in_sqrt": Flag(),
        "moment_clip": Optional(Range(low_open=True)),
    }
    EXTRAS = {"eps_in_sqrt": False, "moment_clip": None, "fused": None}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        eps_in_sqrt: bool = False,
        clip: Transform | None = None,
        moment_clip: float | None = None,
        nonfinite: Literal["ignore", "skip", "raise"] = "ignore",
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            eps_in_sqrt=eps_in_sqrt,
            moment_clip=moment_clip,
            fused=fused,
        )
        super().__init__(params, defaults, clip=clip, nonfinite=nonfinite)

    def build_transform(self, group: Mapping[str, Any]) -> Transform:
        decay = hyper_or_zero(group, "weight_decay")
        momentum = hyper_or_zero(group, "momentum")
        rms = ScaleByRms(
            Hyper("alpha"),
            Hyper("eps"),
            group["centered"],
            self.option(group, "eps_in_sqrt"),
            None if self.option(group, "moment_clip") is None else Hyper("moment_clip"),
        )
        return chain(
            *([AddDecayedWeights(decay)] if decay else []),
            rms,
            *([Trace(momentum)] if momentum else []),
            ScaleByLr(),
        )
