"""What the framework callbacks share: the clipper they build once the model exists, and its
statistics as numbers for a logger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..clipper import Clipper, ClipStats
from ..core.transform import Transform, chain

__all__ = ["STAT_NAMES", "as_transform", "build_clipper", "stats_dict"]

#: The ClipStats fields a callback logs, under ``<prefix>/<field>``.
STAT_NAMES = ("norm", "clipped_norm", "fraction_clipped", "skipped")


def as_transform(transform: Transform | Sequence[Transform]) -> Transform:
    """One transform (a list or tuple is chained); ``TypeError`` for anything else, at once."""
    if isinstance(transform, Transform):
        return transform
    if isinstance(transform, (list, tuple)) and all(isinstance(t, Transform) for t in transform):
        return chain(*transform)
    raise TypeError(f"transform must be a steadygrad Transform or a list of them, got {type(transform).__name__}")


def build_clipper(named_parameters: Any, transform: Transform, nonfinite: str) -> Clipper:
    """A Clipper over the trainable parameters of a model (names in its error messages)."""
    params = [(name, p) for name, p in named_parameters if p.requires_grad]
    return Clipper(params, transform, nonfinite=nonfinite)


def stats_dict(prefix: str, stats: ClipStats) -> dict[str, Tensor]:
    """``{"<prefix>/norm": tensor, ...}`` for the fields of :data:`STAT_NAMES` (float tensors)."""
    return {f"{prefix}/{name}": getattr(stats, name).float() for name in STAT_NAMES}
