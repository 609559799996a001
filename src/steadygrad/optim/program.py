"""The step as a program, and its reference executor.

A :class:`StepProgram` is everything one optimizer step does, as data: the clipping transform run
once over the gradients of all parameter groups, each group's chain (built by the optimizer from
the group's *structural* options: amsgrad, centered, a zero or non-zero weight decay, ...; the
hyperparameters themselves are :class:`~steadygrad.core.transform.Hyper` references read from
the group at every step), ``maximize`` per group, and the state layout of each part
(:class:`~steadygrad.core.state.StateLayout`). An optimizer builds a program once per structure
and keeps it until a structural option changes.

Two executors run a program: :meth:`StepProgram.run` (here) on the parameters' own tensors with
grouped foreach operations, and :class:`steadygrad.kernels.fused.FusedExecutor` on flat buffers
under ``torch.compile``. Both call the very same transforms; neither sees the optimizer.

State layout (the one place that decides it)
    * a group chain's per-parameter state under torch.optim's keys (``step``, ``exp_avg``, ...);
    * its shared state (e.g. ``moment_clip_fraction``) replicated in the entry of every
      parameter of the group, under ``"group.<name>"``;
    * ``clip=``'s per-parameter state under ``"clip.<name>"`` and its shared state (ZClip's
      statistics, ``fraction_clipped``) replicated in every parameter's entry under
      ``"clip.<name>"``.

    ``opt.state`` thus holds only parameter-keyed entries (see :mod:`steadygrad.core.state`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from ..core.dtensor import all_ranks_true, split_shards
from ..core.gate import all_finite, amp_skips, amp_unscale_, combine_gates, count_nonfinite
from ..core.state import Replicated, StateLayout
from ..core.tensorlist import host_readable, split_like, working_copy
from ..core.transform import StepContext, Transform, coarsest_structure
from ..core.workspace import Workspace

__all__ = ["CLIP_NAMESPACE", "GROUP_NAMESPACE", "NONFINITE", "GroupStep", "StepProgram", "structure_key"]

_is_sparse = attrgetter("is_sparse")

#: The optimizers' ``nonfinite`` modes: torch's behaviour, skip the step, raise.
NONFINITE = ("ignore", "skip", "raise")

#: Key prefixes of the state of ``clip=`` and of a group chain's shared state.
CLIP_NAMESPACE = "clip."
GROUP_NAMESPACE = "group."


def _kind(value: Any) -> Any:
    if isinstance(value, Tensor):
        return "tensor"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "zero" if value == 0 else "number"
    if isinstance(value, tuple):
        return tuple(_kind(v) for v in value)
    return value if isinstance(value, (bool, str, type(None))) else type(value).__name__


def structure_key(param_groups: Sequence[Mapping[str, Any]]) -> tuple:
    """What selects a program: per group, every option's *kind* (a bool, string or ``None`` as
    itself; a number as zero or non-zero; a tensor as a tensor). A scheduler changing ``lr`` keeps
    the key; ``momentum`` 0 → 0.9, ``centered``, ``amsgrad`` or ``moment_clip`` None → 2 change it."""
    return tuple(tuple(sorted((k, _kind(v)) for k, v in g.items() if k != "params")) for g in param_groups)


@dataclass(frozen=True)
class GroupStep:
    """The part of a program for one parameter group."""

    transform: Transform
    layout: StateLayout
    maximize: bool
    step_on_device: bool  # torch's capturable: step counters on the parameters' device

    @classmethod
    def build(cls, transform: Transform, group: Mapping[str, Any]) -> GroupStep:
        return cls(
            transform,
            StateLayout(transform, "", GROUP_NAMESPACE),
            bool(group.get("maximize", False)),
            bool(group.get("capturable", False)),
        )

    def updates(self, grads: list[Tensor]) -> tuple[list[Tensor], bool]:
        """What the chain starts from, and whether it may write it: the gradients themselves when
        it writes nothing it is given, else a copy (negated to maximize)."""
        return start(grads, self.maximize, self.transform)


def start(grads: list[Tensor], maximize: bool, transform: Transform) -> tuple[list[Tensor], bool]:
    """The updates a transform starts from: the gradients themselves (not writable) when it
    writes nothing it is given, as torch.optim reads ``.grad``; else a copy (negated to maximize)."""
    if maximize or transform.writes_updates:
        return working_copy(grads, maximize), True
    return grads, False


@dataclass(frozen=True)
class StepProgram:
    """One optimizer step as data (see the module docstring)."""

    key: tuple
    groups: tuple[GroupStep, ...]  # aligned with the optimizer's param_groups
    clip: Transform | None
    clip_layout: StateLayout | None
    nonfinite: str = "ignore"  # one of NONFINITE
    # The optimizer's step for parameters with sparse gradients (group, params, store), or None:
    # sparse gradients raise.
    sparse: Callable[[Mapping[str, Any], list[Tensor], MutableMapping[Any, dict]], None] | None = None

    @classmethod
    def build(
        cls,
        key: tuple,
        transforms: Sequence[Transform],
        param_groups: Sequence[Mapping],
        clip: Transform | None,
        nonfinite: str = "ignore",
        sparse: Any = None,
    ):
        groups = tuple(GroupStep.build(t, g) for t, g in zip(transforms, param_groups))
        layout = StateLayout(clip, CLIP_NAMESPACE, CLIP_NAMESPACE) if clip is not None else None
        return cls(key, groups, clip, layout, nonfinite, sparse)

    def finite_gate(self, grads: Sequence[Tensor], describe: Any, shards: Any = None) -> Tensor | None:
        """The commit gate of ``nonfinite="skip"``: a 0-d float32 tensor, 1 when every gradient
        is finite, else 0 (decided on the device); ``None`` for ``"ignore"``. ``"raise"`` reads
        the check on the host (one device sync) and raises ``RuntimeError`` naming the first
        parameter with inf/NaN (``describe(i)`` names gradient ``i``). With ``shards`` (local
        shards of DTensors) every rank holding a shard decides alike."""
        if self.nonfinite == "ignore":
            return None
        if any(g.device.type == "meta" for g in grads):  # meta gradients have no values to check
            keep = [i for i, g in enumerate(grads) if g.device.type != "meta"]
            if not keep:
                return None
            grads = [grads[i] for i in keep]
            shards = None if shards is None else [shards[i] for i in keep]
            describe = _reindexed(describe, keep)
        ok = all_ranks_true(all_finite(grads), shards)
        if self.nonfinite == "skip":
            return ok.to(torch.float32)
        if not bool(ok):  # the documented host read
            for i, g in enumerate(grads):
                bad = int(count_nonfinite([g]))
                if bad:
                    raise RuntimeError(
                        f"non-finite gradient in {describe(i)}: {bad} of {g.numel()} elements are inf or NaN; "
                        "use nonfinite='skip' to skip such steps"
                    )
            raise RuntimeError(
                "non-finite gradient in a shard held by another rank; use nonfinite='skip' to skip such steps"
            )
        return None

    @cached_property
    def structure(self) -> str:
        """The structure the whole step needs (see :data:`steadygrad.core.transform.STRUCTURES`);
        worked out once per program (transforms are immutable values)."""
        parts = [g.transform.structure for g in self.groups]
        if self.clip is not None:
            parts.append(self.clip.structure)
        return coarsest_structure(*parts)

    def _step_sparse(
        self,
        g: GroupStep,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        store: Any,
        amp: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> list[Tensor]:
        """Steps the parameters with sparse gradients by the optimizer's sparse rule; returns the
        others (dense gradients), for the program. With GradScaler's ``amp``: a ``found_inf``
        step skips them (read on the host, as the sparse rule reads its ``step``), else their
        values are unscaled in place first."""
        if self.sparse is None:
            raise RuntimeError(
                "this steadygrad optimizer does not support sparse gradients; use steadygrad.optim.Adagrad, "
                "torch.optim.Adagrad or torch.optim.SparseAdam for sparse embeddings"
            )
        if self.clip is not None or self.nonfinite != "ignore":
            raise RuntimeError(
                "sparse gradients are stepped by the sparse rule alone: clip= and nonfinite='skip'/'raise' "
                "do not support them (dense gradients only)"
            )
        sparse = [p for p, grad in zip(params, grads) if grad.is_sparse]
        dense = [p for p, grad in zip(params, grads) if not grad.is_sparse]
        if amp_skips(amp):
            return dense
        if amp is not None and amp[0] is not None:
            for p in sparse:
                p.grad = p.grad.coalesce()
                p.grad._values().div_(amp[0].to(p.grad.device))
        g.layout.ensure(store, sparse, Replicated(store, group["params"]))
        self.sparse(group, sparse, store)
        return dense

    # ---- the reference executor -----------------------------------------------------------------

    def run(
        self,
        param_groups: Sequence[Mapping[str, Any]],
        store: MutableMapping[Any, dict],
        workspace: Workspace | None = None,
        amp: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> None:
        """One step on the parameters' own tensors: grouped foreach operations, state in ``store``
        (``opt.state``), large temporaries in ``workspace`` (on the CPU; see
        :mod:`steadygrad.core.workspace`). Parameters without a gradient are not stepped.

        DTensor parameters (FSDP2) are stepped through their local shards, their layout handed to
        the transforms as ``StepContext.shards`` (:mod:`steadygrad.core.dtensor`): element-wise
        rules need no communication, norms are all-reduced over the mesh.

        ``amp``: ``(grad_scale, found_inf)`` of torch's fused-AMP protocol
        (:func:`~steadygrad.core.gate.amp_unscale_`): the gradients are unscaled in place and a step
        with ``found_inf`` commits nothing."""
        work = []
        for g, group in zip(self.groups, param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, shards = split_shards([p.grad for p in params])
            if any(map(_is_sparse, grads)):
                params = self._step_sparse(g, group, params, grads, store, amp)
                if not params:
                    continue
                grads, shards = split_shards([p.grad for p in params])
            work.append((g, group, params, grads, shards))
        if not work:
            return
        all_shards = None
        if any(w[4] is not None for w in work):
            all_shards = [s for *_, grads, shards in work for s in (shards or [None] * len(grads))]
        all_grads = [g for *_, grads, _ in work for g in grads]
        amp_gate = None if amp is None else amp_unscale_(all_grads, *amp)
        finite = None
        if not (self.nonfinite == "raise" and amp_skips(amp)):
            # (GradScaler's inf step is skipped, not raised: "raise" reads the gate on the host anyway)
            finite = self.finite_gate(all_grads, lambda i: _describe(work, param_groups, i), all_shards)
        gate = combine_gates(amp_gate, finite)
        if gate is not None and host_readable(all_grads) and bool(gate):
            # On the CPU the gate is read at no device sync: an open gate is the ungated step (its
            # very bits, without the selects). A closed one (rare) takes the gated step, which
            # still creates state and enters every collective a clipping rule makes.
            gate = None
        if gate is not None and gate.dtype == torch.bool:
            gate = gate.to(torch.float32)
        clipped = None
        if self.clip_layout is not None:
            # Once over the gradients of all groups (a global norm is over all of them); .grad is
            # left as it is (the clip gets a copy unless it writes nothing it is given).
            starts = [start(grads, g.maximize, self.clip) for g, _, _, grads, _ in work]
            flat = [u for us, _ in starts for u in us]
            flat_params = [p for _, _, params, *_ in work for p in params]
            members = [p for group in param_groups for p in group["params"]]
            ctx = StepContext(gate=gate, writable=all(w for _, w in starts), shards=all_shards)
            # A global coefficient comes back unapplied (scale): the groups' chains fold it in.
            out, scale = self.clip_layout.run(store, flat_params, flat, Replicated(store, members), ctx, scaled=True)
            writable = ctx.after(flat, out).writable
            clipped = [(us, writable) for us in split_like(out, [us for us, _ in starts])]
        for i, (g, group, params, grads, shards) in enumerate(work):
            if clipped is not None:
                updates, writable = clipped[i]
            else:
                (updates, writable), scale = g.updates(grads), None
            g.layout.run(
                store,
                params,
                updates,
                Replicated(store, group["params"]),
                StepContext(
                    group,
                    gate=gate,
                    writable=writable,
                    scale=scale,
                    scratch=None if workspace is None else workspace.scratch(split_shards(params)[0]),
                    shards=shards,
                ),
                apply=True,
                step_on_device=g.step_on_device,
            )


def _reindexed(describe: Any, keep: list[int]) -> Any:
    """``describe`` for the gradients ``keep`` selects (``i`` names the ``keep[i]``-th)."""

    def named(i: int) -> str:
        return describe(keep[i])

    return named


def _describe(work: list, param_groups: Sequence[Mapping[str, Any]], i: int) -> str:
    """Names the ``i``-th gradient of a step's ``work`` (groups in order, parameters with a
    gradient)."""
    for _, group, params, *_ in work:
        if i < len(params):
            p = params[i]
            g_index = next(k for k, other in enumerate(param_groups) if other is group)
            p_index = next(k for k, other in enumerate(group["params"]) if other is p)
            return f"parameter {p_index} of param group {g_index} (shape {tuple(p.shape)})"
        i -= len(params)
    return f"gradient {i}"
