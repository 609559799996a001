"""A small training run that two optimizers follow side by side, for parity tests."""

from __future__ import annotations

import torch

from steadygrad.optim import TransformOptimizer


def make_params(seed: int = 0, dtype: torch.dtype = torch.float64, complex_: bool = False) -> list[torch.Tensor]:
    """Weights of a 2-layer network, a vector that gets a gradient only on some steps, and a
    zero-size parameter."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (5,), (3, 5), (3,), (3,), (0, 2)]
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    params = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=g, dtype=dtype)
        if complex_ and i in (0, 4):
            t = torch.complex(t, torch.randn(shape, generator=g, dtype=dtype)).to(cdtype)
        params.append(torch.nn.Parameter(t))
    return params


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def loss_fn(params: list[torch.Tensor], step: int, all_grads: bool = False) -> torch.Tensor:
    w1, b1, w2, b2, extra, empty = params
    g = torch.Generator().manual_seed(1000 + step)
    dtype = b1.dtype
    x = torch.randn(8, 4, generator=g, dtype=dtype)
    if w1.is_complex():
        h = torch.tanh((x.to(w1.dtype) @ w1.T).abs() + b1)
    else:
        h = torch.tanh(x @ w1.T + b1)
    out = h @ w2.T + b2
    loss = ((out - 1) ** 2).mean() + empty.sum()
    if all_grads or step % 3 != 1:  # `extra` has no gradient on every third step
        e = extra.abs() ** 2 if extra.is_complex() else extra**2
        loss = loss + 0.5 * e.sum() + extra.real.sum() * 0.1
    return loss


def train_step(params, opt, step: int, all_grads: bool = False) -> None:
    opt.zero_grad()
    loss_fn(params, step, all_grads).backward()
    opt.step()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 for empty tensors or two zero tensors)."""
    if a.numel() == 0 or (a.dtype == b.dtype and torch.equal(a, b)):  # equal infinities too
        return 0.0
    scale = b.abs().max().item()
    diff = (a.to(b.dtype) - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_same_run(
    params_a, opt_a, params_b, opt_b, rtol: float = 1e-12, rtol32: float | None = None, ignore: tuple[str, ...] = ()
) -> None:
    """Every parameter and every per-parameter state entry of ``opt_a`` equals ``opt_b``'s
    within ``rtol`` relative to the tensor's largest magnitude (``rtol32`` for tensors of lower
    precision, when given), with the same state keys. Against a torch optimizer, steadygrad's
    own namespaced entries (``clip.*``, ``group.*``) are left out; so are the keys in ``ignore``."""

    def tol(t):
        return rtol if rtol32 is None or t.dtype == torch.float64 else rtol32

    def keys(opt, state):
        if all(isinstance(o, TransformOptimizer) for o in (opt_a, opt_b)):
            return set(state) - set(ignore)
        return {k for k in state if not k.startswith(("clip.", "group."))}

    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert max_rel_diff(pa.detach(), pb.detach()) <= tol(pb), f"parameter {i}"
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        ka, kb = keys(opt_a, sa), keys(opt_b, sb)
        assert ka == kb, f"state keys of parameter {i}: {sorted(ka)} vs {sorted(kb)}"
        for key in ka:
            va, vb = sa[key], sb[key]
            assert va.shape == vb.shape and va.dtype == vb.dtype, f"{key} of parameter {i}"
            assert max_rel_diff(va, vb) <= tol(vb), f"{key} of parameter {i}: {max_rel_diff(va, vb)}"
