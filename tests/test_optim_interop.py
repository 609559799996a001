"""Checkpoints move between torch.optim and steadygrad in both directions; LR schedulers,
GradScaler and hooks drive steadygrad exactly as they drive torch.optim."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import steadygrad as sg

from ._parity import assert_same_run, clone_params, make_params, train_step

CONFIGS = [
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1}),
    ("RMSprop", {"weight_decay": 0.1, "centered": True, "momentum": 0.5}),
    ("Adam", {"weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {"lr": 0.01}),
]


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("direction", ["torch->steadygrad", "steadygrad->torch"])
def test_checkpoint_moves_both_ways(name, kwargs, direction):
    """Run 12 steps with one library, save, load into the other, continue 12 steps: the result
    equals 24 steps of torch alone."""
    first, second = (torch.optim, sg.optim) if direction == "torch->steadygrad" else (sg.optim, torch.optim)
    reference = make_params()
    opt_ref = getattr(torch.optim, name)(reference, **kwargs)
    params = clone_params(reference)
    opt_first = getattr(first, name)(params, **kwargs)
    for step in range(12):
        train_step(reference, opt_ref, step)
        train_step(params, opt_first, step)
    resumed = clone_params(params)
    opt_second = getattr(second, name)(resumed, **kwargs)
    opt_second.load_state_dict(_roundtrip(opt_first.state_dict()))
    for step in range(12, 24):
        train_step(reference, opt_ref, step)
        train_step(resumed, opt_second, step)
    assert_same_run(resumed, opt_second, reference, opt_ref)


def test_torch_checkpoint_gets_steadygrad_options():
    params = make_params()
    torch_opt = torch.optim.Adam(params)
    train_step(params, torch_opt, 0)
    opt = sg.optim.Adam(params, eps_in_sqrt=True)
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0]["eps_in_sqrt"] is True
    train_step(params, opt, 1)  # runs with the loaded state
    assert opt.state[params[0]]["step"].item() == 2


def test_load_state_dict_for_other_parameters_raises():
    opt = sg.optim.Adam(make_params())
    other = sg.optim.Adam(make_params()[:3])
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())


def test_old_checkpoint_with_float_step():
    params = make_params()
    opt = sg.optim.Adam(params)
    train_step(params, opt, 0)
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["step"] = float(s["step"])
    fresh = sg.optim.Adam(params)
    fresh.load_state_dict(sd)
    assert torch.is_tensor(fresh.state[params[0]]["step"])
    train_step(params, fresh, 1)
    assert fresh.state[params[0]]["step"].item() == 2


def _scheduled_run(module, name, kwargs, make_scheduler, steps=30):
    params = make_params()
    opt = getattr(module, name)(params, **kwargs)
    scheduler = make_scheduler(opt)
    lrs = []
    for step in range(steps):
        train_step(params, opt, step)
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    return params, opt, lrs


SCHEDULERS = {
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=31, cycle_momentum="momentum" in opt.defaults or "betas" in opt.defaults
    ),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_schedulers_drive_steadygrad_like_torch(name, kwargs, scheduler):
    """OneCycleLR also cycles Adam's beta1 and RMSprop's momentum; both are read at every step."""
    params_t, opt_t, lrs_t = _scheduled_run(torch.optim, name, kwargs, SCHEDULERS[scheduler])
    params_s, opt_s, lrs_s = _scheduled_run(sg.optim, name, kwargs, SCHEDULERS[scheduler])
    assert lrs_s == lrs_t and len(set(lrs_t)) > 2
    if scheduler == "OneCycleLR" and name.startswith("Adam"):
        assert opt_s.param_groups[0]["betas"] == opt_t.param_groups[0]["betas"] != (0.9, 0.999)
    assert_same_run(params_s, opt_s, params_t, opt_t)


def test_tensor_lr_can_change_in_place():
    """A tensor lr is read at every step: filling it changes the next step."""
    params_t, params_s = make_params(), None
    params_s = clone_params(params_t)
    lr = torch.tensor(0.01, dtype=torch.float64)
    opt_t = torch.optim.Adam(params_t, lr=0.01)
    opt_s = sg.optim.Adam(params_s, lr=lr)
    for step in range(10):
        if step == 5:
            lr.fill_(0.002)
            opt_t.param_groups[0]["lr"] = 0.002
        train_step(params_t, opt_t, step)
        train_step(params_s, opt_s, step)
    assert_same_run(params_s, opt_s, params_t, opt_t)


def test_param_group_edits_and_added_groups():
    params_t = make_params()
    params_s = clone_params(params_t)
    opt_t = torch.optim.RMSprop(params_t[:4], lr=0.01)
    opt_s = sg.optim.RMSprop(params_s[:4], lr=0.01)
    for opt, ps in ((opt_t, params_t), (opt_s, params_s)):
        opt.add_param_group({"params": ps[4:], "lr": 0.1, "momentum": 0.9})
    for step in range(15):
        if step == 8:
            for opt in (opt_t, opt_s):
                opt.param_groups[0]["alpha"] = 0.5
                opt.param_groups[1]["weight_decay"] = 0.2
        train_step(params_t, opt_t, step)
        train_step(params_s, opt_s, step)
    assert_same_run(params_s, opt_s, params_t, opt_t)


def test_grad_scaler_steps_steadygrad_like_torch():
    """torch.amp.GradScaler('cpu') unscales, skips the inf step and steps the rest."""
    runs = []
    for module in (torch.optim, sg.optim):
        params = make_params(dtype=torch.float32)
        opt = module.Adam(params, lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(8):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(params[0].sum(1), params[1]) + params[2].pow(2).sum()
            if step == 3:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((params, opt, scaler.get_scale()))
    (params_t, opt_t, scale_t), (params_s, opt_s, scale_s) = runs
    assert scale_s == scale_t < 2.0**10
    assert opt_s.state[params_s[0]]["step"].item() == 7  # the inf step was skipped
    assert_same_run(params_s, opt_s, params_t, opt_t, rtol=1e-6)


def test_step_hooks_and_closure():
    params = make_params()
    opt = sg.optim.AdamW(params)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = params[0].pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"]
    assert loss.item() > 0 and opt.state[params[0]]["step"].item() == 1


def test_gradients_are_not_modified_and_params_without_grad_are_skipped():
    params = make_params()
    for name in ("Adagrad", "RMSprop", "Adam", "AdamW"):
        ps = clone_params(params)
        opt = getattr(sg.optim, name)(ps, weight_decay=0.1, maximize=True)
        ps[0].grad = torch.randn_like(ps[0])
        saved = ps[0].grad.clone()
        before = [p.detach().clone() for p in ps]
        opt.step()
        assert torch.equal(ps[0].grad, saved), name
        assert not torch.equal(ps[0], before[0]), name
        for p, b in zip(ps[1:], before[1:]):
            assert torch.equal(p, b), name  # no gradient: untouched, even with weight decay


def test_deepcopy_and_pickle():
    params = make_params()
    opt = sg.optim.Adam(params)
    train_step(params, opt, 0)
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["state"][0]["step"].item() == 1
