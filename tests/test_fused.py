"""fused=True: the reference transforms compiled over flat buffers give the reference results."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import steadygrad as sg

from ._parity import assert_same_run, clone_params, loss_fn, make_params, max_rel_diff, train_step


def real_params(dtype=torch.float64):
    """The parity model without its complex option, plus a float32 vector in the same group (two
    flat buffers) and a 0-d gain."""
    ps = make_params(dtype=dtype)
    ps.append(torch.nn.Parameter(torch.randn(7, dtype=torch.float32)))
    ps.append(torch.nn.Parameter(torch.tensor(0.5, dtype=dtype)))
    return ps


def step_all(params, opt, step):
    # fused=True keeps gradients in a buffer: a parameter that backward does not reach is stepped
    # with a zero gradient, which is what zero_grad(set_to_none=False) gives the reference path
    opt.zero_grad(set_to_none=False)
    loss = loss_fn(params[:6], step) + (params[6].double() ** 2).sum() * 0.3 + params[7] ** 2
    loss.backward()
    opt.step()


CONFIGS = [
    ("Adam", {"weight_decay": 0.1, "amsgrad": True}),
    ("Adam", {"maximize": True, "eps_in_sqrt": True}),
    ("AdamW", {"lr": 0.01}),
    ("Adam", {"moment_clip": 2.0}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    ("RMSprop", {"moment_clip": 2.0, "maximize": True}),
    ("Adagrad", {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1}),
    ("Adam", {"clip": "value"}),
    ("Adam", {"clip": "norm"}),
    ("RMSprop", {"clip": "moment"}),
    ("AdamW", {"clip": "unit_ratio"}),
    ("Adam", {"clip": "zclip"}),
]
CLIPS = {
    "value": lambda: sg.clip_by_value(0.05),
    "norm": lambda: sg.clip_by_norm(0.3),
    "moment": lambda: sg.clip_by_moment(k=2.0, beta=0.9),
    "unit_ratio": lambda: sg.clip_by_unit_ratio(0.02),
    "zclip": lambda: sg.zclip(warmup_steps=3),
}


def make(name, kwargs, params, **extra):
    kwargs = dict(kwargs)
    if "clip" in kwargs:
        kwargs["clip"] = CLIPS[kwargs["clip"]]()
    groups = [{"params": params[:3] + params[6:]}, {"params": params[3:6], "lr": 0.02}]
    return getattr(sg.optim, name)(groups, **kwargs, **extra)


def ids(configs):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in configs]


@pytest.fixture
def eager_fused(monkeypatch):
    """The fused step without code generation: the same function over the flat buffers."""
    monkeypatch.setenv("STEADYGRAD_COMPILE", "0")


@pytest.fixture
def read_in_place(monkeypatch):
    """Gradients of small models read where autograd wrote them (as those of few big tensors are)."""
    from steadygrad.kernels import fused

    monkeypatch.setattr(fused, "_GIVEN_FROM", 0)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=ids(CONFIGS))
def test_fused_equals_the_reference(eager_fused, name, kwargs):
    ref_params = real_params()
    fused_params = clone_params(ref_params)
    ref = make(name, kwargs, ref_params)
    fused = make(name, kwargs, fused_params, fused=True)
    for step in range(12):
        step_all(ref_params, ref, step)
        with _no_fallback():
            step_all(fused_params, fused, step)
    assert fused._fused.disabled is None and fused._fused.groups
    # float64 to rounding; the float32 vector within float32 rounding (the fused step's
    # hyperparameters are float64 tensors, the reference's Python floats)
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-14, rtol32=1e-6)
    for key in set(ref.state) - {p for p in ref_params}:  # shared state: clip, group statistics
        for name_, value in ref.state[key].items():
            assert max_rel_diff(fused.state[key][name_], value) <= 1e-14, (key, name_)


def test_a_hyperparameter_leaving_zero_selects_another_step(eager_fused):
    """A zero hyperparameter is built into the step as a plain 0 (weight decay then does not read
    the parameters); made non-zero later, it selects a step with its tensor. Both equal the
    reference."""
    ref_params = real_params()
    fused_params = clone_params(ref_params)
    ref = sg.optim.Adam(ref_params, weight_decay=0.0, moment_clip=2.0)
    fused = sg.optim.Adam(fused_params, weight_decay=0.0, moment_clip=2.0, fused=True)
    for step in range(8):
        if step == 4:
            for opt in (ref, fused):
                opt.param_groups[0]["weight_decay"] = 0.1
        step_all(ref_params, ref, step)
        with _no_fallback():
            step_all(fused_params, fused, step)
    assert len(fused._fused._plans) == 2
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-14, rtol32=1e-6)


def test_parameters_gradients_and_state_become_views_of_flat_buffers(eager_fused, read_in_place):
    params = real_params()
    opt = sg.optim.Adam(params, fused=True)
    step_all(params, opt, 0)
    (group,) = opt._fused.groups
    f64, f32 = sorted(group.flats, key=lambda f: f.param_buf.dtype == torch.float32)
    base = f64.param_buf.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in params if p.dtype == torch.float64)
    exp_avg = opt.state[params[0]]["exp_avg"]
    assert exp_avg.untyped_storage().data_ptr() == f64.full["exp_avg"].untyped_storage().data_ptr()
    assert f32.param_buf.dtype == torch.float32 and len(f32.params) == 1
    # few (big) tensors: the gradients stay where autograd wrote them (the step reads them there), and
    # zero_grad(set_to_none=False) zeroes them in place, as torch's
    grads = [p.grad for p in params]
    assert not any(g.untyped_storage().data_ptr() == f64.grad_buf.untyped_storage().data_ptr() for g in grads)
    params[1].grad = None
    opt.zero_grad(set_to_none=False)
    assert params[1].grad is None
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads) if p is not params[1])
    # zero_grad() sets them to None, as torch's
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_many_gradients_are_copied_into_a_flat_buffer(eager_fused):
    """More tensors than a step takes as inputs: their gradients become views of a flat buffer
    (copied in when autograd made new ones); zero_grad(set_to_none=False) zeroes the buffer."""
    params = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(20)]
    opt = sg.optim.Adam(params, fused=True)
    for p in params:
        p.grad = torch.randn(3, dtype=torch.float64)
    opt.step()
    (group,) = opt._fused.groups
    (flat,) = group.flats
    assert all(p.grad is v for p, v in zip(flat.params, flat.grad_views))
    params[1].grad = None
    opt.zero_grad(set_to_none=False)
    assert params[1].grad is None and not flat.grad_buf.any()
    assert all(p.grad is v for p, v in zip(flat.params, flat.grad_views) if p is not params[1])


def test_gradients_set_to_none_by_the_model_are_adopted(eager_fused):
    """A module's zero_grad() (set_to_none) replaces .grad; the next step copies it back."""
    ref_params = real_params()
    fused_params = clone_params(ref_params)
    ref, fused = sg.optim.Adam(ref_params), sg.optim.Adam(fused_params, fused=True)
    for step in range(6):
        for params, opt in ((ref_params, ref), (fused_params, fused)):
            for p in params:
                p.grad = None  # as torch.nn.Module.zero_grad() does
            loss = loss_fn(params[:6], step, all_grads=True) + (params[6].double() ** 2).sum() * 0.3 + params[7] ** 2
            loss.backward()
            with _no_fallback():
                opt.step()
    # float32 as in test_fused_equals_the_reference: whether an element takes a vectorised (FMA)
    # path depends on its buffer, so the 7-element vector may differ in the last bit (with some
    # random draws, i.e. depending on the tests run before)
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-14, rtol32=1e-6)


def test_checkpoints_of_a_fused_optimizer_move_to_torch_and_back(eager_fused):
    params = real_params()
    fused = sg.optim.Adam(params, fused=True, weight_decay=0.1)
    for step in range(5):
        step_all(params, fused, step)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)

    torch_params = clone_params(params)
    torch_opt = torch.optim.Adam(torch_params, weight_decay=0.1)
    buffer.seek(0)
    torch_opt.load_state_dict(torch.load(buffer, weights_only=True))
    resumed_params = clone_params(params)
    resumed = sg.optim.Adam(resumed_params, fused=True, weight_decay=0.1)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(5, 10):
        step_all(params, fused, step)
        step_all(torch_params, torch_opt, step)
        step_all(resumed_params, resumed, step)
    assert_same_run(resumed_params, resumed, params, fused, rtol=1e-14)
    for a, b in zip(params, torch_params):
        # float32: the fused step runs the vector in a larger buffer, where other elements take
        # the vectorised (FMA) path of an operation than in torch's 7-element tensor
        assert max_rel_diff(a.detach(), b.detach()) <= (1e-6 if a.dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda ps: sg.optim.Adam(ps, fused=True, clip=sg.clip_update_rms(1.0)), "whole tensors"),
        (lambda ps: sg.optim.Adam(ps, fused=True, clip=sg.clip_by_norm(1.0, scope="tensor")), "whole tensors"),
    ],
    ids=["update_rms", "norm-per-tensor"],
)
def test_transforms_that_need_whole_tensors_take_the_reference_path(eager_fused, setup, reason):
    ref_params = real_params()
    fused_params = clone_params(ref_params)
    fused = setup(fused_params)
    ref = type(fused)(ref_params, clip=fused.clip)
    with pytest.warns(UserWarning, match=reason):
        for step in range(4):
            step_all(fused_params, fused, step)
    for step in range(4):
        step_all(ref_params, ref, step)
    assert_same_run(fused_params, fused, ref_params, ref, rtol=0.0)


def test_a_parameter_that_gains_a_gradient_is_laid_out_again(eager_fused):
    """A parameter frozen at the first fused step and unfrozen later is outside the flat buffers:
    the buffers are laid out again with it, and it steps from count 0 while the others go on from
    theirs (a segmented step), without leaving the fused path."""
    ref_params = real_params()
    fused_params = clone_params(ref_params)
    ref, fused = sg.optim.Adam(ref_params), sg.optim.Adam(fused_params, fused=True)
    for params in (ref_params, fused_params):
        params[3].requires_grad_(False)
    with _no_fallback():
        for step in range(6):
            if step == 3:
                for params in (ref_params, fused_params):
                    params[3].requires_grad_(True)
            step_all(ref_params, ref, step)
            step_all(fused_params, fused, step)
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-14, rtol32=1e-6)
    assert fused.state[fused_params[3]]["step"].item() == ref.state[ref_params[3]]["step"].item() == 3
    assert fused.state[fused_params[0]]["step"].item() == 6
    assert fused_params[3].untyped_storage().data_ptr() == fused_params[4].untyped_storage().data_ptr()


def test_complex_parameters_take_the_reference_path(eager_fused):
    params = make_params(complex_=True)
    opt = sg.optim.Adam(params, fused=True)
    with pytest.warns(UserWarning, match="complex"):
        train_step(params, opt, 0)
    assert opt._fused.disabled


def test_no_recompiles_across_a_one_cycle_schedule(monkeypatch):
    """100 steps of OneCycleLR (lr and beta1 change every step): one graph, traced once."""
    monkeypatch.setenv("STEADYGRAD_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    params = real_params(torch.float32)
    opt = sg.optim.Adam(params, fused=True, moment_clip=3.0, clip=sg.clip_by_norm(1.0))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=101)
    counters = torch._dynamo.utils.counters
    counters.clear()
    lrs, beta1s = set(), set()
    for step in range(100):
        step_all(params, opt, step)
        sched.step()
        lrs.add(opt.param_groups[0]["lr"])
        beta1s.add(opt.param_groups[0]["betas"][0])
    assert len(lrs) > 90 and len(beta1s) > 90  # the schedule moved both at every step
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


def test_hyperparameters_edited_between_steps_are_read(eager_fused):
    """Numbers the groups hold are copied into the step's tensors only when they changed (a new
    Python object); a tensor ``lr`` changed in place, a value set back to an earlier object and a
    replaced ``betas`` tuple are all read, as by the reference path."""
    ref_params = real_params()
    fused_params = clone_params(ref_params)
    ref = make("Adam", {"weight_decay": 0.1}, ref_params)
    fused = make("Adam", {"weight_decay": 0.1}, fused_params, fused=True)
    first_lr = ref.param_groups[0]["lr"]
    tensor_lrs = [torch.tensor(0.003, dtype=torch.float64) for _ in range(2)]

    def edit(opt, step, tensor_lr):
        group = opt.param_groups[0]
        if step == 2:
            group["lr"] = 0.5 * first_lr
        elif step == 4:
            group["lr"] = first_lr  # the object written at step 0, not the last one
        elif step == 5:
            group["betas"] = (0.8, 0.95)
        elif step == 6:
            group["lr"] = tensor_lr
        elif step == 8:
            tensor_lr.fill_(0.001)  # in place: the same object, another value

    for step in range(10):
        for params, opt, tensor_lr in ((ref_params, ref, tensor_lrs[0]), (fused_params, fused, tensor_lrs[1])):
            edit(opt, step, tensor_lr)
            step_all(params, opt, step)
    assert fused._fused.groups is not None and fused._fused.disabled is None
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-14, rtol32=1e-6)


COMPILED = [
    ("Adam", {"moment_clip": 2.0, "weight_decay": 0.1}, (torch.float64, torch.float32)),
    # a zero weight decay built in as 0; the count shares the update's loop
    ("RMSprop", {"moment_clip": 2.0, "centered": True}, (torch.float64,)),
    # a unit-wise step: AGC over the unit-class views
    ("AdamW", {"clip": "unit_ratio"}, (torch.float64,)),
]


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "read_in_place"])
@pytest.mark.parametrize(("name", "kwargs", "dtypes"), COMPILED, ids=ids([(n, k) for n, k, _ in COMPILED]))
def test_compiled_step_equals_the_reference(name, kwargs, dtypes, in_place, monkeypatch):
    """The real inductor path (C++ on this machine): float64 to 1e-12, float32 to 1e-6; with the
    new gradients of every step (zero_grad()) copied into the buffer, or read where they are."""
    from steadygrad.kernels import fused as fused_module

    monkeypatch.setattr(fused_module, "_GIVEN_FROM", 0 if in_place else 1 << 62)
    for dtype in dtypes:
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        ref_params = make_params(dtype=dtype)[:5]
        fused_params = clone_params(ref_params)
        cls = getattr(sg.optim, name)
        clip = {"clip": CLIPS[kwargs["clip"]]()} if "clip" in kwargs else {}
        plain = {k: v for k, v in kwargs.items() if k != "clip"}
        ref = cls(ref_params, lr=0.01, **plain, **clip)
        fused = cls(fused_params, lr=0.01, fused=True, **plain, **clip)
        for step in range(10):
            for params, opt in ((ref_params, ref), (fused_params, fused)):
                opt.zero_grad()
                loss_fn(params + [torch.zeros(0, 2, dtype=dtype, requires_grad=True)], 3 * step).backward()
                with warnings.catch_warnings():
                    warnings.filterwarnings("error", message="torch.compile failed")
                    opt.step()
        assert fused._fused.disabled is None
        assert all(given == in_place for _, _, given in fused._fused._plans)
        assert_same_run(fused_params, fused, ref_params, ref, rtol=tol)


class _no_fallback:
    """Turns the fused path's fallback warning into an error inside the block."""

    def __enter__(self):

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("error", message="fused=True falls back")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def test_bad_fused_values_do_not_break_construction():
    assert sg.optim.Adam(make_params(), fused=False)._fused is None
    assert sg.optim.RMSprop(make_params(), fused=True)._fused is not None
    assert math.isfinite(1.0)


def test_many_fused_optimizers_in_one_process_each_compile(monkeypatch):
    """Each plan has its own code object: twelve optimizers with different shapes do not exhaust
    dynamo's per-code-object cache (8) and none falls back to eager."""

    monkeypatch.setenv("STEADYGRAD_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in range(1, 13):
            params = [torch.nn.Parameter(torch.randn(n, 3))]
            params[0].grad = torch.ones_like(params[0])
            opt = sg.optim.Adam(params, fused=True)
            opt.step()
            opt.step()
            assert opt._fused.disabled is None


SUBSET_CONFIGS = [
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1, "moment_clip": 2.0}),
    ("AdamW", {"maximize": True}),
    ("Adagrad", {"lr_decay": 0.01}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "moment_clip": 2.0}),
    ("Adam", {"clip": "norm"}),
    ("RMSprop", {"clip": "moment"}),
    ("Adam", {"clip": "zclip", "nonfinite": "skip"}),
]


@pytest.mark.parametrize(("name", "kwargs"), SUBSET_CONFIGS, ids=ids(SUBSET_CONFIGS))
def test_parameters_without_a_gradient_are_not_stepped(name, kwargs, read_in_place):
    """torch's semantics on the inductor path: random per-step subsets of parameters without a
    gradient are not stepped (value, state, step count, clip statistics), as by the reference path
    and torch, in two groups and two dtypes, and the fused path stays on (a segmented step)."""
    g = torch.Generator().manual_seed(7)
    shapes = [(6, 3), (3,), (4, 2), (), (5,), (2, 2)]
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    runs = {}
    kinds = (
        ("reference", "fused")
        if "clip" in kwargs or "moment_clip" in kwargs or "nonfinite" in kwargs
        else ("torch", "reference", "fused")
    )
    for kind in kinds:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        params[5].data = params[5].data.float()
        groups = [{"params": params[:3] + params[5:]}, {"params": params[3:5], "lr": 0.02}]
        if kind == "torch":
            opt = getattr(torch.optim, name)(groups, lr=0.05, **kwargs)
        else:
            opt = make_subset(name, kwargs, groups, fused=kind == "fused")
        rng = torch.Generator().manual_seed(3)
        with _no_fallback():
            for step in range(9):
                present = torch.rand(len(params), generator=rng) > (0.0 if step < 2 else 0.4)
                present[4] = present[4] and step > 1  # first stepped after the buffers are built
                for p, keep in zip(params, present):
                    p.grad = torch.randn(p.shape, generator=rng, dtype=p.dtype) if keep else None
                if step == 5 and kwargs.get("nonfinite") == "skip" and params[0].grad is not None:
                    params[0].grad[0, 0] = math.inf
                opt.step()
        runs[kind] = (params, opt)
    # a global norm over float64 and float32 gradients: compiled, the float32 ones accumulate in
    # float64 (core.norms), eagerly in float32, which moves the clipping coefficient by ~1e-9 and
    # the moments by up to ~4e-8 and ZClip's variance of the norms by ~1e-7 (as before any
    # parameter went without a gradient)
    rtol = 1e-6 if kwargs.get("clip") in ("norm", "zclip") else 1e-13
    for kind in kinds[:-1]:
        assert_same_run(runs["fused"][0], runs["fused"][1], runs[kind][0], runs[kind][1], rtol=rtol, rtol32=1e-6)
    fused = runs["fused"][1]._fused
    assert fused.disabled is None and any(segmented for _, segmented, _ in fused._plans)


def make_subset(name, kwargs, groups, fused):
    kwargs = dict(kwargs)
    if "clip" in kwargs:
        kwargs["clip"] = CLIPS[kwargs["clip"]]()
    return getattr(sg.optim, name)(groups, lr=0.05, fused=fused, **kwargs)


def test_replaced_parameter_data_is_adopted(eager_fused):
    """p.data = ... and vector_to_parameters after fused steps: the new values are stepped (the
    buffers are laid out again), as by the reference path."""
    ref_params = real_params()
    fused_params = clone_params(ref_params)
    ref, fused = sg.optim.Adam(ref_params, lr=0.05), sg.optim.Adam(fused_params, lr=0.05, fused=True)
    for step in range(6):
        if step == 2:
            for params in (ref_params, fused_params):
                with torch.no_grad():
                    params[0].data = params[0].data * 2
        if step == 4:
            for params in (ref_params, fused_params):
                vec = torch.nn.utils.parameters_to_vector(params[:2]) + 1
                torch.nn.utils.vector_to_parameters(vec, params[:2])
        step_all(ref_params, ref, step)
        with _no_fallback():
            step_all(fused_params, fused, step)
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-14, rtol32=1e-6)


def test_a_group_mixing_dtypes_with_a_scalar_parameter(eager_fused):
    """bfloat16 weights and a float32 0-d gain in one group (two flat buffers): the gain's counter
    is told from its per-element state, and both equal the reference."""

    def make_params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(5, 4).bfloat16()), torch.nn.Parameter(torch.tensor(0.7))]

    ref_params, fused_params = make_params(), make_params()
    ref, fused = sg.optim.Adam(ref_params, lr=0.05), sg.optim.Adam(fused_params, lr=0.05, fused=True)
    for step in range(4):
        for params, opt in ((ref_params, ref), (fused_params, fused)):
            opt.zero_grad(set_to_none=False)
            (params[0].float().sum() * params[1] * (step + 1)).backward()
            with _no_fallback():
                opt.step()
    for a, b in zip(fused_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert fused.state[fused_params[1]]["step"].item() == 4.0


def test_unbounded_autoclip_compiles_a_handful_of_times():
    """AutoClip's unbounded history doubles outside the compiled step (Transform.reserve): 150
    steps compile for 64, 128 and 256 slots, not once a step, and equal the reference path."""
    from torch._dynamo.utils import counters

    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(10)) for _ in range(3)]
        opt = sg.optim.Adam(params, lr=0.01, clip=sg.autoclip(), fused=fused)
        counters.clear()
        for step in range(150):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(10, generator=g)
            with _no_fallback():
                opt.step()
        runs[fused] = (params, opt, counters["stats"]["unique_graphs"])
    (fp, fopt, graphs), (rp, _, _) = runs[True], runs[False]
    assert graphs == 3 and fopt._fused.disabled is None
    assert fopt.shared_state()["clip"]["norm_history"].shape == (256,)
    for a, b in zip(fp, rp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_wrapped_autoclip_makes_room_too():
    """skip_nonfinite(autoclip()) as clip=, fused: reserve() reaches the history inside the
    wrapper, so no norm is dropped once the first 64 slots are full."""
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(10)) for _ in range(2)]
        opt = sg.optim.Adam(params, lr=0.01, clip=sg.skip_nonfinite(sg.autoclip(50.0)), fused=fused)
        for step in range(70):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(10, generator=g)
            opt.step()
        runs[fused] = (params, opt.shared_state()["clip"])
    (fp, fs), (rp, rs) = runs[True], runs[False]
    assert fs["norm_history"].shape == rs["norm_history"].shape == (128,)
    torch.testing.assert_close(fs["threshold"], rs["threshold"], rtol=1e-6, atol=0)
    for a, b in zip(fp, rp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_autoclip_compiled_by_hand_grows_by_a_slot_per_call():
    """Compiled outside the fused executor (nobody made room), the unbounded history still keeps
    every norm."""
    t = sg.autoclip()
    params = [torch.zeros(4)]
    state = t.init(params)
    step = torch.compile(lambda u, s: t.update(u, s, params), fullgraph=True, backend="eager")
    for i in range(70):
        _, state = step([torch.full((4,), float(i + 1))], state)
    assert int(state.num_norms) == 70 and int(torch.isfinite(state.norm_history).sum()) == 70


@pytest.mark.parametrize(
    "edit",
    ["step in place", "step replaced", "exp_avg replaced", "exp_avg in place", "steps set apart", "state cleared"],
)
def test_state_edited_by_the_user_is_what_the_next_step_reads(eager_fused, edit):
    """torch reads opt.state at every step: a warm restart that zeroes `step`, or a moment
    replaced or reset, changes the next step. The fused path notices (identity checks of the
    entries, the counters' version) and lays its buffers out again or re-reads the counters;
    counters set apart take segmented steps, without leaving the fused path."""

    def run(make):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, dtype=torch.float64)) for _ in range(3)]
        opt = make(params)
        for i in range(4):
            for p in params:
                p.grad = torch.randn(5, dtype=torch.float64)
            opt.step()
            if i == 1 and edit == "state cleared":
                opt.state.clear()  # torch starts the moments and counters again
            elif i == 1:
                for k, p in enumerate(params):
                    state = opt.state[p]
                    if edit == "step in place":
                        state["step"].zero_()
                    elif edit == "step replaced":
                        state["step"] = torch.tensor(0.0)
                    elif edit == "exp_avg replaced":
                        state["exp_avg"] = torch.ones(5, dtype=torch.float64)
                    elif edit == "exp_avg in place":
                        state["exp_avg"].mul_(-1)
                    else:
                        state["step"].fill_(k)
        return params, opt

    theirs, ref = run(lambda ps: torch.optim.Adam(ps, lr=0.1))
    with _no_fallback():
        ours, opt = run(lambda ps: sg.optim.Adam(ps, lr=0.1, fused=True))
    assert opt._fused.disabled is None
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=0)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item()


def _absent_runs(make, schedule, shapes, seed=0):
    """(params, optimizer) after the steps of ``schedule`` (per step, the indices of the parameters
    that get a gradient), for the reference path and the fused one."""
    runs = []
    for fused in (False, True):
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
        opt = make(params, fused)
        with _no_fallback():
            for t, have in enumerate(schedule):
                opt.zero_grad()
                for i in have:
                    params[i].grad = torch.randn(shapes[i], generator=g, dtype=torch.float64) * (t + 1)
                opt.step()
        runs.append((params, opt))
    return runs


ABSENT_CASES = {
    # weight decay makes the updates of a parameter not stepped non-zero before moment_clip counts
    "moment_clip_fraction": (
        lambda ps, f: sg.optim.Adam(ps, lr=0.1, weight_decay=1.0, moment_clip=1.0, fused=f),
        [(0, 1), (0, 1), (1,), (0, 1)],
        [(100,), (4,)],
    ),
    # a norm clip inside a chain sees the Adam updates of every parameter in the buffer
    "norm_clip_in_a_chain": (
        lambda ps, f: sg.optim.Transformed(
            ps, sg.chain(sg.scale_by_adam(), sg.clip_by_norm(0.5), sg.scale_by_lr()), lr=0.1, fused=f
        ),
        [(0, 1), (0,), (0, 1)],
        [(4,), (4,)],
    ),
    # a group none of whose parameters has a gradient keeps its shared state (AutoClip's history)
    "group_without_gradients": (
        lambda ps, f: sg.optim.Transformed(
            [{"params": ps[:1]}, {"params": ps[1:]}],
            sg.chain(sg.autoclip(percentile=50), sg.scale_by_lr()),
            lr=0.1,
            fused=f,
        ),
        [(0, 1), (0, 1), (0,), (0, 1)],
        [(8,), (4,)],
    ),
}


@pytest.mark.parametrize("case", list(ABSENT_CASES))
def test_parameters_without_a_gradient_leave_chain_statistics_as_the_reference(eager_fused, case):
    """A chain with shared state (a statistic, a norm clip) takes the reference path at a step
    where a gradient is missing: in the buffers, a parameter not stepped still has updates after
    weight decay or Adam's old moments, which the chain's reductions would see."""
    make, schedule, shapes = ABSENT_CASES[case]
    (ref_params, ref), (fused_params, fused) = _absent_runs(make, schedule, shapes)
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-13)
    for key in set(ref.state) - set(ref_params):
        for name_, value in ref.state[key].items():
            assert max_rel_diff(fused.state[key][name_], value) <= 1e-13, (key, name_)


def test_no_state_is_made_for_parameters_never_stepped(eager_fused):
    """Adagrad makes its state in the constructor; a parameter that never gets a gradient is still
    not laid into the buffers, and gets no clip= state, as on the reference path."""
    (ref_params, ref), (fused_params, fused) = _absent_runs(
        lambda ps, f: sg.optim.Adagrad(ps, lr=0.1, clip=sg.clip_by_moment(), fused=f), [(0,), (0,)], [(3,), (3,)]
    )
    assert sorted(fused.state[fused_params[1]]) == sorted(ref.state[ref_params[1]]) == ["step", "sum"]
    assert_same_run(fused_params, fused, ref_params, ref, rtol=1e-13)
