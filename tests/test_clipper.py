"""Clipper: ClipStats values, non-finite handling (skip leaves no trace, raise names the
parameter), the commit argument, state_dict round trips; and the skip_nonfinite wrapper."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from steadygrad.clipper import Clipper, ClipStats
from steadygrad.core.transform import StepContext, chain
from steadygrad.transforms.clipping import (
    clip_by_moment,
    clip_by_norm,
    clip_by_unit_ratio,
    clip_by_value,
    clip_update_rms,
)
from steadygrad.transforms.safety import SkipNonfiniteState, skip_nonfinite

F64 = torch.float64
SHAPES = [(4, 3), (4,), (2, 4), (2,)]


def _params(shapes=SHAPES, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _set_grads(params, step, missing=True):
    """Gradients of one step; the last parameter has none on every third step."""
    g = torch.Generator().manual_seed(500 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + (step % 4))
        p.grad = None if (missing and i == len(params) - 1 and step % 3 == 2) else grad


def _state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _state_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


STATEFUL = {
    "moment": lambda: clip_by_moment(k=1.2, beta=0.9),
    "value+moment": lambda: [clip_by_value(2.5), clip_by_moment(k=1.5, beta=0.95)],
    "norm": lambda: clip_by_norm(3.0),
    "tensor-norm": lambda: clip_by_norm(1.5, norm_type=1.0, scope="tensor"),
    "agc": lambda: clip_by_unit_ratio(0.3),
    "update-rms": lambda: clip_update_rms(1.2),
    "skip_nonfinite(moment)": lambda: skip_nonfinite(clip_by_moment(k=1.2, beta=0.9)),
}


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


def test_params_like_torch():
    ps = _params()
    with pytest.raises(TypeError, match="set"):
        Clipper(set(ps), clip_by_value(1.0))
    with pytest.raises(ValueError, match="twice"):
        Clipper([ps[0], ps[1], ps[0]], clip_by_value(1.0))
    with pytest.raises(TypeError, match="tensors"):
        Clipper([1.0], clip_by_value(1.0))
    with pytest.raises(ValueError, match="nonfinite"):
        Clipper(ps, clip_by_value(1.0), nonfinite="warn")
    with pytest.raises(TypeError, match="Transform"):
        Clipper(ps, "clip_by_value")
    assert Clipper(ps[0], clip_by_value(1.0)).params == [ps[0]]
    named = Clipper([("a", ps[0]), ("b", ps[1])], [clip_by_value(1.0), clip_by_norm(1.0)])
    assert named.names == ["a", "b"] and named.params == ps[:2]


# --------------------------------------------------------------------------------------------
# ClipStats against hand-computed values
# --------------------------------------------------------------------------------------------


def _two():
    w = torch.nn.Parameter(torch.zeros(1, 2, dtype=F64))
    b = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    unused = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    w.grad = torch.tensor([[3.0, 4.0]], dtype=F64)
    b.grad = torch.tensor([12.0], dtype=F64)
    return w, b, unused


def test_clip_stats_norm_clipping_by_hand():
    w, b, unused = _two()
    stats = Clipper([w, b, unused], clip_by_norm(6.5)).clip_()
    c = 6.5 / (13.0 + 1e-6)
    assert isinstance(stats, ClipStats)
    assert stats.norm.item() == pytest.approx(13.0, rel=1e-15)
    assert stats.clipped_norm.item() == pytest.approx(13.0 * c, rel=1e-14)
    assert stats.fraction_clipped.dtype == torch.float32 and stats.fraction_clipped.item() == 1.0
    assert stats.nonfinite.dtype == torch.int64 and stats.nonfinite.item() == 0
    assert stats.skipped.dtype == torch.bool and not stats.skipped.item()
    torch.testing.assert_close(w.grad, torch.tensor([[3 * c, 4 * c]], dtype=F64), rtol=1e-15, atol=0)
    assert unused.grad is None


def test_clip_stats_value_clipping_by_hand():
    w, b, _ = _two()
    stats = Clipper([w, b], clip_by_value(3.5)).clip_()
    assert torch.equal(w.grad, torch.tensor([[3.0, 3.5]], dtype=F64))
    assert torch.equal(b.grad, torch.tensor([3.5], dtype=F64))
    assert stats.norm.item() == 13.0
    assert stats.clipped_norm.item() == pytest.approx(math.sqrt(9 + 3.5**2 + 3.5**2), rel=1e-15)
    assert torch.equal(stats.fraction_clipped, torch.tensor(2 / 3, dtype=torch.float32))


def test_clip_stats_nonfinite_and_commit_by_hand():
    w, b, _ = _two()
    w.grad = torch.tensor([[math.nan, -math.inf]], dtype=F64)
    clipper = Clipper([w, b], clip_by_value(3.5))
    stats = clipper.clip_()
    assert stats.nonfinite.item() == 2 and stats.skipped.item()
    assert math.isnan(stats.norm.item())
    assert stats.clipped_norm.item() == 0.0 and stats.fraction_clipped.item() == 0.0
    assert w.grad is None and b.grad is None  # any optimizer's next step skips them
    # a finite step that the caller will not take (GradScaler skip): commit = 0
    w.grad = torch.tensor([[3.0, 4.0]], dtype=F64)
    b.grad = torch.tensor([12.0], dtype=F64)
    stats = clipper.clip_(commit=torch.tensor(0.0))
    assert stats.nonfinite.item() == 0 and stats.skipped.item()
    assert stats.norm.item() == 13.0 and stats.clipped_norm.item() == 0.0
    assert w.grad is None and b.grad is None
    # without "skip" a step the caller will not take is zeroed on the device (no host read)
    w.grad = torch.tensor([[3.0, 4.0]], dtype=F64)
    b.grad = torch.tensor([12.0], dtype=F64)
    stats = Clipper([w, b], clip_by_value(3.5), nonfinite="ignore").clip_(commit=torch.tensor(0.0))
    assert stats.skipped.item() and torch.equal(b.grad, torch.zeros(1, dtype=F64))
    w.grad = torch.tensor([[3.0, 4.0]], dtype=F64)
    b.grad = torch.tensor([12.0], dtype=F64)
    assert clipper.state["shared"]["fraction_clipped"].item() == 0.0  # nothing committed yet
    stats = clipper.clip_(commit=torch.tensor(1.0))
    assert not stats.skipped.item() and stats.fraction_clipped.item() == pytest.approx(2 / 3)


def test_ignore_mode_lets_nonfinite_through_but_counts_it():
    w, b, _ = _two()
    w.grad = torch.tensor([[math.inf, 1.0]], dtype=F64)
    stats = Clipper([w, b], clip_by_value(3.5), nonfinite="ignore").clip_()
    assert stats.nonfinite.item() == 1 and not stats.skipped.item()
    assert torch.equal(w.grad, torch.tensor([[3.5, 1.0]], dtype=F64))


# --------------------------------------------------------------------------------------------
# A skipped step leaves no trace
# --------------------------------------------------------------------------------------------


def _run(make, bad_steps: dict[int, str], steps: int = 10):
    """Runs ``steps`` good steps; ``bad_steps[i]`` inserts a bad step before good step i."""
    params = _params()
    clipper = Clipper(params, make(), nonfinite="skip")
    outputs = []
    for step in range(steps):
        if step in bad_steps:
            _set_grads(params, step + 1000, missing=False)
            commit = None
            if bad_steps[step] == "nan":
                params[0].grad[1, 2] = math.nan
                params[2].grad[0, 0] = math.inf
            else:
                commit = torch.tensor(0.0)
            stats = clipper.clip_(commit=commit)
            assert stats.skipped.item()
            assert all(p.grad is None for p in params)
        _set_grads(params, step)
        stats = clipper.clip_(commit=torch.tensor(1.0) if step % 2 else None)
        assert not stats.skipped.item()
        outputs.append([None if p.grad is None else p.grad.clone() for p in params] + [stats])
    return outputs, clipper.state_dict()


@pytest.mark.parametrize("kind", ["nan", "commit"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_skipped_step_leaves_no_trace(name, kind):
    make = STATEFUL[name]
    clean, clean_state = _run(make, {})
    dirty, dirty_state = _run(make, {4: kind, 5: kind, 8: kind})
    for a, b in zip(clean, dirty):
        for x, y in zip(a[:-1], b[:-1]):
            assert (x is None and y is None) or torch.equal(x, y)
        for x, y in zip(a[-1], b[-1]):
            assert torch.equal(x, y)
    _state_equal(clean_state, dirty_state)
    assert clean_state["shared"]  # there is state to compare


def test_skip_is_not_trivially_equal():
    """The comparison above can fail: a run where the bad step is *not* skipped differs."""
    params = _params()
    a = Clipper(params, clip_by_moment(k=1.2, beta=0.9))
    b = Clipper(params, clip_by_moment(k=1.2, beta=0.9))
    _set_grads(params, 0)
    a.clip_()
    _set_grads(params, 0)
    b.clip_()
    _set_grads(params, 1000, missing=False)
    b.clip_()  # a finite extra step counts
    assert not torch.equal(a.state[params[0]]["nu"], b.state[params[0]]["nu"])


# --------------------------------------------------------------------------------------------
# nonfinite="raise"
# --------------------------------------------------------------------------------------------


def test_raise_names_the_parameter_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    clipper = Clipper(model.named_parameters(), clip_by_moment(), nonfinite="raise")
    model(torch.randn(5, 3, dtype=F64)).sum().backward()
    clipper.clip_()
    model(torch.randn(5, 3, dtype=F64)).sum().backward()
    model[1].bias.grad[0] = math.nan
    grads = [p.grad.clone() for p in model.parameters()]
    before = copy.deepcopy(clipper.state_dict())
    with pytest.raises(RuntimeError, match=r"'1\.bias' \(index 3, shape \(2,\)\)"):
        clipper.clip_()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    _state_equal(before, clipper.state_dict())
    unnamed = Clipper(list(model.parameters()), clip_by_value(1.0), nonfinite="raise")
    with pytest.raises(RuntimeError, match=r"parameter 3 \(shape \(2,\)\)"):
        unnamed.clip_()


# --------------------------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moment", "value+moment", "skip_nonfinite(moment)", "agc"])
def test_state_dict_round_trip_resumes_exactly(name):
    make = STATEFUL[name]
    params = _params()
    clipper = Clipper(params, make())
    for step in range(5):
        _set_grads(params, step)
        clipper.clip_()
    buffer = io.BytesIO()
    torch.save(clipper.state_dict(), buffer)
    expected = []
    for step in range(5, 10):
        _set_grads(params, step)
        stats = clipper.clip_()
        expected.append([p.grad.clone() if p.grad is not None else None for p in params] + list(stats))

    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = Clipper(fresh, make())
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for step, want in zip(range(5, 10), expected):
        _set_grads(fresh, step)
        stats = resumed.clip_()
        got = [p.grad.clone() if p.grad is not None else None for p in fresh] + list(stats)
        for x, y in zip(got, want):
            assert (x is None and y is None) or torch.equal(x, y)
    _state_equal(clipper.state_dict(), resumed.state_dict())


def test_state_dict_layout():
    params = _params()
    clipper = Clipper(params, clip_by_moment())
    _set_grads(params, 2)  # the last parameter has no gradient on this step
    clipper.clip_()
    sd = clipper.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2]
    assert set(sd["state"][0]) == {"count", "nu"}
    assert sd["state"][0]["nu"].shape == params[0].shape
    assert set(sd["shared"]) == {"fraction_clipped"}
    assert sd["param_shapes"] == [list(s) for s in SHAPES]


def test_load_state_dict_for_other_parameters_raises():
    params = _params()
    clipper = Clipper(params, clip_by_moment())
    _set_grads(params, 0)
    clipper.clip_()
    sd = copy.deepcopy(clipper.state_dict())
    with pytest.raises(ValueError, match="4 parameters"):
        Clipper(params[:3], clip_by_moment()).load_state_dict(sd)
    other = _params(shapes=[(4, 3), (4,), (4, 2), (2,)])
    with pytest.raises(ValueError, match="shape"):
        Clipper(other, clip_by_moment()).load_state_dict(sd)
    with pytest.raises(ValueError, match="count"):
        Clipper(params, clip_by_value(1.0)).load_state_dict(sd)
    with pytest.raises(ValueError, match="param_shapes"):
        Clipper(params, clip_by_moment()).load_state_dict({"state": {}, "shared": {}})
    target = Clipper(params, clip_by_moment())
    target.load_state_dict(sd)  # the right one loads, copied rather than aliased
    assert torch.equal(target.state[params[0]]["nu"], sd["state"][0]["nu"])
    assert target.state[params[0]]["nu"] is not sd["state"][0]["nu"]


# --------------------------------------------------------------------------------------------
# Other dtypes
# --------------------------------------------------------------------------------------------


def test_complex_gradients_clip_like_torch():
    p = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex128))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.randn(3, 2, dtype=torch.complex128) * 3
    q.grad = p.grad.clone()
    stats = Clipper([p], clip_by_norm(1.0)).clip_()
    n = torch.nn.utils.clip_grad_norm_([q], 1.0)
    assert stats.norm.item() == pytest.approx(n.item(), rel=1e-14)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-14, atol=0)


def test_bfloat16_moment_state_is_float32():
    params = _params(dtype=torch.bfloat16)
    clipper = Clipper(params, clip_by_moment(k=1.0, beta=0.9))
    for step in range(3):
        _set_grads(params, step, missing=False)
        stats = clipper.clip_()
    assert clipper.state[params[0]]["nu"].dtype == torch.float32
    assert params[0].grad.dtype == torch.bfloat16
    assert stats.norm.dtype == torch.float32 and 0 < stats.fraction_clipped.item() < 1


# --------------------------------------------------------------------------------------------
# skip_nonfinite
# --------------------------------------------------------------------------------------------


def test_skip_nonfinite_wrapper():
    g = [torch.tensor([1.0, -2.0, 3.0], dtype=F64), torch.tensor([0.5], dtype=F64)]
    t = skip_nonfinite(clip_by_moment(k=1.0, beta=0.5), max_consecutive=1)
    state = t.init(g)
    out, state = t.update([x.clone() for x in g], state, None)
    assert all(torch.equal(o, x) for o, x in zip(out, g))  # first step passes unclipped
    own, inner = state
    assert isinstance(own, SkipNonfiniteState) and own.consecutive.item() == 0
    inner_before = [x.clone() for x in inner.count + inner.nu] + [inner.fraction_clipped.clone()]

    bad = [torch.tensor([1.0, math.nan, math.inf], dtype=F64), torch.tensor([0.5], dtype=F64)]
    out, state = t.update([x.clone() for x in bad], state, None)
    own, inner = state
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    assert (own.nonfinite.item(), own.consecutive.item(), own.total.item()) == (2, 1, 1)
    inner_after = inner.count + inner.nu + [inner.fraction_clipped]
    assert all(torch.equal(a, b) for a, b in zip(inner_before, inner_after))

    # an outer skip freezes the wrapper's own counters too
    _, state = t.update([x.clone() for x in bad], state, None, StepContext(gate=torch.tensor(0.0)))
    assert (state[0].nonfinite.item(), state[0].consecutive.item(), state[0].total.item()) == (2, 1, 1)

    out, state = t.update([x * 4 for x in g], state, None)  # a good step, clipped by v of step 1
    torch.testing.assert_close(out[0], g[0], rtol=1e-15, atol=0)  # v̂ = g1², k = 1: back to |g1|
    assert (state[0].nonfinite.item(), state[0].consecutive.item(), state[0].total.item()) == (0, 0, 1)

    _, state = t.update([x.clone() for x in bad], state, None)
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        t.update([x.clone() for x in bad], state, None)


def test_skip_nonfinite_validation():
    with pytest.raises(ValueError, match="max_consecutive"):
        skip_nonfinite(clip_by_value(1.0), max_consecutive=-1)
    with pytest.raises(TypeError, match="Transform"):
        skip_nonfinite(1.0)


def test_skip_nonfinite_state_keys_in_a_clipper():
    params = _params()
    clipper = Clipper(params, skip_nonfinite(chain(clip_by_value(2.0), clip_by_moment())), nonfinite="ignore")
    _set_grads(params, 0)
    params[1].grad[0] = math.nan
    stats = clipper.clip_()
    assert stats.nonfinite.item() == 1 and not stats.skipped.item()  # the Clipper ignores, the wrapper skips
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    sd = clipper.state_dict()
    assert set(sd["shared"]) == {"nonfinite", "consecutive", "total", "fraction_clipped", "1.1.fraction_clipped"}
    assert sd["shared"]["total"].item() == 1 and sd["state"][0]["count"].item() == 0
