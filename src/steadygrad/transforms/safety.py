"""Safety against non-finite gradients: :func:`skip_nonfinite`, which turns a step with inf/NaN
updates into a no-op for the transforms it wraps.

Everything here decides on the device (no ``.item()``): a bad step is turned into a closed commit
gate (see :mod:`steadygrad.core.gate`) and zeroed updates, never into a Python branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.gate import combine_gates, commit_select, count_nonfinite, zero_unless_
from ..core.transform import PLAIN, Transform
from ..core.validate import check_int

__all__ = ["SkipNonfinite", "SkipNonfiniteState", "skip_nonfinite"]


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite` (all 0-d int64, shared by all the parameters).

    Attributes:
        nonfinite: the number of inf/NaN elements in the updates of the last step.
        consecutive: the number of consecutive skipped steps up to the last one.
        total: the number of steps skipped so far.
    """

    nonfinite: Tensor
    consecutive: Tensor
    total: Tensor


@dataclass(frozen=True)
class SkipNonfinite(Transform):
    """``inner`` on finite steps only; see :func:`skip_nonfinite`."""

    inner: Transform
    max_consecutive: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Transform):
            raise TypeError(f"skip_nonfinite: inner must be a Transform, got {type(self.inner).__name__}")
        if self.max_consecutive is not None:
            check_int("max_consecutive", self.max_consecutive, 0)

    @property
    def structure(self) -> str:  # type: ignore[override]
        return self.inner.structure

    def init(self, params: Sequence[Tensor]) -> tuple[SkipNonfiniteState, Any]:
        device = params[0].device if len(params) else None
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return (SkipNonfiniteState(zero, zero.clone(), zero.clone()), self.inner.init(params))

    def reserve(self, state):
        own, inner_state = state
        return (own, self.inner.reserve(inner_state))

    def update(self, updates, state, params=None, ctx=PLAIN):
        own, inner_state = state
        outer = ctx.gate
        bad = count_nonfinite(updates, own.nonfinite.device)
        finite = bad == 0
        ok = combine_gates(outer, finite)
        zero_unless_(updates, ok)
        updates, inner_state = self.inner.update(updates, inner_state, params, ctx.with_gate(ok.to(torch.float32)))
        zero_unless_(updates, ok)

        consecutive = torch.where(finite, 0, own.consecutive.to(finite.device) + 1)
        total = own.total.to(finite.device) + finite.logical_not().to(torch.int64)
        new = SkipNonfiniteState(
            nonfinite=commit_select(outer, bad, own.nonfinite),
            consecutive=commit_select(outer, consecutive, own.consecutive),
            total=commit_select(outer, total, own.total),
        )
        limit = self.max_consecutive
        if limit is not None and bool(new.consecutive > limit):  # the one host read
            raise RuntimeError(
                f"skip_nonfinite: the updates were non-finite on {int(new.consecutive)} consecutive steps "
                f"(max_consecutive={limit}); the last step had {int(bad)} inf/NaN elements"
            )
        return updates, (new, inner_state)


def skip_nonfinite(inner: Transform, max_consecutive: int | None = None) -> SkipNonfinite:
    """Runs ``inner`` only on steps whose updates are all finite; a bad step leaves no trace.

    Each step counts the inf/NaN elements of the incoming updates. A step with any of them is
    skipped: ``inner`` runs on zeroed updates under a closed commit gate (see
    :mod:`steadygrad.core.transform`), so every gate-aware transform inside keeps its state
    bit-for-bit, and the output updates are zeros (adding them changes nothing). A good step runs
    ``inner`` normally. Nothing is read on the host (unless ``max_consecutive`` is given).

    The state is the tuple ``(SkipNonfiniteState, inner_state)`` (a chain-like tuple, so that
    :mod:`steadygrad.core.state` stores the inner state under its own keys).

    Why it wraps ``inner`` (API.md lists ``skip_nonfinite(max_consecutive=None)``): in a chain a
    transform sees only its own updates and hands on new updates; it cannot stop the transforms
    after it from updating their state with a bad step. Zeroing the updates is not enough either
    (Adam's moments decay on a zero gradient, counters advance). The transforms to protect must
    therefore run *inside* it: ``skip_nonfinite(chain(clip_by_moment(), scale_by_adam()))``.

    An outer commit gate (a :class:`steadygrad.Clipper` or the accumulation helper skipping a
    GradScaler step) closes the inner gate too and freezes this transform's own counters.

    Args:
        inner: the transform (or chain) to protect. Its state is kept only if it honours the
            commit gate; steadygrad's clipping transforms do.
        max_consecutive: ``None`` (default) skips bad steps forever. An integer ``N >= 0`` raises
            ``RuntimeError`` in the ``(N+1)``-th consecutive bad step: a run whose gradients stay
            non-finite has diverged, and silently skipping would waste the rest of the job. This
            costs one host read per step (the only one) and makes ``update`` not
            ``torch.compile(fullgraph=True)``-able. The parameters and ``inner``'s state are
            those of the last good step, so one can reload or lower the learning rate. optax's
            ``apply_if_finite`` instead *applies* the bad update after ``N`` consecutive errors,
            which writes inf/NaN into the parameters and the optimizer state for good; we do not.

    Raises:
        ValueError: ``max_consecutive`` is negative or not an integer.
        TypeError: ``inner`` is not a Transform.
    """
    return SkipNonfinite(inner, max_consecutive)
