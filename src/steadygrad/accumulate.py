"""Gradient accumulation with explicit, exact semantics.

A *window* is the set of micro-batches whose gradients make one optimizer step: ``k_r``
micro-batches on each rank ``r`` of ``W`` ranks. Micro-batch ``i`` of rank ``r`` holds ``n_{r,i}``
items (tokens or examples) and has the per-item losses ``l_{r,i,j}``. :class:`GradAccumulator`
turns the gradients that autograd summed into ``.grad`` over the window into the window's
gradient, for one of three documented reductions:

``"items"`` (the default; backpropagate the **sum** of each micro-batch's item losses)
    .. math::
        g = \\frac{1}{N} \\sum_r \\sum_i \\nabla \\sum_j l_{r,i,j},
        \\qquad N = \\sum_r \\sum_i n_{r,i}

    the mean over every item of the window and of every rank: exactly the gradient of one big
    batch holding all of them, whatever the ``n_{r,i}`` (uneven lengths, padding, a short last
    window). Averaging each micro-batch's *mean* loss and dividing by ``k`` instead weights the
    items of a micro-batch by ``1/(k·n_i)``, which is the item mean only when every ``n_i`` is the
    same.

``"mean"`` (backpropagate each micro-batch's **mean** loss)
    .. math::
        g = \\frac{1}{K} \\sum_r \\sum_i \\nabla \\Big(\\frac{1}{n_{r,i}} \\sum_j l_{r,i,j}\\Big),
        \\qquad K = \\sum_r k_r

    the mean of the micro-batch mean gradients (every micro-batch weighs the same).

``"sum"`` (backpropagate any loss, usually the sum)
    .. math::
        g = \\sum_r \\sum_i \\nabla L_{r,i}

    the plain sum over the window and the ranks.

Every micro-batch calls :meth:`GradAccumulator.count` (with its item count under ``"items"``).
:meth:`GradAccumulator.finalize_` scales ``.grad`` in place and starts a new window.

How the ranks' gradients were combined (``rank_reduction``)
    ``finalize_`` cannot tell from ``.grad`` whether something already reduced it across ranks,
    so the caller says it once, in the constructor; nothing is guessed:

    * ``"mean"``: ``.grad`` holds the *average* over the ranks, ``(1/W) Σ_r``. This is what
      ``DistributedDataParallel`` (and FSDP) do by default on the window's last backward (run the
      others under ``model.no_sync()``). ``finalize_`` multiplies by ``W/N`` (``W/K``, ``W``).
    * ``"sum"``: ``.grad`` holds the *sum* over the ranks (a DDP comm hook that does not divide,
      or a hand-written ``all_reduce(SUM)``). ``finalize_`` multiplies by ``1/N`` (``1/K``, 1).
    * ``"none"``: ``.grad`` holds this rank's gradients alone. ``finalize_`` multiplies by ``1/N``
      with the *global* ``N`` of ``process_group``, so that summing the results over the ranks
      afterwards (``all_reduce(SUM)``) gives the window's gradient. Without a process group this
      is plain single-process accumulation.

    ``W`` is the size of ``process_group``; pass the group DDP reduces over.

Counts stay on the device
    Counts given as tensors (``mask.sum()``) are added on the device; counts given as Python
    integers are added on the host. ``finalize_`` puts both into one 2-element int64 tensor
    ``[items, micro_batches]`` on the parameters' device and, with a process group of more than one
    rank, reduces it with exactly one ``all_reduce``; the gradients themselves are reduced by DDP, not
    here. Nothing reads a device value on the host: no ``.item()``, no synchronisation.

Empty windows
    ``finalize_`` without any ``count()`` since the previous one raises ``RuntimeError`` (a host-side
    check, no sync): it is a missing ``count()`` or a second ``finalize_`` of the same window, which
    would otherwise scale the gradients twice. A window whose counts add up to zero items (every
    token masked) divides by ``max(N, 1)``: the gradients, all zero when the loss was masked, stay
    as they are instead of turning into NaN.

GradScaler and clipping
    :meth:`GradAccumulator.finish_window` runs a window's end in the one right order --
    ``scaler.unscale_``, ``finalize_``, clipping, ``scaler.step``, ``scaler.update``, ``zero_grad`` --
    and hands the clipping hook a 0-d ``commit`` tensor (1: the optimizer will step; 0: the scaler
    found inf/NaN and will skip it), read from the scaler's own inf check on the device. An adaptive
    clipper that folds ``commit`` into its statistics learns nothing from a skipped step, at no cost
    beyond the one host sync that ``GradScaler.step`` already makes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .core.params import parse_params
from .core.tensorlist import group_by_device_dtype

__all__ = ["GradAccumulator", "WindowCounts", "WindowEnd"]

Reduction = Literal["items", "mean", "sum"]
RankReduction = Literal["mean", "sum", "none"]

_REDUCTIONS = ("items", "mean", "sum")
_RANK_REDUCTIONS = ("mean", "sum", "none")


class WindowCounts(NamedTuple):
    """The counts of a finished window, over every rank of the process group.

    Attributes:
        items: 0-d int64 tensor, the items of the window (the ``N`` of ``"items"``).
        micro_batches: 0-d int64 tensor, the micro-batches of the window (the ``K`` of ``"mean"``).
    """

    items: Tensor
    micro_batches: Tensor


class WindowEnd(NamedTuple):
    """What :meth:`GradAccumulator.finish_window` did.

    Attributes:
        counts: the window's :class:`WindowCounts`.
        commit: 0-d float32 tensor on the accumulator's device: 1 if the optimizer stepped, 0 if
            the scaler found inf/NaN gradients and skipped the step. Read it on the host only
            when you need it (logging); that is a sync.
        clip: the value the clipping hook returned (e.g. the pre-clip norm or a ``ClipStats``),
            ``None`` without a hook.
    """

    counts: WindowCounts
    commit: Tensor
    clip: Any


def _host_count(n: Any) -> int:
    """Validates a count given as a Python (or NumPy) number and returns it as an int."""
    if isinstance(n, bool):
        raise TypeError("a count must be an integer number of items, got a bool")
    if isinstance(n, numbers.Integral):
        value = int(n)
    elif isinstance(n, numbers.Real):
        x = float(n)
        if not math.isfinite(x) or not x.is_integer():
            raise ValueError(f"a count must be a whole number of items, got {n!r}")
        value = int(x)
    else:
        raise TypeError(f"a count must be an int or an integer tensor, got {type(n).__name__}")
    if value < 0:
        raise ValueError(f"a count must be >= 0, got {value}")
    return value


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; asynchronous unless the copy lands in host memory (a non-blocking copy
    to the CPU could be read before it has arrived)."""
    return t.to(device, non_blocking=torch.device(device).type != "cpu")


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """The sum of the scaler's inf/NaN flags for ``optimizer`` (after ``unscale_``), on ``device``.

    Reads GradScaler's per-optimizer record ``found_inf_per_device``, the same tensors that
    ``scaler.step`` and ``scaler.update`` consume; the copies are non-blocking (no sync)."""
    getter = getattr(scaler, "_found_inf_per_device", None)
    if getter is not None:
        per_device = getter(optimizer)
    else:  # pragma: no cover - older layouts of the same record
        per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    if not per_device:
        raise RuntimeError(
            "the GradScaler recorded no inf/NaN check for this optimizer after unscale_(): none of "
            "its parameters has a gradient"
        )
    total: Tensor | None = None
    for flag in per_device.values():
        flag = _to_device(flag, device).to(torch.float32)
        total = flag if total is None else total + flag
    assert total is not None
    return total


class GradAccumulator:
    """Turns gradients accumulated over micro-batches into the window's gradient, exactly.

    Usage (single process)::

        acc = sg.GradAccumulator(model.parameters(), reduction="items")
        for mb in window:
            loss_sum(mb).backward()        # the SUM of the item losses of this micro-batch
            acc.count(mb.num_items)        # an int or an integer tensor such as mask.sum()
        acc.finalize_()                    # .grad = the mean over every item of the window
        opt.step(); opt.zero_grad()

    With DDP, run every micro-batch but the last under ``model.no_sync()`` and build the
    accumulator with ``process_group=dist.group.WORLD, rank_reduction="mean"``. With a GradScaler,
    end the window with :meth:`finish_window`. The module docstring gives the formulas of the three
    reductions and the meaning of ``rank_reduction``.

    Args:
        params: the parameters whose ``.grad`` is finalized: a tensor, an ordered iterable of
            tensors, of ``(name, tensor)`` pairs, or of parameter groups (``opt.param_groups``).
        reduction: ``"items"`` (mean over all items; backpropagate sum-reduced losses),
            ``"mean"`` (mean of micro-batch means; backpropagate mean-reduced losses) or ``"sum"``.
        process_group: the ranks whose items make the window (the group DDP reduces over, e.g.
            ``torch.distributed.group.WORLD``). ``None``: this process alone.
        rank_reduction: how ``.grad`` was already combined across the ranks of ``process_group``
            when ``finalize_`` runs: ``"mean"`` (DDP's average), ``"sum"`` or ``"none"`` (local
            gradients). Required with a process group; with ``process_group=None`` only ``None`` or
            ``"none"`` are accepted.

    Raises:
        ValueError: unknown ``reduction`` or ``rank_reduction``; no parameters; a parameter listed
            twice; a process group without ``rank_reduction``; ``process_group=None`` while
            torch.distributed runs more than one rank and ``rank_reduction`` is not ``"none"`` (the
            counts would be this rank's alone while DDP averages the gradients).
        TypeError: ``params`` is a set or holds something other than tensors.

    Checkpoints
        :meth:`state_dict` holds the counts of the open window (per rank), so that a window may
        span a checkpoint; the gradients accumulated so far are not in it (``.grad`` belongs to
        the model), so a mid-window checkpoint must also save them. At a window boundary the state
        is empty and nothing else is needed.
    """

    def __init__(
        self,
        params: Any,
        reduction: Reduction = "items",
        process_group: Any = None,
        *,
        rank_reduction: RankReduction | None = None,
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, _REDUCTIONS))}")
        if rank_reduction is not None and rank_reduction not in _RANK_REDUCTIONS:
            raise ValueError(
                f"unknown rank_reduction {rank_reduction!r}; expected one of {', '.join(map(repr, _RANK_REDUCTIONS))}"
            )
        tensors = parse_params(params, "GradAccumulator", groups=True).tensors  # twice: scaled twice
        if not tensors:
            raise ValueError("GradAccumulator got an empty parameter list")

        distributed = dist.is_available() and dist.is_initialized()
        if process_group is None:
            if rank_reduction in ("mean", "sum"):
                raise ValueError(
                    f"rank_reduction={rank_reduction!r} says the gradients were reduced across ranks, so the "
                    "items must be counted across the same ranks: pass process_group (e.g. "
                    "torch.distributed.group.WORLD)"
                )
            if distributed and dist.get_world_size() > 1 and rank_reduction is None:
                raise ValueError(
                    f"torch.distributed runs {dist.get_world_size()} ranks but process_group is None. Under DDP pass "
                    "process_group=torch.distributed.group.WORLD (or DDP's group) and rank_reduction='mean'; "
                    "to accumulate this rank alone pass rank_reduction='none'"
                )
            world_size = 1
        else:
            if rank_reduction is None:
                raise ValueError(
                    "with a process_group, say how .grad was combined across its ranks before finalize_(): "
                    "rank_reduction='mean' (DDP's default average), 'sum', or 'none' (local gradients)"
                )
            if not distributed:
                raise ValueError("a process_group was given but torch.distributed is not initialized")
            world_size = dist.get_world_size(process_group)

        self.params: list[Tensor] = tensors
        self.reduction: Reduction = reduction
        self.process_group = process_group
        self.rank_reduction: RankReduction = rank_reduction or "none"
        self.world_size: int = world_size
        self.device: torch.device = tensors[0].device
        self._reset()

    # ---- the window ---------------------------------------------------------------------------

    def _reset(self) -> None:
        self._host_items = 0
        self._tensor_items: Tensor | None = None
        self._micro_batches = 0

    def reset(self) -> None:
        """Forgets the counts of the open window (``.grad`` is left alone)."""
        self._reset()

    @property
    def micro_batches(self) -> int:
        """The number of ``count()`` calls on this rank in the open window (a host integer)."""
        return self._micro_batches

    def count(self, n: int | Tensor | None = None) -> None:
        """Records one micro-batch and its number of items.

        Call it once per micro-batch, in every mode.

        Args:
            n: the micro-batch's items (tokens or examples): a non-negative Python integer, or a
                one-element integer tensor (e.g. ``mask.sum()``), which is added on the device
                without a sync (a tensor on another device is copied there first: a sync only if
                that copy goes to host memory). Required under ``"items"``; optional otherwise
                (then only recorded for :class:`WindowCounts`).

        Raises:
            TypeError: ``n`` missing under ``"items"``; a bool, a non-number, or a floating-point,
                complex or bool tensor (counts are integers: use ``mask.sum()`` of a bool mask).
            ValueError: a negative or non-whole number, or a tensor with more than one element.
                The sign of a tensor count is not checked (that would need a host sync).
        """
        if n is None:
            if self.reduction == "items":
                raise TypeError("count() needs the micro-batch's number of items under reduction='items'")
        elif isinstance(n, Tensor):
            if n.numel() != 1:
                raise ValueError(f"a count tensor must have one element, got shape {tuple(n.shape)}")
            if n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
                raise TypeError(
                    f"a count tensor must have an integer dtype, got {n.dtype}; count items with an integer "
                    "or bool mask's .sum(), or convert with .long() if the values are whole numbers"
                )
            value = _to_device(n.detach().reshape(()), self.device).to(torch.int64)
            if self._tensor_items is None:
                self._tensor_items = value.clone()
            else:
                self._tensor_items.add_(value)
        else:
            self._host_items += _host_count(n)
        self._micro_batches += 1

    def _local_counts(self) -> Tensor:
        """``[items, micro_batches]`` of this rank's open window, a new int64 tensor on the device."""
        counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        if self._tensor_items is not None:
            counts[0].add_(self._tensor_items)
        if self._host_items:
            counts[0].add_(self._host_items)
        if self._micro_batches:
            counts[1].add_(self._micro_batches)
        return counts

    @torch.no_grad()
    def finalize_(self) -> WindowCounts:
        """Scales the accumulated ``.grad`` into the window's gradient, in place, and opens a new
        window.

        With ``c = W`` for ``rank_reduction="mean"`` and ``c = 1`` otherwise, every gradient is
        multiplied by ``c / max(N, 1)`` (``"items"``), ``c / K`` (``"mean"``) or ``c`` (``"sum"``),
        where ``N`` and ``K`` are the window's items and micro-batches over all ranks, reduced
        with one ``all_reduce`` when the process group has more than one rank. Parameters
        without a gradient are skipped. Call it after ``scaler.unscale_(opt)`` and before
        clipping.

        Returns:
            The window's :class:`WindowCounts` (device tensors, over all ranks).

        Raises:
            RuntimeError: no ``count()`` since the last ``finalize_`` (a missing ``count()`` or a
                second ``finalize_`` of the same window).
        """
        if self._micro_batches == 0:
            raise RuntimeError(
                "finalize_() found no count() in this window: call count() once per micro-batch "
                "(count(n_items) under reduction='items'); finalize_() runs once per window"
            )
        counts = self._local_counts()
        if self.process_group is not None and self.world_size > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        self._reset()

        ranks = self.world_size if self.rank_reduction == "mean" else 1
        factor: Tensor | float
        if self.reduction == "sum":
            factor = float(ranks)
        else:
            wide = torch.float32 if self.device.type == "mps" else torch.float64
            denominator = counts[0 if self.reduction == "items" else 1].to(wide).clamp_min(1)
            factor = ranks / denominator
        if not (isinstance(factor, float) and factor == 1.0):
            self._scale_grads(factor)
        return WindowCounts(items=counts[0], micro_batches=counts[1])

    def _scale_grads(self, factor: Tensor | float) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        dense = [g for g in grads if g.layout == torch.strided]
        per_device: dict[torch.device, Tensor | float] = {}

        def on(device: torch.device) -> Tensor | float:
            if device not in per_device:
                per_device[device] = _to_device(factor, device) if isinstance(factor, Tensor) else factor
            return per_device[device]

        for (device, _), indices in group_by_device_dtype(dense).items():
            torch._foreach_mul_([dense[i] for i in indices], on(device))
        for g in grads:
            if g.layout != torch.strided:  # sparse gradients: values scaled in place
                g.mul_(on(g.device))

    # ---- the end of a window with GradScaler and clipping --------------------------------------

    def finish_window(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        clip: Callable[[Tensor], Any] | Any | None = None,
        *,
        zero_grad: bool = True,
    ) -> WindowEnd:
        """Ends the window in the documented order and steps the optimizer unless the scaler skips.

        The order::

            scaler.unscale_(optimizer)       # once per window, all micro-batches accumulated
            counts = self.finalize_()
            out = clip(commit)               # or clip.clip_(commit=commit)
            scaler.step(optimizer)           # skips optimizer.step() on inf/NaN
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        ``commit`` is a 0-d float32 tensor on the accumulator's device: 1 when the scaler found the
        gradients finite (the optimizer will step), 0 when it found inf/NaN (the step will be
        skipped), computed on the device from the flags that ``scaler.unscale_`` recorded. When it is
        0 the gradients are zeroed before the hook runs, so that the hook never sees inf/NaN. The
        gate reaches the hook explicitly, as its argument (a Clipper passes it to its transforms
        in their step context).

        The contract for an adaptive clipper: fold ``commit`` into every state update so that a 0
        leaves the state unchanged, e.g. ``ema = torch.where(commit > 0, new_ema, ema)`` or
        ``ema += commit * (1 - beta) * (x - ema)``; never branch on its value on the host. Without a
        scaler (or with a disabled one) ``commit`` is 1.

        No host sync is added: the only ones are the ``.item()`` inside ``GradScaler.step`` and,
        with a :class:`~steadygrad.Clipper` in ``nonfinite="skip"`` mode, its read of ``skipped``
        (it drops the gradients of a skipped window, so the optimizer step changes nothing).

        Args:
            optimizer: the optimizer that owns the accumulator's parameters.
            scaler: a ``torch.amp.GradScaler`` (or ``None``); its ``scale(loss).backward()`` was used
                for every micro-batch, and ``unscale_`` must not have been called yet.
            clip: ``None``; an object with ``clip_(commit=...)`` (a ``steadygrad.Clipper``); or a
                callable taking the commit tensor, e.g.
                ``lambda commit: sg.clip_grad_norm_(model.parameters(), 1.0)``.
            zero_grad: call ``optimizer.zero_grad(set_to_none=True)`` at the end.

        Returns:
            :class:`WindowEnd` with the counts, the commit tensor and what the hook returned.
        """
        scaling = scaler is not None and scaler.is_enabled()
        if scaling:
            scaler.unscale_(optimizer)
        counts = self.finalize_()
        if scaling:
            commit = (_found_inf(scaler, optimizer, self.device) == 0).to(torch.float32)
        else:
            commit = torch.ones((), dtype=torch.float32, device=self.device)

        out = None
        if clip is not None:
            if scaling:
                self._zero_grads_unless(commit)
            if hasattr(clip, "clip_"):
                out = clip.clip_(commit=commit)
            elif callable(clip):
                out = clip(commit)
            else:
                raise TypeError(f"clip must be callable or have a clip_() method, got {type(clip).__name__}")

        if scaling:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        return WindowEnd(counts=counts, commit=commit, clip=out)

    @torch.no_grad()
    def _zero_grads_unless(self, commit: Tensor) -> None:
        """Zeroes every gradient where ``commit`` is 0, on the device (``masked_fill_``, not a
        multiplication: ``0·inf`` is NaN)."""
        skip = commit == 0
        per_device: dict[torch.device, Tensor] = {}
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            if g.device not in per_device:
                per_device[g.device] = _to_device(skip, g.device)
            if g.layout == torch.strided:
                g.masked_fill_(per_device[g.device], 0)
            else:  # sparse: its stored values
                g._values().masked_fill_(per_device[g.device], 0)

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The open window's counts on this rank: ``{"reduction", "items" (0-d int64 tensor),
        "micro_batches" (int)}``. Empty (zeros) at a window boundary."""
        items = self._local_counts()[0].clone()
        return {"reduction": self.reduction, "items": items, "micro_batches": self._micro_batches}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the counts saved by :meth:`state_dict` (restore the saved ``.grad`` too).

        Raises:
            ValueError: missing keys, a different ``reduction``, or malformed counts.
        """
        missing = {"reduction", "items", "micro_batches"} - set(state_dict)
        if missing:
            raise ValueError(f"GradAccumulator state_dict lacks {sorted(missing)}")
        if state_dict["reduction"] != self.reduction:
            raise ValueError(
                f"the state was saved with reduction={state_dict['reduction']!r}, "
                f"this accumulator uses {self.reduction!r}"
            )
        items = state_dict["items"]
        if not isinstance(items, Tensor) or items.numel() != 1 or items.is_floating_point() or items.is_complex():
            raise ValueError("state_dict['items'] must be a one-element integer tensor")
        micro_batches = _host_count(state_dict["micro_batches"])
        self._reset()
        self._tensor_items = items.detach().reshape(()).to(device=self.device, dtype=torch.int64).clone()
        self._micro_batches = micro_batches

    def __repr__(self) -> str:
        group = (
            ""
            if self.process_group is None
            else f", world_size={self.world_size}, rank_reduction={self.rank_reduction!r}"
        )
        return f"GradAccumulator({len(self.params)} tensors, reduction={self.reduction!r}{group})"
