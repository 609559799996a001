"""torch's fused-AMP protocol: ``GradScaler.step(opt)`` on an optimizer with ``fused=True`` sets
``opt.grad_scale`` and ``opt.found_inf`` and leaves unscaling and the inf check to the step (as
torch's fused Adam, AdamW and Adagrad). The oracle: torch's fused optimizers under the same
GradScaler (RMSprop: torch's, which GradScaler unscales itself)."""

from __future__ import annotations

import warnings

import pytest
import torch

import steadygrad as sg
from steadygrad.core.gate import amp_unscale_

INF_STEP = 3


def _train(make_opt, *, reference_path=False, steps=6):
    """A few GradScaler steps, the loss made inf at step INF_STEP; returns what it saw."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = make_opt(model.parameters())
    if reference_path:
        opt._fused.disabled = "the reference path, for the test"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    seen = {}
    for step in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        if step == INF_STEP:
            loss = loss * float("inf")
            seen["before"] = [p.detach().clone() for p in model.parameters()], _state(opt)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == INF_STEP:
            seen["after"] = [p.detach().clone() for p in model.parameters()], _state(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler's cleanup
    seen["params"] = [p.detach().clone() for p in model.parameters()]
    seen["grads"] = [p.grad.clone() for p in model.parameters()]
    seen["scale"] = scaler.get_scale()
    return seen


def _state(opt):
    return [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()]


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad", "RMSprop"])
@pytest.mark.parametrize("reference_path", [False, True], ids=["fused", "fallback"])
def test_grad_scaler_step_equals_torch(name, reference_path):
    ours_opt = getattr(sg.optim, name)
    theirs_opt = getattr(torch.optim, name)
    fused_in_torch = name != "RMSprop"
    ours = _train(lambda ps: ours_opt(ps, lr=0.01, fused=True), reference_path=reference_path)
    theirs = _train(lambda ps: theirs_opt(ps, lr=0.01, **({"fused": True} if fused_in_torch else {})))
    assert ours["scale"] == theirs["scale"] == 2.0**10 * 2.0**-1  # halved once, at the inf step
    for a, b in zip(ours["params"], theirs["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if fused_in_torch:  # torch's fused kernels leave the unscaled gradients in .grad, as here
        for a, b in zip(ours["grads"], theirs["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # The inf step changed nothing: parameters and every state tensor (step counters included).
    params_before, state_before = ours["before"]
    params_after, state_after = ours["after"]
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    for a, b in zip(state_before, state_after):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_fused_path_declares_the_protocol():
    p = torch.nn.Parameter(torch.zeros(2))
    assert sg.optim.Adam([p], fused=True)._step_supports_amp_scaling
    assert not getattr(sg.optim.Adam([p]), "_step_supports_amp_scaling", False)
    import pickle

    assert pickle.loads(pickle.dumps(sg.optim.AdamW([p], fused=True)))._step_supports_amp_scaling


def test_amp_unscale_divides_unless_found_inf():
    g = [torch.randn(5), torch.randn(3, dtype=torch.float64)]
    scale = torch.tensor(1024.0)
    work = [t.clone() for t in g]
    gate = amp_unscale_(work, scale, torch.tensor(0.0))
    assert bool(gate)
    assert all(torch.equal(w, t / scale) for w, t in zip(work, g))  # torch's kernels divide
    work = [t.clone() for t in g]
    gate = amp_unscale_(work, scale, torch.tensor(1.0))
    assert not bool(gate) and all(torch.equal(w, t) for w, t in zip(work, g))
    assert amp_unscale_(work, scale, None) is None


def test_found_inf_with_nonfinite_skip():
    """Both gates close alone: GradScaler's verdict and the optimizer's own finite check."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = sg.optim.Adam([p], lr=0.1, fused=True, nonfinite="skip")
    p.grad = torch.full((3,), 2.0)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.state[p]["step"].item() == 0
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert opt.state[p]["step"].item() == 1
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))
    torch.testing.assert_close(p.grad, torch.ones(3))


def test_sparse_gradients_under_grad_scaler_equal_torch():
    """fused=True hands sparse gradients to the reference rule, which unscales them and skips
    the inf step; torch's Adagrad (not fused: GradScaler unscales for it) is the oracle."""

    def train(make_opt):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(6, 2, sparse=True)
        opt = make_opt(emb.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for step in range(4):
            opt.zero_grad()
            loss = emb(torch.tensor([0, 2, 2])).pow(2).sum()
            if step == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scaler.step(opt)
            scaler.update()
        return emb.weight.detach(), opt

    ours, opt = train(lambda ps: sg.optim.Adagrad(ps, lr=0.1, fused=True))
    theirs, ref = train(lambda ps: torch.optim.Adagrad(ps, lr=0.1))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    p = next(iter(opt.state))
    assert opt.state[p]["step"].item() == next(iter(ref.state.values()))["step"].item() == 3


@pytest.mark.parametrize("reference_path", [False, True], ids=["fused", "fallback"])
def test_raise_does_not_raise_at_a_step_grad_scaler_skips(reference_path):
    """nonfinite="raise" checks the gradients of steps that happen: GradScaler's inf step is
    skipped (as GradScaler skips step() for an optimizer without the protocol), not raised."""
    ours = _train(lambda ps: sg.optim.Adam(ps, lr=0.01, fused=True, nonfinite="raise"), reference_path=reference_path)
    theirs = _train(lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True))
    for a, b in zip(ours["params"], theirs["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    p = torch.nn.Parameter(torch.ones(2))
    opt = sg.optim.Adam([p], fused=True, nonfinite="raise")
    p.grad = torch.tensor([1.0, float("nan")])
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        opt.step()  # without GradScaler's verdict, the check is the optimizer's
