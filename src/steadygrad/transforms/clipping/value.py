"""Clipping by value: every element to ``[-limit, limit]``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.gate import commit_select
from ...core.tensorlist import Scalar
from ...core.transform import PLAIN, Transform
from ...core.validate import check_range
from .common import ClipState, element_fraction, new_fraction

__all__ = ["ClipByValue", "clip_by_value", "value_clip_update"]


def value_clip_update(
    updates: list[Tensor], *, limit: Scalar, shards: Any = None, sizes: Any = None
) -> tuple[list[Tensor], Tensor]:
    """Element-wise clipping to ``[-limit, limit]``, in place on ``updates``.

    .. math::
        u \\leftarrow \\min(\\max(u, -c), c)

    Returns:
        ``(updates, fraction)``: the fraction of elements with ``|u| > limit`` (of whole tensors
        with ``shards``, :func:`~steadygrad.transforms.clipping.common.element_fraction`; of
        ``sizes`` elements per tensor if given, see :attr:`~steadygrad.core.transform.StepContext.sizes`).
    """
    counts = [torch.count_nonzero(u.abs() > limit) for u in updates]
    sizes = [u.numel() for u in updates] if sizes is None else sizes
    if isinstance(limit, Tensor):
        torch._foreach_clamp_max_(updates, [limit] * len(updates))
        torch._foreach_clamp_min_(updates, [-limit] * len(updates))
    else:
        torch._foreach_clamp_max_(updates, limit)
        torch._foreach_clamp_min_(updates, -limit)
    return updates, element_fraction(counts, sizes, shards)


@dataclass(frozen=True)
class ClipByValue(Transform):
    """Clipping to ``[-limit, limit]``; see :func:`clip_by_value`."""

    limit: Any
    structure: ClassVar[str] = "elements"

    def __post_init__(self) -> None:
        object.__setattr__(self, "limit", check_range("limit", self.limit, low_open=True, finite=False))

    def init(self, params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update(self, updates, state, params=None, ctx=PLAIN):
        updates, fraction = value_clip_update(updates, limit=ctx.value(self.limit), shards=ctx.shards, sizes=ctx.sizes)
        return updates, ClipState(commit_select(ctx.gate, fraction, state.fraction_clipped))


def clip_by_value(limit: float | Tensor) -> ClipByValue:
    """Clips every element to ``[-limit, limit]``.

    .. math::
        u_i \\leftarrow \\operatorname{clamp}(u_i, -c, c)

    ``fraction_clipped``: the fraction of elements with ``|u| > limit``. NaN passes through
    (as in torch). Works on a single flat tensor too.

    Args:
        limit: ``c > 0`` (a number or a 0-d tensor; ``inf`` clips nothing).

    Raises:
        ValueError: ``limit`` is ``<= 0``, NaN or not a number.

    Differences: equals ``torch.nn.utils.clip_grad_value_(params, limit)`` and optax's
    ``clip(limit)``. Both accept a negative limit (torch then sets every element to ``limit``);
    here a non-positive limit raises.
    """
    return ClipByValue(limit)
