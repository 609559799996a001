"""The transform protocol: small, composable gradient transformations on lists of tensors.

A :class:`Transform` is a pair of functions, as in optax:

* ``init(params) -> state`` builds the state for a list of parameters;
* ``update(updates, state, params) -> (updates, state)`` turns this step's updates (at first the
  gradients) into new updates and returns the new state.

The final updates are *added* to the parameters (``p ← p + u``), so a descent step ends with a
negative learning rate (:func:`steadygrad.scale_by_lr` does this).

State
    A transform's state is a named tuple. Each field is one of:

    * a list of tensors aligned with ``params`` (per-parameter state, e.g. Adam's ``exp_avg``);
    * a single tensor shared by all parameters (e.g. the running mean of a global norm);
    * ``None`` (a feature that is switched off, e.g. ``max_exp_avg_sq`` without amsgrad).

    The state of :func:`chain` is the plain tuple of its parts' states. Field names follow
    torch.optim's per-parameter state keys where torch has the same quantity, so that the
    optimizers in :mod:`steadygrad.optim` can store the state in torch's ``state_dict`` layout.

In-place rule (one rule for all transforms)
    ``update`` *consumes* ``updates`` and ``state``: it may overwrite their tensors in place and
    returns the resulting updates and state, which may be the very same tensor objects. The
    caller must use the returned values and must pass copies of anything it still needs (the
    optimizers pass a copy of ``.grad``, so gradients are never modified). ``params`` are
    read-only: no transform writes them. This is torch.optim's memory behaviour: a chain needs
    no buffer beyond the state and one update-sized workspace.

Hyperparameters may be Python numbers or 0-d tensors (a tensor changes value without
recompiling a ``torch.compile``'d step). No transform reads a tensor's value on the host.

Skipping a step without a host sync
    A caller that finds a bad step (non-finite gradients) decides on the device, not on the host.
    It runs the transforms inside :func:`gated` with a 0-d ``commit`` tensor (1 = the step counts,
    0 = it must leave no trace) and with the bad gradients zeroed. Every stateful transform reads
    :func:`commit_gate` and folds it into its state update (an EMA rate multiplied by the gate, a
    counter advanced by the gate, a history slot written only when open), so that a closed gate
    leaves all of its state bit-for-bit unchanged. Outside :func:`gated` the gate is ``None``
    (always commit).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor

__all__ = [
    "STRUCTURES",
    "EmptyState",
    "Transform",
    "chain",
    "coarsest_structure",
    "commit_gate",
    "gated",
    "group_hyperparameter",
    "hyperparameters",
    "identity",
    "state_leaves",
]


#: ``Transform.structure``: what a transform needs to see of the tensors it is given.
#: ``"elements"``: nothing: it is element-wise or reduces over everything (a global norm), so it
#: gives the same result on the tensors concatenated into one flat buffer. ``"units"``: whole rows
#: along dim 0 (AGC's units) must stay rows; any stacking of equal-length rows is fine.
#: ``"tensors"``: each tensor must be whole (per-tensor norms), the safe default.
STRUCTURES = ("elements", "units", "tensors")


class Transform(NamedTuple):
    """A gradient transformation: ``init(params) -> state`` and
    ``update(updates, state, params) -> (updates, state)``. See the module docstring for the
    state layout and the in-place rule.

    ``structure`` (one of :data:`STRUCTURES`) tells what the transform needs to see of the tensors;
    the fused optimizers (``fused=True``) run transforms that need no more than ``"units"`` on
    flat buffers. A transform written by hand is ``"tensors"`` unless it says otherwise."""

    init: Callable[[Sequence[Tensor]], Any]
    update: Callable[[list[Tensor], Any, Sequence[Tensor] | None], tuple[list[Tensor], Any]]
    structure: str = "tensors"


def coarsest_structure(*structures: str) -> str:
    """The structure a composition of transforms needs: the most demanding of its parts."""
    return max(structures, key=STRUCTURES.index) if structures else "elements"


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def identity() -> Transform:
    """A transform that returns the updates unchanged."""

    def init(params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(updates, state, params=None):
        return updates, state

    return Transform(init, update, "elements")


def chain(*transforms: Transform) -> Transform:
    """Applies ``transforms`` one after the other; the state is the tuple of their states.

    Example:
        ``sg.chain(sg.scale_by_adam(), sg.add_decayed_weights(1e-2), sg.scale_by_lr())`` is AdamW.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform):
            raise TypeError(f"chain: argument {i} is {type(t).__name__}, expected a Transform")

    def init(params: Sequence[Tensor]) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of {len(state)} parts")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return Transform(init, update, coarsest_structure(*(t.structure for t in transforms)))


def state_leaves(state: Any, path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], NamedTuple]]:
    """Yields ``(path, named_tuple)`` for every transform state inside a (nested) chain state,
    in chain order; ``path`` is the position in the nesting of chains."""
    if hasattr(state, "_fields"):
        yield path, state
    elif isinstance(state, tuple):
        for i, part in enumerate(state):
            yield from state_leaves(part, path + (i,))
    else:
        raise TypeError(f"not a transform state: {type(state).__name__}")


# The hyperparameters of the parameter group being stepped, and the commit gate. The optimizers of
# steadygrad.optim set the group around each ``update`` call so that transforms such as
# ``scale_by_lr()`` read the values an LR scheduler or the user wrote into ``param_groups`` at this
# very step. Both live in a thread-local stack (not a ContextVar: torch.compile traces
# thread-local reads, so an ``update`` that reads them still compiles with fullgraph=True).
class _Context(threading.local):
    def __init__(self) -> None:
        self.groups: list[Mapping[str, Any]] = []
        self.gates: list[Tensor] = []


_CONTEXT = _Context()


@contextlib.contextmanager
def hyperparameters(group: Mapping[str, Any]) -> Iterator[None]:
    """Makes ``group`` (a torch.optim param group) the source of :func:`group_hyperparameter`."""
    _CONTEXT.groups.append(group)
    try:
        yield
    finally:
        _CONTEXT.groups.pop()


def group_hyperparameter(name: str) -> Any:
    """The value of ``name`` in the parameter group being stepped.

    Raises:
        RuntimeError: outside a steadygrad optimizer's ``step``.
        KeyError: the group has no such hyperparameter.
    """
    if not _CONTEXT.groups:
        raise RuntimeError(
            f"the hyperparameter {name!r} is read from the optimizer's parameter group, but no "
            "steadygrad optimizer is stepping; give the value explicitly (e.g. scale_by_lr(lr=1e-3))"
        )
    group = _CONTEXT.groups[-1]
    if name not in group:
        raise KeyError(f"the parameter group has no hyperparameter {name!r}")
    return group[name]


@contextlib.contextmanager
def gated(commit: Tensor) -> Iterator[None]:
    """Runs the enclosed ``update`` calls with the commit gate ``commit`` (a 0-d tensor, 1 or 0)."""
    _CONTEXT.gates.append(commit)
    try:
        yield
    finally:
        _CONTEXT.gates.pop()


def commit_gate() -> Tensor | None:
    """The commit gate of the step being taken: ``None`` (commit) or a 0-d tensor, 1 to commit and
    0 to leave every piece of state unchanged. See the module docstring."""
    return _CONTEXT.gates[-1] if _CONTEXT.gates else None
