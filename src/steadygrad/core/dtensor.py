"""DTensors (FSDP2's ``fully_shard``, tensor parallelism): the one place that looks inside them.

steadygrad runs its steps on the *local shards* of DTensor parameters, gradients and state: every
element-wise rule is the same computation on a shard as on the whole tensor, needs no
communication, and plain tensors run torch's foreach kernels (DTensor has no sharding strategy
for several of them, and dispatching each operation through DTensor costs host time). What needs
the whole tensor, a norm, is computed from the local shards and all-reduced over the mesh
dimensions the tensor is sharded on (:mod:`steadygrad.core.norms`); the executor hands that
layout to the transforms as :attr:`~steadygrad.core.transform.StepContext.shards`.

A :data:`ShardSpec` is ``(device_mesh, mesh_dims, tensor_dims)``: the mesh of a DTensor, the mesh
dimensions along which it is sharded (``Shard`` or ``_StridedShard``; ``Replicate`` dimensions
are not listed) and the tensor dimensions those split (FSDP2: ``(0,)``, dim 0 over the one mesh
dimension). A plain tensor's spec is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .tensorlist import PLAIN_TYPES

__all__ = ["ShardSpec", "all_ranks_true", "is_dtensor", "local_tensor", "split_shards"]

ShardSpec = tuple[Any, tuple[int, ...], tuple[int, ...]]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (``False`` where torch.distributed's tensor module is missing)."""
    if type(t) in PLAIN_TYPES:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return False
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor this rank holds of ``t``: a DTensor's local shard (the very tensor object the
    DTensor keeps, so in-place changes reach it and its identity is stable from step to step),
    any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t  # noqa: SLF001 - what to_local() returns a view of


def _is_sharded(placement: Any) -> bool:
    from torch.distributed.tensor import Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - torch versions where it does not exist
        return isinstance(placement, Shard)
    return isinstance(placement, (Shard, _StridedShard))


def split_shards(tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[ShardSpec | None] | None]:
    """The local tensor of each of ``tensors`` and, when one of them is a DTensor, the
    :data:`ShardSpec` of each (``None`` for plain tensors); ``(tensors, None)`` when none is.

    Raises:
        ValueError: a DTensor with a ``Partial`` placement (its local values are not elements of
            the tensor: redistribute it first).
    """
    if set(map(type, tensors)) <= PLAIN_TYPES:
        return list(tensors), None
    locals_: list[Tensor] = []
    specs: list[ShardSpec | None] = []
    for t in tensors:
        if not is_dtensor(t):
            locals_.append(t)
            specs.append(None)
            continue
        dims, tensor_dims = [], []
        for k, placement in enumerate(t.placements):
            if _is_sharded(placement):
                dims.append(k)
                tensor_dims.append(placement.dim)
            elif not placement.is_replicate():
                raise ValueError(
                    f"DTensors with a {type(placement).__name__} placement ({placement}) are not supported "
                    "(only Shard and Replicate): redistribute the tensor first"
                )
        locals_.append(local_tensor(t))
        specs.append((t.device_mesh, tuple(dims), tuple(tensor_dims)))
    if all(s is None for s in specs):
        return locals_, None
    return locals_, specs


def all_ranks_true(flag: Tensor, specs: Sequence[ShardSpec | None] | None) -> Tensor:
    """``flag`` (a 0-d bool) and-ed over every rank that holds another shard of one of the
    tensors ``specs`` describes: one all-reduce (MIN) per mesh dimension some tensor is sharded
    on, so that all those ranks decide alike (a non-finite value on one rank skips the step on
    all). ``flag`` itself when nothing is sharded."""
    if not specs:
        return flag
    groups: dict[Any, set[int]] = {}
    for spec in specs:
        if spec is not None:
            groups.setdefault(spec[0], set()).update(spec[1])
    value = flag.to(torch.int32)
    for mesh, dims in groups.items():
        for k in sorted(dims):
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=mesh.get_group(k))
    return value.to(torch.bool)
