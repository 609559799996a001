"""Scratch memory for the step's large temporaries on the CPU.

An adaptive step needs one parameter-sized temporary: the denominator ``sqrt(v) + eps`` of
Adagrad, RMSprop and Adam. torch.optim's foreach implementations allocate it at every step. On
the CPU that is expensive for large tensors: the allocator returns large blocks to the operating
system when they are freed, so the next step's block is fresh memory, and every 4 KiB page of it
costs a page fault and is zeroed by the kernel before the step writes it. (Measured on 10M
parameters in 4 tensors, steps interleaved as in training: ``sqrt(v)`` plus ``+ eps`` and the
final ``addcdiv`` took 25 ms with a new block per step and 11 ms with a kept one.)

A :class:`Workspace` keeps one scratch tensor per *large* CPU parameter (at least
:data:`BIG_BYTES`) across steps; the reference executor hands the scalings a :class:`Scratch`
aligned with the parameters they step (:attr:`steadygrad.core.transform.StepContext.scratch`),
and :func:`compute_into` writes a temporary there with one ``out=`` call per large tensor (one
pass over memory, as the allocating operation). Small tensors keep torch's allocating foreach
operations: the allocator serves them from memory it keeps, and one foreach call is cheaper than a
Python call per tensor.

The cost is memory: one tensor the size of each large parameter, in its dtype: the transient peak
of torch's foreach step made permanent. Accelerators' caching allocators make a new block free,
and the fused path (``fused=True``) has no temporaries, so neither uses a workspace.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .tensorlist import PLAIN_TYPES, as_real

__all__ = ["BIG_BYTES", "Scratch", "Workspace", "compute_into"]

#: Tensors of at least this many bytes get a kept scratch tensor (128 KiB: glibc's default
#: threshold above which an allocation is fresh memory from the operating system).
BIG_BYTES = 1 << 17

# Distinct sets of parameters (those with a gradient) whose scratch lists are cached.
_CACHED_SETS = 16


class Scratch(NamedTuple):
    """Scratch for the large tensors of a list: ``buffers[j]`` for ``tensors[big[j]]``; ``small``
    the indices of the others, ``order`` the permutation that puts ``[*big results, *small
    results]`` back in the list's order (``None``: the identity)."""

    big: list[int]
    buffers: list[Tensor]
    small: list[int]
    order: tuple[int, ...] | None


def _pick(values: Sequence[Tensor], indices: list[int]) -> list[Tensor]:
    if len(indices) == 1:
        return [values[indices[0]]]
    return list(itemgetter(*indices)(values)) if indices else []


def compute_into(
    scratch: Scratch | None,
    out_op: Callable[..., Tensor],
    foreach_op: Callable[..., list[Tensor]],
    *lists: Sequence[Any],
) -> list[Tensor]:
    """An element-wise function of aligned ``lists`` (tensors, or numbers per tensor) as a new
    list: ``out_op(*row, out=buffer)`` into the kept scratch of each large tensor,
    ``foreach_op(*lists)`` (allocating) for the small ones; without scratch ``foreach_op`` for all.
    The two must compute the same function (``torch.sqrt`` and ``torch._foreach_sqrt``). A buffer
    whose shape or dtype no longer matches the result's first input is replaced."""
    if scratch is None or not scratch.big:
        return foreach_op(*(list(values) for values in lists))
    results = []
    for j, i in enumerate(scratch.big):
        row = [values[i] for values in lists]
        v, buffer = row[0], scratch.buffers[j]
        if buffer.shape != v.shape or buffer.dtype != v.dtype or buffer.device != v.device:
            buffer = scratch.buffers[j] = torch.empty_like(v, memory_format=torch.contiguous_format)
        results.append(out_op(*row, out=buffer))
    if not scratch.small:
        return results
    results += foreach_op(*(_pick(values, scratch.small) for values in lists))
    return list(itemgetter(*scratch.order)(results))


class Workspace:
    """Kept scratch tensors for the large CPU parameters (see the module docstring).

    Not part of any state: it is not saved, pickled or copied (an unpickled optimizer builds its
    own), and :meth:`clear` drops it."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}
        # The parameters are held with their scratch, so that their ids stay theirs.
        self._sets: OrderedDict[tuple[int, ...], tuple[list[Tensor], Scratch | None]] = OrderedDict()

    def clear(self) -> None:
        self._buffers.clear()
        self._sets.clear()

    def scratch(self, params: Sequence[Tensor]) -> Scratch | None:
        """Scratch aligned with the real views of ``params`` (plain CPU tensors), or ``None``
        where a workspace does not apply (no large tensor, another device, a tensor subclass such
        as a DTensor, under ``torch.compile``)."""
        if not params or torch.compiler.is_compiling():
            return None
        key = tuple(map(id, params))
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key][1]
        scratch = None
        if all(type(p) in PLAIN_TYPES and p.is_cpu for p in params):
            big = [i for i, p in enumerate(params) if p.numel() * p.element_size() >= BIG_BYTES]
            if big:
                scratch = Scratch(big, [self._buffer(params[i]) for i in big], *_rest(big, len(params)))
        self._sets[key] = (list(params), scratch)
        if len(self._sets) > _CACHED_SETS:
            self._sets.popitem(last=False)
        return scratch

    def _buffer(self, p: Tensor) -> Tensor:
        held = self._buffers.get(id(p))
        if held is None or held[0] is not p:
            held = (p, torch.empty_like(as_real(p), memory_format=torch.contiguous_format))
            self._buffers[id(p)] = held
        return held[1]


def _rest(big: list[int], n: int) -> tuple[list[int], tuple[int, ...] | None]:
    """The small indices and the permutation from ``[*big, *small]`` back to ``range(n)``."""
    chosen = set(big)
    small = [i for i in range(n) if i not in chosen]
    if not small:
        return small, None
    position = {i: k for k, i in enumerate(big + small)}
    return small, tuple(position[i] for i in range(n))
