"""``differentiable=True``: one step, recorded by autograd, is differentiable with respect to the
parameter, its gradient, the optimizer state and a tensor ``lr``. Oracles: torch.optim's own
differentiable step (values and vector-Jacobian products, float64) and finite differences
(``torch.autograd.gradcheck``) for what torch does not offer."""

from __future__ import annotations

import pytest
import torch

import steadygrad as sg

F64 = torch.float64

# optimizer, options, the state tensors of one parameter (positive where they are second moments)
CASES = [
    ("Adam", {}, ("exp_avg", "exp_avg_sq")),
    ("Adam", {"amsgrad": True}, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    ("Adam", {"weight_decay": 0.1, "maximize": True}, ("exp_avg", "exp_avg_sq")),
    ("AdamW", {"weight_decay": 0.1}, ("exp_avg", "exp_avg_sq")),
    ("AdamW", {"amsgrad": True}, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    ("RMSprop", {}, ("square_avg",)),
    ("RMSprop", {"weight_decay": 0.1}, ("square_avg",)),
    ("RMSprop", {"momentum": 0.9, "centered": True}, ("square_avg", "momentum_buffer", "grad_avg")),
    ("Adagrad", {}, ("sum",)),
    ("Adagrad", {"lr_decay": 0.1, "weight_decay": 0.1}, ("sum",)),
]
OURS_ONLY = [
    ("Adam", {"eps_in_sqrt": True}, ("exp_avg", "exp_avg_sq")),
    ("Adam", {"moment_clip": 1.5}, ("exp_avg", "exp_avg_sq")),
    ("RMSprop", {"eps_in_sqrt": True, "momentum": 0.5}, ("square_avg", "momentum_buffer")),
    ("Adagrad", {"eps_in_sqrt": True}, ("sum",)),
    ("Adam", {"nonfinite": "skip"}, ("exp_avg", "exp_avg_sq")),
]
POSITIVE = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"}


def _inputs(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(6, generator=g, dtype=F64)
    grad = torch.randn(6, generator=g, dtype=F64)
    state = []
    for k in keys:
        v = torch.randn(6, generator=g, dtype=F64)
        if k in POSITIVE:
            v = v.abs() + 0.5
        if k == "grad_avg":
            v = v * 0.1  # centered: square_avg - grad_avg^2 stays positive
        state.append(v)
    if "max_exp_avg_sq" in keys:
        state[keys.index("max_exp_avg_sq")] = state[keys.index("exp_avg_sq")] + torch.rand(6, generator=g, dtype=F64)
    return [t.requires_grad_() for t in (p, grad, *state)]


def _step(cls, options, keys, lr=0.1):
    """One differentiable step of ``cls`` as a function of (param, grad, *state)."""

    def fn(p, grad, *state):
        p = p.clone()
        p.grad = grad
        opt = cls([p], lr=lr, differentiable=True, **options)
        opt.state[p].update({"step": torch.tensor(3.0, dtype=F64)}, **{k: v.clone() for k, v in zip(keys, state)})
        opt.step()
        return (p, *(opt.state[p][k] for k in keys))

    return fn


@pytest.mark.parametrize(("name", "options", "keys"), CASES, ids=[f"{n}-{o}" for n, o, _ in CASES])
def test_step_differentiates_as_torch(name, options, keys):
    inputs = _inputs(keys)
    ours = _step(getattr(sg.optim, name), options, keys)
    theirs = _step(getattr(torch.optim, name), options, keys)
    out, ref = ours(*inputs), theirs(*inputs)
    for a, b in zip(out, ref):
        assert a.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    cotangents = [torch.randn_like(o) for o in out]
    vjp = torch.autograd.grad(out, inputs, cotangents, allow_unused=True)
    ref_vjp = torch.autograd.grad(ref, inputs, cotangents, allow_unused=True)
    for a, b in zip(vjp, ref_vjp):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(ours, inputs)


@pytest.mark.parametrize(("name", "options", "keys"), OURS_ONLY, ids=[f"{n}-{o}" for n, o, _ in OURS_ONLY])
def test_steadygrad_options_are_differentiable(name, options, keys):
    assert torch.autograd.gradcheck(_step(getattr(sg.optim, name), options, keys), _inputs(keys, seed=1))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_tensor_lr_gets_a_gradient(name):
    keys = ("exp_avg", "exp_avg_sq") if name != "RMSprop" else ("square_avg",)
    inputs = _inputs(keys, seed=2)

    def fn(lr, *rest):
        return _step(getattr(sg.optim, name), {}, keys, lr=lr)(*rest)

    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (lr, *inputs))
    if name != "RMSprop":  # torch's Adam/AdamW differentiate through a tensor lr too
        ours = fn(lr, *inputs)[0]
        theirs = _step(getattr(torch.optim, name), {}, keys, lr=lr)(*inputs)[0]
        torch.testing.assert_close(
            torch.autograd.grad(ours.sum(), lr)[0], torch.autograd.grad(theirs.sum(), lr)[0], rtol=1e-12, atol=0
        )


def test_training_through_several_steps_and_a_meta_gradient():
    """A learned learning rate: the loss after three differentiable steps is differentiated with
    respect to ``lr`` (MAML-style), and equals torch's."""

    def meta_grad(cls):
        torch.manual_seed(0)
        w0 = torch.randn(4, dtype=F64)
        x, y = torch.randn(8, 4, dtype=F64), torch.randn(8, dtype=F64)
        lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
        w = w0.clone().requires_grad_()
        p = w.clone()
        opt = cls([p], lr=lr, differentiable=True)
        # float64 step counters on both sides: torch's default float32 counter rounds its bias
        # corrections to float32 on this path (a documented difference), which moves the result
        # by ~1e-6 relative.
        opt.state[p].update(step=torch.tensor(0.0, dtype=F64), exp_avg=torch.zeros(4, dtype=F64))
        opt.state[p]["exp_avg_sq"] = torch.zeros(4, dtype=F64)
        for _ in range(3):
            loss = (x @ p - y).pow(2).mean()
            (g,) = torch.autograd.grad(loss, p, create_graph=True)
            p.grad = g
            opt.step()
        return torch.autograd.grad((x @ p - y).pow(2).mean(), lr)[0]

    torch.testing.assert_close(meta_grad(sg.optim.Adam), meta_grad(torch.optim.Adam), rtol=1e-11, atol=0)


def test_refused_with_fused_and_clip():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        sg.optim.Adam([p], differentiable=True, fused=True)
    with pytest.raises(ValueError, match="clip="):
        sg.optim.Adam([p], differentiable=True, clip=sg.clip_by_norm(1.0))


def test_non_differentiable_step_records_nothing():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3, requires_grad=True) * 2
    opt = sg.optim.Adam([p])
    opt.step()
    assert opt.state[p]["exp_avg"].grad_fn is None and not opt.state[p]["exp_avg"].requires_grad
    assert p.grad_fn is None


@pytest.mark.parametrize(
    ("name", "options", "keys"),
    [
        ("Adam", {"amsgrad": True}, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
        ("RMSprop", {"momentum": 0.9, "centered": True}, ("square_avg", "momentum_buffer", "grad_avg")),
    ],
)
def test_several_steps_with_state_updated_in_place(name, options, keys):
    """Two steps: the second reads state the first updated in place (torch's amsgrad and centered
    paths raise an in-place error at the backward here)."""

    def two_steps(p, grad, *state):
        p = p.clone()
        p.grad = grad
        opt = getattr(sg.optim, name)([p], lr=0.1, differentiable=True, **options)
        opt.state[p].update({"step": torch.tensor(3.0, dtype=F64)}, **{k: v.clone() for k, v in zip(keys, state)})
        opt.step()
        p.grad = grad * 0.5
        opt.step()
        return (p, *(opt.state[p][k] for k in keys))

    assert torch.autograd.gradcheck(two_steps, _inputs(keys, seed=3))
