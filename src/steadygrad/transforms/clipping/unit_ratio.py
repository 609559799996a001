"""Adaptive gradient clipping (AGC, NFNets): each unit's gradient norm below a fraction of its
weight norm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...core.gate import commit_select
from ...core.norms import all_reduce_shards_, reduced_norms
from ...core.tensorlist import Scalar
from ...core.transform import PLAIN, Transform
from ...core.validate import check_range
from .common import ClipState, element_fraction, new_fraction

__all__ = ["AGC_DIV_EPS", "ClipByUnitRatio", "clip_by_unit_ratio", "unit_ratio_clip_update"]

#: The floor of a unit's gradient norm in AGC's division (Brock et al.; timm and optax use it too).
AGC_DIV_EPS = 1e-6


def _unit_norms(tensors: Sequence[Tensor], shards: Any, views: Sequence[bool]) -> list[Tensor]:
    """The L2 norm of each unit of each tensor in torch's ``(out, in, ...)`` layout.

    A tensor of 2 or more dimensions has ``shape[0]`` units (its slices along dim 0): the result
    has shape ``(out, 1, ..., 1)``. A 0-D or 1-D tensor is one unit: the result has shape
    ``(1,) * ndim``. The real view of a complex tensor (``views[i]`` true) has the units of the
    complex tensor: a complex vector is one unit, not one per element. One reduction per tensor
    over dims ``1..`` (not one per unit: a model's embedding has tens of thousands of rows, and a
    graph with a node per row takes minutes to compile), by
    :func:`~steadygrad.core.norms.reduced_norms` (no overflow).

    With ``shards`` (local shards of DTensors): a unit split across ranks (a 0-D or 1-D tensor
    sharded, or a tensor sharded along a dimension other than 0) gets its squared norm summed
    over those ranks; rows of a tensor sharded along dim 0 (FSDP2) are whole on one rank.
    """
    dims = [None if _one_unit(t, c) else tuple(range(1, t.dim())) for t, c in zip(tensors, views)]
    out = reduced_norms(tensors, dims)
    split = [_splits_units(t, s, c) for t, s, c in zip(tensors, shards, views)] if shards is not None else []
    if any(split):
        # float64 (not on mps, which has none): a float32 square could overflow
        squares = [(n if n.device.type == "mps" else n.double()).square() for n in out]
        all_reduce_shards_(squares, [s if flag else None for s, flag in zip(shards, split)])
        out = [sq.sqrt().to(n.dtype) if flag else n for n, sq, flag in zip(out, squares, split)]
    return out


def _one_unit(t: Tensor, complex_view: bool) -> bool:
    """Whether a tensor is a single unit: 0-D or 1-D (as a complex tensor, for a real view)."""
    return t.dim() <= (2 if complex_view else 1)


def _splits_units(t: Tensor, spec: Any, complex_view: bool = False) -> bool:
    """Whether a shard holds parts of units (rather than whole units) of its tensor."""
    return bool(spec and spec[1]) and (_one_unit(t, complex_view) or any(d != 0 for d in spec[2]))


def unit_ratio_clip_update(
    updates: list[Tensor],
    params: Sequence[Tensor],
    *,
    clip_factor: Scalar,
    eps: Scalar,
    shards: Any = None,
    complex_views: Any = None,
) -> tuple[list[Tensor], Tensor]:
    """AGC, in place on ``updates``; units in torch's layout (see :func:`clip_by_unit_ratio`).

    .. math::
        m = \\lambda \\max(\\|W_u\\|, \\epsilon),\\qquad
        G_u \\leftarrow G_u \\cdot \\frac{m}{\\max(\\|G_u\\|, 10^{-6})}
        \\;\\text{ if } \\|G_u\\| > m

    ``complex_views`` (one bool per tensor, :attr:`StepContext.complex_views
    <steadygrad.core.transform.StepContext.complex_views>`) marks real views of complex
    parameters, whose units are those of the complex tensor.

    Returns:
        ``(updates, fraction)``: the fraction of units clipped (of whole tensors with ``shards``,
        the local shards' layout of :attr:`~steadygrad.core.transform.StepContext.shards`).
    """
    if len(params) != len(updates):
        raise ValueError(f"unit_ratio_clip_update: {len(updates)} updates but {len(params)} params")
    views = list(complex_views) if complex_views is not None else [False] * len(updates)
    g_norms = _unit_norms(updates, shards, views)
    w_norms = _unit_norms(params, shards, views)
    counts = []
    units = []
    for u, gn, wn in zip(updates, g_norms, w_norms):
        limit = torch.clamp(wn.to(gn.dtype), min=eps) * clip_factor
        clipped = gn > limit
        coef = torch.where(clipped, limit / torch.clamp(gn, min=AGC_DIV_EPS), 1.0)
        # ``coef`` has u's number of dimensions, so u is multiplied in coef's (wide) dtype.
        if torch.compiler.is_compiling() and u.is_contiguous():
            # The same product over the flattened tensor, the coefficient indexed by element:
            # compiled, every loop of the step is then one-dimensional, so the writes of the
            # optimizer's state fuse into the loop that computes it (no temporaries).
            u.view(-1).mul_(coef.expand(u.shape).reshape(-1))
        else:
            u.mul_(coef)
        counts.append(torch.count_nonzero(clipped))
        units.append(gn.numel())
    # A tensor whose units were all-reduced counts them once; one sharded by whole units, on
    # every rank that holds some.
    by_units = (
        None if shards is None else [None if _splits_units(u, s, c) else s for u, s, c in zip(updates, shards, views)]
    )
    return updates, element_fraction(counts, units, by_units)


@dataclass(frozen=True)
class ClipByUnitRatio(Transform):
    """AGC; see :func:`clip_by_unit_ratio`."""

    clip_factor: Any = 0.01
    eps: Any = 1e-3
    structure: ClassVar[str] = "units"

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip_factor", check_range("clip_factor", self.clip_factor, low_open=True))
        object.__setattr__(self, "eps", check_range("eps", self.eps, low_open=True))

    def init(self, params: Sequence[Tensor]) -> ClipState:
        return ClipState(fraction_clipped=new_fraction(params))

    def update(self, updates, state, params=None, ctx=PLAIN):
        if params is None:
            raise ValueError(
                "clip_by_unit_ratio needs the parameters (the weight norms): update(updates, state, params)"
            )
        updates, fraction = unit_ratio_clip_update(
            updates,
            params,
            clip_factor=ctx.value(self.clip_factor),
            eps=ctx.value(self.eps),
            shards=ctx.shards,
            complex_views=ctx.complex_views,
        )
        return updates, ClipState(commit_select(ctx.gate, fraction, state.fraction_clipped))


def clip_by_unit_ratio(clip_factor: float | Tensor = 0.01, eps: float | Tensor = 1e-3) -> ClipByUnitRatio:
    """Adaptive gradient clipping (AGC): Brock, De, Smith and Simonyan, *High-Performance
    Large-Scale Image Recognition Without Normalization* (NFNets), 2021.

    Each unit's gradient is kept below ``λ`` times the unit's weight norm:

    .. math::
        m_u = \\lambda \\cdot \\max(\\|W_u\\|_2, \\epsilon),\\qquad
        G_u \\leftarrow
        \\begin{cases} G_u \\cdot \\dfrac{m_u}{\\max(\\|G_u\\|_2,\\, 10^{-6})} & \\|G_u\\|_2 > m_u \\\\
        G_u & \\text{otherwise} \\end{cases}

    A unit is one output row in torch's layout: for a weight of shape ``(out, in, ...)`` (Linear
    ``(out, in)``, Conv2d ``(out, in/groups, kh, kw)``) the norms reduce over dims ``1..``, one
    per output unit; a 0-D or 1-D tensor (a bias, a gain) is a single unit. A complex parameter
    has the units of its complex shape (a complex vector is one unit; its real view is not
    taken for rows). ``eps`` keeps
    zero-initialised weights (biases, the last layer of many inits) from freezing.

    Needs ``params`` in ``update``. Needs whole rows (``structure="units"``).

    Excluding parameters: the paper does not clip the final classifier layer. Build the clipper
    over the parameters to clip only, e.g.
    ``sg.Clipper([p for n, p in model.named_parameters() if not n.startswith("fc.")],
    sg.clip_by_unit_ratio(0.01))``; in a :class:`steadygrad.optim.Transformed` optimizer, give
    the final layer its own parameter group with a chain without this transform.

    ``fraction_clipped``: the fraction of units clipped at the last committed step.

    Args:
        clip_factor: ``λ > 0`` (0.01 for the NFNets; the paper finds that larger batches need smaller values).
        eps: ``ε > 0``, the floor of the weight norm (1e-3).

    Raises:
        ValueError: ``clip_factor <= 0``, ``eps <= 0`` or NaN; in ``update``, ``params`` is
            ``None``.

    Differences: equals timm's ``adaptive_clip_grad`` (``norm_type=2``), which also reduces over
    dims ``1..`` and treats ≤1-D tensors as one unit; timm keeps a unit whose norm equals the
    limit as it is, as here. optax's ``adaptive_grad_clip`` assumes JAX's ``(in, out)`` layout
    and reduces over axis 0 by default (on a torch weight that is one unit per *input* column:
    the wrong units); with ``axis=(1, ..., ndim-1)`` it equals this transform.
    """
    return ClipByUnitRatio(clip_factor, eps)
