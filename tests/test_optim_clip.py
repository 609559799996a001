"""Clipping inside the optimizers: ``clip=`` (any clipping transform, over all parameter groups
together) and ``moment_clip=`` (OpenAI Five's rule with the optimizer's own second moment)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import steadygrad as sg

from ._parity import assert_same_run, clone_params, loss_fn, make_params, train_step


def grouped(params):
    """Two parameter groups, as a model with a no-decay group for biases has."""
    return [{"params": params[0:1] + params[2:3]}, {"params": params[1:2] + params[3:], "weight_decay": 0.0}]


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam", "AdamW"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_clip_by_norm_equals_clip_grad_norm_then_torch_step(name, norm_type, maximize, weight_decay, kept_scratch):
    """The norm is over all groups together, exactly as torch.nn.utils.clip_grad_norm_. Without
    coupled weight decay the scalings fold the coefficient into their arithmetic (no scaled copy
    of the gradients); with it, it is applied first."""
    params_t = make_params()
    params_s = clone_params(params_t)
    opt_t = getattr(torch.optim, name)(grouped(params_t), weight_decay=weight_decay, maximize=maximize)
    opt_s = getattr(sg.optim, name)(
        grouped(params_s), weight_decay=weight_decay, maximize=maximize, clip=sg.clip_by_norm(0.5, norm_type)
    )
    for step in range(20):
        opt_t.zero_grad()
        loss_fn(params_t, step).backward()
        # torch's inf norm raises on the zero-size parameter (steadygrad's does not); it holds nothing
        torch.nn.utils.clip_grad_norm_([p for p in params_t if p.numel()], 0.5, norm_type)
        opt_t.step()
        train_step(params_s, opt_s, step)
    assert_same_run(params_s, opt_s, params_t, opt_t)
    assert opt_s.shared_state()["clip"]["fraction_clipped"].item() in (0.0, 1.0)


def test_clip_leaves_grad_untouched():
    params = make_params()
    opt = sg.optim.Adam(params, clip=sg.clip_by_value(1e-3))
    loss_fn(params, 0).backward()
    saved = [p.grad.clone() for p in params]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, saved))
    assert opt.shared_state()["clip"]["fraction_clipped"].item() > 0.5


@pytest.mark.parametrize(
    "make_clip",
    [lambda: sg.clip_by_moment(k=2.0, beta=0.9), lambda: sg.zclip(warmup_steps=3), lambda: sg.clip_by_unit_ratio(0.05)],
    ids=["moment", "zclip", "agc"],
)
def test_clip_equals_a_clipper_before_the_step(make_clip):
    """clip=T inside the optimizer is the same as sg.Clipper(params, T) on .grad before step()."""
    params_a = make_params()
    params_b = clone_params(params_a)
    opt_a = sg.optim.Adam(params_a, lr=0.01, clip=make_clip())
    opt_b = sg.optim.Adam(params_b, lr=0.01)
    clipper = sg.Clipper(params_b, make_clip(), nonfinite="ignore")
    for step in range(15):
        train_step(params_a, opt_a, step)
        opt_b.zero_grad()
        loss_fn(params_b, step).backward()
        clipper.clip_()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=1e-13, atol=1e-15)


def test_clip_state_is_namespaced_and_survives_checkpoints():
    params = make_params()
    opt = sg.optim.Adam(params, clip=sg.clip_by_moment(k=3.0))
    for step in range(6):
        train_step(params, opt, step)
    keys = set(opt.state[params[0]])
    assert keys == {"step", "exp_avg", "exp_avg_sq", "clip.count", "clip.nu", "clip.fraction_clipped"}
    assert all(isinstance(k, torch.Tensor) for k in opt.state)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_params = clone_params(params)
    resumed = sg.optim.Adam(resumed_params, clip=sg.clip_by_moment(k=3.0))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(6, 12):
        train_step(params, opt, step)
        train_step(resumed_params, resumed, step)
    assert_same_run(resumed_params, resumed, params, opt, rtol=0.0)

    # torch.optim.Adam loads it too (the extra keys ride along unused)
    torch_opt = torch.optim.Adam(clone_params(params))
    torch_opt.load_state_dict(opt.state_dict())


def test_deepcopy_keeps_the_clip_and_the_transform():
    params = make_params()
    opt = sg.optim.Transformed(params, sg.chain(sg.scale_by_adam(), sg.scale_by_lr()), clip=sg.clip_by_norm(1.0))
    train_step(params, opt, 0)
    twin = copy.deepcopy(opt)
    assert twin.clip == opt.clip and twin.transform == opt.transform  # the same functions
    train_step(params, twin, 1)


def test_clip_must_be_a_transform():
    with pytest.raises(TypeError, match="clip"):
        sg.optim.Adam(make_params(), clip=1.0)


@pytest.mark.parametrize("name", ["RMSprop", "Adam", "AdamW"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_moment_clip_must_be_positive(name, bad):
    with pytest.raises(ValueError, match="moment_clip"):
        getattr(sg.optim, name)(make_params(), moment_clip=bad)


# ---- moment_clip: the optimizer's own second moment ------------------------------------------


def adam_moment_clip_reference(grads, k, lr, b1, b2, eps):
    """Adam with OpenAI Five clipping, element by element in Python floats: the limit
    k·sqrt(v/(1 − b2^(t−1))) from the steps before (none at t = 1), v from the raw g, m from the
    clipped g."""
    x, m, v = 0.0, 0.0, 0.0
    xs, clipped = [], []
    for t, g in enumerate(grads, start=1):
        limit = math.inf if t == 1 else k * math.sqrt(v / (1 - b2 ** (t - 1)))
        gc = max(-limit, min(limit, g))
        clipped.append(gc != g)
        v = b2 * v + (1 - b2) * g * g
        m = b1 * m + (1 - b1) * gc
        x -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
        xs.append(x)
    return xs, clipped


def rmsprop_moment_clip_reference(grads, k, lr, alpha, eps):
    x, v = 0.0, 0.0
    xs = []
    for t, g in enumerate(grads, start=1):
        limit = math.inf if t == 1 else k * math.sqrt(v / (1 - alpha ** (t - 1)))
        gc = max(-limit, min(limit, g))
        v = alpha * v + (1 - alpha) * g * g
        x -= lr * gc / (math.sqrt(v) + eps)
        xs.append(x)
    return xs


def _series(seed=0, n=40, spikes=((20, 1000.0), (21, -800.0))):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g, dtype=torch.float64).tolist()
    for at, value in spikes:
        values[at] = value
    return values


def _run_scalar_optimizer(opt_factory, grads):
    x = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = opt_factory([x])
    xs = []
    for g in grads:
        x.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        xs.append(x.item())
    return xs, opt, x


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_moment_clip_equals_the_reference(name):
    grads = _series()
    expected, clipped = adam_moment_clip_reference(grads, k=3.0, lr=0.1, b1=0.9, b2=0.99, eps=1e-8)
    got, opt, x = _run_scalar_optimizer(
        lambda p: getattr(sg.optim, name)(p, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, moment_clip=3.0), grads
    )
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert clipped[20] and clipped[21]  # both spikes were cut (the second saw the first in v)
    assert opt.shared_state()["group0"]["moment_clip_fraction"].item() == float(clipped[-1])
    # no extra memory: the state is Adam's own (and one shared number)
    assert set(opt.state[x]) == {"step", "exp_avg", "exp_avg_sq", "group.moment_clip_fraction"}


def test_rmsprop_moment_clip_equals_the_reference():
    grads = _series(1)
    expected = rmsprop_moment_clip_reference(grads, k=2.0, lr=0.01, alpha=0.9, eps=1e-8)
    got, _, _ = _run_scalar_optimizer(lambda p: sg.optim.RMSprop(p, lr=0.01, alpha=0.9, moment_clip=2.0), grads)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_moment_clip_differs_from_a_separate_clip_by_moment():
    """With clip=clip_by_moment, Adam's v sees the *clipped* gradient; with moment_clip it sees
    the raw one. Same limit rule, different optimizer state after a spike."""
    grads = _series(2)
    shared, opt_a, xa = _run_scalar_optimizer(
        lambda p: sg.optim.Adam(p, lr=0.1, betas=(0.9, 0.99), moment_clip=3.0), grads
    )
    separate, opt_b, xb = _run_scalar_optimizer(
        lambda p: sg.optim.Adam(p, lr=0.1, betas=(0.9, 0.99), clip=sg.clip_by_moment(k=3.0, beta=0.99)), grads
    )
    # before the first spike the two agree exactly: same v, same limits
    assert shared[:20] == pytest.approx(separate[:20], rel=1e-13)
    # shared: Adam's v took both raw spikes (1000², 800²); separate: only the clipped first spike
    # (3σ) and the second one cut to the limit that the clipper's own v had learnt from the first
    assert opt_a.state[xa]["exp_avg_sq"].item() > 3 * opt_b.state[xb]["exp_avg_sq"].item()


@pytest.mark.parametrize("name", ["RMSprop", "Adam"])
def test_huge_moment_clip_is_the_plain_optimizer(name):
    params_t = make_params()
    params_s = clone_params(params_t)
    opt_t = getattr(torch.optim, name)(params_t, lr=0.01)
    opt_s = getattr(sg.optim, name)(params_s, lr=0.01, moment_clip=1e30)
    for step in range(10):
        train_step(params_t, opt_t, step)
        train_step(params_s, opt_s, step)
    assert_same_run(params_s, opt_s, params_t, opt_t)


def test_loading_keeps_wide_clip_state_of_low_precision_parameters():
    """torch casts loaded state to the parameter's dtype; a clipper's float32 second moment (and
    its counter) of bfloat16 parameters must come back in float32, bit for bit."""
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = sg.optim.Adam(params, clip=sg.clip_by_moment(k=5.0))
    for step in range(300):
        params[0].grad = torch.randn(64, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        opt.step()
    saved = opt.state[params[0]]
    assert saved["clip.nu"].dtype == torch.float32 and saved["exp_avg"].dtype == torch.bfloat16
    fresh = sg.optim.Adam([torch.nn.Parameter(params[0].detach().clone())], clip=sg.clip_by_moment(k=5.0))
    fresh.load_state_dict(opt.state_dict())
    loaded = fresh.state[fresh.param_groups[0]["params"][0]]
    for key in ("clip.nu", "clip.count", "exp_avg", "exp_avg_sq", "step"):
        assert loaded[key].dtype == saved[key].dtype and torch.equal(loaded[key], saved[key]), key
    assert loaded["clip.count"].item() == 300  # 300 is not a bfloat16 number


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam", "AdamW"])
def test_clip_by_norm_coefficient_is_folded_into_the_scaling_on_the_cpu(name, monkeypatch):
    """On CPU gradients the optimizer never scales a copy of .grad for clip_by_norm: the
    coefficient comes back unapplied and the scaling folds it into its own arithmetic."""
    import steadygrad.core.norms as norms

    params_t = make_params()
    params_s = clone_params(params_t)
    opt_t = getattr(torch.optim, name)(params_t, lr=0.01)
    opt_s = getattr(sg.optim, name)(params_s, lr=0.01, clip=sg.clip_by_norm(0.05))

    def forbidden(*args, **kwargs):
        raise AssertionError("the clip coefficient was applied to a copy of the gradients")

    monkeypatch.setattr(norms, "scaled", forbidden)
    monkeypatch.setattr(norms, "scale_", forbidden)
    for step in range(10):
        opt_t.zero_grad()
        loss_fn(params_t, step).backward()
        torch.nn.utils.clip_grad_norm_(params_t, 0.05)
        opt_t.step()
        train_step(params_s, opt_s, step)
    assert_same_run(params_s, opt_s, params_t, opt_t)
    assert opt_s.shared_state()["clip"]["fraction_clipped"].item() == 1.0
