"""Stateful gradient clipping for any optimizer: :class:`Clipper` and its :class:`ClipStats`.

::

    clipper = sg.Clipper(model.parameters(), sg.clip_by_moment(k=5.0), nonfinite="skip")
    loss.backward()
    scaler.unscale_(opt)          # with AMP: clip the true gradients, never the scaled ones
    stats = clipper.clip_()       # in place on .grad
    opt.step()                    # after a skipped step .grad is None: nothing moves (see below)

A :class:`Clipper` runs a clipping transform (:mod:`steadygrad.transforms.clipping`, or any
chain) in place on the ``.grad`` of its parameters and keeps the transform's state between steps,
per parameter, in torch.optim's layout (:mod:`steadygrad.core.state`), with ``state_dict()`` and
``load_state_dict()``. It works next to any optimizer, torch's included.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .core.dtensor import split_shards
from .core.gate import all_finite, combine_gates, nonfinite_counts, zero_unless_
from .core.norms import shard_sum, total_norm
from .core.params import parse_params
from .core.state import SharedDict, StateLayout
from .core.tensorlist import as_real, host_readable
from .core.transform import StepContext, Transform, chain

__all__ = ["ClipStats", "Clipper"]

NONFINITE_MODES = ("skip", "raise", "ignore")

#: The key of ``Clipper.state`` under which state shared by all parameters is stored.
SHARED = "shared"


class ClipStats(NamedTuple):
    """What one :meth:`Clipper.clip_` did; every field is a 0-d tensor (read it when you log).

    Attributes:
        norm: the global L2 norm of the gradients before clipping (float32 or wider; inf/NaN
            when some gradient is).
        clipped_norm: the global L2 norm after clipping (0 on a skipped step).
        fraction_clipped: float32, the ``fraction_clipped`` of the transform at this step (of the
            last clipping transform of a chain that has one; 0 if none has; 0 on a skipped step).
            Its meaning depends on the transform (elements, tensors, units or the step: see
            :mod:`steadygrad.transforms.clipping`).
        nonfinite: int64, the number of inf/NaN elements of the gradients before clipping.
        skipped: bool, whether the step was skipped (non-finite gradients with
            ``nonfinite="skip"``, or ``commit`` was 0).
    """

    norm: Tensor
    clipped_norm: Tensor
    fraction_clipped: Tensor
    nonfinite: Tensor
    skipped: Tensor


class Clipper:
    """Clips the gradients of a fixed list of parameters with a stateful transform.

    Args:
        params: the parameters, as for a torch optimizer: an iterable of tensors, or of
            ``(name, tensor)`` pairs (``model.named_parameters()``; the names appear in error
            messages), or a single tensor. Not a set (its order is not stable); no parameter twice.
        transform: a clipping transform, a chain, or a list/tuple of transforms (chained).
        nonfinite: what to do when a gradient holds inf or NaN:

            * ``"skip"`` (default): leave every statistic, moving average, history and step
              counter of the transform exactly as it was (the transform runs under a closed
              commit gate, :mod:`steadygrad.core.gate`) and set *every* ``.grad`` to ``None``,
              so that the following ``opt.step()`` of any optimizer, torch's or steadygrad's,
              skips every parameter: parameters and optimizer state stay bit-identical (a step
              counter does not advance either). Deciding to drop the gradients reads
              ``skipped`` on the host: one device sync per call on an accelerator. A
              steadygrad optimizer's own ``nonfinite="skip"`` (with ``clip=`` for the clipping)
              decides on the device instead.
            * ``"raise"``: raise ``RuntimeError`` naming the first offending parameter. This reads
              the count on the host: one device sync per step.
            * ``"ignore"``: no check; the non-finite values go through the transform (and
              usually make its state non-finite). The cheapest mode.

    ``commit`` (see :meth:`clip_`) is honoured in every mode.

    Differences: torch's ``clip_grad_norm_(error_if_nonfinite=True)`` is ``"raise"`` for norm
    clipping; it has no stateful clippers and no skip. optax's ``apply_if_finite`` is the
    functional analogue of ``"skip"`` (see :func:`steadygrad.skip_nonfinite`).
    """

    def __init__(
        self,
        params: Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        transform: Transform | Sequence[Transform],
        nonfinite: Literal["skip", "raise", "ignore"] = "skip",
    ) -> None:
        parsed = parse_params(params, "Clipper")
        self.params, self.names = parsed.tensors, parsed.names
        self._parsed = parsed
        if isinstance(transform, Transform):
            self.transform = transform
        elif isinstance(transform, (list, tuple)) and all(isinstance(t, Transform) for t in transform):
            self.transform = chain(*transform)
        else:
            raise TypeError(
                f"transform must be a steadygrad Transform or a list of them, got {type(transform).__name__}"
            )
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        #: Per-parameter state ``state[p] = {key: tensor}`` and shared state ``state["shared"]``.
        self.state: defaultdict[Any, dict[str, Tensor]] = defaultdict(dict)
        self._layout = StateLayout(self.transform)
        self._keys = self._layout.keys
        fraction_keys = [k.key for k in self._keys if k.field == "fraction_clipped" and not k.per_param]
        self._fraction_key = fraction_keys[-1] if fraction_keys else None

    def __repr__(self) -> str:
        return f"Clipper({len(self.params)} parameters, nonfinite={self.nonfinite!r})"

    # ---- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def clip_(self, commit: Tensor | None = None) -> ClipStats:
        """Clips the ``.grad`` of the parameters that have one, in place.

        Call it after ``backward`` (and after ``GradScaler.unscale_``), before ``opt.step()``.
        Parameters without a gradient are left alone and their state does not advance.

        Args:
            commit: an optional 0-d tensor, 0 when this step will not be taken (e.g. the
                GradScaler found inf/NaN and will skip ``opt.step()``): the step is then treated
                as skipped (state untouched, ``skipped`` true; the gradients set to ``None``
                with ``nonfinite="skip"``, else zeroed) whatever ``nonfinite`` says. 1 (or any
                non-zero value) lets the step count.

        Returns:
            :class:`ClipStats`, all tensors on the device of the first gradient; read on the host:
            ``skipped`` with ``nonfinite="skip"``, the non-finite count with ``"raise"``.

        Raises:
            RuntimeError: ``nonfinite="raise"`` and a gradient holds inf/NaN (nothing is changed);
                or a gradient is sparse.
        """
        indices = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in indices]
        for i, p in zip(indices, params):
            if p.grad.is_sparse:
                raise RuntimeError(f"Clipper does not support sparse gradients ({self._name(i)})")
        # DTensor gradients (FSDP2): their local shards, with the layout for whole-tensor norms
        # and counts (the same statistics, and the same skip decision, on every rank).
        grads, shards = split_shards([p.grad for p in params])
        device = grads[0].device if grads else (self.params[0].device if self.params else None)

        norm = total_norm(grads, 2.0, shards=shards)
        if shards is None and host_readable(grads) and bool(all_finite(grads)):
            # CPU: one vectorised pass says there is nothing to count (a per-element count costs
            # ~10x a norm); read without a device sync.
            counts = None
            nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        else:
            counts = nonfinite_counts(grads)
            nonfinite = _sum(counts, device) if shards is None else shard_sum(counts, shards).to(torch.int64)
        if self.nonfinite == "raise" and bool(nonfinite > 0):  # the documented host read
            bad = [j for j, c in enumerate(counts or []) if bool(c > 0)]
            if not bad:
                raise RuntimeError(
                    f"non-finite gradient on another rank ({int(nonfinite)} inf or NaN elements in all the "
                    "gradients); use nonfinite='skip' to skip such steps"
                )
            j = bad[0]
            raise RuntimeError(
                f"non-finite gradient in {self._name(indices[j])}: {int(counts[j])} of {grads[j].numel()} "
                f"elements are inf or NaN ({int(nonfinite)} in all the gradients); "
                "use nonfinite='skip' to skip such steps"
            )

        ok: Tensor | None = None
        if self.nonfinite == "skip" and counts is not None:
            # (counts is None: the CPU check found every gradient finite, so there is nothing to
            # gate; an open gate gives the ungated step's bits, without its two masking passes)
            ok = nonfinite == 0
        if commit is not None:
            ok = combine_gates(commit.reshape(()).to(device) != 0, ok)

        if grads:
            if ok is not None:
                zero_unless_(grads, ok)
            # The norm measured above is the transform's input whenever the step commits (a closed
            # gate discards whatever it computes), so the global norm is computed once.
            ctx = StepContext(gate=None if ok is None else ok.to(torch.float32), norm=norm, shards=shards)
            updates = self._layout.run(self.state, params, grads, SharedDict(self.state[SHARED]), ctx)
            for g, u in zip(grads, updates):
                target = as_real(g)
                if u.data_ptr() != target.data_ptr() or u.shape != target.shape:
                    target.copy_(u)
            if ok is not None:
                zero_unless_(grads, ok)  # whatever the transform made of the zeros

        clipped_norm = total_norm(grads, 2.0, shards=shards)
        fraction = self._fraction(device)
        if ok is not None:
            fraction = torch.where(ok, fraction, 0.0)
            skipped = ok.logical_not()
        else:
            skipped = torch.zeros((), dtype=torch.bool, device=device)
        if self.nonfinite == "skip" and grads and bool(skipped):  # the documented host read
            for p in params:
                p.grad = None
        return ClipStats(norm, clipped_norm, fraction, nonfinite, skipped)

    def _fraction(self, device: torch.device | None) -> Tensor:
        value = self.state[SHARED].get(self._fraction_key) if self._fraction_key is not None else None
        if value is None:
            return torch.zeros((), dtype=torch.float32, device=device)
        return value.to(device=device, dtype=torch.float32)

    def _name(self, i: int) -> str:
        return self._parsed.describe(i)

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The clipper's state, in torch.optim's layout.

        ``{"state": {index: {key: tensor}}, "shared": {key: tensor}, "param_shapes": [...],
        "nonfinite": mode}``: ``index`` is the parameter's position in ``params`` (only
        parameters that have had a gradient have state), the keys are the transform's state
        field names (:mod:`steadygrad.core.state`), ``shared`` holds the state common to all
        parameters (e.g. ``fraction_clipped``). As torch's ``state_dict``, the tensors are the
        live state (save or copy them before clipping again).
        """
        state = {i: dict(self.state[p]) for i, p in enumerate(self.params) if self.state.get(p)}
        return {
            "state": state,
            "shared": dict(self.state.get(SHARED, {})),
            "param_shapes": [list(p.shape) for p in self.params],
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`; the clipper then continues exactly where that one stopped.

        Tensors are copied (the argument is not aliased); per-parameter state moves to its
        parameter's device and shared state to the first parameter's device, dtypes kept.

        Raises:
            ValueError: the state dict was made for other parameters (a different number of
                parameters or other shapes) or for another transform (unknown keys), or is
                malformed.
        """
        for key in ("state", "shared", "param_shapes"):
            if key not in state_dict:
                raise ValueError(f"not a Clipper state_dict: the key {key!r} is missing")
        shapes = [tuple(s) for s in state_dict["param_shapes"]]
        if len(shapes) != len(self.params):
            raise ValueError(
                f"the state_dict was made for {len(shapes)} parameters, this clipper has {len(self.params)}"
            )
        for i, (shape, p) in enumerate(zip(shapes, self.params)):
            if shape != tuple(p.shape):
                raise ValueError(
                    f"the state_dict was made for other parameters: {self._name(i)} had shape {shape} there"
                )
        per_param = {k.key for k in self._keys if k.per_param}
        shared = {k.key for k in self._keys if not k.per_param}
        new: defaultdict[Any, dict[str, Tensor]] = defaultdict(dict)
        for index, entries in state_dict["state"].items():
            if not isinstance(index, int) or not 0 <= index < len(self.params):
                raise ValueError(f"the state_dict has state for parameter index {index!r}, out of range")
            unknown = set(entries) - per_param
            if unknown:
                raise ValueError(f"the state_dict has per-parameter keys {sorted(unknown)} this transform does not use")
            p = self.params[index]
            new[p] = {k: _copy_to(v, p.device) for k, v in entries.items()}
        unknown = set(state_dict["shared"]) - shared
        if unknown:
            raise ValueError(f"the state_dict has shared keys {sorted(unknown)} this transform does not use")
        device = self.params[0].device if self.params else None
        if state_dict["shared"]:
            new[SHARED] = {k: _copy_to(v, device) for k, v in state_dict["shared"].items()}
        self.state = new


def _copy_to(value: Any, device: torch.device | None) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to(device=device, copy=True)
    return copy.deepcopy(value)


def _sum(counts: list[Tensor], device: torch.device | None) -> Tensor:
    if not counts:
        return torch.zeros((), dtype=torch.int64, device=device)
    return torch.stack([c.to(counts[0].device) for c in counts]).sum()
