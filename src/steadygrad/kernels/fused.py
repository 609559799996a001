"""The fused optimizer step: the reference transforms, compiled over flat buffers.

There is no second copy of any algorithm here. :class:`FusedExecutor` runs the very step program
the reference executor runs (:class:`steadygrad.optim.program.StepProgram`: the ``clip``
transform, every group's chain, their state layouts), on the optimizer's ``param_groups`` and
state store, never on the optimizer itself. It hands the transforms the unit-class views of
:class:`~steadygrad.kernels.flat.FlatGroup` buffers instead of per-parameter
tensors, and compiles the whole step — clipping, every parameter group's chain and the parameter
update — with ``torch.compile(fullgraph=True)``: inductor turns it into one loop over memory
(two where a global norm must be known first), C++ on CPU and Triton on GPU. A step whose
transforms are all element-wise runs on each buffer whole; one with a unit-wise transform (AGC)
on the buffer's unit-class views.

* Hyperparameters are one-element float64 tensors, refreshed from ``param_groups`` before every
  step (written when the group holds another number), so an LR scheduler (OneCycleLR also
  cycles betas and momentum) never recompiles. Structural options
  (amsgrad, centered, maximize, a hyperparameter switching between zero and non-zero) select a
  separately compiled step.
* The step applies when the parameters are real, dense and contiguous and the transforms declare
  ``structure`` ``"elements"`` or ``"units"``. Otherwise the optimizer takes the reference path,
  on the same views, with the same result.
* Where ``torch.compile`` is unavailable or fails, the same function runs eagerly over the flat
  buffers (still a handful of large foreach operations instead of several per parameter), with a
  warning; ``STEADYGRAD_COMPILE=0`` selects that directly, and ``STEADYGRAD_COMPILE_BACKEND``
  picks another ``torch.compile`` backend.
* torch's semantics: a parameter that took part in the first fused step is a view into the
  flat buffer from then on, and so is its gradient. ``zero_grad()`` sets the gradients to
  ``None`` as torch's does; a new gradient is copied into the buffer at the next step
  (``zero_grad(set_to_none=False)`` zeroes the buffer in place and saves that copy). A parameter
  without a gradient is not stepped (value, state and step count stay), for any subset of the
  parameters at any step. Step counters live in per-parameter tables (the state entries are
  views of them). While all parameters have a gradient and have stepped as often, the step
  advances one entry per buffer (per unit class) and copies it to the others, in the compiled
  step; otherwise a *segmented* step (a second compiled program) advances the tables
  themselves, computes the transforms' counter factors (bias corrections) on them and gathers
  them per element, and keeps the old value of every
  element (and table entry) of a parameter not stepped (:func:`_segmented`; for element-wise
  programs. A step where a gradient is missing takes the reference path when a chain keeps shared
  state, :func:`_absent_exact`; a unit-wise program does so too, and gives up once the counts
  part). A parameter that gets its first gradient after the buffers were built, and
  replaced parameter data (``p.data = ...``) or state entries, lay the buffers out again.
"""

from __future__ import annotations

import operator
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..core.gate import all_finite, amp_skips, amp_unscale_, combine_gates
from ..core.state import Replicated
from ..core.tensorlist import split_like, working_copy
from ..core.transform import Chain, StepContext, state_leaves, with_leaves
from .flat import FlatGroup, at_least_1d, ineligibility

__all__ = ["FusedExecutor", "compile_enabled"]

_NUMBER = (int, float)


def compile_enabled() -> bool:
    """``torch.compile`` is used unless ``STEADYGRAD_COMPILE=0``."""
    return os.environ.get("STEADYGRAD_COMPILE", "1") != "0"


def _compile(fn: Callable) -> Callable:
    """``torch.compile(fullgraph=True)``; the backend is inductor unless
    ``STEADYGRAD_COMPILE_BACKEND`` names another (``eager`` traces without generating code).

    Every plan gets a function with a code object of its own: dynamo keeps its compiled graphs
    per code object, up to a small limit (8), so one shared step function would make the ninth
    fused optimizer of a process fall back to eager.
    """
    fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    backend = os.environ.get("STEADYGRAD_COMPILE_BACKEND", "inductor")
    if backend != "inductor":
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, options=_inductor_options())


def _inductor_options() -> dict[str, Any]:
    """Inductor settings for the step (those this torch version knows).

    ``realize_reads_threshold=1``: a value with several users (the moment-clip threshold: the
    clamp and the clip count read it) becomes a buffer of its own, which the scheduler can fuse
    wherever its users go, instead of being recomputed inside each user from the state it reads.
    A count that recomputes the threshold reads ``v`` before the step overwrites it, must
    therefore run before the update and, being a reduction, cannot share its loop. With the
    threshold as a buffer, the whole step is one loop; the buffer is never written to memory.
    Measured (10M float32, 2 threads): Adam with ``moment_clip`` 12.5 → 9.7 ms, RMSprop 10.2 →
    6.9 ms; the other cases unchanged.

    ``post_grad_custom_post_pass``: :class:`_ScalarsFirst`.
    """
    from torch._inductor import config

    wanted: dict[str, Any] = {"realize_reads_threshold": 1, "post_grad_custom_post_pass": _ScalarsFirst()}
    return {key: value for key, value in wanted.items() if hasattr(config, key)}


def _scalar_pass_base() -> type:
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - older torch
        return object
    return CustomGraphPass


class _ScalarsFirst(_scalar_pass_base()):  # type: ignore[misc]
    """An inductor graph pass: every floating-point scalar the step computes (a bias correction,
    ``1 − β``, ``lr·√(1−β2^t)/(1−β1^t)``) and hands to an operation on whole buffers becomes a
    buffer of its own, computed once before the loops. Left to itself, inductor inlines such a
    scalar into the vectorised loop that reads it, where it is computed again for every vector of
    16 elements (the C++ compiler cannot hoist loads that may alias the loop's stores); torch's
    fused kernels compute them once per tensor.

    The scalars computed from the step's one-element inputs alone (hyperparameters, counters:
    most of them) are moved to the top of the graph and realized together, one buffer per dtype
    (one allocation at every step instead of one per scalar); the others (a clipping factor from
    a norm) one by one. The realization is a maximum of two copies of the values (exact), which
    inductor never inlines. The graph is still functional here (inductor re-inplaces later), so
    pure nodes may move; a mutating node never does."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        early = self._early(graph)
        together: dict[tuple, list[torch.fx.Node]] = {}
        for node in list(graph.nodes):
            val = node.meta.get("val")
            if node.op != "call_function" or node.target is torch.ops.aten.amax.default:
                continue
            if not (isinstance(val, Tensor) and val.dim() == 0 and val.dtype.is_floating_point):
                continue
            if not any(_numel(u) > 1 for u in node.users):
                continue
            if node in early:
                together.setdefault((val.dtype, val.device), []).append(node)
            else:
                self._realize(graph, [node], node)
        if together:
            anchor = next(n for n in reversed(graph.nodes) if n in early)
            for nodes in together.values():
                anchor = self._realize(graph, nodes, anchor)

    @staticmethod
    def _early(graph: torch.fx.Graph) -> set:
        """The pure nodes whose inputs are all one-element placeholders or such nodes, each moved
        up to follow the placeholders (in their order)."""
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        small = {n for n in placeholders if _numel(n) <= 1}
        early: list[torch.fx.Node] = []
        for node in graph.nodes:
            if node.op != "call_function" or _numel(node) > 1 or not node.users:
                continue
            schema = getattr(node.target, "_schema", None)
            if schema is None or schema.is_mutable:
                continue
            if all(i in small for i in node.all_input_nodes):
                small.add(node)
                early.append(node)
        anchor = placeholders[-1] if placeholders else None
        for node in early:
            if anchor is None:
                next(iter(graph.nodes)).prepend(node)
            else:
                anchor.append(node)
            anchor = node
        return set(early)

    @staticmethod
    def _realize(graph: torch.fx.Graph, nodes: list[torch.fx.Node], anchor: torch.fx.Node) -> torch.fx.Node:
        """Realizes the 0-d ``nodes`` (one dtype) as one buffer, inserted after ``anchor``; their
        users on whole buffers read it. Returns the last node inserted."""
        aten = torch.ops.aten
        vals = [n.meta["val"] for n in nodes]
        users = [[u for u in n.users if _numel(u) > 1] for n in nodes]
        added = []

        def add(target: Any, args: tuple, val: Tensor) -> torch.fx.Node:
            with graph.inserting_after(added[-1] if added else anchor):
                node = graph.call_function(target, args)
            node.meta["val"] = val
            added.append(node)
            return node

        k, device = len(nodes), vals[0].device
        with vals[0].fake_mode:
            # the values side by side, as one element-wise expression (a concatenation would be
            # a buffer with a view per value), then its maximum with itself: one buffer
            index = torch.arange(k, device=device)
            iota = add(torch.ops.prims.iota.default, (k,), index)
            iota.kwargs = {"start": 0, "step": 1, "dtype": torch.int64, "device": device, "requires_grad": False}
            stacked = torch.stack(vals)
            row = add(aten.expand.default, (nodes[0], [k]), stacked.clone())
            for i, node in enumerate(nodes[1:], 1):
                at = add(aten.eq.Scalar, (iota, i), index == i)
                row = add(aten.where.self, (at, node, row), stacked.clone())
            table = add(aten.expand.default, (row, [2, k]), stacked.expand(2, k))
            once = add(aten.amax.default, (table, [0]), stacked.clone())
            for i, (node, val, big) in enumerate(zip(nodes, vals, users)):
                one = add(aten.select.int, (once, 0, i), val.clone())
                for user in big:
                    user.replace_input_with(node, one)
        return added[-1]

    def uuid(self) -> str:
        return "steadygrad.scalars-first.3"


def _numel(node: Any) -> int:
    """The most elements of a tensor a graph node produces (a foreach node: a list of them)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    vals = val if isinstance(val, (list, tuple)) else [val]
    return max((v.numel() for v in vals if isinstance(v, Tensor)), default=0)


def _is_number(v: Any) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return _is_number(v) or (isinstance(v, Tensor) and v.numel() == 1)


def _numbers(v: Any) -> bool:
    """Whether a group's option is what the fused step reads from tensors: a number (not a bool)
    or one-element tensor, or a non-empty tuple of them (``betas``)."""
    return _is_scalar(v) or (isinstance(v, tuple) and bool(v) and all(map(_is_scalar, v)))


@dataclass
class _Group:
    """The fused form of one parameter group."""

    index: int
    flats: list[FlatGroup]
    hyper: dict[str, Any]  # the group with 0-d tensors for its numbers
    tensors: dict[str, Tensor | tuple[Tensor, ...]]  # the tensors of ``hyper`` to refresh
    # the Python number (or tuple of numbers) each tensor of ``tensors`` was last set to
    written: dict[str, Any] = field(default_factory=dict)

    def refresh(self, group: dict[str, Any]) -> None:
        """Copies the group's current hyperparameters into their tensors (no host sync). A number
        that is the very object copied at the last step is skipped (numbers are immutable; an LR
        scheduler's new value is a new object): a step with unchanged options writes nothing."""
        written = self.written
        with torch.no_grad():
            for key, t in self.tensors.items():
                value = group.get(key)
                if value is written.get(key, written):
                    continue
                if not _numbers(value):
                    continue  # an option that is no number now (moment_clip back to None)
                pairs = list(zip(t, value)) if isinstance(t, tuple) else [(t, value)]
                for ti, vi in pairs:
                    if isinstance(vi, Tensor):
                        ti.copy_(vi.reshape(()))
                    else:
                        ti.fill_(vi)
                if not any(isinstance(vi, Tensor) for _, vi in pairs):  # a tensor may change in place
                    written[key] = value


@dataclass
class _Plan:
    """A compiled step for one program (one structure of the hyperparameters)."""

    kernel: Callable
    program: Any
    views: tuple | None = None  # its inputs' views of the buffers (see FusedExecutor._arguments)


class FusedExecutor:
    """Runs step programs over flat buffers (see the module docstring). It owns the flat buffers
    and the compiled steps of one optimizer; nothing of it is pickled (an unpickled or deep-copied
    optimizer builds them again at its first fused step)."""

    def __init__(self) -> None:
        self.groups: list[_Group] | None = None
        self._outside: list[Tensor] = []  # parameters not in a flat buffer (no gradient when built)
        self.disabled: str | None = None  # why this optimizer stays on the reference path
        self._plans: dict[Any, _Plan] = {}
        self._warned: set[str] = set()
        self._program_key: Any = None
        self._layout: Any = None
        self._uniform = True  # every parameter in the buffers has stepped as often (one counter)
        self._readable = False  # few big tensors: gradients are read where autograd writes them
        self._store_values: list | None = None  # opt.state's values when last found intact

    def __deepcopy__(self, memo: dict) -> FusedExecutor:
        return FusedExecutor()

    def __reduce__(self) -> Any:
        return (FusedExecutor, ())

    # ---- building ------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget the flat layout (after load_state_dict or add_param_group); the next fused step
        rebuilds it from the current per-parameter tensors."""
        self.groups = None
        self.disabled = None
        self._store_values = None
        self._plans.clear()

    @staticmethod
    def _hyper(group: dict[str, Any], tensors: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The group for the compiled step: its numbers as one-element float64 tensors, taken from
        (or added to) ``tensors``, which keeps one tensor per option for the executor's life (a
        plan compiled earlier goes on reading the same tensors). One element, not 0-d: dynamo
        guards the value of a 0-d float64 CPU input (``not isnan(x.item())``, a Python guard
        function at every call); the transforms read them as 0-d (:meth:`StepContext.value`)."""
        hyper = {}
        for key, value in group.items():
            if key == "params":
                continue
            if not _numbers(value):
                hyper[key] = value
            elif not isinstance(value, tuple):
                if not isinstance(tensors.get(key), Tensor):
                    tensors[key] = torch.zeros(1, dtype=torch.float64, device=device)
                hyper[key] = tensors[key]
            else:
                if not (isinstance(tensors.get(key), tuple) and len(tensors[key]) == len(value)):
                    tensors[key] = tuple(torch.zeros(1, dtype=torch.float64, device=device) for _ in value)
                hyper[key] = tensors[key]
        return hyper

    def _build(self, program: Any, param_groups: list[dict[str, Any]], store: Any) -> str | None:
        groups = []
        # those with a gradient now, and those whose state the program has made before (stepped
        # before; they may have none this step). Others stay outside: a state is made for a
        # parameter only when it is stepped, as by the reference path and torch.
        members = [
            [p for p in group["params"] if p.grad is not None or _has_state(store.get(p), program, index)]
            for index, group in enumerate(param_groups)
        ]
        # gradients the steps will read where autograd writes them are not copied in (see step)
        adopt = not _worth_reading([p for ps in members for p in ps]) or not all(
            _readable_gradient(p) for ps in members for p in ps if p.grad is not None
        )
        for index, (group, params) in enumerate(zip(param_groups, members)):
            if not params:
                continue
            if len({id(p) for p in params}) != len(params):
                return "a parameter listed twice in a group"
            for p in params:
                if p.device.type == "meta":  # torch's error, before any state exists
                    raise RuntimeError(
                        "`fused=True` requires all the params to be floating point Tensors of supported devices "
                        "(cpu, cuda, ...), and a parameter is on the meta device (no data): materialise it first "
                        "(module.to_empty), or use fused=False for a step that only creates the state's shapes"
                    )
                reason = ineligibility(p) or _sparse_gradient(p)
                if reason:
                    return reason
            devices = {p.device for p in params}
            if len(devices) != 1:
                return "a parameter group on several devices"
            tensors: dict[str, Any] = {}
            hyper = self._hyper(group, tensors, params[0].device)
            keys = self._keys(program, index, param_groups, params, store)
            counters = _counter_keys(program, index)
            flats = []
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for p in params:
                by_dtype.setdefault(p.dtype, []).append(p)
            for dtype_params in by_dtype.values():
                flat = FlatGroup.build(dtype_params, store, keys, counters, adopt)
                if isinstance(flat, str):
                    return flat
                flats.append(flat)
            groups.append(_Group(index, flats, hyper, tensors))
            groups[-1].refresh(group)
        self.groups = groups
        self._uniform = all([f.counters_agree() for g in groups for f in g.flats])  # a host read, once
        self._program_key, self._layout = program.key, _layout(program)
        flat = {id(p) for g in groups for f in g.flats for p in f.params}
        self._outside = [p for group in param_groups for p in group["params"] if id(p) not in flat]
        self._readable = _worth_reading([p for g in groups for f in g.flats for p in f.params])
        return None

    @staticmethod
    def _keys(program: Any, index: int, param_groups: list, params: list[Tensor], store: Any) -> list[str]:
        """Creates the missing state of ``params`` and returns its per-parameter keys."""
        g = program.groups[index]
        g.layout.ensure(
            store, params, Replicated(store, param_groups[index]["params"]), step_on_device=g.step_on_device
        )
        if program.clip_layout is not None:
            members = [p for group in param_groups for p in group["params"]]
            program.clip_layout.ensure(store, params, Replicated(store, members))
        return [k.key for layout in _layouts(program, index) for k in layout.per_param]

    def zero_grad(self) -> None:
        """``zero_grad(set_to_none=False)``: zeroes every gradient in place, as torch does. In the
        buffers' copy mode (many tensors) the gradient buffer is zeroed and each ``.grad`` that is
        not ``None`` points at its view again; otherwise (gradients read where autograd writes
        them) each gradient tensor is zeroed where it is. One that is ``None`` stays so."""
        for g in self.groups or ():
            for flat in g.flats:
                flat.grad_buf.zero_()
                if not flat.adopts:
                    others = [
                        p.grad for p, v in zip(flat.params, flat.grad_views) if p.grad is not None and p.grad is not v
                    ]
                    if others:
                        torch._foreach_zero_(others)
                    continue
                for p, view in zip(flat.params, flat.grad_views):
                    if p.grad is not None and p.grad is not view:
                        p.grad = view

    # ---- the step ------------------------------------------------------------------------------

    def step(self, program: Any, param_groups: list[dict[str, Any]], store: Any, amp: Any = None) -> bool:
        """One fused step of ``program`` on ``param_groups`` with the state in ``store``;
        ``False`` if this step must take the reference path. ``amp``: ``(grad_scale, found_inf)``
        of torch's fused-AMP protocol, consumed in the compiled step
        (:func:`~steadygrad.core.gate.amp_unscale_`: unscaling in the same pass, a ``found_inf``
        step commits nothing)."""
        if self.disabled:
            return False
        if not any(p.grad is not None for group in param_groups for p in group["params"]):
            return True  # no gradients: nothing is stepped, as on the reference path
        if self.groups is not None and program.key != self._program_key:
            if _layout(program) != self._layout:
                # A structural edit that adds per-parameter state (amsgrad, centered, ...): the
                # buffers are laid out again from the current per-parameter tensors.
                self.invalidate()
            else:  # shared state the new program adds (moment_clip None -> k)
                for g in self.groups:
                    params = [p for f in g.flats for p in f.params]
                    self._keys(program, g.index, param_groups, params, store)
                self._program_key = program.key
        if self.groups is None:
            reason = self._build(program, param_groups, store)
            if reason:
                return self._give_up(reason)
        assert self.groups is not None
        if not (all(f.holds_data() for g in self.groups for f in g.flats) and self._state_intact(store)) or any(
            p.grad is not None for p in self._outside
        ):
            # A parameter's data or a state entry was replaced (``p.data = ...``,
            # ``opt.state[p]["exp_avg"] = ...``), or a parameter outside the buffers (no gradient
            # and no state when they were built) now has a gradient: the buffers are laid out
            # again from the tensors as they are now.
            self.invalidate()
            reason = self._build(program, param_groups, store)
            if reason:
                return self._give_up(reason)
        flats = [f for g in self.groups for f in g.flats]
        if any(f.counters_written() for f in flats):  # opt.state[p]["step"] written in place
            self._uniform = all([f.counters_agree() for f in flats])
        replaced = [f for f in flats if not f.gradients_in_place()]
        # New gradients of a few tensors are read where autograd put them (no copy into the
        # buffer: 8 bytes per parameter); many small ones are copied (one input per buffer).
        readable = (
            bool(replaced) and self._readable and all(map(_readable_gradient, (p for f in flats for p in f.params)))
        )
        for f in [] if readable else replaced:
            reason = next(filter(None, map(_sparse_gradient, f.params)), None)
            if reason:
                return self._give_up(reason)
        missing = not readable and any(f.missing_gradients() for f in replaced)
        if program.structure == "tensors":
            return self._give_up("a transform needs whole tensors (structure='tensors')")
        # Per-parameter counters and masks need one tensor per buffer (the element structure).
        if program.structure != "elements" and not self._uniform:
            return self._give_up(
                "the parameters have taken different numbers of steps, and a transform needs whole rows "
                "(structure='units')"
            )
        if missing and not (program.structure == "elements" and _absent_exact(program)):
            # The reference path steps those with a gradient only; the element structure's later
            # steps run segmented.
            self._uniform = False
            return False
        segmented = missing or not self._uniform
        given = readable and not segmented
        plan = self._plan(program, param_groups, segmented, given)

        for g in self.groups:
            g.refresh(param_groups[g.index])
        if not given:
            for flat in replaced:
                flat.adopt_gradients()
        if program.nonfinite == "raise" and not amp_skips(amp):
            # (GradScaler's inf step is skipped inside the kernel, not raised)
            flat_params = [p for f in flats for p in f.params if p.grad is not None]
            program.finite_gate([p.grad for p in flat_params], lambda i: _describe(param_groups, flat_params[i]))
        segments = [[(*f.segments(), f.present()) for f in g.flats] for g in self.groups] if segmented else None
        arguments = self._arguments(plan, param_groups, store, given)
        new_states, clip_state = plan.kernel(*arguments, amp, segments)
        for g, state in zip(self.groups, new_states):
            layout = program.groups[g.index].layout
            if layout.shared:
                layout.store_shared(state, Replicated(store, param_groups[g.index]["params"]))
        if program.clip_layout is not None:
            members = [p for group in param_groups for p in group["params"]]
            program.clip_layout.store_shared(clip_state, Replicated(store, members))
        if segmented:
            self._uniform = False
        for flat in flats:  # the step wrote the counter tables
            flat.record_versions()
        return True

    def _state_intact(self, store: Any) -> bool:
        """:meth:`FlatGroup.state_intact` of every buffer. While ``opt.state`` holds the very
        dicts it held at the last check, in the same order (one C-level pass over its values,
        no hashing of parameters), only the entries of the dicts are checked."""
        flats = [f for g in self.groups for f in g.flats]
        known = self._store_values
        if known is not None and len(store) == len(known) and all(map(operator.is_, store.values(), known)):
            return all(f.entries_intact() for f in flats)
        if not all(f.state_intact(store) for f in flats):
            return False
        self._store_values = list(store.values())
        return True

    def _give_up(self, reason: str) -> bool:
        """Turns the fused path off for good (one warning naming ``reason``): this step and the
        later ones take the reference path."""
        self.disabled = reason
        self._warn(f"fused=True falls back to the reference path: {reason}")
        return False

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=5)

    def _plan(self, program: Any, param_groups: list[dict[str, Any]], segmented: bool, given: bool) -> _Plan:
        key = (program.key, segmented, given)
        plan = self._plans.get(key)
        if plan is None:
            hypers = []
            for g in self.groups:
                group = param_groups[g.index]
                g.hyper = self._hyper(group, g.tensors, g.flats[0].param_buf.device)
                g.written.clear()  # tensors _hyper added start at zero
                g.refresh(group)
                hypers.append(_specialized(g.hyper, group))
            counters = _counter_fields(program, [g.index for g in self.groups])
            structure = "tensors" if given else program.structure
            spans = None if segmented else [[f.counter_span(structure) for f in g.flats] for g in self.groups]
            fn = _step_function(program, [g.index for g in self.groups], hypers, counters, spans)
            kernel = _compile(fn) if compile_enabled() else fn
            plan = _Plan(_with_fallback(kernel, fn, self._warn), program)
            self._plans[key] = plan
        return plan

    def _arguments(self, plan: _Plan, param_groups: list[dict[str, Any]], store: Any, given: bool) -> tuple:
        """The kernel's inputs: per group the parameters, gradients and state as views of the
        flat buffers (whole buffers, unit classes, or with ``given`` one per parameter next to the
        gradients autograd wrote), the counters as their tables, and ``clip``'s state.

        The views are made at a plan's first step and kept with it (the buffers live as long as
        the plan); shared state is read from ``store`` at every step, and every state gets
        :meth:`~steadygrad.core.transform.Transform.reserve` at every step."""
        program = plan.program
        if plan.views is None:
            structure = "tensors" if given else program.structure
            params, grads, states = [], [], []
            for g in self.groups:
                params.append([v for f in g.flats for v in f.class_views(f.param_buf, structure)])
                grads.append([v for f in g.flats for v in f.class_views(f.grad_buf, structure)])
                states.append(_FlatState(program.groups[g.index].layout, g.flats, structure))
            flats = [f for g in self.groups for f in g.flats]
            clip = None if program.clip_layout is None else _FlatState(program.clip_layout, flats, structure)
            plan.views = params, grads, states, clip
        params, grads, states, clip = plan.views
        if given:
            grads = [[at_least_1d(p.grad) for f in g.flats for p in f.params] for g in self.groups]
        states = [
            s.layout.transform.reserve(s.gather(Replicated(store, param_groups[g.index]["params"])))
            for g, s in zip(self.groups, states)
        ]  # room for this step, outside compiled code
        clip_state = None
        if clip is not None:
            members = [p for group in param_groups for p in group["params"]]
            clip_state = program.clip.reserve(clip.gather(Replicated(store, members)))
        return params, grads, states, clip_state


#: The most tensors whose gradients a fused step reads where autograd wrote them: each is an input
#: of the compiled step (a guard and a loop of its own); more are copied into the buffers.
_GIVEN_TENSORS = 16
#: The fewest elements for that: reading them in place saves a copy (8 bytes per element, ~0.4 ms
#: per million on 2 CPU cores) but costs ~0.1 ms of host time per step (the inputs' guards).
_GIVEN_FROM = 1 << 18


def _worth_reading(params: list[Tensor]) -> bool:
    """Whether gradients of ``params`` are to be read where autograd writes them (see
    :data:`_GIVEN_TENSORS`, :data:`_GIVEN_FROM`)."""
    return len(params) <= _GIVEN_TENSORS and sum(p.numel() for p in params) >= _GIVEN_FROM


def _readable_gradient(p: Tensor) -> bool:
    g = p.grad
    return (
        g is not None
        and g.layout == torch.strided
        and g.is_contiguous()
        and (g.shape, g.dtype, g.device) == (p.shape, p.dtype, p.device)
    )


def _describe(param_groups: list[dict[str, Any]], p: Tensor) -> str:
    for g_index, group in enumerate(param_groups):
        for p_index, other in enumerate(group["params"]):
            if other is p:
                return f"parameter {p_index} of param group {g_index} (shape {tuple(p.shape)})"
    return f"a parameter of shape {tuple(p.shape)}"


def _sparse_gradient(p: Tensor) -> str | None:
    """Why a parameter's gradient cannot be stepped in a flat buffer, or ``None``."""
    grad = p.grad
    if grad is not None and grad.layout != torch.strided:
        return "a sparse gradient (stepped by the optimizer's sparse rule on the reference path)"
    return None


def _counter_keys(program: Any, index: int) -> frozenset[str]:
    """The per-parameter state keys of group ``index`` that hold one number per parameter (step
    counters) whatever the parameter's shape: what the transforms create for a 2-element
    parameter as 0-d (a 0-d parameter's counters cannot be told from its per-element state)."""
    probe = [torch.empty(2, device="meta")]
    out = set()
    for layout in _layouts(program, index):
        try:
            template = layout.transform.init(probe)
        except Exception:  # noqa: BLE001 - a hand-written init that reads values: shapes decide
            continue
        leaves = [leaf for _, leaf in state_leaves(template)]
        for k in layout.per_param:
            if getattr(leaves[k.leaf], k.field)[0].dim() == 0:
                out.add(k.key)
    return frozenset(out)


def _layouts(program: Any, index: int) -> list[Any]:
    """The state layouts a parameter of group ``index`` has entries of: its chain's, and ``clip``'s."""
    return [program.groups[index].layout] + ([program.clip_layout] if program.clip_layout is not None else [])


def _counter_fields(program: Any, indices: list[int]) -> tuple[list[frozenset], frozenset]:
    """The ``(leaf, field)`` of the step counters in the state of each group's chain (of
    ``indices``) and of ``clip``: the fields the compiled step gets as per-parameter tables."""
    keys = {i: _counter_keys(program, i) for i in indices}

    def fields(layout: Any, index: int) -> frozenset:
        return frozenset((k.leaf, k.field) for k in layout.per_param if k.key in keys[index])

    groups = [fields(program.groups[i].layout, i) for i in indices]
    clip = fields(program.clip_layout, indices[0]) if program.clip_layout is not None and indices else frozenset()
    return groups, clip


def _absent_exact(program: Any) -> bool:
    """Whether a segmented step with parameters that have no gradient equals the reference path,
    which leaves them out: no group chain keeps shared state, and ``clip`` is one transform. In a
    chain, a parameter not stepped still has updates after its first transform (weight decay,
    Adam's old moments), which a later reduction in the chain would see (a norm clip, the
    fraction ``moment_clip`` clips: shared state), and a group none of whose parameters has a
    gradient would still commit its shared state. Such a program takes the reference path at a
    step where a gradient is missing."""
    return all(not g.layout.shared for g in program.groups) and not isinstance(program.clip, Chain)


def _has_state(entry: dict | None, program: Any, index: int) -> bool:
    """Whether a parameter's state ``entry`` holds every per-parameter key of group ``index``'s
    chain and of ``clip``."""
    return bool(entry) and all(k.key in entry for layout in _layouts(program, index) for k in layout.per_param)


def _layout(program: Any) -> tuple:
    """The per-parameter state keys of a program: what the flat buffers hold."""
    keys = [tuple(k.key for k in g.layout.per_param) for g in program.groups]
    if program.clip_layout is not None:
        keys.append(tuple(k.key for k in program.clip_layout.per_param))
    return tuple(keys)


def _step_function(
    program: Any,
    indices: list[int],
    hypers: list[dict[str, Any]],
    counters: tuple[list[frozenset], frozenset],
    spans: list[list[int]] | None,
) -> Callable:
    """The step over flat buffers: ``clip`` once over all groups, then each group's chain, its
    updates added to the parameters (``apply_``), exactly as the reference executor does.

    ``counters``: the ``(leaf, field)`` of the step counters in each group's chain state and in
    ``clip``'s (:func:`_counter_fields`), which the step gets as their tables, one per flat
    buffer. With ``spans`` (per group and buffer :meth:`FlatGroup.counter_span`: every
    parameter has stepped as often) each transform gets that many 0-d views of each table, which
    it advances once each, and the whole table then takes the first value (no host work after
    the step). ``spans`` ``None`` makes a *segmented* step (the parameters' step counts differ,
    or some have no gradient at this step): the step then also gets ``segments``, per group and
    flat buffer the parameter of every element, the elements of every parameter and which
    parameters are stepped, and each transform runs under :func:`_segmented` on the tables.
    Otherwise ``segments`` is ``None``.

    Returns per group the new state and ``clip``'s, with only their shared fields (the
    per-parameter ones were written in place)."""
    clip = program.clip
    skip = program.nonfinite == "skip"
    parts = [program.groups[i] for i in indices]
    clip_layout = program.clip_layout
    clip_spans = None if spans is None else [k for ks in spans for k in ks]

    def run(call: Callable, state: Any, fields: frozenset, spans: list[int] | None, segments: Any, ctx: StepContext):
        if spans is None:
            return _segmented(call, state, fields, segments, ctx)
        views, partial = _counter_views(state, fields, spans)
        result, new = call(views, ctx)
        _copy_back(views, new)
        for table in partial:  # the entries the step did not advance take the first's value
            table.copy_(table[0].expand_as(table))
        return result, new

    def step(params, grads, states, clip_state, amp, segments):
        # GradScaler's grad_scale/found_inf: unscaled in place (the same loop), found_inf gates.
        # nonfinite="skip": the gate from one max-abs reduction over the gradients; every state
        # update and the parameter update select under it, in the same loop.
        flat_grads = [g for gr in grads for g in gr]
        gate = None if amp is None else amp_unscale_(flat_grads, *amp)
        gate = combine_gates(gate, all_finite(flat_grads) if skip else None)
        gate = None if gate is None else gate.to(torch.float32)
        updates = [working_copy(gr, part.maximize) for gr, part in zip(grads, parts)]
        if spans is None:
            kept = [[p.clone() for p in ps] for ps in params]
        if clip is not None:
            flat_params = [p for ps in params for p in ps]
            flat_updates = [u for us in updates for u in us]
            ctx = StepContext(gate=gate, reserved=True)  # _arguments made room (Transform.reserve)
            flat_segments = None if segments is None else [s for segs in segments for s in segs]
            flat_updates, clip_state = run(
                lambda state, ctx: clip.update(flat_updates, state, flat_params, ctx),
                clip_state,
                counters[1],
                clip_spans,
                flat_segments,
                ctx,
            )
            updates = split_like(flat_updates, updates)
            clip_state = _shared_only(clip_layout, clip_state)
        new_states = []
        for i, (part, hyper, ps, us, state) in enumerate(zip(parts, hypers, params, updates, states)):
            _, new = run(
                lambda state, ctx, ps=ps, us=us, part=part: (None, part.transform.apply_(ps, us, state, ctx)),
                state,
                counters[0][i],
                None if spans is None else spans[i],
                None if segments is None else segments[i],
                StepContext(hyper, gate=gate, reserved=True),
            )
            if spans is None:
                for p, old, (index, _, present) in zip(ps, kept[i], segments[i]):
                    p.copy_(torch.where(present[index], p, old))  # the parameters not stepped
            new_states.append(_shared_only(part.layout, new))
        return new_states, clip_state

    return step


def _counter_views(state: Any, fields: frozenset, spans: list[int]) -> tuple[Any, list[Tensor]]:
    """``state`` with each counter field (``fields``: ``(leaf, field)``), a list of tables, as
    the first ``spans[i]`` entries of table ``i``, each a 0-d view; and the tables with entries
    left out."""
    leaves, partial = [], []
    for i, (_, leaf) in enumerate(state_leaves(state)):
        views = {}
        for f in leaf._fields:
            if (i, f) in fields:
                tables = getattr(leaf, f)
                views[f] = [table[j] for table, k in zip(tables, spans) for j in range(k)]
                partial += [table for table, k in zip(tables, spans) if k < table.numel()]
        leaves.append(leaf._replace(**views) if views else leaf)
    return with_leaves(state, leaves), partial


def _shared_only(layout: Any, state: Any) -> Any:
    """``state`` with its per-parameter fields ``None``: what the compiled step hands back (its
    shared fields, to store)."""
    leaves = [leaf for _, leaf in state_leaves(state)]
    for k in layout.per_param:
        leaves[k.leaf] = leaves[k.leaf]._replace(**{k.field: None})
    return with_leaves(state, leaves)


def _segmented(call: Callable, state: Any, counters: frozenset, segments: list, ctx: StepContext) -> tuple[Any, Any]:
    """One transform call of a segmented step, on one tensor per flat buffer. ``state``: its
    state, with a table of one value per parameter for each counter field (``counters``);
    ``segments``: per tensor ``(index, numels, present)``.

    The transform gets the parameter of every element (:attr:`StepContext.segments`: it computes
    its counter factors on the tables and gathers them per element) and the number of elements
    stepped per tensor (:attr:`StepContext.sizes`). Afterwards every per-parameter field gets its
    old values back where the parameter is not stepped: per element, and per table entry for the
    counters. Returns what ``call`` returns, ``(result, new state)``."""
    masks = {}
    kept = []
    for i, (_, leaf) in enumerate(state_leaves(state)):
        for f in leaf._fields:
            value = getattr(leaf, f)
            if isinstance(value, list):
                per_table = (i, f) in counters
                masks[i, f] = [present if per_table else present[index] for index, _, present in segments]
                kept.append(((i, f), [t.clone() for t in value]))
    indexes = [index for index, _, _ in segments]
    sizes = [(present * numels).sum() for _, numels, present in segments]
    result, new = call(state, replace(ctx, sizes=sizes, segments=indexes))
    _copy_back(state, new)
    leaves = [leaf for _, leaf in state_leaves(state)]
    for (i, f), olds in kept:
        for t, old, mask in zip(getattr(leaves[i], f), olds, masks[i, f]):
            t.copy_(torch.where(mask, t, old))
    return result, new


def _specialized(hyper: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """``hyper`` with the numbers that are zero in ``group`` as the Python number 0.0.

    A zero selects a separately compiled step anyway (see
    :func:`steadygrad.optim.program.structure_key`), and as a plain zero
    it lets a transform skip its term (``weight_decay=0`` does not read the parameters), as on the
    reference path, instead of multiplying by a zero tensor.
    """

    def pick(tensor: Any, value: Any) -> Any:
        if isinstance(tensor, tuple):
            return tuple(pick(t, v) for t, v in zip(tensor, value))
        return 0.0 if isinstance(tensor, Tensor) and _is_number(value) and value == 0 else tensor

    return {key: pick(value, group[key]) if key in group else value for key, value in hyper.items()}


def _with_fallback(kernel: Callable, eager: Callable, warn: Callable[[str], None]) -> Callable:
    """Runs ``kernel``; if compiling fails, warns once and runs ``eager`` from then on."""
    box = {"fn": kernel}

    def run(*args):
        try:
            return box["fn"](*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back
            if box["fn"] is eager:
                raise
            warn(f"torch.compile failed ({type(error).__name__}: {error}); the fused step runs eagerly")
            box["fn"] = eager
            return eager(*args)

    return run


class _FlatState:
    """The state of one layout over the views of ``flats`` for ``structure``: the per-parameter
    views made once, the shared fields read at every :meth:`gather`. Counters are their tables,
    one per buffer: the compiled step takes its views of them (see :func:`_step_function`)."""

    def __init__(self, layout: Any, flats: list[FlatGroup], structure: str) -> None:
        self.layout = layout
        self.views: dict[str, list[Tensor]] = {}
        for k in layout.per_param:
            if k.key in flats[0].full:
                self.views[k.key] = [v for f in flats for v in f.class_views(f.full[k.key], structure)]
            else:
                self.views[k.key] = [f.scalar[k.key] for f in flats]
        self._state = None if layout.shared else layout.assemble(self._per_param, None)

    def _per_param(self, k: Any) -> list[Tensor]:
        return self.views[k.key]

    def gather(self, shared: Replicated) -> Any:
        """The state, with the shared fields as ``shared`` holds them now."""
        if self._state is not None:
            return self._state
        return self.layout.assemble(self._per_param, shared)


def _copy_back(old: Any, new: Any) -> None:
    """Per-parameter state that a transform returned as new tensors goes back into the buffers."""
    for (_, a), (_, b) in zip(state_leaves(old), state_leaves(new)):
        for x, y in zip(a, b):
            if isinstance(x, list):
                for xi, yi in zip(x, y):
                    if xi is not yi:
                        xi.copy_(yi)
