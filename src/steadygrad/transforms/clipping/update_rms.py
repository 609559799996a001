"""Update clipping of Adafactor: each tensor's RMS at most ``d``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core.gate import commit_select
from ...core.norms import all_reduce_shards_, scale_, tensor_norms
from ...core.tensorlist import Scalar
from ...core.transform import PLAIN, Transform
from ...core.validate import check_range
from .common import ClipState, fraction_of, new_fraction

__all__ = ["ClipUpdateRms", "clip_update_rms", "rms_clip_update"]


def rms_clip_update(updates: list[Tensor], *, d: Scalar, shards: Any = None) -> tuple[list[Tensor], Tensor]:
    """Adafactor's update clipping, per tensor, in place on ``updates``.

    .. math::
        \\operatorname{RMS}(U) = \\frac{\\|U\\|_2}{\\sqrt{\\operatorname{numel}(U)}},\\qquad
        U \\leftarrow \\frac{U}{\\max\\big(1, \\operatorname{RMS}(U)/d\\big)}

    With ``shards`` (local shards of DTensors,
    :attr:`~steadygrad.core.transform.StepContext.shards`) the norm and the element count are of
    the whole tensor.

    Returns:
        ``(updates, fraction)``: the fraction of tensors with ``RMS(U) > d``.
    """
    norms = tensor_norms(updates, 2.0, shards=shards)
    sizes = [torch.tensor(float(u.numel()), dtype=torch.float64, device=u.device) for u in updates]
    if shards is not None:
        all_reduce_shards_(sizes, shards)
    flags = []
    for u, n, size in zip(updates, norms, sizes):
        rms = n / torch.sqrt(torch.clamp(size, min=1.0)).to(n.dtype)
        ratio = rms / d
        flags.append(ratio > 1)
        scale_([u], 1 / torch.clamp(ratio, min=1.0))
    return updates, fraction_of(flags, len(flags))


@dataclass(frozen=True)
class ClipUpdateRms(Transform):
    """Adafactor's update clipping; see :func:`clip_update_rms`."""

    d: Any = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "d", check_range("d", self.d, low_open=True, finite=False))

    def init(self, params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update(self, updates, state, params=None, ctx=PLAIN):
        updates, fraction = rms_clip_update(updates, d=ctx.value(self.d), shards=ctx.shards)
        return updates, ClipState(commit_select(ctx.gate, fraction, state.fraction_clipped))


def clip_update_rms(d: float | Tensor = 1.0) -> ClipUpdateRms:
    """Update clipping of Adafactor: Shazeer and Stern, *Adafactor: Adaptive Learning Rates with
    Sublinear Memory Cost*, 2018.

    Each tensor's update is scaled down so that its root mean square is at most ``d``:

    .. math::
        U \\leftarrow \\frac{U}{\\max\\big(1, \\operatorname{RMS}(U)/d\\big)},\\qquad
        \\operatorname{RMS}(U) = \\sqrt{\\operatorname{mean}(U^2)}

    Adafactor applies it to the *update* (after the preconditioner, before the learning rate):
    put it after the scaling in a chain, ``chain(scale_by_rms(), clip_update_rms(1.0),
    scale_by_lr())``. In a :class:`steadygrad.Clipper` it clips each gradient tensor's RMS. A
    zero-element tensor has RMS 0. Needs the tensor structure (per-tensor decisions).

    ``fraction_clipped``: the fraction of tensors whose RMS exceeded ``d``.

    Args:
        d: the clipping threshold ``d > 0`` (1.0 in the paper).

    Raises:
        ValueError: ``d <= 0`` or NaN.

    Differences: equals optax's ``clip_by_block_rms(d)`` and the update clipping of the
    Adafactor implementations in transformers and timm (``U / max(1, RMS(U)/d)``); the RMS is
    computed in float32 or wider.
    """
    return ClipUpdateRms(d)
