"""Global norms across ranks: two CPU processes (gloo), each holding different parameters.

One spawn runs every check (process start-up dominates the time); a failing rank makes the
others fail fast (a 30 s collective timeout) and the parent kills whatever is left at its
deadline, so a broken collective cannot hang the suite.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from ._distributed import WORLD_SIZE, needs_gloo, run_on_ranks

INF = math.inf
SHAPES = [(4, 3), (7,), (0,), (2, 2, 3), (5,), (1,)]
OWNER = [0, 1, 1, 0, 1, 0]  # which rank holds which parameter

pytestmark = needs_gloo


def _full_params(seed=0, scale=10.0):
    """The same parameters and gradients on every rank (one seed)."""
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in SHAPES:
        p = torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
        p.grad = torch.randn(s, generator=g, dtype=torch.float64) * scale
        ps.append(p)
    return ps


def _formula_norm(tensors, p):
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat.abs().max() if math.isinf(p) else flat.abs().pow(p).sum().pow(1 / p)


class _CountingAllReduce:
    """Wraps dist.all_reduce to count the calls."""

    def __init__(self):
        self.calls = 0
        self._original = dist.all_reduce

    def __enter__(self):
        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _close(a, b, rtol=1e-13):
    torch.testing.assert_close(a, b, rtol=rtol, atol=0)


def _check_process_group(rank):
    from steadygrad.clip_grad import clip_grad_norm_, get_total_norm
    from steadygrad.core.norms import WORLD, tensor_norms, total_norm

    full = _full_params()
    mine = [p for p, owner in zip(full, OWNER) if owner == rank]
    world = dist.group.WORLD
    for p in (2.0, INF):
        expected = _formula_norm([q.grad for q in full], p)
        local = total_norm([q.grad for q in mine], p)
        assert local < expected if p == 2.0 else local <= expected  # a rank alone sees less
        with _CountingAllReduce() as counter:
            got = total_norm([q.grad for q in mine], p, world)
        assert counter.calls == 1
        _close(got, expected)
        assert got.dtype == torch.float64
        _close(total_norm([q.grad for q in mine], p, WORLD), expected)
        _close(get_total_norm([q.grad for q in mine], p, process_group=world), expected)
        if p == 2.0:
            _close(expected, torch.nn.utils.get_total_norm([q.grad for q in full], p))

        # clipping: every rank's gradients scaled by the one global coefficient
        reference = _full_params()
        torch.nn.utils.clip_grad_norm_([q for q in reference if q.numel() or p != INF], 1.0, p)
        to_clip = [q for q, owner in zip(_full_params(), OWNER) if owner == rank]
        with _CountingAllReduce() as counter:
            n = clip_grad_norm_(to_clip, 1.0, p, process_group=world)
        assert counter.calls == 1
        _close(n, expected)
        theirs = [q for q, owner in zip(reference, OWNER) if owner == rank]
        for a, b in zip(to_clip, theirs):
            _close(a.grad, b.grad)

        # a rank holding nothing still joins the all-reduce and gets the global norm (in the
        # default dtype's norm dtype: it has no tensor to take the dtype from)
        held = [q.grad for q in full] if rank == 0 else []
        got = total_norm(held, p, world)
        assert got.dtype == (torch.float64 if held else torch.float32)
        _close(got.double(), expected, rtol=1e-13 if held else 1e-7)

    # per-tensor norms of plain tensors never reduce
    with _CountingAllReduce() as counter:
        tensor_norms([q.grad for q in mine])
    assert counter.calls == 0

    # overflow: float32 values whose squares overflow on one rank, nothing (or inf) on the
    # other; the pass that rescales is decided before the one all-reduce, so the ranks' calls
    # pair up (the next collective gets what it expects)
    huge = [torch.full((3,), 3e19)] if rank == 1 else []
    with _CountingAllReduce() as counter:
        got = total_norm(huge, 2.0, world)
    assert counter.calls == 1
    torch.testing.assert_close(got.double(), torch.tensor(3e19 * math.sqrt(3), dtype=torch.float64), rtol=1e-6, atol=0)
    bad = [torch.tensor([1.0, INF])] if rank == 1 else []
    assert total_norm(bad, 2.0, world).isinf()
    check = torch.arange(3.0)
    dist.all_reduce(check)
    assert check.tolist() == [0.0, 2.0, 4.0]

    # an optimizer skipping a NaN step on one rank still enters its clip rule's all-reduce
    import steadygrad as sg

    w = torch.nn.Parameter(torch.ones(4))
    opt = sg.optim.Adam([w], lr=0.1, clip=sg.zclip(warmup_steps=2, process_group=world), nonfinite="skip")
    for step in range(3):
        w.grad = torch.ones(4)
        if rank == 0 and step == 1:
            w.grad[0] = float("nan")
        opt.step()
    assert opt.state[w]["step"].item() == (2 if rank == 0 else 3)
    check = torch.arange(3.0)
    dist.all_reduce(check)
    assert check.tolist() == [0.0, 2.0, 4.0]


def _check_dtensor(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    from steadygrad.clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_
    from steadygrad.core.norms import tensor_norms, total_norm

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    g = torch.Generator().manual_seed(7)
    layouts = [
        ((5, 3), [Shard(0)]),  # uneven: 3 + 2 rows
        ((4, 6), [Shard(1)]),
        ((6,), [Replicate()]),  # must not be counted twice
        ((1, 2), [Shard(0)]),  # rank 1 holds an empty shard
    ]
    fulls = [torch.randn(s, generator=g, dtype=torch.float64) * 5 for s, _ in layouts]
    dts = [distribute_tensor(f, mesh, pl) for f, (_, pl) in zip(fulls, layouts)]
    assert dts[0].to_local().shape[0] == (3 if rank == 0 else 2)
    for p in (2.0, INF):
        expected = _formula_norm(fulls, p)
        with _CountingAllReduce() as counter:
            got = total_norm(dts, p)
        assert counter.calls == 1  # one sharded mesh dimension, one all-reduce
        assert type(got) is torch.Tensor
        _close(got, expected)
        with _CountingAllReduce() as counter:
            per_tensor = tensor_norms(dts, p)
        assert counter.calls == 1
        for n, f in zip(per_tensor, fulls):
            _close(n, _formula_norm([f], p))

    # clip_grad_norm_ on parameters with DTensor gradients (FSDP2's layout)
    params = []
    for f, (_, pl) in zip(fulls, layouts):
        q = torch.nn.Parameter(distribute_tensor(torch.zeros_like(f), mesh, pl))
        q.grad = distribute_tensor(f.clone(), mesh, pl)
        params.append(q)
    reference = [torch.nn.Parameter(torch.zeros_like(f)) for f in fulls]
    for r, f in zip(reference, fulls):
        r.grad = f.clone()
    n_ref = torch.nn.utils.clip_grad_norm_(reference, 2.0)
    n = clip_grad_norm_(params, 2.0)
    _close(n, n_ref)
    # process_group over the ranks that hold the shards would count each shard once per rank
    with pytest.raises(ValueError, match="already global"):
        clip_grad_norm_(params, 2.0, process_group="world")
    for q, r in zip(params, reference):
        _close(q.grad.full_tensor(), r.grad)
    clip_grad_value_(params, 0.05)
    for q, r in zip(params, reference):
        _close(q.grad.full_tensor(), r.grad.clamp(-0.05, 0.05))

    # clip_grads_with_norm_ takes torch's own (DTensor) norm and makes it whole
    sharded = params[:2]
    torch_norm = torch.nn.utils.get_total_norm([q.grad for q in sharded])
    assert type(torch_norm) is not torch.Tensor  # a DTensor
    before = [q.grad.full_tensor() for q in sharded]
    _close(torch_norm.full_tensor(), total_norm([q.grad for q in sharded]))
    clip_grads_with_norm_(sharded, 0.01, torch_norm)
    coef = 0.01 / (_formula_norm(before, 2.0) + 1e-6)
    for q, b in zip(sharded, before):
        _close(q.grad.full_tensor(), b * coef)

    # a plain tensor next to DTensors counts once (as replicated over the mesh)
    plain = torch.randn(3, generator=g, dtype=torch.float64)
    _close(total_norm([*dts, plain]), _formula_norm([*fulls, plain], 2.0))

    # 2-D mesh: a gradient sharded on both dimensions, one sharded on the second only
    mesh2 = init_device_mesh("cpu", (WORLD_SIZE, 1), mesh_dim_names=("dp", "tp"))
    a = distribute_tensor(fulls[1], mesh2, [Shard(0), Shard(1)])
    b = distribute_tensor(fulls[0], mesh2, [Replicate(), Shard(0)])
    with _CountingAllReduce() as counter:
        got = total_norm([a, b])
    assert counter.calls == 2  # mesh dims 0 and 1
    _close(got, _formula_norm([fulls[1], fulls[0]], 2.0))

    partial = dts[0].redistribute(mesh, [Replicate()])
    partial = torch.distributed.tensor.DTensor.from_local(partial.to_local() / WORLD_SIZE, mesh, [Partial()])
    try:
        total_norm([partial])
    except ValueError as e:
        assert "Partial" in str(e)
    else:
        raise AssertionError("a Partial DTensor must be refused")


def _check(rank, tmp_dir):
    _check_process_group(rank)
    _check_dtensor(rank)


def test_global_norms_two_ranks(tmp_path):
    run_on_ranks(tmp_path, _check, seconds=90)
