"""Safety against non-finite gradients: counting them, zeroing a bad step on the device, and
:func:`skip_nonfinite`, which turns a step with inf/NaN updates into a no-op for the transforms
it wraps.

Everything here decides on the device (no ``.item()``): a bad step is turned into a closed commit
gate (see :mod:`steadygrad.core.transform`) and zeroed updates, never into a Python branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.transform import Transform, commit_gate, gated
from .clipping import commit_select

__all__ = ["SkipNonfiniteState", "count_nonfinite", "nonfinite_counts", "skip_nonfinite", "zero_unless_"]


def nonfinite_counts(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The number of inf/NaN elements of each tensor, as 0-d int64 tensors on its device."""
    return [torch.count_nonzero(torch.isfinite(t).logical_not_()) for t in tensors]


def count_nonfinite(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """The number of inf/NaN elements of all ``tensors``: a 0-d int64 tensor on the device of the
    first tensor (``device``, else the CPU, when there are none). Nothing is read on the host."""
    counts = nonfinite_counts(tensors)
    if not counts:
        return torch.zeros((), dtype=torch.int64, device=device)
    dev = counts[0].device
    if len(counts) == 1:
        return counts[0]
    return torch.stack([c.to(dev) for c in counts]).sum()


def zero_unless_(tensors: Sequence[Tensor], ok: Tensor) -> None:
    """Sets every element of every tensor to 0 where the 0-d ``ok`` is false (0), in place and on
    the device (``masked_fill_``: inf and NaN become 0 too, which a multiplication would not do)."""
    bad = ok == 0
    for t in tensors:
        t.masked_fill_(bad if bad.device == t.device else bad.to(t.device), 0)


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


def skip_nonfinite(inner: Transform, max_consecutive: int | None = None) -> Transform:
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
    if not isinstance(inner, Transform):
        raise TypeError(f"skip_nonfinite: inner must be a Transform, got {type(inner).__name__}")
    if max_consecutive is not None and (
        isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 0
    ):
        raise ValueError(f"max_consecutive must be None or an integer >= 0, got {max_consecutive!r}")

    def init(params: Sequence[Tensor]) -> tuple[SkipNonfiniteState, object]:
        device = params[0].device if len(params) else None
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return (SkipNonfiniteState(zero, zero.clone(), zero.clone()), inner.init(params))

    def update(updates, state, params=None):
        own, inner_state = state
        outer = commit_gate()
        bad = count_nonfinite(updates, own.nonfinite.device)
        finite = bad == 0
        ok = finite if outer is None else finite & (outer.to(finite.device) != 0)
        zero_unless_(updates, ok)
        with gated(ok.to(torch.float32)):
            updates, inner_state = inner.update(updates, inner_state, params)
        zero_unless_(updates, ok)

        consecutive = torch.where(finite, 0, own.consecutive.to(finite.device) + 1)
        total = own.total.to(finite.device) + finite.logical_not().to(torch.int64)
        new = SkipNonfiniteState(
            nonfinite=commit_select(outer, bad, own.nonfinite),
            consecutive=commit_select(outer, consecutive, own.consecutive),
            total=commit_select(outer, total, own.total),
        )
        if max_consecutive is not None and bool(new.consecutive > max_consecutive):  # the one host read
            raise RuntimeError(
                f"skip_nonfinite: the updates were non-finite on {int(new.consecutive)} consecutive steps "
                f"(max_consecutive={max_consecutive}); the last step had {int(bad)} inf/NaN elements"
            )
        return updates, (new, inner_state)

    return Transform(init, update, inner.structure)
