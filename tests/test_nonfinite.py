"""A step with inf/NaN gradients leaves no trace: the optimizers' ``nonfinite="skip"`` on both
paths, with every ``clip=`` rule, in every float dtype; ``"raise"``; and a Clipper's skip in
front of any optimizer, torch's included."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import steadygrad as sg

NAMES = ["Adagrad", "RMSprop", "Adam", "AdamW"]
OPTIONS = {
    "Adagrad": [{}, {"lr_decay": 0.01, "weight_decay": 0.1}],
    "RMSprop": [{}, {"centered": True, "momentum": 0.9, "weight_decay": 0.1}, {"moment_clip": 2.0}],
    "Adam": [{}, {"amsgrad": True, "weight_decay": 0.1}, {"moment_clip": 2.0}],
    "AdamW": [{}, {"amsgrad": True, "moment_clip": 2.0}],
}
CASES = [(name, i) for name in NAMES for i in range(len(OPTIONS[name]))]
CLIPS = {
    "none": lambda: None,
    "norm": lambda: sg.clip_by_norm(0.5),
    "value": lambda: sg.clip_by_value(0.3),
    "moment": lambda: sg.clip_by_moment(k=2.0, beta=0.9),
    "agc": lambda: sg.clip_by_unit_ratio(0.05),
    "update_rms": lambda: sg.clip_update_rms(1.0),
    "zclip": lambda: sg.zclip(warmup_steps=2),
    "autoclip": lambda: sg.autoclip(percentile=50.0),
}
STEPS = 7
BAD = 3


def _grads(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g).to(dtype) for s in ((5, 4), (3,), (2, 3))] for _ in range(STEPS)]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in ((5, 4), (3,), (2, 3))]


def _run(make_opt, dtype, bad: str | None, grads=None):
    """Steps through the gradient sequence; with ``bad``, step BAD's gradients get an inf/NaN
    (else step BAD is left out)."""
    params = _params(dtype)
    opt = make_opt(params)
    for step, gs in enumerate(grads or _grads(dtype)):
        if step == BAD:
            if bad is None:
                continue
            gs = [g.clone() for g in gs]
            gs[1][0] = math.nan if bad == "nan" else -math.inf
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _equal(x, y):
    """Bit for bit (a NaN equals the same NaN)."""
    x, y = x.detach().reshape(-1), y.detach().reshape(-1)
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def _assert_same(a, b, ignore=()):
    (params_a, opt_a), (params_b, opt_b) = a, b
    for x, y in zip(params_a, params_b):
        assert _equal(x, y)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for key in set(sa[i]) - set(ignore):
            assert _equal(sa[i][key], sb[i][key]), (i, key)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_a_bad_step_leaves_no_trace_on_the_reference_path(name, option, clip):
    """Parameters, every state entry (clip= state and statistics included) and step counters are
    bit-identical to a run without the bad step."""

    def make(params):
        return getattr(sg.optim, name)(params, lr=0.05, clip=CLIPS[clip](), nonfinite="skip", **OPTIONS[name][option])

    clean = _run(make, torch.float64, None)
    for bad in ("nan", "inf"):
        _assert_same(_run(make, torch.float64, bad), clean)


@pytest.mark.parametrize("clip", ["none", "norm", "moment", "zclip"])
@pytest.mark.parametrize("name", NAMES)
def test_a_bad_step_leaves_no_trace_on_the_fused_path(name, clip):
    def make(params):
        kwargs = {"moment_clip": 2.0} if name in ("RMSprop", "Adam") and clip == "none" else {}
        return getattr(sg.optim, name)(params, lr=0.05, clip=CLIPS[clip](), nonfinite="skip", fused=True, **kwargs)

    clean = _run(make, torch.float32, None)
    _assert_same(_run(make, torch.float32, "nan"), clean)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("name", "kwargs"), [("RMSprop", {"momentum": 0.9}), ("Adam", {})])
def test_low_precision_skips_stay_finite(dtype, fused, name, kwargs):
    """float16 and bfloat16: a skipped step computes 0/0 where eps rounds to 0; the gate selects,
    so nothing of it reaches the parameters or the momentum buffer."""

    def make(params):
        return getattr(sg.optim, name)(params, lr=0.05, nonfinite="skip", fused=fused, **kwargs)

    dirty, clean = _run(make, dtype, "nan"), _run(make, dtype, None)
    _assert_same(dirty, clean)
    assert all(torch.isfinite(p).all() for p in dirty[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_an_open_gate_gives_the_ignore_step_bits(name, option, dtype):
    """On finite gradients "skip" computes exactly what "ignore" (torch's behaviour) computes, in
    16-bit floats too (the gated step runs the ungated step's in-place operations on copies)."""
    opts = OPTIONS[name][option]

    def make(mode):
        return lambda params: getattr(sg.optim, name)(
            params, lr=0.05, nonfinite=mode, clip=sg.clip_by_norm(0.5), **opts
        )

    _assert_same(_run(make("skip"), dtype, None), _run(make("ignore"), dtype, None))


def test_ignore_is_torchs_behaviour_and_lets_nan_through():
    params, _ = _run(lambda ps: sg.optim.Adam(ps, lr=0.05), torch.float64, "nan")
    assert torch.isnan(params[1]).any()


@pytest.mark.parametrize("fused", [False, True])
def test_raise_names_the_parameter_and_changes_nothing(fused):
    params = _params(torch.float32)
    opt = sg.optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}], nonfinite="raise", fused=fused)
    for p, g in zip(params, _grads(torch.float32)[0]):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    params[2].grad[1, 1] = math.inf
    with pytest.raises(RuntimeError, match=r"parameter 1 of param group 1 \(shape \(2, 3\)\): 1 of 6 elements"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
    assert opt.state_dict()["state"][0]["step"].item() == 1


def test_nonfinite_is_validated_and_survives_pickling():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid nonfinite value: 'bogus'"):
        sg.optim.RMSprop([p], nonfinite="bogus")
    opt = sg.optim.Transformed([p], sg.chain(sg.scale_by_adam(), sg.scale_by_lr()), nonfinite="skip")
    copy_ = pickle.loads(pickle.dumps(opt))
    assert copy_.nonfinite == "skip" and copy.deepcopy(opt).nonfinite == "skip"
    p.grad = torch.tensor([math.nan, 1.0])
    copy_.param_groups[0]["params"][0].grad = p.grad.clone()
    copy_.step()
    assert torch.equal(copy_.param_groups[0]["params"][0], torch.zeros(2))


# ---- a Clipper's skip in front of any optimizer --------------------------------------------------

TORCH_AND_SG = {
    "torch.AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.05),
    "torch.SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "torch.Adam(fused)": lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),
    "sg.AdamW": lambda ps: sg.optim.AdamW(ps, lr=0.05),
    "sg.RMSprop(fused)": lambda ps: sg.optim.RMSprop(ps, lr=0.05, momentum=0.9, fused=True),
}


@pytest.mark.parametrize("optimizer", list(TORCH_AND_SG))
def test_a_clipper_skip_is_a_skipped_step_for_any_optimizer(optimizer):
    """Clipper(nonfinite="skip") drops the gradients of a skipped step (.grad = None): the next
    opt.step() of torch's optimizers and steadygrad's changes neither parameters nor state."""

    def run(bad):
        params = _params(torch.float32)
        opt = TORCH_AND_SG[optimizer](params)
        clipper = sg.Clipper(params, sg.zclip(warmup_steps=2))
        for step, gs in enumerate(_grads(torch.float32)):
            if step == BAD:
                if bad is None:
                    continue
                gs = [g.clone() for g in gs]
                gs[0][0, 0] = math.nan
            for p, g in zip(params, gs):
                p.grad = g.clone()
            stats = clipper.clip_()
            assert bool(stats.skipped) == (step == BAD)
            opt.step()
        return params, opt, clipper.state_dict()

    (pa, oa, ca), (pb, ob, cb) = run("nan"), run(None)
    _assert_same((pa, oa), (pb, ob))
    for key in ca["shared"]:
        assert torch.equal(ca["shared"][key], cb["shared"][key]), key


def test_finish_window_honours_a_clipper_skip():
    """A window whose gradients the Clipper skipped does not move the optimizer."""
    params = _params(torch.float32)
    opt = sg.optim.AdamW(params, lr=0.05)
    acc = sg.GradAccumulator(params, reduction="sum")
    clipper = sg.Clipper(params, sg.clip_by_norm(1.0))
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(torch.float32)[0]):
        p.grad = g.clone()
    params[0].grad[0, 0] = math.inf
    acc.count()
    end = acc.finish_window(opt, None, clip=clipper)
    assert bool(end.clip.skipped)
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and not opt.state


def test_skip_nonfinite_in_float16_keeps_the_momentum_buffer_finite():
    """skip_nonfinite around RMSprop + momentum in float16: the zeroed bad step computes 0/0 (eps
    rounds to 0); the gate selects, so the momentum buffer and the parameters stay as they were."""

    def make(params):
        chain = sg.chain(sg.scale_by_rms(), sg.trace(0.9), sg.scale_by_lr())
        return sg.optim.Transformed(params, sg.skip_nonfinite(chain), lr=0.05)

    dirty, clean = _run(make, torch.float16, "nan"), _run(make, torch.float16, None)
    _assert_same(dirty, clean, ignore=("group.nonfinite", "group.total"))  # it counts the skip
    assert all(torch.isfinite(p).all() for p in dirty[0])
    assert int(dirty[1].state[dirty[0][0]]["group.total"]) == 1


@pytest.mark.parametrize("fused", [False, True])
def test_load_state_dict_keeps_the_nonfinite_mode(fused, monkeypatch):
    """torch's load_state_dict re-enters __setstate__ with the state and groups only: the
    optimizer's nonfinite="skip" stays, and an inf gradient after loading leaves no trace."""
    monkeypatch.setenv("STEADYGRAD_COMPILE", "0")
    p = torch.nn.Parameter(torch.ones(3))
    opt = sg.optim.AdamW([p], lr=0.1, nonfinite="skip", fused=fused)
    p.grad = torch.ones(3)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = sg.optim.AdamW([q], lr=0.1, nonfinite="skip", fused=fused)
    other.load_state_dict(opt.state_dict())
    assert other.nonfinite == "skip"
    before = q.detach().clone()
    q.grad = torch.tensor([math.inf, 1.0, 1.0])
    other.step()
    assert torch.equal(q.detach(), before) and other.state[q]["step"].item() == 1
