"""The commit gate: a closed gate leaves every optimizer transform's state bit-for-bit unchanged,
an open one gives the ungated result, and skip_nonfinite makes a whole optimizer skip a NaN step
without a host sync."""

from __future__ import annotations

import pytest
import torch

import steadygrad as sg
from steadygrad.core import StepContext, state_leaves
from steadygrad.transforms.safety import skip_nonfinite

from ._parity import assert_same_run, clone_params, make_params, train_step

STATEFUL = {
    "scale_by_rss": lambda: sg.scale_by_rss(initial_accumulator_value=0.1, lr_decay=0.1),
    "scale_by_rms": lambda: sg.scale_by_rms(alpha=0.9),
    "scale_by_rms-centered": lambda: sg.scale_by_rms(alpha=0.9, centered=True, eps_in_sqrt=True),
    "scale_by_adam": lambda: sg.scale_by_adam(betas=(0.8, 0.95)),
    "scale_by_adam-amsgrad": lambda: sg.scale_by_adam(amsgrad=True),
    "trace": lambda: sg.trace(0.9),
    "trace-nesterov": lambda: sg.trace(0.9, nesterov=True),
}


def _flat_state(state):
    out = []
    for _, leaf in state_leaves(state):
        for value in leaf:
            if isinstance(value, list):
                out.extend(t.clone() for t in value)
            elif value is not None:
                out.append(value.clone())
    return out


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("name", STATEFUL)
def test_closed_gate_leaves_state_bit_for_bit(name):
    t = STATEFUL[name]()
    params = _grads(0)
    state = t.init(params)
    for step in range(3):
        _, state = t.update(_grads(step + 1), state, params)
    before = _flat_state(state)
    _, state = t.update([torch.zeros_like(p) for p in params], state, params, StepContext(gate=torch.tensor(0.0)))
    after = _flat_state(state)
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", STATEFUL)
def test_open_gate_equals_no_gate(name):
    t = STATEFUL[name]()
    params = _grads(0)
    state_a, state_b = t.init(params), t.init(params)
    for step in range(4):
        grads = _grads(step + 10)
        out_a, state_a = t.update([g.clone() for g in grads], state_a, params)
        out_b, state_b = t.update([g.clone() for g in grads], state_b, params, StepContext(gate=torch.tensor(1.0)))
        for a, b in zip(out_a, out_b):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    for a, b in zip(_flat_state(state_a), _flat_state(state_b)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam"])
def test_skip_nonfinite_optimizer_skips_a_nan_step_without_trace(name):
    """A Transformed optimizer wrapped in skip_nonfinite: inserting a NaN step changes nothing."""
    chains = {
        "Adagrad": lambda: sg.chain(sg.scale_by_rss(), sg.scale_by_lr()),
        "RMSprop": lambda: sg.chain(sg.scale_by_rms(centered=True), sg.trace(0.5), sg.scale_by_lr()),
        "Adam": lambda: sg.chain(sg.scale_by_adam(amsgrad=True), sg.add_decayed_weights(0.1), sg.scale_by_lr()),
    }
    params_a = make_params()
    params_b = clone_params(params_a)
    opt_a = sg.optim.Transformed(params_a, skip_nonfinite(chains[name]()), lr=0.01)
    opt_b = sg.optim.Transformed(params_b, skip_nonfinite(chains[name]()), lr=0.01)
    for step in range(10):
        train_step(params_a, opt_a, step)
        if step == 4:  # an extra step whose gradient has a NaN
            opt_b.zero_grad()
            for p in params_b:
                p.grad = torch.zeros_like(p)
            params_b[0].grad[0, 0] = float("nan")
            opt_b.step()
            assert opt_b.shared_state()["group0"]["total"].item() == 1
        train_step(params_b, opt_b, step)
    assert not any(torch.isnan(p).any() for p in params_b)
    # everything as if the NaN step had not happened, but skip_nonfinite's own count of it
    assert_same_run(params_b, opt_b, params_a, opt_a, rtol=0.0, ignore=("group.total",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("size", [10, 20_000], ids=["foreach", "aminmax"])
@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")], ids=["finite", "inf", "-inf", "nan"])
def test_all_finite_on_large_and_small_tensors(dtype, size, bad):
    """Both ways of finding the extremes (aminmax from 16384 elements, a foreach infinity norm
    below) see +inf, -inf and NaN anywhere, next to complex and other-dtype tensors."""
    from steadygrad.core.gate import all_finite, count_nonfinite

    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(size, generator=g).to(dtype),
        torch.randn(3, dtype=torch.complex64, generator=g),
        torch.randn(7, generator=g).to(dtype),
    ]
    if bad is not None:
        tensors[0][size // 3] = bad
    ok = all_finite(tensors)
    assert ok.dtype == torch.bool and bool(ok) == (bad is None)
    assert int(count_nonfinite(tensors)) == (0 if bad is None else 1)
    # A finite float64 extreme beyond float32's range is finite.
    assert bool(all_finite([torch.full((size,), 1e300, dtype=torch.float64), torch.ones(2)]))
