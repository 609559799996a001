"""AutoClip (Seetharaman et al., 2020): clipping of the global L2 norm to a percentile of the norms
seen so far; and what ZClip and AutoClip share.

Both clip the global L2 norm ``n`` of the updates (:func:`steadygrad.core.norms.total_norm`, one
all-reduce with ``process_group``) to a threshold learnt from the norms seen so far, with torch's
coefficient ``min(1, threshold / (n + 1e-6))`` (:func:`~steadygrad.transforms.clipping.norm_clip_update`).
Each is written once as a function with explicit state (:func:`zclip_update`,
:func:`autoclip_update`) and wrapped by a :class:`~steadygrad.core.transform.Transform` factory
(:func:`zclip`, :func:`autoclip`). They follow the conventions of
:mod:`steadygrad.transforms.clipping` (in place, ``fraction_clipped``, commit gate, no host reads,
validation); the one difference is that the ``*_update`` functions take the commit gate and
return the new state (their statistics must be gated inside), not only the fraction.

No host sync
    The whole update is tensor arithmetic: no ``.item()``, no Python branch on a tensor value, so
    it runs under ``torch.compile(fullgraph=True)``: ZClip and bounded AutoClip. The unbounded
    AutoClip history reads its count on the host (free for CPU state, a device sync on an
    accelerator) to double its buffer when full. Compiled code cannot read it: there the caller
    makes room first, outside the compiled step (``AutoClip.reserve``, then ``StepContext(reserved=
    True)``; the fused executor does), so the compiled step sees a new shape only when the buffer
    doubles; compiled without that, it grows by one slot per call.

State
    Named tuples of single tensors shared by all parameters (see :mod:`steadygrad.core.transform`);
    an optimizer or a :class:`~steadygrad.Clipper` stores them in its shared slot, so they are in
    its ``state_dict`` and a resumed run equals one that never stopped. Counters are int64, the
    statistics float32 or wider (the promotion of float32 with the parameters' and the norm's
    :func:`~steadygrad.core.norms.norm_dtype`: float64 gradients keep float64 statistics), and
    ``fraction_clipped`` is the 0-d float32 of the clipping conventions: 1 when this step's
    coefficient was below 1, else 0 (one decision per step, as ``clip_by_norm(scope="global")``).
    ``last_norm`` (the pre-clip norm) and ``threshold`` (the limit applied, ``inf`` when none)
    report the step. A state made by ``init([])`` lives on the CPU in float32 and moves to the
    norm's device and dtype at the first update. Field names avoid torch.optim's per-parameter
    keys (``step``, ``exp_avg``, ...), so a clipper in front of an optimizer in a chain leaves the
    optimizer's keys unprefixed.

Non-finite norms
    A NaN or infinite norm never enters the statistics (ZClip's mean, variance and warm-up
    buffer, AutoClip's history): for them the step is skipped. The updates are returned unchanged
    (scaling cannot repair a NaN, and the coefficient of an infinite norm, 0, would turn the
    infinite entries into NaN); the non-finite values are left to the caller
    (``Clipper(nonfinite=...)``, ``skip_nonfinite()``, ``GradScaler``). ``last_norm`` reports the
    non-finite norm, ``threshold`` the limit that finite updates would have met, and
    ``fraction_clipped`` is 0. Under the commit gate (:mod:`steadygrad.core.gate`) a closed gate
    leaves every field bit-for-bit unchanged.

Where we follow the published rules and where we differ
    ZClip (Kumar et al., 2025, arXiv:2504.02507; PyPI ``zclip``), z-score mode with adaptive
    scaling. We follow the formulas, the population variance of the warm-up norms, the raw
    (pre-clip) norms in the warm-up buffer, the EMA fed with the clipped norm (the adaptive
    threshold) on a spike, the variance updated with the new mean, the ``eps`` in
    ``z = (n − μ)/(σ + eps)``, the coefficient ``threshold/(n + 1e-6)`` and, with ``max_norm``,
    the package's fixed cap at every step (warm-up included) that does not feed the statistics.
    We differ: ``max_norm`` defaults to ``None`` (pure ZClip; the package's recent default is
    1.0); the statistics are tensors, not Python floats read with ``.item()`` every step; they
    are in the ``state_dict``; a non-finite norm is skipped (in the package one NaN makes μ NaN
    forever and ends clipping); the warm-up collects the first N *finite* norms.

    AutoClip (Seetharaman et al., 2020, arXiv:2007.14469): threshold = the p-th percentile of the
    observed pre-clip global norms, the current one included (the paper's code appends, then
    calls ``np.percentile``), with numpy's default linear interpolation. We follow the paper's
    p = 10 and whole history by default; ``history=H`` keeps the last H norms. The PyPI
    ``autoclip`` package differs from the paper (the 0.9 quantile of the last 1000 norms of each
    parameter separately, an ``inf`` stored in its history after one infinite gradient) and has
    no ``state_dict``; we keep one global norm, skip non-finite norms and bound the history only
    when asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ...core.gate import commit_select
from ...core.norms import portable_group, total_norm
from ...core.tensorlist import Scalar
from ...core.transform import PLAIN, Transform
from ...core.validate import check_int, check_range
from .common import admits, new_fraction, stat_device, stat_dtype
from .norm import clip_to_limit

__all__ = ["AutoClip", "AutoClipState", "autoclip", "autoclip_update"]

# The first capacity of the unbounded history; it doubles whenever the committed norms fill it.
_MIN_CAPACITY = 64


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`, single tensors shared by all parameters.

    Attributes:
        num_norms: int64, the finite norms committed so far (all of them, also beyond
            ``history``).
        norm_history: the norms. Without ``history``, norm i (0-based) is in slot i and the
            buffer doubles (from 64 slots) whenever the committed norms fill it: a skipped step
            changes nothing, and a compiled step sees a new shape a handful of times. With
            ``history=H`` it is a ring buffer of H slots: norm i in slot i mod H, the newest at
            ``(num_norms − 1) mod H``. Slots without a norm hold ``+inf``.
        last_norm: the pre-clip norm of the last committed step.
        threshold: the percentile applied at the last committed step.
        fraction_clipped: float32, 1 if the last committed step was clipped, else 0.
    """

    num_norms: Tensor
    norm_history: Tensor
    last_norm: Tensor
    threshold: Tensor
    fraction_clipped: Tensor


def _percentile_sorted(values: Tensor, k: Tensor, q: Scalar) -> Tensor:
    """The ``q``-quantile (q in [0, 1]) of the ``k`` smallest entries of the sorted 1-D ``values``,
    numpy's default linear interpolation: position ``h = q·(k − 1)``, ``lerp`` between the entries
    ``floor(h)`` and ``floor(h) + 1`` (clamped to ``k − 1``). ``inf`` when ``k`` is 0."""
    last = torch.clamp(k - 1, min=0)
    pos = last.to(torch.float64) * q
    floor = torch.floor(pos)
    lo = floor.to(torch.int64)
    hi = torch.minimum(lo + 1, last)
    # gather, not values[lo]: indexing by a tensor would read the index on the host.
    ends = values.gather(0, torch.stack([lo, hi]))
    value = torch.lerp(ends[0], ends[1], (pos - floor).to(values.dtype))
    return torch.where(k > 0, value, torch.full_like(value, math.inf))


def _reserved(buf: Tensor, count: Tensor) -> Tensor:
    """The unbounded history with room for one more norm: doubled (from 64 slots) when the
    committed norms fill it. Reads ``count`` on the host (free for CPU state)."""
    if int(count) < buf.shape[0]:
        return buf
    grow = max(_MIN_CAPACITY, buf.shape[0])
    return torch.cat([buf, torch.full((grow,), math.inf, dtype=buf.dtype, device=buf.device)])


def autoclip_update(
    updates: list[Tensor],
    state: AutoClipState,
    *,
    percentile: Scalar,
    history: int | None = None,
    process_group: Any = None,
    gate: Tensor | None = None,
    norm: Tensor | None = None,
    shards: Any = None,
    reserved: bool = False,
) -> tuple[list[Tensor], AutoClipState]:
    """One AutoClip step: clips ``updates`` in place and returns them with the new state.

    The global L2 norm n of ``updates`` joins the history (if finite and committed); the limit
    is the ``percentile``-th percentile of the history (the last ``history`` norms, or all of
    them if ``None``) with numpy's linear interpolation; the updates are scaled by
    ``min(1, limit/(n + 1e-6))``. An empty history gives no limit.

    Args:
        history: must match the state's layout: ``None`` for a growing buffer, H for a ring
            buffer of H slots.
        reserved: compiled, the caller has made room for this norm (:meth:`AutoClip.reserve`);
            otherwise a compiled call grows the unbounded history by one slot.
        gate: the commit gate (``None`` = commit), as in :func:`zclip_update`.
    """
    norm = total_norm(updates, 2.0, process_group, shards=shards) if norm is None else norm
    device = norm.device
    dtype = torch.promote_types(state.norm_history.dtype, norm.dtype)
    n = norm.to(dtype)

    count = state.num_norms.to(device)
    buf = state.norm_history.to(device=device, dtype=dtype)
    admit = admits(n, gate)
    if history is None:
        if not torch.compiler.is_compiling():
            buf = _reserved(buf, count)
        elif not reserved:  # compiled, and nobody made room: one more slot per call
            buf = torch.cat([buf, torch.full((1,), math.inf, dtype=dtype, device=device)])
        index = count
    else:
        index = torch.remainder(count, history)
    slot = torch.arange(buf.shape[0], device=device) == index
    new_buf = torch.where(slot & admit, n, buf)
    new_count = count + admit.to(torch.int64)
    valid = new_count if history is None else torch.clamp(new_count, max=history)

    ordered = torch.sort(new_buf).values  # the +inf of unused slots sort last
    limit = _percentile_sorted(ordered, valid, percentile / 100)
    updates, fraction = clip_to_limit(updates, n, limit)
    new_state = AutoClipState(
        num_norms=new_count,
        norm_history=new_buf,
        last_norm=commit_select(gate, n, state.last_norm),
        threshold=commit_select(gate, limit, state.threshold),
        fraction_clipped=commit_select(gate, fraction, state.fraction_clipped),
    )
    return updates, new_state


@dataclass(frozen=True)
class AutoClip(Transform):
    """AutoClip; see :func:`autoclip`."""

    percentile: Any = 10.0
    history: int | None = None
    process_group: Any = None
    structure: ClassVar[str] = "elements"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "percentile", check_range("percentile", self.percentile, 0.0, 100.0, low_open=True, high_open=False)
        )
        if self.history is not None:
            object.__setattr__(self, "history", check_int("history", self.history, 1))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "process_group": portable_group(self.process_group)}

    def init(self, params: Sequence[Tensor]) -> AutoClipState:
        dtype, device = stat_dtype(params), stat_device(params)
        return AutoClipState(
            num_norms=torch.zeros((), dtype=torch.int64, device=device),
            norm_history=torch.full((self.history or 0,), math.inf, dtype=dtype, device=device),
            last_norm=torch.zeros((), dtype=dtype, device=device),
            threshold=torch.full((), math.inf, dtype=dtype, device=device),
            fraction_clipped=new_fraction(params),
        )

    def reserve(self, state: AutoClipState) -> AutoClipState:
        """The unbounded history doubled when full (outside compiled code: the fused executor
        calls this before each step, so that the compiled step never changes its shape)."""
        if self.history is not None:
            return state
        return state._replace(norm_history=_reserved(state.norm_history, state.num_norms))

    def update(self, updates, state, params=None, ctx=PLAIN):
        if self.history is not None and state.norm_history.shape != (self.history,):
            raise ValueError(
                f"autoclip(history={self.history}) got a state with a history of shape "
                f"{tuple(state.norm_history.shape)} (a checkpoint made with another history?)"
            )
        return autoclip_update(
            updates,
            state,
            percentile=ctx.value(self.percentile),
            history=self.history,
            process_group=self.process_group,
            gate=ctx.gate,
            norm=ctx.norm if self.process_group is None else None,
            shards=ctx.shards,
            reserved=ctx.reserved,
        )


def autoclip(percentile: float | Tensor = 10.0, history: int | None = None, process_group: Any = None) -> AutoClip:
    """AutoClip (Seetharaman, Wichern, Pardo and Le Roux, 2020, *AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks*): clips the global L2 norm to the p-th percentile
    of the norms observed so far, the current one included.

    .. math::
        \\tau_t = \\operatorname{percentile}_p(n_1, \\dots, n_t),\\qquad
        u \\leftarrow u \\cdot \\min\\Big(1, \\frac{\\tau_t}{n_t + 10^{-6}}\\Big)

    The percentile is numpy's default (``method="linear"``: position :math:`p/100\\cdot(k-1)` in
    the sorted k norms, linear interpolation between its neighbours), which the paper's code
    (``np.percentile``) and ``torch.quantile`` use. A step whose norm is itself the percentile
    (the first step; with p = 100 every new maximum) is scaled by ``n/(n + 1e-6)`` as in the
    paper's ``clip_grad_norm_`` call, and counts as clipped in ``fraction_clipped`` (coefficient
    below 1, the rule of :func:`~steadygrad.transforms.clipping.clip_by_norm`).

    Args:
        percentile: p in (0, 100]; the paper recommends 10.
        history: ``None`` keeps every norm (the paper; memory and a sort grow with the number of
            steps); an int H >= 1 keeps the last H norms in a ring buffer.
        process_group: the process group over which the norm is global (``None``: this rank's
            updates).

    Raises:
        ValueError: ``percentile`` outside (0, 100] or ``history`` < 1 (the message names it).

    Differences from the paper and the ``autoclip`` package: see the module docstring and
    ``docs/adaptive-clipping.md``. Non-finite norms do not enter the history and leave the
    updates unchanged.
    """
    return AutoClip(percentile, history, process_group)
