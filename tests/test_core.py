"""The transform core: chain, state layout and storage, the in-place rule, hyperparameter
context, commit gate, and the tensor-list helpers."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch

import steadygrad as sg
from steadygrad.core import Hyper, StepContext, state_leaves
from steadygrad.core.state import SharedDict, StateLayout, state_keys
from steadygrad.core.tensorlist import (
    add_scalar_,
    add_scalars_,
    bias_correction,
    group_by_device_dtype,
    host_scalar,
    mul_scalar_,
)

from ._parity import assert_same_run, clone_params, make_params, train_step

ALL_TRANSFORMS = {
    "scale_by_rss": lambda: sg.scale_by_rss(lr_decay=0.1),
    "scale_by_rms": lambda: sg.scale_by_rms(centered=True),
    "scale_by_adam": lambda: sg.scale_by_adam(amsgrad=True),
    "trace": lambda: sg.trace(0.9, nesterov=True),
    "add_decayed_weights": lambda: sg.add_decayed_weights(0.1),
    "scale": lambda: sg.scale(-0.5),
    "scale_by_lr": lambda: sg.scale_by_lr(lr=0.1),
    "identity": sg.identity,
}


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_in_place_rule_params_are_read_only_and_results_are_what_is_returned(name):
    """Transforms never write params; the returned updates/state are the result, and running on
    copies of the inputs gives the same result as running on the originals."""
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    saved = [p.clone() for p in params]
    t = ALL_TRANSFORMS[name]()
    state_a, state_b = t.init(params), t.init(params)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        out_a, state_a = t.update([g.clone() for g in grads], state_a, params)
        out_b, state_b = t.update(grads, state_b, params)
        for a, b in zip(out_a, out_b):
            assert torch.equal(a, b)
    for p, s in zip(params, saved):
        assert torch.equal(p, s)


def test_in_place_rule_what_a_chain_writes_and_what_it_reads():
    """torch-style memory: Adam reads the gradients it is given and returns new updates, which
    the rest of the chain writes in place; so an optimizer passes .grad without a copy (as
    updates that are not writable). Updates the step owns (writable, the default) Adam may use
    as scratch once its moments are updated; the result is the same."""
    params = [torch.randn(5, dtype=torch.float64)]
    t = sg.chain(sg.scale_by_adam(), sg.add_decayed_weights(0.1), sg.scale_by_lr(lr=0.1))
    assert not t.writes_updates and t.fresh_updates
    updates = [torch.randn(5, dtype=torch.float64)]
    given = updates[0].clone()
    out, _ = t.update(updates, t.init(params), params, StepContext(writable=False))
    assert out[0] is not updates[0] and torch.equal(updates[0], given)
    owned, _ = t.update([given.clone()], t.init(params), params)
    assert torch.equal(owned[0], out[0])
    # coupled weight decay and norm clipping work out of place on updates that are not writable
    for first in (sg.add_decayed_weights(0.1), sg.clip_by_norm(1e-3)):
        t = sg.chain(first, sg.scale_by_adam(), sg.scale_by_lr(lr=0.1))
        assert not t.writes_updates
        out, _ = t.update(updates, t.init(params), params, StepContext(writable=False))
        assert torch.equal(updates[0], given)
        ref, _ = t.update([given.clone()], t.init(params), params)
        assert torch.equal(out[0], ref[0])
    # a chain that starts by writing (moment clipping inside Adam) says so
    assert sg.chain(sg.scale_by_adam(moment_clip=5.0), sg.scale_by_lr()).writes_updates
    t = sg.chain(sg.scale(2.0), sg.scale_by_lr(lr=0.1))
    out, _ = t.update(updates, t.init(params), params)
    assert t.writes_updates and out[0] is updates[0]


def test_chain_composes_in_order():
    params = [torch.ones(2, dtype=torch.float64)]
    t = sg.chain(sg.scale(2.0), sg.add_decayed_weights(1.0), sg.scale(3.0))
    out, state = t.update([torch.tensor([1.0, -1.0], dtype=torch.float64)], t.init(params), params)
    assert out[0].tolist() == [(2 + 1) * 3, (-2 + 1) * 3] and state == ((), (), ())


def test_chain_rejects_non_transforms_and_wrong_state():
    with pytest.raises(TypeError, match="argument 1"):
        sg.chain(sg.identity(), lambda x: x)
    t = sg.chain(sg.identity(), sg.identity())
    with pytest.raises(ValueError, match="2 transforms"):
        t.update([torch.zeros(1)], (sg.EmptyState(),), None)


def test_state_leaves_and_storage_keys_deduplicate_by_position():
    t = sg.chain(sg.scale_by_adam(), sg.chain(sg.trace(0.9), sg.scale_by_rss()))
    template = t.init([])
    assert [path for path, _ in state_leaves(template)] == [(0,), (1, 0), (1, 1)]
    keys = [k.key for k in state_keys(template)]
    assert keys == ["step", "exp_avg", "exp_avg_sq", "momentum_buffer", "1.1.step", "sum"]


class _CountState(NamedTuple):
    calls: torch.Tensor  # shared by all parameters
    seen: list[torch.Tensor]  # per parameter


@dataclass(frozen=True)
class _Counting(sg.Transform):
    """A test transform with one shared and one per-parameter field."""

    def init(self, params):
        return _CountState(torch.zeros(()), [torch.zeros(()) for _ in params])

    def update(self, updates, state, params=None, ctx=None):
        return updates, _CountState(state.calls + 1, [s + 1 for s in state.seen])


_counting = _Counting


def test_shared_and_per_parameter_state_in_an_optimizer_and_its_state_dict():
    params = make_params()
    opt = sg.optim.Transformed(params, sg.chain(_counting(), sg.scale_by_lr()), lr=0.1)
    for step in range(6):
        train_step(params, opt, step)
    assert opt.shared_state()["group0"]["calls"].item() == 6
    assert opt.state[params[0]]["seen"].item() == 6 and opt.state[params[4]]["seen"].item() == 4
    # shared state is replicated in the parameters' entries: opt.state holds parameters only
    assert all(isinstance(k, torch.Tensor) for k in opt.state)
    assert all(opt.state[p]["group.calls"] is opt.state[params[0]]["group.calls"] for p in opt.state)
    sd = opt.state_dict()
    fresh = sg.optim.Transformed(params, sg.chain(_counting(), sg.scale_by_lr()), lr=0.1)
    fresh.load_state_dict(sd)
    train_step(params, fresh, 6)
    assert fresh.shared_state()["group0"]["calls"].item() == 7
    assert all(fresh.state[p]["group.calls"] is fresh.state[params[0]]["group.calls"] for p in fresh.state)


def test_a_layout_returns_new_state_tensors_to_the_store():
    store = defaultdict(dict)
    params = [torch.zeros(2)]
    layout = StateLayout(_counting())
    layout.run(store, params, [torch.ones(2)], SharedDict(store["shared"]))
    layout.run(store, params, [torch.ones(2)], SharedDict(store["shared"]))
    assert store["shared"]["calls"].item() == 2 and store[params[0]]["seen"].item() == 2


@pytest.mark.parametrize("decoupled", [False, True])
def test_transformed_chain_equals_the_named_optimizer(decoupled):
    params_a = make_params()
    params_b = clone_params(params_a)
    named = sg.optim.Adam(params_a, lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)
    parts = [sg.add_decayed_weights(0.1), sg.scale_by_adam()]
    chain = sg.chain(*(parts[::-1] if decoupled else parts), sg.scale_by_lr())
    custom = sg.optim.Transformed(params_b, chain, lr=0.01)
    for step in range(10):
        train_step(params_a, named, step)
        train_step(params_b, custom, step)
    assert_same_run(params_b, custom, params_a, named, rtol=0.0)


def test_scale_by_lr_reads_the_group_and_explains_itself_outside_an_optimizer():
    t = sg.scale_by_lr()
    assert t.lr == Hyper("lr")
    out, _ = t.update([torch.ones(2)], t.init([]), None, StepContext({"lr": 0.5}))
    assert out[0].tolist() == [-0.5, -0.5]
    with pytest.raises(KeyError, match="scale_by_lr"):
        t.update([torch.ones(2)], t.init([]), None)


def test_step_context_resolves_references_and_carries_the_gate_explicitly():
    g = torch.tensor(0.0)
    ctx = StepContext(
        {"lr": torch.tensor([0.5]), "betas": (torch.tensor([[0.9]]), 0.99)}, gate=g, norm=torch.tensor(3.0)
    )
    assert ctx.value(Hyper("lr")).shape == () and ctx.value(2.0) == 2.0
    b1, b2 = ctx.value(Hyper("betas"))
    assert b1.shape == () and b2 == 0.99
    assert ctx.with_gate(None).gate is None and ctx.with_gate(None).norm is None
    given, new = [torch.zeros(1)], [torch.zeros(1)]
    read_only = StepContext(gate=g, norm=torch.tensor(1.0), writable=False)
    assert read_only.after(given, given).gate is g and read_only.after(given, given).norm is None
    assert not read_only.after(given, given).writable and read_only.after(given, new).writable


def test_group_by_device_dtype_keeps_first_seen_order():
    ts = [torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(2), torch.zeros(1, dtype=torch.bfloat16)]
    groups = group_by_device_dtype(ts)
    cpu = torch.device("cpu")
    assert list(groups.items()) == [
        ((cpu, torch.float32), [0, 2]),
        ((cpu, torch.float64), [1]),
        ((cpu, torch.bfloat16), [3]),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixed", [False, True])
def test_scalar_helpers_give_torchs_bits_for_a_python_number(dtype, mixed):
    """mul_scalar_/add_scalar_ pass a number as a 0-d tensor where that gives the same bits (CPU,
    float32/float64, one dtype): the values must equal torch's own number path exactly, also for a
    list mixing dtypes (a float64 tensor among float32 ones must not get a float32 scalar)."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(37, generator=g).to(dtype) for _ in range(3)]
    if mixed:
        ts.append(torch.randn(5, generator=g, dtype=torch.float64))
    for value in (0.99, 1e-8, 1 - 0.999, -3.3e-4, 1.0 / 3.0):
        mine, theirs = [t.clone() for t in ts], [t.clone() for t in ts]
        mul_scalar_(mine, value)
        torch._foreach_mul_(theirs, value)
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), ("mul", value)
        add_scalar_(mine, value)
        torch._foreach_add_(theirs, value)
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), ("add", value)
        add_scalars_(mine, [value] * len(mine))
        torch._foreach_add_(theirs, [value] * len(theirs))
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), ("add list", value)
    # different values per tensor, and a 0-d tensor value that is never read on the host
    mine, theirs = [t.clone() for t in ts], [t.clone() for t in ts]
    add_scalars_(mine, [0.1 * i for i in range(len(mine))])
    torch._foreach_add_(theirs, [0.1 * i for i in range(len(theirs))])
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    add_scalar_(mine, torch.tensor(0.5, dtype=dtype))
    torch._foreach_add_(theirs, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_host_scalar_reads_only_what_costs_no_device_sync():
    assert host_scalar(0.5) == 0.5 and host_scalar(3) == 3
    assert host_scalar(torch.tensor(0.25)) == 0.25
    assert host_scalar(torch.tensor([0.25])) == 0.25
    assert host_scalar(torch.tensor(0.25, requires_grad=True)) is None
    assert host_scalar(torch.tensor([1.0, 2.0])) is None
    assert host_scalar(torch.tensor(0.25, device="meta")) is None


def test_bias_correction_is_double_precision_per_counter():
    steps = [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(40.0)]
    # CPU counters are read as torch.optim reads them: Python floats, torch's very numbers
    got = bias_correction(0.999, steps)
    assert got == [1 - 0.999**1, 1 - 0.999**3, 1 - 0.999**40]
    assert bias_correction(0.9, steps, offset=1)[1] == 1 - 0.9**2
    # a tensor beta: 0-d float64 tensors, nothing read on the host
    got = bias_correction(torch.tensor(0.999, dtype=torch.float64), steps)
    assert all(g.dtype == torch.float64 and g.dim() == 0 for g in got)
    torch.testing.assert_close(torch.stack(got), torch.tensor([1 - 0.999**t for t in (1, 3, 40)], dtype=torch.float64))


def test_a_set_inside_a_param_group_raises_type_error():
    with pytest.raises(TypeError, match="ordered"):
        sg.optim.Adam([{"params": {torch.nn.Parameter(torch.zeros(1))}}])


@pytest.mark.parametrize(
    "make_after",
    [
        lambda: sg.scale_by_adam(),
        lambda: sg.scale_by_rms(centered=True),
        lambda: sg.scale_by_rss(lr_decay=0.1),
        lambda: sg.trace(0.9),
        lambda: sg.chain(sg.add_decayed_weights(0.1), sg.scale_by_adam(amsgrad=True)),
    ],
    ids=["adam", "rms_centered", "rss", "trace", "wd_then_adam"],
)
@pytest.mark.parametrize("writable", [False, True])
def test_a_pending_clip_coefficient_equals_clipping_first(make_after, writable):
    """chain(clip_by_norm, T): the coefficient left pending (StepContext.scale) and folded into
    T, or applied before a T that does not take it, equals clipping a copy and then running T; the
    given updates are written only when writable."""
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    t = sg.chain(sg.clip_by_norm(0.3), make_after())
    clip, after = sg.clip_by_norm(0.3), make_after()
    state_a = t.init(params)
    state_c, state_t = clip.init(params), after.init(params)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        given = [g.clone() for g in grads]
        got, state_a = t.update(given, state_a, params, StepContext(writable=writable))
        if not writable:
            assert all(torch.equal(a, b) for a, b in zip(given, grads))
        clipped, state_c = clip.update([g.clone() for g in grads], state_c, params)
        want, state_t = after.update(clipped, state_t, params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_shared_scalar_tensors_do_not_depend_on_the_first_callers_context():
    """The 0-d scalars that mul_scalar_/add_scalar_ cache are CPU tensors made outside inference
    mode, and no shared tensor is made under a dispatch mode (fake tensors, meta)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    value = 0.123456789
    with torch.device("meta"):
        ts = [torch.ones(3, device="cpu")]
        add_scalar_(ts, value)
    with torch.inference_mode():
        ts2 = [torch.ones(3)]
        mul_scalar_(ts2, value + 1)
    with FakeTensorMode():
        fake = [torch.ones(3)]
        mul_scalar_(fake, value + 2)
    p = torch.nn.Parameter(torch.ones(3))
    opt = sg.optim.Adam([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert opt.state[p]["step"].item() == 3.0
    out = [torch.ones(3, requires_grad=False)]
    add_scalar_(out, value)
    mul_scalar_(out, value + 1)
    mul_scalar_(out, value + 2)
    assert torch.allclose(out[0], torch.full((3,), (1 + value) * (1 + value) * (value + 2)))
