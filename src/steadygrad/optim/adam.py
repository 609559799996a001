"""Adam and AdamW as drop-ins for ``torch.optim.Adam`` and ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from ..core.transform import Hyper, Transform, chain
from ..core.validate import Betas, Flag, Optional, Range, check_betas
from ..transforms.adaptive import ScaleByAdam
from ..transforms.basic import AddDecayedWeights, ScaleByLr
from .base import ParamsT, TransformOptimizer, hyper_or_zero

__all__ = ["Adam", "AdamW"]


class Adam(TransformOptimizer):
    """Adam (Kingma and Ba, 2015) with torch.optim's signature, defaults and state.

    .. math::
        m \\leftarrow \\beta_1 m + (1-\\beta_1) g,\\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2,\\quad
        p \\leftarrow p - \\text{lr}\\cdot\\frac{m/(1-\\beta_1^t)}{\\sqrt{v/(1-\\beta_2^t)} + \\epsilon}

    Weight decay is L2 (``g ← g + λp``, the chain ``add_decayed_weights → scale_by_adam →
    scale_by_lr``), or decoupled with ``decoupled_weight_decay=True`` (``p ← p·(1 − lr·λ)``, the
    chain ``scale_by_adam → add_decayed_weights → scale_by_lr``), which is :class:`AdamW`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (number or 1-element tensor), ``>= 0``. A tensor works on every path
            (torch refuses it with ``foreach=True`` unless capturable).
        betas: ``(beta1, beta2)``, numbers or 1-element tensors, each in ``[0, 1)``.
        eps: ``> 0`` (torch accepts 0, which gives 0/0 = NaN for a zero gradient).
        weight_decay: ``>= 0``.
        amsgrad: use the running maximum of ``v`` (Reddi et al., 2018), as torch.
        foreach: accepted for compatibility; the list implementation is always used.
        maximize: ascend instead of descend.
        capturable: keep the step counters on the parameters' device (CUDA graphs).
        differentiable: record the step for autograd (higher-order gradients through it; see
            :class:`~steadygrad.optim.TransformOptimizer`); not with ``fused`` or ``clip``.
        fused: ``True`` compiles the step over flat buffers (:mod:`steadygrad.kernels.fused`).
        decoupled_weight_decay: AdamW's weight decay.
        eps_in_sqrt: denominator ``sqrt(v/(1-β2^t) + eps)`` (optax's ``eps_root``).
        clip: a clipping transform applied to the gradients (of all groups together) before the
            update, e.g. ``sg.clip_by_norm(1.0)`` or ``sg.clip_by_moment(k=5)`` (with its own
            second moment); see :class:`~steadygrad.optim.TransformOptimizer`.
        moment_clip: ``k > 0`` clips each gradient element to ``±k·sqrt(v̂)`` with Adam's own
            ``exp_avg_sq`` as the second moment, fed by the unclipped gradient (OpenAI Five's
            setting; see :func:`steadygrad.scale_by_adam`). No extra memory. The fraction clipped at
            the last step is in ``opt.shared_state()["group<i>"]["moment_clip_fraction"]``.
        nonfinite: a step with an inf/NaN gradient: ``"ignore"`` (torch's behaviour: it goes
            through), ``"skip"`` (parameters, state, step counters and ``clip=``'s state stay
            bit-identical; decided on the device, no host sync) or ``"raise"`` (``RuntimeError``
            naming the parameter; one host read per step). See
            :class:`~steadygrad.optim.TransformOptimizer`.
    """

    HYPERPARAMETERS = {
        "lr": Range(),
        "betas": Betas(),
        "eps": Range(low_open=True),
        "weight_decay": Range(),
        "amsgrad": Flag(),
        "maximize": Flag(),
        "capturable": Flag(),
        "decoupled_weight_decay": Flag(),
        "eps_in_sqrt": Flag(),
        "moment_clip": Optional(Range(low_open=True)),
    }
    EXTRAS = {"eps_in_sqrt": False, "moment_clip": None}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        eps_in_sqrt: bool = False,
        clip: Transform | None = None,
        moment_clip: float | None = None,
        nonfinite: Literal["ignore", "skip", "raise"] = "ignore",
    ) -> None:
        betas = check_betas(betas)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            eps_in_sqrt=eps_in_sqrt,
            moment_clip=moment_clip,
        )
        super().__init__(params, defaults, clip=clip, nonfinite=nonfinite)

    def build_transform(self, group: Mapping[str, Any]) -> Transform:
        adam = ScaleByAdam(
            Hyper("betas"),
            Hyper("eps"),
            group["amsgrad"],
            self.option(group, "eps_in_sqrt"),
            None if self.option(group, "moment_clip") is None else Hyper("moment_clip"),
        )
        wd = hyper_or_zero(group, "weight_decay")
        decay = [AddDecayedWeights(wd)] if wd else []
        if group["decoupled_weight_decay"]:
            return chain(adam, *decay, ScaleByLr())
        return chain(*decay, adam, ScaleByLr())


class AdamW(Adam):
    """AdamW (Loshchilov and Hutter, 2019): :class:`Adam` with decoupled weight decay, default
    ``weight_decay=1e-2``, with ``torch.optim.AdamW``'s signature, defaults and state.

    .. math::
        p \\leftarrow p\\,(1 - \\text{lr}\\cdot\\lambda)
            - \\text{lr}\\cdot\\frac{m/(1-\\beta_1^t)}{\\sqrt{v/(1-\\beta_2^t)} + \\epsilon}
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        eps_in_sqrt: bool = False,
        clip: Transform | None = None,
        moment_clip: float | None = None,
        nonfinite: Literal["ignore", "skip", "raise"] = "ignore",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            eps_in_sqrt=eps_in_sqrt,
            clip=clip,
            moment_clip=moment_clip,
            nonfinite=nonfinite,
        )

    def _complete_group(self, group: dict[str, Any]) -> None:
        super()._complete_group(group)
        group["decoupled_weight_decay"] = True
