"""Norms of lists of tensors, and their all-reduce across ranks: the one place for norms.

Every norm in steadygrad comes from here, so that all of them follow the same rules:

* **Wide accumulation.** A norm is computed in float32 or wider whatever the tensor's dtype:
  float64 (and complex128) tensors in float64, everything else (float32, float16, bfloat16,
  complex64) in float32. A finite float16 gradient whose norm exceeds 65504 has a finite norm.
* **No overflow.** A norm is ``inf`` only if it exceeds its dtype's range (or an element is
  inf), never because a square does: a float32 tensor of values 3e19 has norm 3e19·√n, not
  inf (torch's kernels overflow there). On the CPU in eager mode the float32 pass runs as
  usual and a tensor whose norm comes out ``inf`` is normed again scaled by its largest
  magnitude, :math:`m \\, \\|x / m\\|_p`, a second pass paid only then. Elsewhere (accelerators,
  ``torch.compile``, tensor subclasses) the sum is accumulated in float64 (``mps``, which has
  no float64, keeps float32); norms are then combined across tensors scaled by the largest.
  Across ranks partials are float64 sums of :math:`n^p`, which overflow only beyond float64's
  range (e.g. a float32 norm of 3e38 at ``p > 8``). AGC's row norms (:func:`reduced_norms`) stay
  float32 on accelerators in eager mode.
* **p-norms.** ``norm_type`` is a real ``p > 0`` or ``inf`` (see :func:`check_norm_type`):
  :math:`\\|x\\|_p = (\\sum_i |x_i|^p)^{1/p}` and :math:`\\|x\\|_\\infty = \\max_i |x_i|`, over the
  complex values themselves for complex tensors (as ``torch.linalg.vector_norm``). The norm of a
  zero-element tensor is 0, for ``p = inf`` too (torch raises there).
* **No host sync.** Nothing here reads an accelerator tensor's value on the host or branches on
  it; the results stay on the device (:func:`total_norm` and :func:`clip_coefficient` run under
  ``torch.compile(fullgraph=True)``). The one exception, :func:`_overflowed`, reads a 0-d
  *CPU* result in eager mode (no device to wait for; about 2 µs) to decide whether the
  overflow pass is needed.
* **One all-reduce.** :func:`total_norm` with ``process_group`` reduces the local partial
  :math:`\\sum |x|^p` (``max |x|`` for ``inf``) with a single all-reduce, in float64.
* **DTensor.** A DTensor (FSDP2, tensor parallel) contributes its local shard, reduced over the
  dimensions of its device mesh along which it is sharded, so the result is the norm of the full
  tensor and replicas are counted once. ``Shard`` (and ``_StridedShard``) and ``Replicate``
  placements are supported; ``Partial`` raises ``ValueError`` (the local values are not elements
  of the tensor: redistribute first).

Norms are statistics, not part of the model: the functions run under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any, Final

import torch
import torch.distributed as dist
from torch import Tensor

from .dtensor import ShardSpec, local_tensor, split_shards
from .tensorlist import PLAIN_TYPES, any_empty, devices, dtypes, group_by_device_dtype, host_readable, types
from .validate import check_range

__all__ = [
    "CLIP_EPS",
    "WORLD",
    "check_norm_type",
    "check_threshold",
    "portable_group",
    "reduced_norms",
    "scaled",
    "clip_coefficient",
    "norm_dtype",
    "all_reduce_shards_",
    "scale_",
    "shard_sum",
    "tensor_norms",
    "total_norm",
    "use_foreach",
    "wide_dtype",
]

#: Added to the norm in the clip coefficient ``max_norm / (norm + CLIP_EPS)`` (torch's value).
CLIP_EPS: Final = 1e-6

#: ``process_group=WORLD`` (the string ``"world"``) reduces over the default process group,
#: resolved when the norm is computed (``torch.distributed`` must be initialised by then).
WORLD: Final = "world"

# Device types with foreach kernels (torch's list, plus the CPU, which runs them as a loop).
try:
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    _FOREACH_DEVICES: frozenset[str] = frozenset(["cpu", *_get_foreach_kernels_supported_devices()])
except ImportError:  # pragma: no cover - older or trimmed torch builds
    _FOREACH_DEVICES = frozenset(["cpu", "cuda", "xpu", torch._C._get_privateuse1_backend_name()])

_DOUBLE = (torch.float64, torch.complex128)


def check_norm_type(norm_type: Any) -> float:
    """Validates a norm order and returns it as a float.

    Accepted: a real number ``p > 0`` (``int``, ``float``, a NumPy scalar), ``inf``, and a string
    that ``float()`` reads as such (``"inf"``, ``"2"``), as torch's ``clip_grad_norm_`` does.
    Rejected with ``ValueError``: ``p <= 0`` (torch's ``p = 0`` counts non-zeros, which is no
    norm to clip by), ``-inf``, NaN, booleans, and other strings, ``"fro"`` and ``"nuc"``
    included (matrix norms; torch's ``clip_grad_norm_`` rejects them too).

    Raises:
        ValueError: ``norm_type`` is not one of the accepted values.
    """
    value: float | None = None
    if isinstance(norm_type, numbers.Real) and not isinstance(norm_type, bool):
        value = float(norm_type)
    elif isinstance(norm_type, str):
        try:
            value = float(norm_type)
        except ValueError:
            value = None
    if value is None or math.isnan(value) or value <= 0:
        raise ValueError(f"norm_type must be a number > 0 or inf (or the string 'inf'), got {norm_type!r}")
    return value


def check_threshold(value: Any, name: str) -> float:
    """Validates a clipping threshold (``max_norm``, ``clip_value``) and returns it as a float:
    a number ``> 0`` (``inf`` allowed: nothing is clipped) or a 1-element tensor holding one (read
    on the host, a device sync for accelerator tensors, as torch's ``float()``). The one range
    checker, :func:`steadygrad.core.validate.check_range`, decides.

    Raises:
        ValueError: ``value`` is ``<= 0`` or NaN; the message names ``name``.
        TypeError: ``value`` is not a number or a 1-element tensor.
    """
    return float(check_range(name, value, low_open=True, finite=False))


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype in which a tensor of ``dtype`` is normed: float64 for float64 and
    complex128, float32 for everything else (float32, float16, bfloat16, complex64, ...)."""
    return torch.float64 if dtype in _DOUBLE else torch.float32


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is widened to before norming or scaling: at least float32 precision,
    complex tensors staying complex (their norm is over the complex values)."""
    if dtype in _DOUBLE:
        return dtype
    return torch.complex64 if dtype.is_complex else torch.float32


def clip_coefficient(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """The factor that scales gradients of norm ``total_norm`` to at most ``max_norm``.

    .. math::
        c = \\min\\left(1,\\; \\frac{\\text{max\\_norm}}{\\text{total\\_norm} + 10^{-6}}\\right)

    as torch's ``clip_grad_norm_``: ``c = 1`` exactly when the norm is small enough, NaN when
    the norm is NaN, 0 when it is inf. Computed on ``total_norm``'s device in float32 or wider
    (an fp16 ``total_norm`` is widened first), without reading anything on the host.

    Args:
        total_norm: the norm, a 0-d tensor.
        max_norm: the largest norm allowed, a number or a 0-d tensor (not validated here).
    """
    norm = total_norm.to(norm_dtype(total_norm.dtype))
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


@torch.no_grad()
def tensor_norms(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
    shards: Sequence[ShardSpec | None] | None = None,
) -> list[Tensor]:
    """The p-norm of each tensor, as a 0-d tensor on that tensor's device.

    .. math::
        n_i = \\Big(\\sum_j |x_{ij}|^p\\Big)^{1/p}, \\qquad
        n_i = \\max_j |x_{ij}| \\;\\text{ for } p = \\infty

    The dtype of ``n_i`` is :func:`norm_dtype` of the tensor's dtype (float32 or float64); a
    zero-element tensor has norm 0. Tensors are normed with one ``torch._foreach_norm`` per
    (device, dtype) group. For a DTensor the norm is that of the full tensor: the local shards'
    partial sums are all-reduced over the mesh dimensions it is sharded on (one all-reduce per
    such mesh dimension for all DTensors together), so every rank must call this with the
    same DTensors.

    Args:
        tensors: the tensors (any dtype that torch can norm, any devices).
        norm_type: ``p``, see :func:`check_norm_type`.
        foreach: ``None`` uses the foreach kernels where the device has them; ``True`` insists
            (``RuntimeError`` on other devices); ``False`` norms one tensor at a time.
        shards: ``tensors`` are local shards laid out as these specs say
            (:func:`steadygrad.core.dtensor.split_shards`): the norms are of the whole tensors.

    Raises:
        ValueError: a bad ``norm_type``, or a DTensor with a ``Partial`` placement.
    """
    p = check_norm_type(norm_type)
    locals_, specs = _locals(tensors, shards)
    checked = _checked_on_host(locals_, p)
    norms = _local_norms(locals_, p, foreach, wide=not checked)
    if checked and _overflowed(norms):
        norms = _rescaled(locals_, norms, p)
    sharded = [i for i, spec in enumerate(specs) if spec is not None and spec[1]]
    if sharded:
        partials = [_partial(norms[i].to(torch.float64), p) for i in sharded]
        reduced = _reduce_over_meshes(partials, [specs[i] for i in sharded], p)
        for i, r in zip(sharded, reduced):
            norms[i] = _finish(r, p)
    return norms if checked and not sharded else _as_norm_dtypes(locals_, norms)


@torch.no_grad()
def reduced_norms(tensors: Sequence[Tensor], dims: Sequence[tuple[int, ...] | None]) -> list[Tensor]:
    """The L2 norm of each tensor over some of its dimensions, kept as size-1 dimensions.

    ``dims[i]`` lists the dimensions to reduce of ``tensors[i]`` (``None``: all of them, the
    result of shape ``(1,) * ndim``). Accumulated and returned in :func:`norm_dtype`, without
    overflow on the CPU in eager mode (float32 pass, a scaled second pass for the tensors that
    overflowed) and under ``torch.compile`` (float64 accumulation). On accelerators in eager
    mode the sums are float32 (a float64 accumulation would copy every tensor first): a row
    whose squares exceed float32's range (values beyond ~1.8e19) has norm inf. Local tensors only
    (no DTensor reduction): the caller all-reduces what is split across ranks.
    """
    tensors = list(tensors)
    checked = _checked_on_host(tensors, 2.0)
    out = []
    for t, d in zip(tensors, dims):
        # (inductor fuses a float64 cast into the reduction; eager kernels would copy the tensor
        # to float64 first, so eager accelerators keep float32 here)
        wide = torch.compiler.is_compiling() or (not checked and t.device.type == "cpu")
        n = _vector_norm(t, 2.0, d, _accumulation(t.dtype, t.device, wide))
        out.append(n if n.dtype == norm_dtype(t.dtype) else n.to(norm_dtype(t.dtype)))
    if checked and out and _overflowed(torch._foreach_norm(out, 1.0)):  # norms >= 0: sum = L1
        for i, (t, d, n) in enumerate(zip(tensors, dims, out)):
            if bool(n.isinf().any()):
                out[i] = _max_scaled(t, n, 2.0, d)
    return out


@torch.no_grad()
def total_norm(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    process_group: Any = None,
    *,
    foreach: bool | None = None,
    shards: Sequence[ShardSpec | None] | None = None,
) -> Tensor:
    """The p-norm of all tensors together, as if they were concatenated into one vector.

    .. math::
        \\|g\\|_p = \\Big(\\sum_{\\text{ranks}} \\sum_i \\sum_j |g_{ij}|^p\\Big)^{1/p}, \\qquad
        \\|g\\|_\\infty = \\max_{\\text{ranks}, i, j} |g_{ij}|

    The result is a 0-d tensor on the device of the first tensor, in float64 if any tensor is
    float64 or complex128 and in float32 otherwise (never float16/bfloat16). An empty list gives
    0 (as torch: ``tensor(0.)`` on the CPU when there is no process group). Nothing is read on
    the host.

    Distributed use:
        * ``process_group`` (a ``torch.distributed`` process group, or :data:`WORLD` for the
          default group): the ranks of the group hold *different* tensors (parameter shards,
          pipeline stages) and the result is the norm over all of them, the same on every rank.
          The local partial (:math:`\\sum |g|^p`, or :math:`\\max |g|` for inf) is reduced with
          exactly one all-reduce (SUM, or MAX for inf) in float64. Every rank of the group must
          call this, also a rank with no tensors (it contributes 0).
        * DTensors (FSDP2, tensor parallel) need no ``process_group``: each contributes the
          partial of its local shard, reduced over the mesh dimensions it is sharded on
          (``Shard``/``_StridedShard``); ``Replicate`` dimensions are not reduced, so replicas
          count once. That is one all-reduce per sharded mesh dimension (FSDP2: one), for all
          DTensors together. ``process_group`` then reduces further over ranks holding other
          DTensors (pipeline stages). A plain tensor next to DTensors counts once per rank of
          ``process_group`` (i.e. it is taken to be replicated over the DTensors' mesh). The
          result is a plain tensor holding the full norm (not a DTensor).

    Args:
        tensors: the tensors, e.g. the gradients.
        norm_type: ``p``, see :func:`check_norm_type`.
        process_group: ``None`` (this rank's tensors only, plus the DTensor reduction), a
            process group, or :data:`WORLD`.
        foreach: as in :func:`tensor_norms`.
        shards: as in :func:`tensor_norms`.

    Raises:
        ValueError: a bad ``norm_type`` or ``process_group`` string, a DTensor with a
            ``Partial`` placement, or a ``process_group`` that shares ranks with a mesh
            dimension a DTensor is sharded on (its norm is already global there: reducing
            again would count it once per rank).
        TypeError: ``process_group`` is not a process group.
        RuntimeError: ``process_group`` is given but torch.distributed is not available or not
            initialised.
    """
    p = check_norm_type(norm_type)
    group = _resolve_group(process_group)
    tensors = list(tensors)
    if not tensors:
        dtype = norm_dtype(torch.get_default_dtype())
        if group is None:
            return torch.zeros((), dtype=dtype)
        partial = torch.zeros((), dtype=torch.float64, device=_group_device(group))
        _all_reduce(partial, p, group)
        return _finish(partial, p).to(dtype)

    locals_, specs = _locals(tensors, shards)
    if group is not None:
        _check_no_overlap(group, specs)
    dtype = norm_dtype(locals_[0].dtype)
    for other in dtypes(locals_):
        dtype = torch.promote_types(dtype, norm_dtype(other))
    checked = _checked_on_host(locals_, p)
    norms = _local_norms(locals_, p, foreach, wide=not checked)
    distributed = group is not None or any(s and s[1] for s in specs)
    if checked and distributed and _overflowed(norms):
        # Decided from this rank's values before any collective: every rank then all-reduces
        # once (float64 partials, which do not overflow for p <= 8).
        norms = _rescaled(locals_, norms, p)
    total = _combine(norms, specs, p, group, tensors[0].device, wide=False)
    if checked and not distributed and _overflowed([total]):  # no collective in _combine here
        total = _combine(_rescaled(locals_, norms, p), specs, p, group, tensors[0].device, wide=True)
    return total.to(dtype)


def _combine(norms: list[Tensor], specs: list, p: float, group: Any, device: torch.device, *, wide: bool) -> Tensor:
    """The norm of all tensors from their norms: the partial (sum of n^p, or max) of the tensors
    this rank holds whole (plain tensors, fully replicated DTensors), plus one partial per (mesh,
    sharded mesh dims) all-reduced over those dims, then all-reduced over ``group``. Partials are
    float64 whenever anything is reduced across ranks, and with ``wide`` (mps keeps float32)."""
    distributed = group is not None or any(s and s[1] for s in specs)
    if not distributed and devices(norms) == {device}:
        dtype = norms[0].dtype
        for other in dtypes(norms):
            dtype = torch.promote_types(dtype, other)
        whole = norms if dtypes(norms) == {dtype} else [n.to(dtype) for n in norms]
        if wide and _squares(p):  # sum of (n_i / max n)^p: no overflow at any p, in any dtype
            x = torch.stack(whole)
            m = _safe_scale(x.amax())
            return m * _finish(_partial_of_norms([x / m], p), p)
        return _finish(_partial_of_norms(whole, p), p)
    dtype = torch.float64 if distributed or (wide and device.type != "mps") else norms[0].dtype
    whole = [norms[i].to(device=device, dtype=dtype) for i, s in enumerate(specs) if not (s and s[1])]
    sharded: dict[tuple[Any, tuple[int, ...]], list[Tensor]] = {}
    for i, spec in enumerate(specs):
        if spec is not None and spec[1]:
            sharded.setdefault(spec[:2], []).append(norms[i].to(device=device, dtype=dtype))
    pieces = [_partial_of_norms(whole, p)] if whole else []
    if sharded:
        keys = list(sharded)
        reduced = _reduce_over_meshes([_partial_of_norms(sharded[k], p) for k in keys], keys, p)
        pieces += [r.to(device) for r in reduced]
    if len(pieces) == 1:
        partial = pieces[0]
    else:
        stacked = torch.stack(pieces)
        partial = stacked.amax() if math.isinf(p) else stacked.sum()
    if group is not None:
        _all_reduce(partial, p, group)
    return _finish(partial, p)


@torch.no_grad()
def shard_sum(values: Sequence[Tensor | int], shards: Sequence[ShardSpec | None] | None) -> Tensor:
    """``Σ values`` (0-d tensors or numbers, one per tensor), where the value of a tensor sharded
    over ranks (its :data:`~steadygrad.core.dtensor.ShardSpec` lists mesh dimensions) is first
    summed over those ranks: the total of a per-element count over whole tensors (elements
    clipped, elements non-finite). A float64 0-d tensor on the first tensor value's device (the
    CPU for numbers only); one all-reduce per sharded mesh dimension."""
    specs = list(shards) if shards is not None else [None] * len(values)
    device = next((v.device for v in values if isinstance(v, Tensor)), torch.device("cpu"))
    as_tensors = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]
    whole = [v for v, s in zip(as_tensors, specs) if not (s and s[1])]
    sharded: dict[tuple[Any, tuple[int, ...]], list[Tensor]] = {}
    for v, s in zip(as_tensors, specs):
        if s and s[1]:
            sharded.setdefault(s[:2], []).append(v)
    total = torch.stack(whole).sum() if whole else torch.zeros((), dtype=torch.float64, device=device)
    if sharded:
        keys = list(sharded)
        for r in _reduce_over_meshes([torch.stack(sharded[k]).sum() for k in keys], keys, 1.0):
            total = total + r.to(device)
    return total


@torch.no_grad()
def all_reduce_shards_(tensors: Sequence[Tensor], shards: Sequence[ShardSpec | None]) -> None:
    """Sums each tensor of a sharded DTensor's partial results (any shape, e.g. squared norms of
    units split across ranks) over the ranks of its mesh dimensions, in place; tensors with spec
    ``None`` (or not sharded) are left as they are. One all-reduce per (mesh, dimension), the
    tensors flattened into one float64 buffer."""
    chosen = [(t, s) for t, s in zip(tensors, shards) if s and s[1]]
    if not chosen:
        return
    meshes: dict[Any, list[tuple[Tensor, Any]]] = {}
    for t, s in chosen:
        meshes.setdefault(s[0], []).append((t, s))
    for mesh, items in meshes.items():
        for k in range(mesh.ndim):
            group = [t for t, s in items if k in s[1]]
            if not group:
                continue
            buffer = torch.cat([t.reshape(-1).to(torch.float64) for t in group])
            dist.all_reduce(buffer, group=mesh.get_group(k))
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(buffer[offset : offset + n].view_as(t))
                offset += n


@torch.no_grad()
def scale_(tensors: Sequence[Tensor], factor: Tensor, *, foreach: bool | None = None) -> None:
    """``t ← t · factor`` in place for every tensor, computed in float32 or wider.

    Float32/float64/complex tensors are multiplied directly (by ``factor`` cast to their
    :func:`norm_dtype`); float16/bfloat16 tensors are widened to float32, multiplied and cast
    back, in chunks of about 2**24 elements of scratch, so that the factor is not rounded to
    16 bits first. A DTensor is scaled through its local shard. One foreach launch per step and
    (device, dtype) group; nothing is read on the host.

    Args:
        tensors: the tensors to scale (e.g. gradients), modified in place.
        factor: a 0-d tensor, e.g. :func:`clip_coefficient`.
        foreach: as in :func:`tensor_norms`.
    """
    tensors = [local_tensor(t) for t in tensors]
    for (device, dtype), indices in group_by_device_dtype(tensors).items():
        group = [tensors[i] for i in indices]
        wide = wide_dtype(dtype)
        f = factor.to(device=device, dtype=norm_dtype(dtype))
        fused = use_foreach(group, device, foreach)
        if wide == dtype:
            if fused:
                torch._foreach_mul_(group, f)
            else:
                for t in group:
                    t.mul_(f)
        elif fused:
            for chunk in _chunks(group, _WIDEN_CHUNK):
                scratch = [torch.empty_like(t, dtype=wide) for t in chunk]
                torch._foreach_copy_(scratch, chunk)
                torch._foreach_mul_(scratch, f)
                torch._foreach_copy_(chunk, scratch)
        else:
            for t in group:
                t.copy_(t.to(wide).mul_(f))


@torch.no_grad()
def scaled(tensors: Sequence[Tensor], factor: Tensor) -> list[Tensor]:
    """New tensors ``t · factor``, computed as :func:`scale_` computes them (one pass instead of
    a copy and an in-place scaling)."""
    tensors = list(tensors)
    if types(tensors) <= PLAIN_TYPES and all(d == wide_dtype(d) for d in dtypes(tensors)):
        out: list[Tensor | None] = [None] * len(tensors)
        for (device, dtype), indices in group_by_device_dtype(tensors).items():
            f = factor.to(device=device, dtype=norm_dtype(dtype))
            for i, t in zip(indices, torch._foreach_mul([tensors[i] for i in indices], f)):
                out[i] = t
        return out  # type: ignore[return-value]
    copies = [t.clone() for t in tensors]
    scale_(copies, factor)
    return copies


# --- helpers ---------------------------------------------------------------------------------


def _locals(tensors: Sequence[Tensor], shards: Sequence[ShardSpec | None] | None) -> tuple[list[Tensor], list]:
    """The local tensors and one spec per tensor (``None`` for a tensor held whole)."""
    if shards is not None:
        return list(tensors), list(shards)
    locals_, specs = split_shards(tensors)
    return locals_, specs if specs is not None else [None] * len(locals_)


def _check_no_overlap(group: Any, specs: Sequence[ShardSpec | None]) -> None:
    """``process_group`` must not reduce again over ranks that hold shards of one DTensor."""
    mine = set(dist.get_process_group_ranks(group))
    rank = dist.get_rank()
    for spec in specs:
        if spec is None:
            continue
        mesh, dims = spec[:2]
        for k in dims:
            if (set(dist.get_process_group_ranks(mesh.get_group(k))) & mine) - {rank}:
                raise ValueError(
                    "process_group shares ranks with a mesh dimension the DTensor gradients are sharded on "
                    "(FSDP2): the norm of a DTensor is already global there, and reducing again would count it "
                    "once per rank. Drop process_group (or pass only a group across ranks holding other "
                    "tensors, such as pipeline stages)"
                )


def use_foreach(tensors: Sequence[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Whether to run ``torch._foreach_*`` kernels on ``tensors`` (all on ``device``), following
    torch.nn.utils' ``foreach`` argument: ``None`` where the device has foreach kernels and the
    tensors are plain tensors or parameters, ``True`` always (``RuntimeError`` on a device
    without them), ``False`` never."""
    if foreach is False:
        return False
    supported = device.type in _FOREACH_DEVICES
    if foreach:
        if not supported:
            raise RuntimeError(f"foreach=True, but there are no foreach kernels for {device.type} tensors")
        return True
    return supported and types(tensors) <= PLAIN_TYPES


def _local_norms(tensors: list[Tensor], p: float, foreach: bool | None, *, wide: bool = False) -> list[Tensor]:
    """Each tensor's norm in its :func:`norm_dtype`, or accumulated in float64 with ``wide`` where
    the squares could overflow (returned as float64; ``mps`` stays in float32)."""
    out: list[Tensor | None] = [None] * len(tensors)
    for (device, dtype), indices in group_by_device_dtype(tensors).items():
        cast = _accumulation(dtype, device, wide and _squares(p))
        real = norm_dtype(dtype)
        if any_empty([tensors[i] for i in indices]):
            full = []
            for i in indices:
                if tensors[i].numel() == 0:  # torch has no identity for max over nothing
                    out[i] = torch.zeros((), dtype=real, device=device)
                else:
                    full.append(i)
        else:
            full = indices
        if not full:
            continue
        group = [tensors[i] for i in full]
        # (compiled, one norm per tensor: inductor fuses the cast into the reduction, but runs
        # _foreach_norm with a dtype as torch's kernel, which first copies every tensor to float64)
        if use_foreach(group, device, foreach) and not (cast is not None and torch.compiler.is_compiling()):
            norms = torch._foreach_norm(group, p, dtype=cast)
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=cast) for t in group]
        for i, n in zip(full, norms):
            out[i] = n
    return out  # type: ignore[return-value]


def _checked_on_host(tensors: Sequence[Tensor], p: float) -> bool:
    """Whether overflow of these tensors' p-norms is checked on the host afterwards
    (:func:`_overflowed`): plain CPU tensors outside ``torch.compile``, whose values are read at
    no device sync. Otherwise their norms are accumulated wide (:func:`_local_norms`)."""
    return _squares(p) and host_readable(tensors)


def _squares(p: float) -> bool:
    """Whether the partial sum of a p-norm can overflow before the norm does (not p = 1, inf)."""
    return p != 1.0 and not math.isinf(p)


def _overflowed(results: list[Tensor]) -> bool:
    """Whether a CPU norm came out inf or NaN (or their sum overflows), so that the overflow pass
    (:func:`_rescaled`) may be needed. Reads the results on the host: for
    :func:`_checked_on_host` tensors only, no device sync."""
    if not results:
        return False
    value = results[0] if len(results) == 1 else torch.stack(results).sum()
    return not math.isfinite(value.item())


def _rescaled(tensors: list[Tensor], norms: list[Tensor], p: float) -> list[Tensor]:
    """``norms`` with each ``inf`` norm of a finite tensor computed again without overflow:
    :math:`m \\, \\|x / m\\|_p` with :math:`m = \\max |x|` (CPU, eager: see :func:`_overflowed`)."""
    return [_max_scaled(t, n, p) if bool(n.isinf()) else n for t, n in zip(tensors, norms)]


def _accumulation(dtype: torch.dtype, device: torch.device, wide: bool) -> torch.dtype | None:
    """The ``dtype=`` a norm of a ``dtype`` tensor is accumulated in: float64 (complex128) with
    ``wide`` (not on ``mps``, which has none), else :func:`wide_dtype`; ``None`` for the
    tensor's own."""
    if wide and dtype not in _DOUBLE and device.type != "mps":
        return torch.complex128 if dtype.is_complex else torch.float64
    compute = wide_dtype(dtype)
    return None if compute == dtype else compute


def _vector_norm(t: Tensor, p: float, dim: tuple[int, ...] | None, cast: torch.dtype | None = None) -> Tensor:
    """``t``'s p-norm over ``dim`` kept as size-1 dimensions (``None``: all of them)."""
    if dim is None:
        return torch.linalg.vector_norm(t, p, dtype=cast).reshape((1,) * t.dim())
    return torch.linalg.vector_norm(t, p, dim=dim, keepdim=True, dtype=cast)


def _safe_scale(m: Tensor) -> Tensor:
    """``m`` where it is a positive finite number to divide by, else 1."""
    return torch.where((m > 0) & m.isfinite(), m, torch.ones_like(m))


def _max_scaled(t: Tensor, n: Tensor, p: float, dim: tuple[int, ...] | None = None) -> Tensor:
    """``n``, the p-norm of ``t`` over ``dim`` (all of it for ``None``, any shape of its values),
    computed again without overflow: :math:`m \\, \\|t / m\\|_p` with :math:`m = \\max |t|`
    over the same elements; where ``m`` is not finite (inf/NaN elements) ``n`` stays."""
    x = t.to(wide_dtype(t.dtype))
    m = (x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)).reshape(n.shape)
    safe = _safe_scale(m)
    scaled = safe * _vector_norm(x / safe, p, dim).reshape(n.shape)
    return torch.where(m.isfinite(), scaled, n).to(n.dtype)


def _as_norm_dtypes(tensors: list[Tensor], norms: list[Tensor]) -> list[Tensor]:
    """Each norm in its tensor's :func:`norm_dtype` (wide accumulation returns float64)."""
    return [n if n.dtype == norm_dtype(t.dtype) else n.to(norm_dtype(t.dtype)) for t, n in zip(tensors, norms)]


# Scratch budget (elements) of :func:`scale_` for widening float16/bfloat16 tensors.
_WIDEN_CHUNK = 1 << 24


def _chunks(tensors: list[Tensor], budget: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of ``tensors`` of about ``budget`` elements (a larger tensor alone)."""
    chunk: list[Tensor] = []
    size = 0
    for t in tensors:
        if chunk and size + t.numel() > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += t.numel()
    if chunk:
        yield chunk


def _partial(norm: Tensor, p: float) -> Tensor:
    """The additive (max for inf) piece of a norm: ``n^p``, or ``n`` for p = 1 and inf."""
    if p == 1.0 or math.isinf(p):
        return norm
    if p == 2.0:
        return norm * norm
    return norm.pow(p)


def _finish(partial: Tensor, p: float) -> Tensor:
    """The norm from a combined partial: ``s^(1/p)``."""
    if p == 1.0 or math.isinf(p):
        return partial
    if p == 2.0:
        return partial.sqrt()
    return partial.pow(1.0 / p)


def _partial_of_norms(norms: list[Tensor], p: float) -> Tensor:
    """``sum_i n_i^p`` (``max_i n_i`` for inf) of 0-d norms on one device and dtype, vectorized."""
    x = torch.stack(norms) if len(norms) > 1 else norms[0]
    return x.amax() if math.isinf(p) else _partial(x, p).sum()


def _op(p: float) -> Any:
    return dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM


def _all_reduce(t: Tensor, p: float, group: Any) -> None:
    dist.all_reduce(t, op=_op(p), group=group)


def _reduce_over_meshes(partials: list[Tensor], specs: list[tuple[Any, ...]], p: float) -> list[Tensor]:
    """All-reduces each partial over the mesh dimensions its DTensor is sharded on, in float64.

    Mesh dimension by mesh dimension: the partials sharded on dimension k go into one vector and
    are reduced over that dimension's group, so a partial sharded on dims {0, 1} ends up summed
    over the whole 2-D grid, while one replicated on dim 1 is not summed over it. One all-reduce
    per (mesh, sharded dimension); the order is that of first appearance, the same on every rank.
    """
    out = [t.to(torch.float64) for t in partials]
    meshes: dict[Any, list[int]] = {}
    for i, (mesh, *_) in enumerate(specs):
        meshes.setdefault(mesh, []).append(i)
    for mesh, indices in meshes.items():
        for k in range(mesh.ndim):
            chosen = [i for i in indices if k in specs[i][1]]
            if not chosen:
                continue
            buffer = torch.stack([out[i] for i in chosen])
            _all_reduce(buffer, p, mesh.get_group(k))
            for j, i in enumerate(chosen):
                out[i] = buffer[j]
    return out


def _resolve_group(process_group: Any) -> Any:
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != WORLD:
            raise ValueError(f"process_group must be a process group, None or {WORLD!r}, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"process_group={WORLD!r} needs torch.distributed to be initialised")
        return dist.group.WORLD
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup, None or {WORLD!r}, "
            f"got {type(process_group).__name__}"
        )
    return process_group


def _group_device(group: Any) -> torch.device:
    """Where a rank without tensors puts its partial: the device the group's backend reduces on."""
    try:
        return torch.device(dist.distributed_c10d._get_object_coll_device(group))
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - other torch versions
        return torch.device("cpu")


def portable_group(process_group: Any) -> Any:
    """``process_group`` as it can be pickled: ``None`` and ``"world"`` as they are, the default
    (world) group as ``"world"``.

    Raises:
        TypeError: another process group (a subgroup exists only in the process that made it;
            build the transform again in the receiving process).
    """
    if process_group is None or isinstance(process_group, str):
        return process_group
    if dist.is_available() and dist.is_initialized() and process_group is dist.group.WORLD:
        return WORLD
    raise TypeError(
        "a transform holding a process group other than the world group cannot be pickled: the group exists "
        "only in this process; build the transform in the receiving process"
    )
