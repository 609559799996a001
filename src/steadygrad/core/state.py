"""Running a transform over parameters whose state is stored per parameter, torch.optim style.

Transforms keep their state as named tuples of lists (see :mod:`steadygrad.core.transform`).
Objects that live across steps for a changing set of parameters (an optimizer steps only the
parameters that have a gradient; a clipper likewise) store it instead in a mapping
``store[param] -> {key: tensor}``, the layout of ``torch.optim.Optimizer.state``. This module
converts between the two and runs one step.

Keys
    A state field is stored under its field name (``step``, ``exp_avg``, ...: torch.optim's keys).
    A name that occurs twice in a chain is stored as ``"<position>.<name>"`` from its second
    occurrence on (position = index path in the chain, e.g. ``"1.step"``). Fields that are a
    single tensor (shared by all parameters) are stored in ``store[shared_key]``; ``None`` fields
    are not stored.

Complex parameters are handed to the transform as real views (``torch.view_as_real``) of the
parameter, the update and every state tensor, as torch.optim does; the state stays complex.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .tensorlist import as_real, from_real
from .transform import Transform, state_leaves

__all__ = ["StateKey", "assemble_state", "init_state", "run_transform", "shared_slot", "state_keys", "store_shared"]


class StateKey(NamedTuple):
    """Where one field of a transform's state is stored."""

    leaf: int  # index of the state named tuple in chain order
    field: str  # its field name
    key: str  # the storage key
    per_param: bool  # a list aligned with the parameters (else one shared tensor)


def state_keys(template: Any, prefix: str = "") -> list[StateKey]:
    """The storage keys of a transform state (``transform.init([])`` is a cheap template).
    Per-parameter keys start with ``prefix`` (a namespace when several transforms share one
    per-parameter store); shared keys have a slot of their own and keep their names."""
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
            keys.append(StateKey(i, field, prefix + key if per_param else key, per_param))
    return keys


def init_state(
    store: MutableMapping[Any, dict],
    transform: Transform,
    params: Sequence[Tensor],
    keys: Sequence[StateKey] | None = None,
    *,
    step_on_device: bool = False,
    prefix: str = "",
) -> None:
    """Creates the per-parameter state that ``params`` lack (new parameters, or a state field of
    an option switched on since). ``step_on_device`` keeps ``step`` counters on the parameter's
    device in float32 (torch's ``capturable``)."""
    if keys is None:
        keys = state_keys(transform.init([]), prefix)
    per_param = [k for k in keys if k.per_param]
    missing = [p for p in params if any(k.key not in store[p] for k in per_param)]
    if not missing:
        return
    fresh = [leaf for _, leaf in state_leaves(transform.init(missing))]
    for k in per_param:
        for p, value in zip(missing, getattr(fresh[k.leaf], k.field)):
            if k.key not in store[p]:
                if k.key == "step" and step_on_device:
                    value = value.to(device=p.device, dtype=torch.float32)
                store[p][k.key] = value


def assemble_state(
    template: Any,
    keys: Sequence[StateKey],
    per_param: Callable[[StateKey], list[Tensor]],
    shared: MutableMapping[str, Any],
) -> Any:
    """A transform state in the structure of ``template``: per-parameter fields from
    ``per_param(key)``, shared fields from ``shared`` (created there from the template's value the
    first time)."""
    leaves = [leaf for _, leaf in state_leaves(template)]
    fields: list[dict[str, Any]] = [{} for _ in leaves]
    for k in keys:
        if k.per_param:
            fields[k.leaf][k.field] = per_param(k)
        else:
            if k.key not in shared:
                shared[k.key] = getattr(leaves[k.leaf], k.field)
            fields[k.leaf][k.field] = shared[k.key]
    return _rebuild(template, iter([leaf._replace(**f) for leaf, f in zip(leaves, fields)]))


def shared_slot(store: MutableMapping[Any, dict], shared_key: Any, keys: Sequence[StateKey]) -> dict:
    """``store[shared_key]`` if the state has shared fields; otherwise a throwaway dict, so that no
    empty entry appears in an optimizer's ``state_dict``."""
    return store[shared_key] if any(not k.per_param for k in keys) else {}


def store_shared(state: Any, keys: Sequence[StateKey], shared: MutableMapping[str, Any]) -> None:
    """Writes the shared fields of ``state`` back to ``shared``."""
    leaves = [leaf for _, leaf in state_leaves(state)]
    for k in keys:
        if not k.per_param:
            shared[k.key] = getattr(leaves[k.leaf], k.field)


def _store_per_param(store, state, keys, params) -> None:
    leaves = [leaf for _, leaf in state_leaves(state)]
    for k in keys:
        if not k.per_param:
            continue
        for p, v in zip(params, getattr(leaves[k.leaf], k.field)):
            old = store[p][k.key]
            # In-place updates of a complex tensor come back as its real view.
            if v is not old and not (old.is_complex() and v.data_ptr() == old.data_ptr()):
                store[p][k.key] = from_real(v, old)


def _rebuild(template: Any, leaves: Any) -> Any:
    if hasattr(template, "_fields"):
        return next(leaves)
    return tuple(_rebuild(part, leaves) for part in template)


def run_transform(
    store: MutableMapping[Any, dict],
    transform: Transform,
    params: Sequence[Tensor],
    updates: list[Tensor],
    shared_key: Any,
    *,
    step_on_device: bool = False,
    prefix: str = "",
) -> list[Tensor]:
    """One ``transform.update`` for ``params`` with state kept in ``store``.

    Creates missing state, gathers it, runs the update (which may consume ``updates``, see the
    in-place rule), stores the new state and returns the updates. ``params`` and ``updates``
    are the original tensors; complex ones are viewed as real here. The returned updates are real
    views for complex parameters. ``prefix`` starts every storage key (a namespace).
    """
    template = transform.init([])
    keys = state_keys(template, prefix)
    init_state(store, transform, params, keys, step_on_device=step_on_device)
    shared = shared_slot(store, shared_key, keys)
    state = assemble_state(template, keys, lambda k: [as_real(store[p][k.key]) for p in params], shared)
    real_updates = [as_real(u) for u in updates]
    real_params = [as_real(p) for p in params]
    real_updates, state = transform.update(real_updates, state, real_params)
    _store_per_param(store, state, keys, params)
    store_shared(state, keys, shared)
    return real_updates
