"""Thin ``torch.optim.Optimizer`` wrappers around step programs.

:class:`TransformOptimizer` owns bookkeeping only. Each subclass says how one parameter group
becomes a chain of transforms (:meth:`~TransformOptimizer.build_transform`, with
:class:`~steadygrad.core.transform.Hyper` references for the hyperparameters) and which group
options it accepts (``HYPERPARAMETERS``). ``step()`` builds the :class:`~.program.StepProgram`
for the groups' current structure (once, then cached) and hands it to an executor: the reference
executor (:meth:`.program.StepProgram.run`) or, with ``fused=True``, the fused one
(:class:`steadygrad.kernels.fused.FusedExecutor`). The math lives in :mod:`steadygrad.transforms`.

State layout
    Per-parameter state lives in ``self.state[p]`` under torch.optim's keys (``step``, ``sum``,
    ``square_avg``, ``exp_avg``, ...), so ``state_dict()`` has torch's layout and checkpoints move
    between the two libraries. ``opt.state`` holds nothing but parameter-keyed entries: state
    shared by a group or by ``clip=`` is replicated in each of its parameters' entries under
    ``"group."`` / ``"clip."`` keys (see :mod:`.program`), so that
    ``torch.distributed.checkpoint``'s ``get/set_optimizer_state_dict`` round-trip every option.
    State is created when a parameter first has a gradient, as in torch.

``param_groups``
    A default-constructed optimizer has torch's group keys, no more: steadygrad's own options
    (``eps_in_sqrt``, ``moment_clip``, ``fused`` where torch has none) appear only when set, and a
    group without them uses their defaults (:attr:`TransformOptimizer.EXTRAS`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from operator import is_
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.params import check_ordered
from ..core.state import Replicated, state_keys
from ..core.transform import Hyper, Transform, state_leaves
from ..core.validate import Range, check_group, check_range
from ..core.workspace import Workspace
from ..kernels.fused import FusedExecutor
from .program import CLIP_NAMESPACE, GROUP_NAMESPACE, NONFINITE, StepProgram, structure_key

__all__ = ["Transformed", "TransformOptimizer", "hyper_or_zero"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


class TransformOptimizer(Optimizer):
    """Base of the steadygrad optimizers: a ``torch.optim.Optimizer`` that runs a step program.

    Subclasses implement :meth:`build_transform` and set ``HYPERPARAMETERS`` (the group options
    and their rules, :mod:`steadygrad.core.validate`) and ``EXTRAS`` (steadygrad's options that are
    stored in a group only when set, with their defaults). Recognised group keys besides:
    ``maximize`` (negate the gradients first) and ``capturable`` (keep ``step`` counters on the
    parameter's device).

    ``clip`` (a transform, e.g. ``sg.clip_by_norm(1.0)`` or ``sg.zclip()``) runs first at every
    step, once over the gradients of all parameter groups together (so a global norm is the norm
    of all of them, as with ``clip_grad_norm_(model.parameters())``), on the optimizer's copy of
    the gradients: ``.grad`` is left as it is. Its state is stored under ``"clip.<name>"`` keys in
    the parameters' entries and travels in ``state_dict()``; :meth:`shared_state` reads it.

    ``fused=True`` runs the same program compiled over flat buffers (see
    :mod:`steadygrad.kernels.fused`).

    ``nonfinite`` (one of :data:`~steadygrad.optim.program.NONFINITE`) covers the gradients of all
    groups, which are also ``clip``'s input. ``"ignore"`` is torch's behaviour. ``"skip"``: one
    max-abs reduction over the gradients gives the commit gate (:mod:`steadygrad.core.gate`);
    every state update, ``clip``'s included, and the parameter update select between their new
    and old values under it, so a step with inf or NaN leaves parameters, state and step counters
    bit-identical, and an open gate gives the ``"ignore"`` step's bits. On accelerators the new
    values are still computed (the step costs what it costs) and nothing is read on the host,
    with one exception: torch's layout keeps the ``step`` counters on the CPU, and advancing them
    under a gate on the device copies the gate to the host (``capturable=True`` keeps the counters
    on the device and avoids it). On the CPU the reference path reads the gate (no device to wait
    for): an open gate runs the ungated step, a closed one the gated step. ``"raise"`` checks the
    same reduction on the host and raises ``RuntimeError`` naming the first parameter with inf/NaN,
    before anything changes.

    Validation: every group option is checked when the group is added (constructor groups and
    ``add_param_group``) and whenever a structural option of a group changes (``ValueError``
    naming the option, the value and the group).

    ``differentiable=True`` (torch's option, for higher-order gradients through the step, as in
    meta-learning): the reference step runs with autograd recording it, so the new parameters and
    state are differentiable with respect to the parameters, gradients, state and tensor
    hyperparameters (``lr``) they came from. The step keeps its in-place updates; autograd keeps
    a copy of each tensor a backward formula needs (a ``saved_tensors_hooks`` clone), which costs
    memory, not correctness. Not with ``fused=True`` (torch's ``RuntimeError``) or ``clip=``
    (``ValueError``).

    Differences from torch.optim: sparse gradients raise ``RuntimeError`` (but for Adagrad, as in
    torch). A parameter listed twice in a group gets torch's warning and is stepped twice, as by
    torch (the numbers are each library's own); ``fused=True`` then takes the reference path.
    """

    HYPERPARAMETERS: ClassVar[dict[str, Any]] = {"lr": Range()}
    EXTRAS: ClassVar[dict[str, Any]] = {}
    #: Options read only when state is created (their exact values select the program).
    INIT_OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: The step for parameters with sparse gradients, ``(group, params, state)``; ``None``: they raise.
    SPARSE_STEP: ClassVar[Callable[..., None] | None] = None

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        clip: Transform | None = None,
        nonfinite: Literal["ignore", "skip", "raise"] = "ignore",
    ) -> None:
        if nonfinite not in NONFINITE:
            raise ValueError(f"Invalid nonfinite value: {nonfinite!r}; nonfinite must be one of {NONFINITE}")
        if clip is not None and not isinstance(clip, Transform):
            raise TypeError(
                f"clip must be a steadygrad Transform (e.g. sg.clip_by_norm(1.0)), not {type(clip).__name__}"
            )
        check_ordered(params, type(self).__name__)
        check_group(self.HYPERPARAMETERS, defaults, None)
        if defaults.get("differentiable", False):
            if defaults.get("fused", None):
                raise RuntimeError("`fused` does not support `differentiable`")
            if clip is not None:
                raise ValueError(
                    "differentiable=True with clip=: clipping statistics and coefficients are computed without "
                    "autograd; clip the gradients in the differentiable graph yourself, or drop clip="
                )
        # steadygrad's own options only when set away from their defaults: a default optimizer's
        # param_groups (and state_dict) are torch's.
        defaults = {k: v for k, v in defaults.items() if k not in self.EXTRAS or not _is_default(v, self.EXTRAS[k])}
        self.clip = clip
        self.nonfinite = nonfinite
        self._last_program: tuple[list, StepProgram, Any] | None = None
        self._programs: dict[Any, StepProgram] = {}
        self._fused: FusedExecutor | None = None
        self._workspace = Workspace()
        super().__init__(params, defaults)
        if defaults.get("fused", None):
            self._fused = FusedExecutor()

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch's fused-AMP protocol, on the fused path: ``GradScaler.step`` then sets
        ``grad_scale``/``found_inf`` and leaves the unscaling and the inf check to the step."""
        return getattr(self, "_fused", None) is not None

    def build_transform(self, group: Mapping[str, Any]) -> Transform:
        """The chain for one parameter group, for the group's structure (called once per
        structure; hyperparameters as :class:`~steadygrad.core.transform.Hyper` references)."""
        raise NotImplementedError

    def option(self, group: Mapping[str, Any], name: str) -> Any:
        """A group's value of ``name``, or its default for one of steadygrad's own options."""
        return group[name] if name in group else self.EXTRAS[name]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        else:
            check_ordered(params, type(self).__name__)
            params = list(params)
        param_group["params"] = params
        index = len(self.param_groups)
        check_group(self.HYPERPARAMETERS, param_group, index)
        super().add_param_group(param_group)
        self._invalidate()

    def _invalidate(self) -> None:
        self._last_program = None
        if getattr(self, "_programs", None) is not None:
            self._programs.clear()
        if getattr(self, "_workspace", None) is not None:
            self._workspace.clear()
        if getattr(self, "_fused", None) is not None:
            self._fused.invalidate()

    # ---- the program --------------------------------------------------------------------------------

    def program(self) -> StepProgram:
        """The step program for the groups' current structure (built on first use)."""
        # The groups' options as the very same objects as at the last step: the same program
        # (an LR scheduler's new number or a structural edit computes the key again).
        options = [(tuple(g), tuple(g.values())) for g in self.param_groups]
        last = self._last_program
        if last is not None and len(last[0]) == len(options) and last[2] == (id(self.clip), self.nonfinite):
            if all(_same(a, b) for a, b in zip(options, last[0])):
                return last[1]
        init = tuple(tuple(g.get(k) for k in self.INIT_OPTIONS) for g in self.param_groups)
        key = (structure_key(self.param_groups), init, id(self.clip), self.nonfinite)
        program = self._programs.get(key)
        if program is None:
            for index, group in enumerate(self.param_groups):
                check_group(self.HYPERPARAMETERS, group, index)
            transforms = [self.build_transform(group) for group in self.param_groups]
            program = StepProgram.build(
                key, transforms, self.param_groups, self.clip, self.nonfinite, type(self).SPARSE_STEP
            )
            self._programs[key] = program
        self._last_program = (options, program, (id(self.clip), self.nonfinite))
        return program

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        differentiable = bool(self.defaults.get("differentiable", False))
        with torch.set_grad_enabled(differentiable), _saved_as_they_were(differentiable):
            program = self.program()
            amp = _amp_inputs(self)
            if self._fused is not None and self._fused.step(program, self.param_groups, self.state, amp):
                return loss
            program.run(self.param_groups, self.state, None if differentiable else self._workspace, amp=amp)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's. With ``fused=True`` and ``set_to_none=False`` the gradients of the flat
        parameters are zeroed in their buffer and stay views into it (autograd then accumulates
        into the buffer, which the fused step reads: no copy); with ``set_to_none=True`` (the
        default) they are ``None`` as with torch, and the next step copies the new gradients
        into the buffer."""
        super().zero_grad(set_to_none)
        if self._fused is not None and not set_to_none:
            self._fused.zero_grad()

    # ---- state ----------------------------------------------------------------------------------------

    def shared_state(self) -> dict[str, dict[str, Tensor]]:
        """The state shared by all parameters of ``clip=`` (``{"clip": {...}}``) and of each group's
        chain (``{"group0": {...}}``), read from the parameters' entries (names without their
        namespace). Only parts that have shared state and have stepped appear."""
        program = self.program()
        out: dict[str, dict[str, Tensor]] = {}
        if program.clip_layout is not None:
            members = [p for g in self.param_groups for p in g["params"]]
            _read_shared(out, "clip", program.clip_layout, Replicated(self.state, members))
        for i, (g, group) in enumerate(zip(program.groups, self.param_groups)):
            _read_shared(out, f"group{i}", g.layout, Replicated(self.state, group["params"]))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then steadygrad's own entries as they were saved.

        torch casts every loaded state tensor except ``step`` to its parameter's dtype and copies
        each entry apart. That is right for torch's own keys, which steadygrad creates in the
        parameter's dtype too, but it would round a clipper's float32 second moment of a bfloat16
        parameter (or its int64 counters) to 16 bits, and it unshares replicated state. Those
        entries are cast again, from the saved values, to the dtype the transforms create, and
        each shared value becomes one tensor again.

        Stricter than torch, which loads anything of the right length and fails (or silently
        computes nonsense) at a later step: every saved state entry this optimizer uses for that
        parameter (with the checkpoint's options, completed as for an older torch's checkpoint,
        and this ``clip=``) must have the shape it has here, and an entry that lacks keys this
        optimizer keeps while holding others (another optimizer's, another clipping rule's) is
        refused. Otherwise ``ValueError`` names the parameter, the key and both shapes (or the two
        sets of keys), and nothing is loaded. Keys only in the checkpoint (state of an option
        switched off since) are kept, as torch keeps them.
        """
        # The check runs as the last load_state_dict pre-hook: on the state dict as the user's
        # pre-hooks leave it, before torch loads anything.
        seen: list[dict[str, Any]] = []

        def check(opt: TransformOptimizer, hooked: dict[str, Any]) -> None:
            opt._check_loadable(hooked)
            seen.append(hooked)

        handle = self.register_load_state_dict_pre_hook(check)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        state_dict = seen[-1]  # what torch loaded: the pre-hooks' result
        self._invalidate()
        program = self.program()
        saved = state_dict["state"]
        all_params, all_saved = [], []
        for saved_group, group, g in zip(state_dict["param_groups"], self.param_groups, program.groups):
            values = [saved.get(index) for index in saved_group["params"]]
            g.layout.restore(self.state, group["params"], values, Replicated(self.state, group["params"]))
            all_params += group["params"]
            all_saved += values
        if program.clip_layout is not None:
            program.clip_layout.restore(self.state, all_params, all_saved, Replicated(self.state, all_params))

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Fills in the options a group of an older checkpoint lacks (torch adds options over
        versions), as ``__setstate__`` does after ``load_state_dict``."""
        for key, value in self.defaults.items():
            group.setdefault(key, value)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`load_state_dict`. Sizes of groups are torch's to check (its messages)."""
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            return  # torch's own load_state_dict reports a malformed state_dict
        if len(saved_groups) != len(self.param_groups):
            return
        if any(len(s.get("params", ())) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            return
        name = type(self).__name__
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            merged = {**saved, "params": group["params"]}
            self._complete_group(merged)
            try:
                transform = self.build_transform(merged)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"param group {gi} of the state_dict does not describe a {name} group ({error!r}): "
                    "a checkpoint of another optimizer?"
                ) from None
            for pi, (index, p) in enumerate(zip(saved["params"], group["params"])):
                entry = saved_state.get(index)
                if not entry:
                    continue
                expected = _template_shapes(transform, p)
                if self.clip is not None and expected is not None:
                    clip_keys = _template_shapes(self.clip, p, CLIP_NAMESPACE)
                    expected = None if clip_keys is None else {**expected, **clip_keys}
                if expected is None:  # a transform whose init cannot run on a meta tensor
                    return
                where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
                _check_kind(entry, expected, where, name, self.clip)
                for key, value in entry.items():
                    if key not in expected:
                        continue  # state of an option switched off since: kept, as torch keeps it
                    want = expected[key]
                    if isinstance(value, Tensor) and want is not None and tuple(value.shape) != want:
                        if not (want == () and value.numel() == 1):
                            hint = "other parameters" if want == tuple(p.shape) else "other settings of the rule"
                            raise ValueError(
                                f"the state_dict's {key!r} for {where} has shape {tuple(value.shape)}, this "
                                f"optimizer's has {want}: a checkpoint of {hint}? Nothing was loaded."
                            )

    # Attributes that are not hyperparameters but must survive copy.deepcopy and pickling, which
    # torch's __getstate__ would drop. Compiled artefacts and cached programs are rebuilt instead.
    _kept_attributes: ClassVar[tuple[str, ...]] = ("clip", "nonfinite")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._kept_attributes})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with the state and groups only: the optimizer's own
        # settings stay (an old pickle without them gets the defaults)
        state.setdefault("nonfinite", getattr(self, "nonfinite", "ignore"))
        super().__setstate__(state)
        self._last_program = None
        self._programs = {}
        self._workspace = Workspace()
        self._fused = FusedExecutor() if self.defaults.get("fused", None) else None
        for group in self.param_groups:
            self._complete_group(group)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)


def _amp_inputs(opt: Optimizer) -> tuple[Tensor | None, Tensor | None] | None:
    """``(grad_scale, found_inf)`` as ``GradScaler.step`` sets them on an optimizer with
    ``_step_supports_amp_scaling`` (for the duration of the step), or ``None``."""
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    return None if grad_scale is None and found_inf is None else (grad_scale, found_inf)


def _saved_as_they_were(differentiable: bool) -> Any:
    """With ``differentiable``, autograd keeps a copy of each tensor a backward formula needs,
    made when it is saved: the step then updates its state and temporaries in place, as the
    non-differentiable step does, and the graph still holds the values it computed with."""
    if not differentiable:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(torch.clone, _same_tensor)


def _same_tensor(t: Tensor) -> Tensor:
    return t


def _same(a: tuple[tuple, tuple], b: tuple[tuple, tuple]) -> bool:
    """Whether two snapshots ``(keys, values)`` of a param group hold the very same objects."""
    return len(a[1]) == len(b[1]) and all(map(is_, a[0], b[0])) and all(map(is_, a[1], b[1]))


def _check_kind(entry: Mapping[str, Any], expected: Mapping[str, Any], where: str, name: str, clip: Any) -> None:
    """A saved entry from another optimizer or clipping rule: in one namespace (the optimizer's
    keys, ``clip.``, ``group.``) it lacks keys this one uses *and* has keys this one does not. (Keys
    it only has more of are state of an option switched off since; keys it only lacks are created
    at the next step.)"""

    def space(key: str) -> str:
        return key.split(".", 1)[0] + "." if key.startswith((CLIP_NAMESPACE, GROUP_NAMESPACE)) else ""

    for ns in {space(k) for k in entry} | {space(k) for k in expected}:
        extra = sorted(k for k in entry if space(k) == ns and k not in expected)
        missing = sorted(k for k in expected if space(k) == ns and k not in entry)
        if extra and missing:
            rule = f"clip={type(clip).__name__}" if clip is not None else "no clip="
            raise ValueError(
                f"the state_dict's entry for {where} has {extra} where {name} ({rule}) keeps {missing}: the state "
                "of another optimizer or clipping rule? Nothing was loaded."
            )


def _template_shapes(transform: Transform, p: Tensor, namespace: str = "") -> dict[str, Any] | None:
    """The storage keys of ``transform``'s state for a parameter like ``p`` and the shape each
    has (``None``: any, a buffer that grows), from ``init`` on a meta tensor (``None`` when that
    init cannot run there). Shared state is replicated under ``namespace`` (``"group."`` for a
    group chain's)."""
    try:
        template = transform.init([torch.empty(p.shape, dtype=p.dtype, device="meta")])
    except Exception:  # noqa: BLE001 - a hand-written init that reads values: nothing to check
        return None
    leaves = [leaf for _, leaf in state_leaves(template)]
    out: dict[str, Any] = {}
    for k in state_keys(template, namespace, namespace or GROUP_NAMESPACE):
        value = getattr(leaves[k.leaf], k.field)
        shape = tuple((value[0] if k.per_param else value).shape)
        out[k.key] = None if (not k.per_param and 0 in shape) else shape
    return out


def _is_default(value: Any, default: Any) -> bool:
    if default in (None, False):
        return value is None or value is False
    return not isinstance(value, Tensor) and value == default


def hyper_or_zero(group: Mapping[str, Any], name: str) -> Any:
    """``Hyper(name)``, or the number 0 when the group's value is a zero number: the chain then
    leaves the term out (``weight_decay=0`` does not read the parameters), and a change to non-zero
    selects another program."""
    value = group[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    return Hyper(name)


def _read_shared(out: dict, name: str, layout: Any, shared: Replicated) -> None:
    values = {}
    for k in layout.shared:
        value = shared.get(k.key)
        if value is not None:
            values[k.key.split(".", 1)[1]] = value
    if values:
        out[name] = values


class Transformed(TransformOptimizer):
    """Any transform as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        transform: the chain that maps gradients to updates; the updates are *added* to the
            parameters, so end it with :func:`steadygrad.scale_by_lr` (which reads this
            optimizer's ``lr`` at every step) or another negative scaling.
        lr: the learning rate stored in each parameter group (for schedulers and scale_by_lr).
        maximize: negate the gradients before the transform.
        clip: a clipping transform run first, over all parameter groups together (see
            :class:`TransformOptimizer`).
        **defaults: further hyperparameters stored in each parameter group (read by
            ``Hyper(name)`` references in the chain).

    Example::

        opt = sg.optim.Transformed(
            model.parameters(),
            sg.chain(sg.scale_by_adam(), sg.add_decayed_weights(1e-2), sg.scale_by_lr()),
            lr=1e-3,
        )
    """

    def __init__(
        self,
        params: ParamsT,
        transform: Transform,
        lr: float | Tensor = 1e-3,
        *,
        maximize: bool = False,
        clip: Transform | None = None,
        nonfinite: Literal["ignore", "skip", "raise"] = "ignore",
        **defaults: Any,
    ) -> None:
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a steadygrad Transform, got {type(transform).__name__}")
        check_range("lr", lr)
        self.transform = transform
        super().__init__(params, dict(lr=lr, maximize=maximize, **defaults), clip=clip, nonfinite=nonfinite)

    _kept_attributes = ("clip", "nonfinite", "transform")

    def build_transform(self, group: Mapping[str, Any]) -> Transform:
        return self.transform
