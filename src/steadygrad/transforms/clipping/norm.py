"""Clipping by p-norm, global or per tensor: torch's ``clip_grad_norm_`` rule as a transform."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.gate import commit_select
from ...core.norms import check_norm_type, clip_coefficient, scale_, scaled, tensor_norms, total_norm
from ...core.tensorlist import Scalar
from ...core.transform import PLAIN, Transform
from ...core.validate import check_range
from .common import ClipState, fraction_of, new_fraction

__all__ = ["SCOPES", "ClipByNorm", "clip_by_norm", "clip_to_limit", "global_coefficient", "norm_clip_update"]

SCOPES = ("global", "tensor")


def norm_clip_update(
    updates: list[Tensor],
    *,
    max_norm: Scalar,
    norm_type: float = 2.0,
    scope: str = "global",
    norm: Tensor | None = None,
    inplace: bool = True,
    shards: Any = None,
) -> tuple[list[Tensor], Tensor]:
    """Clipping by p-norm: torch's ``clip_grad_norm_`` rule.

    .. math::
        n = \\|u\\|_p,\\qquad c = \\min\\Big(1, \\frac{\\text{max\\_norm}}{n + 10^{-6}}\\Big),
        \\qquad u \\leftarrow c\\,u

    with ``n`` the norm of all updates together (``scope="global"``) or of each tensor alone
    (``scope="tensor"``). Norms and coefficients are computed in float32 or wider
    (:mod:`steadygrad.core.norms`); float16/bfloat16 updates are scaled in float32.

    Args:
        norm: ``scope="global"`` only: the global norm if the caller already has it, else it is
            computed here.
        inplace: scale ``updates`` in place (else return scaled copies; ``scope="global"``).
        shards: ``updates`` are local shards of DTensors laid out so
            (:attr:`~steadygrad.core.transform.StepContext.shards`): the norms are of the whole
            tensors.

    Returns:
        ``(updates, fraction)``: the fraction of norms (1 for global) whose coefficient is
        below 1.
    """
    if scope == "global":
        coef, fraction = global_coefficient(updates, max_norm=max_norm, norm_type=norm_type, norm=norm, shards=shards)
        if not inplace:
            updates = scaled(updates, coef)
        else:
            scale_(updates, coef)
        return updates, fraction
    if scope != "tensor":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    coefs = [clip_coefficient(n, max_norm) for n in tensor_norms(updates, norm_type, shards=shards)]
    for u, c in zip(updates, coefs):
        scale_([u], c)
    return updates, fraction_of([c < 1 for c in coefs], len(coefs))


def global_coefficient(
    updates: list[Tensor],
    *,
    max_norm: Scalar,
    norm_type: float = 2.0,
    norm: Tensor | None = None,
    shards: Any = None,
) -> tuple[Tensor, Tensor]:
    """The coefficient ``c`` of global norm clipping (``norm``: the global norm if the caller has
    it; ``shards`` as for :func:`norm_clip_update`) and the fraction clipped (1.0 if ``c < 1``
    else 0.0), as 0-d tensors."""
    n = total_norm(updates, norm_type, shards=shards) if norm is None else norm
    coef = clip_coefficient(n, max_norm)
    return coef, (coef < 1).to(torch.float32)


def clip_to_limit(updates: list[Tensor], norm: Tensor, limit: Tensor) -> tuple[list[Tensor], Tensor]:
    """Clips ``updates`` (global L2 norm ``norm``) to the tensor ``limit`` in place with torch's
    coefficient (ZClip's and AutoClip's last step); returns them and the fraction clipped (0/1).
    A non-finite norm leaves them unchanged: the coefficient is then computed from norm 0 and
    limit inf, i.e. exactly 1."""
    finite = torch.isfinite(norm)
    safe_norm = torch.where(finite, norm, torch.zeros_like(norm))
    safe_limit = torch.where(finite, limit, torch.full_like(limit, math.inf))
    return norm_clip_update(updates, max_norm=safe_limit, norm=safe_norm)


@dataclass(frozen=True)
class ClipByNorm(Transform):
    """Clipping by p-norm; see :func:`clip_by_norm`."""

    max_norm: Any
    norm_type: float = 2.0
    scope: str = "global"
    writes_updates: ClassVar[bool] = False  # a scaled copy when the updates are not writable

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_norm", check_range("max_norm", self.max_norm, low_open=True, finite=False))
        object.__setattr__(self, "norm_type", check_norm_type(self.norm_type))
        if self.scope not in SCOPES:
            raise ValueError(f"Invalid scope value: {self.scope!r}; scope must be one of {SCOPES}")

    @property
    def structure(self) -> str:  # type: ignore[override]
        return "elements" if self.scope == "global" else "tensors"

    def init(self, params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update_scaled(self, updates, state, params=None, ctx=PLAIN):
        """Global scope: the coefficient is left unapplied, for the caller to fold in (see
        :attr:`~steadygrad.core.transform.StepContext.scale`); the updates are not touched."""
        if self.scope != "global":
            return super().update_scaled(updates, state, params, ctx)
        coef, fraction = global_coefficient(
            updates,
            max_norm=ctx.value(self.max_norm),
            norm_type=self.norm_type,
            norm=ctx.norm if self.norm_type == 2.0 else None,
            shards=ctx.shards,
        )
        return updates, coef, ClipState(commit_select(ctx.gate, fraction, state.fraction_clipped))

    def update(self, updates, state, params=None, ctx=PLAIN):
        norm = ctx.norm if self.scope == "global" and self.norm_type == 2.0 else None
        if self.scope != "global" and not ctx.writable:
            updates = [u.clone() for u in updates]
        updates, fraction = norm_clip_update(
            updates,
            max_norm=ctx.value(self.max_norm),
            norm_type=self.norm_type,
            scope=self.scope,
            norm=norm,
            inplace=ctx.writable or self.scope != "global",
            shards=ctx.shards,
        )
        return updates, ClipState(commit_select(ctx.gate, fraction, state.fraction_clipped))


def clip_by_norm(max_norm: float | Tensor, norm_type: float = 2.0, scope: str = "global") -> ClipByNorm:
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
    ``clip_by_block_rms`` bounds each tensor's RMS instead (:func:`clip_update_rms`). On DTensor
    gradients (FSDP2) the norms are of the whole tensors, all-reduced over the mesh
    (:attr:`~steadygrad.core.transform.StepContext.shards`).
    """
    return ClipByNorm(max_norm, norm_type, scope)
