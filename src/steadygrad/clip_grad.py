"""Drop-ins for ``torch.nn.utils``' gradient clipping, with norms that do not overflow.

``get_total_norm``, ``clip_grad_norm_``, ``clip_grads_with_norm_`` and ``clip_grad_value_`` have
torch's (2.13) signatures and semantics, plus a keyword-only ``process_group``. The differences,
each deliberate:

* norms accumulate in float32 or wider whatever the gradient dtype, are returned in that dtype,
  and the clip coefficient is applied in it before the result is cast back: finite float16
  gradients whose norm exceeds 65504 are clipped to ``max_norm`` (torch's norm overflows to inf
  and its coefficient zeroes them);
* ``norm_type=inf`` works with zero-element gradients (torch raises);
* ``max_norm <= 0`` or NaN, ``clip_value <= 0`` or NaN, and a bad ``norm_type`` raise
  ``ValueError`` naming the argument (torch silently misbehaves or raises late);
* ``process_group=`` makes the norm global across ranks, and DTensor gradients (FSDP2) give the
  norm of the full gradients as a plain tensor (see :mod:`steadygrad.core.norms`).

The norms and the coefficient come from :mod:`steadygrad.core.norms`.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from typing import Any, TypeAlias

import torch
from torch import Tensor

from .core.dtensor import local_tensor
from .core.norms import check_threshold, clip_coefficient, scale_, total_norm, use_foreach
from .core.tensorlist import group_by_device_dtype

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]

TensorOrTensors: TypeAlias = Tensor | Iterable[Tensor]


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
) -> Tensor:
    """The norm of ``tensors`` viewed as one vector; ``torch.nn.utils.get_total_norm``.

    .. math::
        n = \\Big(\\sum_i \\|t_i\\|_p^p\\Big)^{1/p}, \\qquad n = \\max_i \\|t_i\\|_\\infty
        \\;\\text{ for } p = \\infty

    Differences from torch: the norm is accumulated and returned in float32 or wider (float64 if
    any tensor is float64, float32 otherwise; torch returns float16 for float16 tensors and
    overflows past 65504); zero-element tensors are fine with ``norm_type=inf``; a bad
    ``norm_type`` raises ``ValueError``; ``process_group`` reduces the norm over ranks.

    Args:
        tensors: a tensor or an iterable of tensors.
        norm_type: the order ``p``: a number ``> 0``, ``inf`` or ``"inf"``.
        error_if_nonfinite: raise ``RuntimeError`` if the norm is NaN or infinite. This reads the
            norm on the host (a device sync), as torch does.
        foreach: ``None`` uses the foreach kernels where the device has them, ``True`` insists
            (``RuntimeError`` on a device without them), ``False`` goes tensor by tensor.
        process_group: a ``torch.distributed`` process group whose ranks hold different tensors,
            or ``"world"`` (:data:`steadygrad.core.norms.WORLD`) for the default group: the norm
            is then over the tensors of all ranks, with one all-reduce. DTensors are reduced over
            their own mesh without it. See :func:`steadygrad.core.norms.total_norm`.

    Returns:
        The norm, a 0-d tensor on the device of the first tensor.

    Raises:
        ValueError: a bad ``norm_type``.
        RuntimeError: ``error_if_nonfinite`` and the norm is not finite.
    """
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm = total_norm(tensors, norm_type, process_group, foreach=foreach)
    if error_if_nonfinite and not bool(torch.isfinite(norm)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is {norm.item()}, so they cannot "
            "be clipped; pass error_if_nonfinite=False to scale them by the non-finite norm anyway"
        )
    return norm


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    """Scales the gradients by the clip coefficient of a given norm, in place;
    ``torch.nn.utils.clip_grads_with_norm_``.

    .. math::
        g \\leftarrow g \\cdot \\min\\left(1,\\; \\frac{\\text{max\\_norm}}{\\text{total\\_norm} + 10^{-6}}\\right)

    Every gradient is multiplied, also when the coefficient is 1 (no branch on the norm, so no
    device sync); parameters without ``.grad`` are skipped.

    Differences from torch: the coefficient is computed in float32 or wider and applied in the
    gradients' norm precision (float16/bfloat16 gradients are multiplied in float32, then cast
    back, instead of multiplying by a coefficient rounded to 16 bits); ``max_norm <= 0`` or NaN
    raises ``ValueError``; a DTensor ``total_norm`` is made whole first.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is scaled.
        max_norm: the largest norm allowed, ``> 0`` (``inf`` leaves the gradients as they are).
        total_norm: the norm of the gradients, e.g. from :func:`get_total_norm`.
        foreach: as in :func:`get_total_norm`.

    Raises:
        ValueError: ``max_norm`` is not a number ``> 0``.
    """
    max_norm = check_threshold(max_norm, "max_norm")
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(total_norm, dtype=torch.float64)
    elif type(total_norm) is not Tensor and hasattr(total_norm, "full_tensor"):
        total_norm = total_norm.full_tensor()  # torch's DTensor norm
    coef = clip_coefficient(total_norm, max_norm)
    scale_(grads, coef, foreach=foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
) -> Tensor:
    """Clips the gradients' total norm to ``max_norm``, in place; ``torch.nn.utils.clip_grad_norm_``.

    .. math::
        n = \\Big(\\sum_i \\|g_i\\|_p^p\\Big)^{1/p}, \\qquad
        g_i \\leftarrow g_i \\cdot \\min\\left(1,\\; \\frac{\\text{max\\_norm}}{n + 10^{-6}}\\right)

    (``n = max |g|`` for ``p = inf``). One coefficient scales all gradients, so their directions
    are kept; every gradient is multiplied, also when the coefficient is 1. Equals
    :func:`get_total_norm` of the gradients followed by :func:`clip_grads_with_norm_`.

    Differences from torch:

    * the norm is accumulated and returned in float32 or wider (float64 if a gradient is
      float64), and the coefficient is applied in that precision then cast back: finite
      float16 gradients with a norm above 65504 are clipped to ``max_norm``, where torch's norm
      is inf and its coefficient turns them into zeros (or NaNs);
    * ``norm_type=inf`` works with zero-element gradients;
    * ``max_norm <= 0`` or NaN and a bad ``norm_type`` raise ``ValueError``;
    * ``process_group`` makes the norm global across ranks (one all-reduce); DTensor gradients
      (FSDP2) are reduced over their mesh and the returned norm is a plain tensor holding the
      norm of the full gradients.

    Args:
        parameters: a tensor or an iterable of tensors; those without ``.grad`` are ignored.
        max_norm: the largest total norm allowed, ``> 0``.
        norm_type: the order ``p``: a number ``> 0``, ``inf`` or ``"inf"``.
        error_if_nonfinite: raise ``RuntimeError`` (before clipping) if the norm is NaN or
            infinite; reads the norm on the host.
        foreach: as in :func:`get_total_norm`.
        process_group: as in :func:`get_total_norm`. Every rank of the group must call this.

    Returns:
        The total norm of the gradients before clipping, a 0-d tensor.

    Raises:
        ValueError: a bad ``max_norm`` or ``norm_type``.
        RuntimeError: ``error_if_nonfinite`` and the norm is not finite.
    """
    max_norm = check_threshold(max_norm, "max_norm")
    if isinstance(parameters, Tensor):
        params = [parameters]
    else:
        from_generator = isinstance(parameters, types.GeneratorType)
        params = list(parameters)
        if from_generator and not params:
            warnings.warn("parameters is an empty generator: nothing is clipped", stacklevel=3)
    grads = [p.grad for p in params if p.grad is not None]
    norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach, process_group=process_group)
    clip_grads_with_norm_(params, max_norm, norm, foreach)
    return norm


@torch.no_grad()
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    """Clamps every gradient element to ``[-clip_value, clip_value]``, in place;
    ``torch.nn.utils.clip_grad_value_``.

    .. math::
        g \\leftarrow \\min(\\max(g, -c), c)

    NaN elements stay NaN. Parameters without ``.grad`` are skipped; DTensor gradients are
    clamped shard by shard (``Partial`` placements raise ``ValueError``).

    Difference from torch: ``clip_value <= 0`` or NaN raises ``ValueError`` (torch clamps to a
    reversed or empty range).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clamped.
        clip_value: the largest magnitude allowed, ``> 0``.
        foreach: as in :func:`get_total_norm`.

    Raises:
        ValueError: ``clip_value`` is not a number ``> 0``.
    """
    clip_value = check_threshold(clip_value, "clip_value")
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = []
    for p in params:
        if p.grad is None:
            continue
        placements = getattr(p.grad, "placements", ())
        if any(pl.is_partial() for pl in placements):
            raise ValueError("clip_grad_value_: gradients with a Partial placement cannot be clamped shard by shard")
        grads.append(local_tensor(p.grad))
    for (device, _), indices in group_by_device_dtype(grads).items():
        group = [grads[i] for i in indices]
        if use_foreach(group, device, foreach):
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
