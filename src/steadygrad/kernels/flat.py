"""Flat buffers: parameters, gradients and per-parameter state as views into contiguous memory.

An optimizer step is memory-bound, and its cost on a model of many small tensors is dominated
by per-tensor overhead (kernel launches, Python, compile time growing with the tensor count).
A :class:`FlatGroup` moves the parameters of one (parameter group, device, dtype) into one
contiguous buffer and makes each parameter a view into it (``p.data``), does the same for every
per-parameter state entry (``optimizer.state[p][key]``) and, when it ``adopts`` them, for the
gradients (``p.grad``; else the step reads them where autograd wrote them), so that a step can
run over a few large tensors while the model, autograd and ``state_dict`` still see ordinary
per-parameter tensors.

Layout: parameters are ordered by *unit class* — the length of a row along dim 0 (a 0-D or 1-D
tensor is one row: AGC's unit) — so that every class is one contiguous ``(rows, row_length)``
view. A transform whose ``structure`` is ``"elements"`` or ``"units"`` gives the same result on
the class views as on the parameters (see :mod:`steadygrad.core.transform`).

Per-parameter state of the shape of the parameter gets one buffer per key; 0-d state (step
counters) gets a small buffer with one element per parameter (the *table*), which the optimizer's
state entries are views of. While every parameter has stepped as often, a step advances the first
entries of the table (one per unit class, :meth:`FlatGroup.counter_span`) and copies the first
to all; once they part (a parameter without a gradient at a step), it advances the table itself
and gathers the factors it computes from it per element through the *segment index* (the
parameter of every element).
"""

from __future__ import annotations

import operator
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from ..core.tensorlist import PLAIN_TYPES

__all__ = ["FlatGroup", "at_least_1d", "ineligibility"]

_GRAD = operator.attrgetter("grad")


def ineligibility(p: Tensor) -> str | None:
    """Why ``p`` cannot live in a flat buffer, or ``None`` if it can."""
    if not p.dtype.is_floating_point:
        return f"dtype {p.dtype} (complex and integer parameters take the reference path)"
    if p.is_sparse or p.layout != torch.strided:
        return "a sparse or non-strided parameter"
    if not p.is_contiguous():
        return "a non-contiguous parameter (e.g. channels_last)"
    if type(p) not in PLAIN_TYPES:
        return f"a tensor subclass ({type(p).__name__})"
    return None


def at_least_1d(t: Tensor) -> Tensor:
    """``t``, or a one-element view of a 0-d ``t``. A compiled step takes no 0-d tensor it
    writes: torch.compile (2.13, CPU) loses in-place writes to 0-d float64 inputs, whose values
    dynamo traces as numbers."""
    return t if t.dim() else t.view(1)


def _row_length(p: Tensor) -> int:
    if p.dim() <= 1:
        return p.numel()
    return p[0].numel() if p.shape[0] else max(p.numel(), 1)


@dataclass
class _Class:
    row_length: int
    start: int  # element offset of the class in the buffer
    size: int  # elements in the class


@dataclass
class FlatGroup:
    """Parameters of one device and dtype, with their gradients and state, in flat buffers."""

    params: list[Tensor]
    offsets: list[int]
    classes: list[_Class]
    param_buf: Tensor
    grad_buf: Tensor
    grad_views: list[Tensor]
    data_ptrs: list[int] = field(default_factory=list)  # of the parameter views, for holds_data
    full: dict[str, Tensor] = field(default_factory=dict)  # key -> buffer like param_buf
    scalar: dict[str, Tensor] = field(default_factory=dict)  # key -> one element per parameter
    # What the optimizer's state holds, to notice a user's edits (state_intact, counters_written):
    entries: dict[str, list[Tensor]] = field(default_factory=dict)  # key -> the per-parameter views
    dicts: list[dict] = field(default_factory=list)  # store[p] per parameter
    versions: dict[str, int] = field(default_factory=dict)  # key -> scalar buffer's version
    adopts: bool = True  # gradients are copied into ``grad_buf`` (else read where autograd writes them)
    _segments: tuple[Tensor, Tensor] | None = None  # (segment index, elements per parameter)
    _per_param: dict[Any, list[Tensor]] = field(default_factory=dict)  # kept per-parameter views

    # ---- building ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        params: Sequence[Tensor],
        store: MutableMapping,
        keys: Sequence[str],
        counters: frozenset[str] = frozenset(),
        adopt: bool = True,
    ) -> FlatGroup | str:
        """Moves ``params`` (one device and dtype, each eligible) and their state entries
        ``store[p][key]`` for ``keys`` into flat buffers; the keys in ``counters`` hold one number
        per parameter (also for a 0-d parameter, whose per-element state is 0-d too). With
        ``adopt``, the gradients too (else they stay where they are, the gradient buffer zero).
        Returns the group, or the reason why it cannot be built (then nothing has been changed)."""
        params = sorted(params, key=_row_length)  # stable: equal row lengths keep their order
        device, dtype = params[0].device, params[0].dtype
        offsets, classes, total = [], [], 0
        for p in params:
            length = _row_length(p)
            if not classes or classes[-1].row_length != length:
                classes.append(_Class(length, total, 0))
            offsets.append(total)
            classes[-1].size += p.numel()
            total += p.numel()

        kinds: dict[str, str] = {}
        for key in keys:
            values = [store[p][key] for p in params]
            if (
                key not in counters
                and all(v.shape == p.shape for v, p in zip(values, params))
                and len({v.dtype for v in values}) == 1
            ):
                kinds[key] = "full"
            elif all(v.dim() == 0 for v in values) and len({(v.dtype, v.device) for v in values}) == 1:
                kinds[key] = "scalar"
            else:
                return f"the state {key!r} is neither per-element nor one number per parameter"

        group = cls(
            params=params,
            offsets=offsets,
            classes=classes,
            param_buf=torch.empty(total, device=device, dtype=dtype),
            grad_buf=torch.zeros(total, device=device, dtype=dtype),
            grad_views=[],
            adopts=adopt,
        )
        with torch.no_grad():
            for p, view in zip(params, group.views(group.param_buf)):
                view.copy_(p)
                p.data = view
            group.data_ptrs = list(map(Tensor.data_ptr, params))
            for p, view in zip(params, group.views(group.grad_buf)):
                if adopt and p.grad is not None:  # one without a gradient keeps None (and a zero view)
                    view.copy_(p.grad)
                    p.grad = view
                group.grad_views.append(view)
            for key, kind in kinds.items():
                values = [store[p][key] for p in params]
                if kind == "full":
                    buf = torch.empty(total, device=values[0].device, dtype=values[0].dtype)
                    for p, view, value in zip(params, group.views(buf), values):
                        view.copy_(value)
                        store[p][key] = view
                    group.full[key] = buf
                else:
                    # on the parameters' device (as torch's fused optimizers keep `step`): the
                    # kernel advances them without a host round trip
                    buf = torch.stack([v.to(device) for v in values])
                    for i, p in enumerate(params):
                        store[p][key] = buf[i]
                    group.scalar[key] = buf
            group.dicts = [store[p] for p in params]
            group.entries = {key: [d[key] for d in group.dicts] for key in kinds}
            group.record_versions()
        return group

    # ---- views ---------------------------------------------------------------------------------

    def views(self, buf: Tensor) -> list[Tensor]:
        """Per-parameter views of a buffer laid out like ``param_buf``."""
        return [buf[o : o + p.numel()].view(p.shape) for p, o in zip(self.params, self.offsets)]

    def class_views(self, buf: Tensor, structure: str) -> list[Tensor]:
        """The tensors a step of ``structure`` runs on, of a buffer laid out like ``param_buf``:
        one ``(rows, row_length)`` view per unit class, for ``"elements"`` the whole buffer
        (one tensor: one loop, one counter, fewer guards), for ``"tensors"`` one view per
        parameter, a 0-d one as one element (see :func:`at_least_1d`)."""
        if structure == "elements":
            return [buf]
        if structure == "tensors":  # made once: the buffers live as long as the group
            views = self._per_param.get(id(buf))
            if views is None:
                views = self._per_param[id(buf)] = [at_least_1d(v) for v in self.views(buf)]
            return views
        out = []
        for c in self.classes:
            rows = c.size // c.row_length if c.row_length else 0
            out.append(buf[c.start : c.start + c.size].view(rows, c.row_length))
        return out

    def counter_span(self, structure: str) -> int:
        """How many entries of a counter table a step of ``structure`` advances, each once: one
        for ``"elements"`` (the whole buffer is one tensor), one per unit class for ``"units"``,
        one per parameter for ``"tensors"``. While the parameters have stepped as often, those
        entries stand for all of them (see the module docstring)."""
        if structure == "elements":
            return 1
        return len(self.classes) if structure == "units" else len(self.params)

    # ---- per step ------------------------------------------------------------------------------

    def holds_data(self) -> bool:
        """Whether every parameter is still its view into the buffer (``p.data = ...``,
        ``vector_to_parameters`` or ``module.to(...)`` replace it). A C-level comparison."""
        return list(map(Tensor.data_ptr, self.params)) == self.data_ptrs

    def gradients_in_place(self) -> bool:
        """Whether every ``.grad`` is still its view into the buffer (the usual case; one C-level
        check). If not, see :meth:`missing_gradients` and :meth:`adopt_gradients`."""
        return all(map(operator.is_, map(_GRAD, self.params), self.grad_views))

    def missing_gradients(self) -> bool:
        """Whether a parameter has no gradient (``.grad is None``): it must not be stepped."""
        return any(map(operator.is_, map(_GRAD, self.params), repeat(None)))

    def state_intact(self, store: MutableMapping) -> bool:
        """Whether every state entry is still the view the buffers hold (a user who assigns
        ``opt.state[p][key] = ...``, ``opt.state[p] = {}`` or clears ``opt.state`` replaces it).
        C-level identity checks, one pass per key and one for the dicts."""
        return all(map(operator.is_, map(store.get, self.params), self.dicts)) and self.entries_intact()

    def entries_intact(self) -> bool:
        """:meth:`state_intact` once the per-parameter dicts are known to be those of the store:
        whether every entry of them is still its view."""
        try:
            return all(
                all(map(operator.is_, map(operator.getitem, self.dicts, repeat(key)), views))
                for key, views in self.entries.items()
            )
        except KeyError:  # an entry was deleted
            return False

    def counters_written(self) -> bool:
        """Whether a per-parameter counter (``opt.state[p]["step"]``) was written in place since
        the last step (its table's version counter moved; :meth:`record_versions` after each)."""
        return any(buf._version != self.versions[key] for key, buf in self.scalar.items())

    def record_versions(self) -> None:
        self.versions = {key: buf._version for key, buf in self.scalar.items()}

    def counters_agree(self) -> bool:
        """Whether every parameter has stepped as often: the entries of each counter table are
        equal (read on the host)."""
        return all(bool((buf == buf[:1]).all()) for buf in self.scalar.values())

    def segments(self) -> tuple[Tensor, Tensor]:
        """``(index, sizes)``: the parameter of every element of the buffers (int32, laid out
        like ``param_buf``) and the elements of each parameter (int64). Built when first asked
        for (a step where the parameters' counters part), then kept with the group."""
        if self._segments is None:
            device = self.param_buf.device
            sizes = torch.tensor([p.numel() for p in self.params], dtype=torch.int64, device=device)
            index = torch.repeat_interleave(
                torch.arange(len(self.params), dtype=torch.int32, device=device),
                sizes,
                output_size=self.param_buf.numel(),
            )
            self._segments = (index, sizes)
        return self._segments

    def present(self) -> Tensor:
        """One bool per parameter: whether it has a gradient (is stepped) at this step."""
        return torch.tensor([p.grad is not None for p in self.params], device=self.param_buf.device)

    def adopt_gradients(self) -> None:
        """Brings gradients that were replaced (``zero_grad(set_to_none=True)`` of a module, a
        hook assigning ``.grad``) back into the buffer and re-points ``.grad`` at it. A gradient
        that is ``None`` stays ``None`` (the parameter is not stepped); its view is zeroed, so that
        the buffer holds no stale values for global quantities (norms, non-finite checks)."""
        moved = [(p, view) for p, view in zip(self.params, self.grad_views) if p.grad is not view]
        with torch.no_grad():
            given = [(view, p.grad) for p, view in moved if p.grad is not None]
            if given:
                torch._foreach_copy_([v for v, _ in given], [g for _, g in given])
            absent = [view for p, view in moved if p.grad is None]
            if absent:
                torch._foreach_zero_(absent)
            for p, view in moved:
                if p.grad is not None:
                    p.grad = view
