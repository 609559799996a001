"""The transform protocol: small, composable, picklable gradient transformations on lists of tensors.

A :class:`Transform` is a value, as in optax: a frozen dataclass whose fields are its
hyperparameters, with two methods,

* ``init(params) -> state`` builds the state for a list of parameters;
* ``update(updates, state, params, ctx) -> (updates, state)`` turns this step's updates (at first
  the gradients) into new updates and returns the new state. ``ctx`` (a :class:`StepContext`)
  brings everything the step provides: the hyperparameters of the parameter group being stepped
  and the commit gate. Nothing reaches a transform through a hidden channel (no thread-locals, no
  context variables), so a transform pickles, and a compiled step sees all of its inputs.

The final updates are *added* to the parameters (``p ← p + u``), so a descent step ends with a
negative learning rate (:func:`steadygrad.scale_by_lr` does this). ``apply_`` does the last
transform and that addition in one go where it can (``scale_by_lr`` adds ``-lr·u`` in one
operation instead of scaling ``u`` first).

State
    A transform's state is a named tuple. Each field is one of:

    * a list of tensors aligned with ``params`` (per-parameter state, e.g. Adam's ``exp_avg``);
    * a single tensor shared by all parameters (e.g. the running mean of a global norm);
    * ``None`` (a feature that is switched off, e.g. ``max_exp_avg_sq`` without amsgrad).

    The state of :func:`chain` is the plain tuple of its parts' states. Field names follow
    torch.optim's per-parameter state keys where torch has the same quantity, so that the
    optimizers in :mod:`steadygrad.optim` store the state in torch's ``state_dict`` layout
    (:mod:`steadygrad.core.state`).

In-place rule (one rule for all transforms)
    ``update`` *consumes* ``updates`` and ``state``: it may overwrite their tensors in place and
    returns the resulting updates and state, which may be the very same tensor objects.
    ``params`` are read-only: no transform writes them (only ``apply_`` does). A transform whose
    ``update`` never writes the tensors it is given declares ``writes_updates = False``; the
    optimizers then hand it the gradients themselves instead of a copy (as torch.optim does).
    A transform whose updates come out as new tensors of its own declares ``fresh_updates =
    True``; what follows it in a chain may then write them even when the chain was given the
    gradients.

Hyperparameters
    Python numbers or 0-d tensors (a tensor changes value without recompiling a compiled step),
    or :class:`Hyper` references (``Hyper("lr")``): the value of that name in ``ctx.hyper``,
    i.e. in the parameter group being stepped, read at every step. The optimizers build their
    chains once per structure with such references, so LR schedulers and ``param_groups`` edits
    take effect at once. No transform reads a tensor's value on the host.

Skipping a step without a host sync
    A caller that finds a bad step (non-finite gradients) decides on the device, not on the host.
    It runs the transforms with ``ctx.gate`` a 0-d tensor (1 = the step counts, 0 = it must leave
    no trace) and with the bad gradients zeroed. Every stateful transform folds the gate into its
    state update by *selection* (:mod:`steadygrad.core.gate`), so that a closed gate leaves all of
    its state bit-for-bit unchanged. ``ctx.gate`` is ``None`` when every step commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "STRUCTURES",
    "Chain",
    "EmptyState",
    "Hyper",
    "StepContext",
    "Transform",
    "chain",
    "coarsest_structure",
    "identity",
    "state_leaves",
]


#: ``Transform.structure``: what a transform needs to see of the tensors it is given.
#: ``"elements"``: nothing: it is element-wise or reduces over everything (a global norm), so it
#: gives the same result on the tensors concatenated into one flat buffer. ``"units"``: whole rows
#: along dim 0 (AGC's units) must stay rows; any stacking of equal-length rows is fine.
#: ``"tensors"``: each tensor must be whole (per-tensor norms), the safe default.
STRUCTURES = ("elements", "units", "tensors")


def coarsest_structure(*structures: str) -> str:
    """The structure a composition of transforms needs: the most demanding of its parts."""
    return max(structures, key=STRUCTURES.index) if structures else "elements"


@dataclass(frozen=True)
class Hyper:
    """A reference to the hyperparameter ``name`` of the parameter group being stepped.

    ``sg.scale_by_lr()`` is ``scale_by_lr(lr=Hyper("lr"))``: it reads the group's ``lr`` at every
    step (from :attr:`StepContext.hyper`), so that LR schedulers work."""

    name: str


@dataclass(frozen=True)
class StepContext:
    """What a step provides to every ``update``: explicit data, no hidden channels.

    Attributes:
        hyper: the hyperparameters of the parameter group being stepped (a torch.optim param
            group, or the fused step's 0-d tensors of it); :class:`Hyper` references resolve here.
        gate: the commit gate, ``None`` (commit) or a 0-d tensor: non-zero commits, 0 leaves every
            piece of state unchanged.
        norm: the global L2 norm of the incoming updates when the caller has already computed it
            (a :class:`steadygrad.Clipper` does, for its statistics), else ``None``. A chain passes
            it to its first transform only.
    """

    hyper: Mapping[str, Any] = field(default_factory=dict)
    gate: Tensor | None = None
    norm: Tensor | None = None

    def value(self, v: Any) -> Any:
        """``v`` itself, or the group's value if ``v`` is a :class:`Hyper` (1-element tensors as
        0-d, tuples element-wise)."""
        if isinstance(v, Hyper):
            try:
                v = self.hyper[v.name]
            except KeyError:
                raise KeyError(
                    f"the hyperparameter {v.name!r} is read from the parameter group, but the step provides "
                    f"none (known: {sorted(k for k in self.hyper if k != 'params')}); outside an optimizer, "
                    "give the value explicitly (e.g. scale_by_lr(lr=1e-3))"
                ) from None
        if isinstance(v, Tensor) and v.dim() != 0:
            return v.reshape(())
        if isinstance(v, tuple):
            return tuple(x.reshape(()) if isinstance(x, Tensor) and x.dim() else x for x in v)
        return v

    def with_gate(self, gate: Tensor | None) -> StepContext:
        """This context with ``gate`` (already combined with the current one by the caller) and
        without ``norm`` (a gating caller zeroes the updates)."""
        return StepContext(self.hyper, gate)

    def without_norm(self) -> StepContext:
        """This context for transforms that see other updates than the ones ``norm`` measured."""
        return self if self.norm is None else StepContext(self.hyper, self.gate)


#: The context of a step outside any optimizer: no group, always commit.
PLAIN = StepContext()


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class Transform:
    """A gradient transformation (see the module docstring).

    Subclasses are frozen dataclasses whose fields are their hyperparameters; they implement
    ``init`` and ``update`` and set the class attributes below.

    Attributes:
        structure: one of :data:`STRUCTURES`: what the transform needs to see of the tensors. The
            fused optimizers (``fused=True``) run transforms that need no more than ``"units"`` on
            flat buffers. A transform written by hand is ``"tensors"`` unless it says otherwise.
        writes_updates: ``update`` may overwrite the tensors of ``updates`` it is given.
        fresh_updates: ``update`` returns new tensors of its own (not its input, not its state).
    """

    structure: ClassVar[str] = "tensors"
    writes_updates: ClassVar[bool] = True
    fresh_updates: ClassVar[bool] = False

    def init(self, params: Sequence[Tensor]) -> Any:
        raise NotImplementedError

    def update(
        self, updates: list[Tensor], state: Any, params: Sequence[Tensor] | None = None, ctx: StepContext = PLAIN
    ) -> tuple[list[Tensor], Any]:
        raise NotImplementedError

    def apply_(self, params: list[Tensor], updates: list[Tensor], state: Any, ctx: StepContext = PLAIN) -> Any:
        """``update``, then ``params += updates`` in place; returns the new state."""
        updates, state = self.update(updates, state, params, ctx)
        torch._foreach_add_(params, updates)
        return state


@dataclass(frozen=True)
class Identity(Transform):
    """A transform that returns the updates unchanged."""

    structure: ClassVar[str] = "elements"
    writes_updates: ClassVar[bool] = False

    def init(self, params: Sequence[Tensor]) -> EmptyState:
        return EmptyState()

    def update(self, updates, state, params=None, ctx=PLAIN):
        return updates, state


def identity() -> Transform:
    """A transform that returns the updates unchanged."""
    return Identity()


@dataclass(frozen=True)
class Chain(Transform):
    """Transforms applied one after the other; the state is the tuple of their states."""

    transforms: tuple[Transform, ...]

    def __post_init__(self) -> None:
        for i, t in enumerate(self.transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"chain: argument {i} is {type(t).__name__}, expected a Transform")

    @property
    def structure(self) -> str:  # type: ignore[override]
        return coarsest_structure(*(t.structure for t in self.transforms))

    @property
    def writes_updates(self) -> bool:  # type: ignore[override]
        for t in self.transforms:
            if t.writes_updates:
                return True
            if t.fresh_updates:
                return False
        return False

    @property
    def fresh_updates(self) -> bool:  # type: ignore[override]
        return any(t.fresh_updates for t in self.transforms)

    def init(self, params: Sequence[Tensor]) -> tuple:
        return tuple(t.init(params) for t in self.transforms)

    def _check(self, state: Any) -> None:
        if len(state) != len(self.transforms):
            raise ValueError(f"chain of {len(self.transforms)} transforms got a state of {len(state)} parts")

    def update(self, updates, state, params=None, ctx=PLAIN):
        self._check(state)
        new_state = []
        for t, s in zip(self.transforms, state):
            updates, s = t.update(updates, s, params, ctx)
            ctx = ctx.without_norm()
            new_state.append(s)
        return updates, tuple(new_state)

    def apply_(self, params, updates, state, ctx=PLAIN):
        self._check(state)
        if not self.transforms:
            torch._foreach_add_(params, updates)
            return ()
        new_state = []
        for t, s in zip(self.transforms[:-1], state[:-1]):
            updates, s = t.update(updates, s, params, ctx)
            ctx = ctx.without_norm()
            new_state.append(s)
        new_state.append(self.transforms[-1].apply_(params, updates, state[-1], ctx))
        return tuple(new_state)


def chain(*transforms: Transform) -> Chain:
    """Applies ``transforms`` one after the other; the state is the tuple of their states.

    Example:
        ``sg.chain(sg.scale_by_adam(), sg.add_decayed_weights(1e-2), sg.scale_by_lr())`` is AdamW.
    """
    return Chain(tuple(transforms))


def state_leaves(state: Any, path: tuple[int, ...] = ()) -> Any:
    """Yields ``(path, named_tuple)`` for every transform state inside a (nested) chain state,
    in chain order; ``path`` is the position in the nesting of chains."""
    if hasattr(state, "_fields"):
        yield path, state
    elif isinstance(state, tuple):
        for i, part in enumerate(state):
            yield from state_leaves(part, path + (i,))
    else:
        raise TypeError(f"not a transform state: {type(state).__name__}")
