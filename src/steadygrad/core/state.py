"""State layout: where each field of a transform's state is stored, in torch.optim's layout.

Transforms keep their state as named tuples of lists (see :mod:`steadygrad.core.transform`).
Objects that live across steps for a changing set of parameters (an optimizer steps only the
parameters that have a gradient; a clipper likewise) store it instead in a mapping
``store[param] -> {key: tensor}``, the layout of ``torch.optim.Optimizer.state``. A
:class:`StateLayout` is the one place that decides the keys, creates missing state, gathers the
state of a step and stores it back.

Keys
    A per-parameter field is stored under its field name (``step``, ``exp_avg``, ...: torch.optim's
    keys), after ``namespace`` (``"clip."`` for an optimizer's ``clip=``). A name that occurs twice
    in a chain is stored as ``"<position>.<name>"`` from its second occurrence on (position = index
    path in the chain, e.g. ``"1.step"``).

Shared fields (one tensor for all parameters: ZClip's statistics, a ``fraction_clipped``)
    An optimizer's ``state`` holds nothing but parameter-keyed entries, so that
    ``torch.distributed.checkpoint`` and torch's own tooling work: a shared field is *replicated*
    in the entry of every parameter it belongs to (the parameters of its group, or of all groups
    for ``clip=``), under ``shared_namespace + name`` (``"group."`` or ``"clip."``). In memory every
    entry holds the very same tensor, updated in place; ``state_dict()`` therefore carries it once
    per parameter (``torch.save`` stores it once), and :meth:`StateLayout.realias` makes the copies
    that ``load_state_dict`` creates one tensor again. A :class:`steadygrad.Clipper` keeps its shared
    fields in a dict of their own instead (``SharedDict``).

Complex parameters are handed to the transform as real views (``torch.view_as_real``) of the
parameter, the update and every state tensor, as torch.optim does; the state stays complex.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import replace
from operator import is_, itemgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .dtensor import is_dtensor, local_tensor, split_shards
from .tensorlist import any_complex, as_real, from_real
from .transform import PLAIN, StepContext, Transform, apply_scale, state_leaves, with_leaves

__all__ = ["Replicated", "SharedDict", "StateKey", "StateLayout", "state_keys"]


class StateKey(NamedTuple):
    """Where one field of a transform's state is stored."""

    leaf: int  # index of the state named tuple in chain order
    field: str  # its field name
    key: str  # the storage key
    per_param: bool  # a list aligned with the parameters (else one shared tensor)


def state_keys(template: Any, namespace: str = "", shared_namespace: str = "") -> list[StateKey]:
    """The storage keys of a transform state (``transform.init([])`` is a cheap template)."""
    keys: list[StateKey] = []
    taken: set[str] = set()
    for i, (path, leaf) in enumerate(state_leaves(template)):
        for field in leaf._fields:
            value = getattr(leaf, field)
            if value is None:
                continue
            key = field if field not in taken else ".".join(map(str, path)) + "." + field
            taken.add(key)
            per_param = isinstance(value, (list, tuple))
            keys.append(StateKey(i, field, (namespace if per_param else shared_namespace) + key, per_param))
    return keys


# ---- where shared fields live --------------------------------------------------------------------


class SharedDict:
    """Shared fields in a dict of their own (a Clipper's ``state["shared"]``)."""

    def __init__(self, slot: MutableMapping[str, Tensor]) -> None:
        self.slot = slot

    def get(self, key: str) -> Tensor | None:
        return self.slot.get(key)

    def put(self, key: str, value: Tensor, params: Sequence[Tensor]) -> None:
        self.slot[key] = value

    def attach(self, key: str, value: Tensor, params: Sequence[Tensor]) -> None:
        self.slot.setdefault(key, value)


class Replicated:
    """Shared fields replicated in the entries of ``members`` (all the parameters they belong to)
    of an optimizer's ``state``: every entry holds the same tensor."""

    def __init__(self, store: MutableMapping[Any, dict], members: Sequence[Tensor]) -> None:
        self.store = store
        self.members = members

    def get(self, key: str) -> Tensor | None:
        for p in self.members:
            entry = self.store.get(p)
            if entry and key in entry:
                return entry[key]
        return None

    def attach(self, key: str, value: Tensor, params: Sequence[Tensor]) -> None:
        """Gives the parameters that lack it the tensor ``value`` under ``key``."""
        for p in params:
            self.store[p].setdefault(key, value)

    def put(self, key: str, value: Tensor, params: Sequence[Tensor]) -> None:
        """Stores the new value: in place into the shared tensor when it keeps its shape (one
        copy), else the new tensor into every entry."""
        old = self.get(key)
        if old is value:
            return
        if old is not None and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device:
            old.copy_(value)
            return
        for p in self.members:
            entry = self.store.get(p)
            if entry and key in entry:
                entry[key] = value
        self.attach(key, value, params)


# ---- the layout ------------------------------------------------------------------------------------


class StateLayout:
    """The storage of one transform's state (see the module docstring).

    Args:
        transform: the transform (or chain).
        namespace: the prefix of its per-parameter keys.
        shared_namespace: the prefix of its shared keys.
    """

    def __init__(self, transform: Transform, namespace: str = "", shared_namespace: str = "") -> None:
        self.transform = transform
        self.template = transform.init([])
        self.keys = state_keys(self.template, namespace, shared_namespace)
        self.per_param = [k for k in self.keys if k.per_param]
        self.shared = [k for k in self.keys if not k.per_param]
        self.key_names = frozenset(k.key for k in self.keys)
        self.leaves = [leaf for _, leaf in state_leaves(self.template)]

    # ---- creating -------------------------------------------------------------------------------

    def ensure(
        self,
        store: MutableMapping[Any, dict],
        params: Sequence[Tensor],
        shared: SharedDict | Replicated,
        *,
        step_on_device: bool = False,
        entries: Sequence[dict] | None = None,
    ) -> None:
        """Creates the state that ``params`` lack (new parameters, or a field of an option switched
        on since), shared fields included. ``step_on_device`` keeps ``step`` counters on the
        parameter's device in float32 (torch's ``capturable``). ``entries``: ``store[p]`` for each
        of ``params``, if the caller has them."""
        names = self.key_names
        if entries is None:
            entries = list(map(store.__getitem__, params))
        missing = [p for p, entry in zip(params, entries) if not entry.keys() >= names]
        if not missing:
            return
        fresh = [leaf for _, leaf in state_leaves(self.transform.init(missing))]
        for k in self.per_param:
            for p, value in zip(missing, getattr(fresh[k.leaf], k.field)):
                entry = store[p]
                if k.key not in entry:
                    if k.key == "step" and step_on_device:
                        value = value.to(device=p.device, dtype=torch.float32)
                    entry[k.key] = value
        for k in self.shared:
            value = shared.get(k.key)
            shared.attach(k.key, getattr(fresh[k.leaf], k.field) if value is None else value, missing)

    # ---- one step ---------------------------------------------------------------------------------

    def assemble(self, per_param: Callable[[StateKey], list[Tensor]], shared: SharedDict | Replicated) -> Any:
        """A state in the structure of the template: per-parameter fields from ``per_param(key)``,
        shared fields from ``shared``."""
        fields: list[dict[str, Any]] = [{} for _ in self.leaves]
        for k in self.per_param:
            fields[k.leaf][k.field] = per_param(k)
        for k in self.shared:
            fields[k.leaf][k.field] = shared.get(k.key)
        return with_leaves(self.template, [leaf._replace(**f) for leaf, f in zip(self.leaves, fields)])

    def gather(
        self,
        store: MutableMapping[Any, dict],
        params: Sequence[Tensor],
        shared: SharedDict | Replicated,
        *,
        real: bool | None = None,
        local: bool = False,
        entries: Sequence[dict] | None = None,
    ) -> Any:
        """The state of ``params`` (real views of complex state; with ``local``, the local shards
        of DTensor state). Call :meth:`ensure` first. ``real``: whether all of ``params`` are known
        to be real (else it is checked); ``entries`` as for :meth:`ensure`."""
        if real is None:
            real = not any_complex(params)
        if entries is None and self.per_param:
            entries = list(map(store.__getitem__, params))
        if real and not local:
            return self.assemble(lambda k: list(map(itemgetter(k.key), entries)), shared)
        return self.assemble(lambda k: [as_real(local_tensor(e[k.key])) for e in entries], shared)

    def scatter(
        self,
        store: MutableMapping[Any, dict],
        params: Sequence[Tensor],
        state: Any,
        shared: SharedDict | Replicated,
        *,
        given: Any = None,
    ) -> None:
        """Stores ``state`` (as returned by the transform) back. ``given``: the state the transform
        was given (:meth:`gather`'s), whose per-parameter lists need no storing where the transform
        returned the very same tensors (it updated them in place: the usual case)."""
        leaves = [leaf for _, leaf in state_leaves(state)]
        before = None if given is None else [leaf for _, leaf in state_leaves(given)]
        entries = None
        for k in self.per_param:
            values = getattr(leaves[k.leaf], k.field)
            if before is not None and all(map(is_, values, getattr(before[k.leaf], k.field))):
                continue
            if entries is None:
                entries = list(map(store.__getitem__, params))
            for entry, v in zip(entries, values):
                old = entry[k.key]
                if is_dtensor(old):  # a new local value goes into the DTensor's own shard
                    shard = local_tensor(old)
                    if v is not shard and v.data_ptr() != shard.data_ptr():
                        shard.copy_(from_real(v, shard))
                # In-place updates of a complex tensor come back as its real view.
                elif v is not old and not (old.is_complex() and v.data_ptr() == old.data_ptr()):
                    entry[k.key] = from_real(v, old)
        self.store_shared(state, shared, params)

    def store_shared(self, state: Any, shared: SharedDict | Replicated, params: Sequence[Tensor] = ()) -> None:
        """Writes the shared fields of ``state`` back (``params``: entries that must hold them)."""
        if not self.shared:
            return
        leaves = [leaf for _, leaf in state_leaves(state)]
        for k in self.shared:
            shared.put(k.key, getattr(leaves[k.leaf], k.field), params)

    def run(
        self,
        store: MutableMapping[Any, dict],
        params: Sequence[Tensor],
        updates: list[Tensor],
        shared: SharedDict | Replicated,
        ctx: StepContext = PLAIN,
        *,
        apply: bool = False,
        scaled: bool = False,
        step_on_device: bool = False,
    ) -> Any:
        """One step of the transform for ``params`` with the state kept in ``store``.

        Creates missing state, gathers it, runs ``update`` (``update_scaled`` with ``scaled``;
        ``apply_`` with ``apply``: the updates are added to the parameters), and stores the new
        state. ``params`` and ``updates`` are the original tensors; complex ones are viewed as real
        here; DTensors (parameters, updates, state) are replaced by their local shards (the
        caller describes the layout in ``ctx.shards``, :mod:`steadygrad.core.dtensor`). A pending
        factor in ``ctx`` (:attr:`StepContext.scale`) is applied first unless the transform takes
        it. Returns the updates (real views for complex parameters, local shards of DTensors;
        ``[]`` with ``apply``), with ``scaled`` the pair ``(updates, scale)``.
        """
        entries = list(map(store.__getitem__, params))
        self.ensure(store, params, shared, step_on_device=step_on_device, entries=entries)
        local_params, specs = split_shards(params)
        local = specs is not None
        if local:
            updates = [local_tensor(u) for u in updates]
        real = not any_complex(local_params)
        given = self.gather(store, params, shared, real=real, local=local, entries=entries)
        real_updates = list(updates) if real else [as_real(u) for u in updates]
        real_params = local_params if real else [as_real(p) for p in local_params]
        if not real:
            ctx = replace(ctx, complex_views=[p.is_complex() for p in local_params])
        if ctx.scale is not None and not self.transform.takes_scale:
            real_updates, ctx = apply_scale(real_updates, ctx)
        scale = None
        if apply:
            state = self.transform.apply_(real_params, real_updates, given, ctx)
            real_updates = []
        elif scaled:
            real_updates, scale, state = self.transform.update_scaled(real_updates, given, real_params, ctx)
        else:
            real_updates, state = self.transform.update(real_updates, given, real_params, ctx)
        self.scatter(store, params, state, shared, given=given)
        return (real_updates, scale) if scaled else real_updates

    # ---- checkpoints ------------------------------------------------------------------------------

    def restore(
        self,
        store: MutableMapping[Any, dict],
        params: Sequence[Tensor],
        saved: Sequence[dict | None],
        shared: Replicated,
    ) -> None:
        """After torch's ``load_state_dict`` (which casts every state tensor but ``step`` to its
        parameter's dtype and copies each entry apart): the entries of this layout again in the
        dtype the transform creates, from the saved values ``saved`` (aligned with ``params``), and
        each shared field one tensor for all ``params`` again (the first saved one)."""
        if not params:
            return
        leaves = [leaf for _, leaf in state_leaves(self.transform.init([p.detach().to("meta") for p in params]))]
        for k in self.per_param:
            for p, values, like in zip(params, saved, getattr(leaves[k.leaf], k.field)):
                entry = store.get(p)
                if not values or k.key not in values or not entry or k.key not in entry:
                    continue
                if entry[k.key].dtype != like.dtype:
                    entry[k.key] = values[k.key].to(device=entry[k.key].device, dtype=like.dtype, copy=True)
        for k in self.shared:
            source = next((values[k.key] for values in saved if values and k.key in values), None)
            if source is None:
                continue
            dtype = getattr(leaves[k.leaf], k.field).dtype
            value = source.detach().to(device=params[0].device, dtype=dtype, copy=True)
            for p in params:
                entry = store.get(p)
                if entry and k.key in entry:
                    entry[k.key] = value
