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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .gate import clones, select_
from .tensorlist import mul_scalar_

__all__ = [
    "STRUCTURES",
    "Chain",
    "Dense",
    "EmptyState",
    "Hyper",
    "Quotient",
    "StepContext",
    "Transform",
    "apply_scale",
    "chain",
    "coarsest_structure",
    "identity",
    "state_leaves",
    "with_leaves",
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
        writable: whether the incoming updates belong to the step and may be overwritten (the
            in-place rule). An optimizer that hands a transform the gradients themselves says
            ``False``; a transform that can produce its result out of place at no extra cost
            (norm clipping: a scaled copy; coupled weight decay: ``g + λp``) then does, and
            declares ``writes_updates = False``.
        scale: ``None``, or a factor the incoming updates still carry: the transform's input is
            ``scale · updates``. Global norm clipping leaves its coefficient unapplied this way
            (:meth:`Transform.update_scaled`), so that on gradients it must not write it makes no
            scaled copy: the adaptive scalings fold the factor into their own arithmetic
            (``takes_scale``); for every other transform the chain applies it first
            (:func:`apply_scale`).
        scratch: ``None``, or kept memory for the step's large parameter-sized temporaries, aligned
            with the parameters (a :class:`~steadygrad.core.workspace.Scratch`; the reference
            executor provides one on the CPU, see :mod:`steadygrad.core.workspace`). A transform
            may write a temporary there that is dead when the step ends (a denominator), never
            state or updates it hands on.
        shards: ``None``, or one :data:`~steadygrad.core.dtensor.ShardSpec` (or ``None``) per tensor
            given: the tensors are the local shards of DTensors (FSDP2), and a transform that needs
            a norm of whole tensors passes this to :mod:`steadygrad.core.norms`, which all-reduces
            over the mesh (:mod:`steadygrad.core.dtensor`). Element-wise transforms ignore it.
        reserved: the caller made room for this step in state that grows (:meth:`Transform.reserve`)
            before it: compiled code, which cannot read a size from a value, then relies on it.
        complex_views: ``None``, or one bool per tensor given: ``True`` where the tensor is the real
            view (``torch.view_as_real``, a trailing dimension of 2) of a complex parameter. A
            transform whose units follow the tensor's shape (AGC) reads the complex shape here.
        sizes: ``None``, or one 0-d tensor per tensor given: how many of its elements take part in
            this step. A fused step's flat buffer also holds the parameters that have no gradient at
            this step (zero, and left as they were); a per-element statistic (the fraction of
            elements clipped) divides by these counts instead of ``numel()``.
        segments: ``None``, or one int32 tensor per tensor given, laid out like it: the parameter
            of each of its elements. The step counters in the state are then tables of one value
            per parameter (a fused step's flat buffer holds parameters that have stepped different
            numbers of times); a transform computes its factors from them on the tables and
            gathers them per element (:func:`~steadygrad.core.tensorlist.per_element`).
    """

    hyper: Mapping[str, Any] = field(default_factory=dict)
    gate: Tensor | None = None
    norm: Tensor | None = None
    writable: bool = True
    scale: Any = None
    scratch: Any = None
    shards: Any = None
    reserved: bool = False
    complex_views: Any = None
    sizes: Any = None
    segments: Any = None

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
        return replace(self, gate=gate, norm=None)

    def with_scale(self, scale: Any) -> StepContext:
        """This context with the pending factor ``scale`` (``None``: none)."""
        if scale is None and self.scale is None:
            return self
        return replace(self, scale=scale)

    def after(self, given: list[Tensor], returned: list[Tensor], scale: Any = None) -> StepContext:
        """The context for the next transform of a chain, which gets ``returned`` (carrying the
        factor ``scale``, see :meth:`Transform.update_scaled`): no ``norm`` (it measured
        ``given``), and writable unless the updates are still the ones given."""
        writable = self.writable or not given or returned[0] is not given[0]
        if self.norm is None and writable == self.writable and scale is None and self.scale is None:
            return self
        return replace(self, norm=None, writable=writable, scale=scale)


def apply_scale(updates: list[Tensor], ctx: StepContext) -> tuple[list[Tensor], StepContext]:
    """The updates with ``ctx.scale`` applied, and the context without it: in place when the
    updates are writable, else as new tensors (which are then). Computed as norm clipping scales
    (:func:`steadygrad.core.norms.scale_`: float16/bfloat16 in float32)."""
    if ctx.scale is None:
        return updates, ctx
    from .norms import scale_, scaled

    factor = ctx.scale if isinstance(ctx.scale, Tensor) else torch.tensor(ctx.scale, dtype=torch.float64)
    if ctx.writable:
        scale_(updates, factor)
    else:
        updates = scaled(updates, factor)
    return updates, replace(ctx, writable=True, scale=None)


def _settle(t: Transform, updates: list[Tensor], ctx: StepContext) -> tuple[list[Tensor], StepContext]:
    """What ``t`` is given: the pending factor applied first unless ``t`` takes it."""
    if ctx.scale is None or t.takes_scale:
        return updates, ctx
    return apply_scale(updates, ctx)


#: The context of a step outside any optimizer: no group, always commit.
PLAIN = StepContext()


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _wide(x: Any) -> Any:
    """A tensor factor in float64 (a float32 lr times a float64 decay loses no digits)."""
    return x.to(torch.float64) if isinstance(x, Tensor) and x.dtype != torch.float64 else x


class Dense(NamedTuple):
    """Updates as tensors (see :meth:`Transform.update_pending`)."""

    tensors: list[Tensor]

    def materialize(self) -> list[Tensor]:
        return self.tensors

    def add_to_(self, params: list[Tensor], factor: Any = 1.0) -> None:
        """``params += factor · u`` (the tensors are read, not written)."""
        if _is_number(factor):
            torch._foreach_add_(params, self.tensors, alpha=factor)
        else:
            torch._foreach_add_(params, torch._foreach_mul(self.tensors, factor))


class Quotient(NamedTuple):
    """Updates ``u = scale · num / den`` not divided yet, so that adding them to the parameters is
    one ``addcdiv`` (torch.optim's own last operation). ``scale`` is one number or 0-d tensor, or
    one per tensor."""

    num: list[Tensor]
    den: list[Tensor]
    scale: Any = 1.0

    def _scales(self, factor: Any) -> Any:
        factor = _wide(factor)
        if isinstance(self.scale, list):
            return [factor * s for s in self.scale]
        return factor * self.scale

    def materialize(self) -> list[Tensor]:
        u = torch._foreach_div(self.num, self.den)
        if not (_is_number(self.scale) and self.scale == 1):
            mul_scalar_(u, self.scale)
        return u

    def add_to_(self, params: list[Tensor], factor: Any = 1.0) -> None:
        """``params += factor · u`` in one pass where the factors are numbers."""
        scales = self._scales(factor)
        if isinstance(scales, list) and scales and all(map(_is_number, scales)) and len(set(scales)) == 1:
            scales = scales[0]  # one number: no list of scalars to convert per tensor
        if _is_number(scales):
            torch._foreach_addcdiv_(params, self.num, self.den, value=scales)
        elif isinstance(scales, list) and all(map(_is_number, scales)):
            torch._foreach_addcdiv_(params, self.num, self.den, scales)
        else:
            u = torch._foreach_div(self.num, self.den)
            torch._foreach_mul_(u, scales)
            torch._foreach_add_(params, u)


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
        takes_scale: ``update`` honours :attr:`StepContext.scale` itself (it folds the factor into
            its arithmetic, or applies it); for other transforms the caller applies it first.

    Applying a chain to the parameters (``apply_``)
        The chain's *linear tail* (stateless transforms ``u ← a·u + b·p``: :func:`scale_by_lr`,
        :func:`scale`, :func:`add_decayed_weights`, see :meth:`linear`) is folded into the
        parameter update: with ``u₀`` the updates of the last transform before the tail, the tail
        gives ``u = A·u₀ + B·p``, so ``p ← p·(1 + B) + A·u₀``, torch's AdamW (``p ← p·(1 − lr·λ)``,
        then the Adam step). That last transform hands over ``u₀`` unfinished
        (:meth:`update_pending`): Adam's ``m / den`` as a :class:`Quotient`, added with one
        ``addcdiv`` as torch.optim does, instead of being divided, scaled and added.
    """

    structure: ClassVar[str] = "tensors"
    writes_updates: ClassVar[bool] = True
    fresh_updates: ClassVar[bool] = False
    takes_scale: ClassVar[bool] = False

    def init(self, params: Sequence[Tensor]) -> Any:
        raise NotImplementedError

    def update(
        self, updates: list[Tensor], state: Any, params: Sequence[Tensor] | None = None, ctx: StepContext = PLAIN
    ) -> tuple[list[Tensor], Any]:
        raise NotImplementedError

    def update_pending(
        self, updates: list[Tensor], state: Any, params: Sequence[Tensor] | None = None, ctx: StepContext = PLAIN
    ) -> tuple[Dense | Quotient, Any]:
        """``update``, with the updates possibly unfinished (a :class:`Quotient`) or aliasing the
        state (read-only: they are only added to the parameters)."""
        updates, state = self.update(updates, state, params, ctx)
        return Dense(updates), state

    def update_scaled(
        self, updates: list[Tensor], state: Any, params: Sequence[Tensor] | None = None, ctx: StepContext = PLAIN
    ) -> tuple[list[Tensor], Any, Any]:
        """``update``, possibly leaving one global factor unapplied: returns ``(updates, scale,
        state)`` where the result is ``scale · updates`` (``scale`` ``None``: applied). Global norm
        clipping returns its coefficient this way (see :attr:`StepContext.scale`)."""
        updates, state = self.update(updates, state, params, ctx)
        return updates, None, state

    def reserve(self, state: Any) -> Any:
        """``state`` with room for one more step: what an executor that compiles the step calls
        first, outside compiled code (the fused one does, and then says so with
        ``StepContext.reserved``), for state whose size must grow, which compiled code cannot
        decide without reading a value. The state itself by default; AutoClip's unbounded history
        doubles when full; a transform that wraps others passes the call on."""
        return state

    def linear(self, ctx: StepContext = PLAIN) -> tuple[Any, Any] | None:
        """``(a, b)`` if this transform is ``u ← a·u + b·p`` and stateless, else ``None``."""
        return None

    def apply_(self, params: list[Tensor], updates: list[Tensor], state: Any, ctx: StepContext = PLAIN) -> Any:
        """``update``, then ``params += updates`` in place (kept as they were under a closed
        ``ctx.gate``); returns the new state."""
        updates, ctx = _settle(self, updates, ctx)
        pending, state = self.update_pending(updates, state, params, ctx)
        _apply_gated(params, pending, 1.0, 0.0, ctx.gate)
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

    takes_scale: ClassVar[bool] = True  # each part gets the pending factor applied unless it takes it

    def init(self, params: Sequence[Tensor]) -> tuple:
        return tuple(t.init(params) for t in self.transforms)

    def _check(self, state: Any) -> None:
        if len(state) != len(self.transforms):
            raise ValueError(f"chain of {len(self.transforms)} transforms got a state of {len(state)} parts")

    def _run(self, parts, updates, state, params, ctx):
        """``parts`` one after the other; returns the updates, the context for what follows (with
        the factor the updates still carry) and the new states."""
        new_state = []
        for t, s in zip(parts, state):
            updates, ctx = _settle(t, updates, ctx)
            given = updates
            updates, scale, s = t.update_scaled(updates, s, params, ctx)
            ctx = ctx.after(given, updates, scale)
            new_state.append(s)
        return updates, ctx, new_state

    def reserve(self, state):
        self._check(state)
        return tuple(t.reserve(s) for t, s in zip(self.transforms, state))

    def update(self, updates, state, params=None, ctx=PLAIN):
        self._check(state)
        updates, ctx, new_state = self._run(self.transforms, updates, state, params, ctx)
        updates, _ = apply_scale(updates, ctx)
        return updates, tuple(new_state)

    def update_scaled(self, updates, state, params=None, ctx=PLAIN):
        self._check(state)
        updates, ctx, new_state = self._run(self.transforms, updates, state, params, ctx)
        return updates, ctx.scale, tuple(new_state)

    def update_pending(self, updates, state, params=None, ctx=PLAIN):
        self._check(state)
        if not self.transforms:
            updates, _ = apply_scale(updates, ctx)
            return Dense(updates), ()
        updates, ctx, new_state = self._run(self.transforms[:-1], updates, state[:-1], params, ctx)
        last = self.transforms[-1]
        updates, ctx = _settle(last, updates, ctx)
        pending, s = last.update_pending(updates, state[-1], params, ctx)
        return pending, tuple(new_state) + (s,)

    def apply_(self, params, updates, state, ctx=PLAIN):
        """See :class:`Transform`: the linear tail folded into the parameter update."""
        self._check(state)
        tail = len(self.transforms)
        while tail > 0 and self.transforms[tail - 1].linear(ctx) is not None:
            tail -= 1
        if tail == 0:  # nothing but linear transforms: nothing to fold them into
            return super().apply_(params, updates, state, ctx)
        head = Chain(self.transforms[:tail])
        pending, head_state = head.update_pending(updates, state[:tail], params, ctx)
        a_total, b_total = 1.0, 0.0  # the tail is u ← A·u₀ + B·p
        for t in self.transforms[tail:]:
            a, b = (_wide(x) for x in t.linear(ctx))
            a_total, b_total = a * a_total, a * b_total + b
        _apply_gated(params, pending, a_total, b_total, ctx.gate)
        return head_state + tuple(state[tail:])


def _apply_gated(params: list[Tensor], pending: Dense | Quotient, a: Any, b: Any, gate: Tensor | None) -> None:
    """``p ← p·(1 + b) + a·u`` in place; under a commit gate the new values are computed apart
    and selected where the gate is open (:func:`~steadygrad.core.gate.select_`): a closed gate
    leaves the parameters bit-for-bit unchanged whatever ``u`` holds (inf, NaN, 0/0)."""
    decay = not (_is_number(b) and b == 0)
    if gate is None:
        if decay:
            mul_scalar_(params, 1 + b)
        pending.add_to_(params, a)
        return
    new = clones(params)
    if decay:
        mul_scalar_(new, 1 + b)
    pending.add_to_(new, a)
    select_(params, new, gate)


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


def with_leaves(state: Any, leaves: Iterable[Any]) -> Any:
    """``state`` with its transform states (in :func:`state_leaves` order) replaced by
    ``leaves``: the same nesting of chains."""
    leaves = iter(leaves)

    def rebuild(part: Any) -> Any:
        if hasattr(part, "_fields"):
            return next(leaves)
        return tuple(rebuild(p) for p in part)

    return rebuild(state)
