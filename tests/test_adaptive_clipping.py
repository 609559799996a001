"""ZClip and AutoClip (steadygrad.transforms.adaptive_clipping), in float64.

Each transform is checked against a plain-Python reference of its published rule, step by step;
then the properties the references lack: spikes are cut to the usual norm, a skipped (gated or
non-finite) step leaves no trace, a resumed run equals an uninterrupted one, a bounded history
forgets, bad hyperparameters are refused, and the update compiles without a graph break.
"""

from __future__ import annotations

import io
import math
from collections import deque

import numpy as np
import pytest
import torch

from steadygrad.clipper import Clipper
from steadygrad.core.state import SharedDict, StateLayout, state_keys
from steadygrad.core.transform import StepContext, chain
from steadygrad.transforms.adaptive import scale_by_adam
from steadygrad.transforms.clipping import (
    AutoClipState,
    ZClipState,
    autoclip,
    autoclip_update,
    zclip,
    zclip_update,
)
from steadygrad.transforms.clipping.autoclip import _percentile_sorted

F64 = torch.float64
SHAPES = [(3, 4), (5,), (2, 3, 2), ()]
# step -> factor: spikes of several sizes, and a dip.
SPIKES = {3: 6.0, 30: 20.0, 37: 5.0, 41: 0.2, 45: 100.0, 52: 8.0}


def make_grads(
    steps: int = 60, seed: int = 0, spikes: dict[int, float] = SPIKES, drift: float = 0.3
) -> list[list[torch.Tensor]]:
    """Random float64 gradients of several tensors with a slowly drifting scale and spikes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        scale = (1.0 + drift * math.sin(t / 7)) * spikes.get(t, 1.0)
        out.append([torch.randn(s, generator=g, dtype=F64) * scale for s in SHAPES])
    return out


def flat(tensors) -> list[float]:
    return [v for t in tensors for v in t.reshape(-1).tolist()]


def py_norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def clone(tensors):
    return [t.clone() for t in tensors]


def assert_bitwise(a, b):
    """Two states (named tuples of tensors) are identical: dtype, device, shape, bits (NaN = NaN)."""
    assert type(a) is type(b)
    for name, x, y in zip(a._fields, a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, name
        assert (
            torch.equal(x, y)
            or (torch.isnan(x) == torch.isnan(y)).all()
            and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))
        ), name


def snapshot(state):
    return type(state)(*(t.clone() for t in state))


# --------------------------------------------------------------------------------------------
# Plain-Python references of the published rules
# --------------------------------------------------------------------------------------------


class RefZClip:
    """ZClip, z-score mode with adaptive scaling, as in the paper and the zclip package
    (Python floats; the package's form of the threshold, mu + z_thr*sigma / (z / z_thr))."""

    def __init__(self, alpha, z_thr, warmup, eps, max_norm=None):
        self.alpha, self.z_thr, self.warmup, self.eps, self.max_norm = alpha, z_thr, warmup, eps, max_norm
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def step(self, values: list[float]) -> tuple[float, float]:
        """Returns (coefficient, limit) for gradients ``values``."""
        n = py_norm(values)
        limit = math.inf
        if self.mean is None:
            self.buffer.append(n)
            if len(self.buffer) == self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((b - self.mean) ** 2 for b in self.buffer) / len(self.buffer)
        else:
            std = math.sqrt(self.var)
            z = (n - self.mean) / (std + self.eps)
            x = n
            if z > self.z_thr:
                limit = self.mean + self.z_thr * std / (z / self.z_thr)
                x = limit
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        if self.max_norm is not None:
            limit = min(limit, self.max_norm)
        return min(1.0, limit / (n + 1e-6)), limit


def linear_percentile(values: list[float], p: float) -> float:
    """Hand-written numpy 'linear' percentile: position p/100*(k-1) in the sorted values."""
    s = sorted(values)
    pos = p / 100 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


class RefAutoClip:
    """AutoClip as in the paper's code: append the norm, np.percentile of the history, clip."""

    def __init__(self, p, history=None):
        self.p = p
        self.hist = deque(maxlen=history)

    def step(self, values: list[float]) -> tuple[float, float]:
        n = py_norm(values)
        self.hist.append(n)
        limit = float(np.percentile(list(self.hist), self.p))
        assert math.isclose(limit, linear_percentile(list(self.hist), self.p), rel_tol=1e-13)
        return min(1.0, limit / (n + 1e-6)), limit


def run_against_reference(transform, ref, grads_seq):
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    state = transform.init(params)
    clipped_steps = 0
    for t, grads in enumerate(grads_seq):
        coef, limit = ref.step(flat(grads))
        out, state = transform.update(clone(grads), state, params)
        expected = [g * coef for g in grads]
        for o, e in zip(out, expected):
            torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-15, msg=f"step {t}")
        torch.testing.assert_close(state.last_norm, torch.tensor(py_norm(flat(grads)), dtype=F64), rtol=1e-13, atol=0)
        if math.isinf(limit):
            assert math.isinf(state.threshold)
        else:
            torch.testing.assert_close(state.threshold, torch.tensor(limit, dtype=F64), rtol=1e-12, atol=0)
        assert state.fraction_clipped.dtype == torch.float32
        assert float(state.fraction_clipped) == float(coef < 1.0)  # the clip_by_norm rule
        clipped_steps += coef < 1.0
        yield t, state
    assert clipped_steps >= 2, "the sequence must exercise clipping"


# --------------------------------------------------------------------------------------------
# Equality with the published rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # the defaults: alpha 0.97, z 2.5, warm-up 25
        dict(alpha=0.9, z_threshold=1.5, warmup_steps=5, eps=1e-3),
        dict(alpha=0.8, z_threshold=2.0, warmup_steps=4, max_norm=7.5),  # the cap bites on some steps
    ],
)
def test_zclip_equals_python_reference(kwargs):
    full = dict(alpha=0.97, z_threshold=2.5, warmup_steps=25, eps=1e-6, max_norm=None) | kwargs
    ref = RefZClip(full["alpha"], full["z_threshold"], full["warmup_steps"], full["eps"], full["max_norm"])
    for t, state in run_against_reference(zclip(**kwargs), ref, make_grads()):
        assert int(state.num_norms) == t + 1
        if ref.mean is None:
            assert float(state.norm_mean) == 0.0
        else:
            torch.testing.assert_close(state.norm_mean, torch.tensor(ref.mean, dtype=F64), rtol=1e-12, atol=0)
            torch.testing.assert_close(state.norm_var, torch.tensor(ref.var, dtype=F64), rtol=1e-10, atol=1e-15)
        assert state.norm_mean.dtype == F64 and state.num_norms.dtype == torch.int64


@pytest.mark.parametrize("p", [10.0, 50.0, 87.5, 100.0])
@pytest.mark.parametrize("history", [None, 7])
def test_autoclip_equals_python_reference(p, history):
    ref = RefAutoClip(p, history)
    for t, state in run_against_reference(autoclip(p, history), ref, make_grads()):
        assert int(state.num_norms) == t + 1
        valid = state.norm_history[torch.isfinite(state.norm_history)]
        assert sorted(valid.tolist()) == pytest.approx(sorted(ref.hist), rel=1e-13)


def test_percentile_definition_is_numpys_linear_and_torch_quantile():
    g = torch.Generator().manual_seed(3)
    for k in (1, 2, 5, 13):
        values = torch.rand(k, generator=g, dtype=F64) * 10
        padded = torch.cat([values, torch.full((4,), math.inf, dtype=F64)])
        ordered = torch.sort(padded).values
        for p in (0.1, 10.0, 25.0, 50.0, 99.0, 100.0):
            got = _percentile_sorted(ordered, torch.tensor(k), p / 100)
            assert float(got) == pytest.approx(float(np.percentile(values.numpy(), p)), rel=1e-14)
            assert float(got) == pytest.approx(float(torch.quantile(values, p / 100)), rel=1e-14)
    assert math.isinf(float(_percentile_sorted(torch.full((3,), math.inf, dtype=F64), torch.tensor(0), 0.5)))


# --------------------------------------------------------------------------------------------
# Spikes are cut to the usual norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: zclip(), lambda: autoclip(10.0)], ids=["zclip", "autoclip"])
def test_a_100x_spike_is_cut_to_about_the_calm_norm(make):
    grads_seq = make_grads(steps=41, seed=1, spikes={40: 100.0}, drift=0.0)
    t = make()
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    state = t.init(params)
    calm = []
    for grads in grads_seq[:40]:
        out, state = t.update(clone(grads), state, params)
        calm.append(py_norm(flat(grads)))
    spike = grads_seq[40]
    out, state = t.update(clone(spike), state, params)
    clipped = py_norm(flat(out))
    assert py_norm(flat(spike)) > 50 * max(calm)
    # Stated factor: the clipped spike lies within the range of the calm norms, give or take 5 %.
    assert 0.95 * min(calm) <= clipped <= 1.05 * max(calm), (clipped, min(calm), max(calm))
    assert float(state.fraction_clipped) == 1.0
    torch.testing.assert_close(torch.tensor(clipped, dtype=F64), state.threshold, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Skipped steps leave no trace
# --------------------------------------------------------------------------------------------

TRANSFORMS = {
    "zclip": lambda: zclip(alpha=0.9, z_threshold=2.0, warmup_steps=6),
    "zclip_capped": lambda: zclip(warmup_steps=6, max_norm=8.0),
    "autoclip": lambda: autoclip(25.0),
    "autoclip_ring": lambda: autoclip(25.0, history=9),
}
BAD_STEPS = (2, 33)  # one inside the warm-up, one after it


def comparable(state, name):
    """The state, without the unused +inf padding of an unbounded AutoClip history (its length is
    the host-side number of calls, the one thing a skipped step adds)."""
    if name != "autoclip":
        return state
    history = state.norm_history
    k = int(state.num_norms)
    assert torch.isfinite(history[:k]).all() and torch.isinf(history[k:]).all(), "padding must be +inf"
    return state._replace(norm_history=history[:k].clone())


def reference_run(transform, grads_seq):
    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    state = transform.init(params)
    outs, states = [], []
    for grads in grads_seq:
        out, state = transform.update(clone(grads), state, params)
        outs.append(out)
        states.append(state)
    return params, outs, states


def bad_grads(grads, kind):
    bad = clone(grads)
    bad[1][2] = math.nan if kind == "nan" else math.inf
    return bad


@pytest.mark.parametrize("name", TRANSFORMS)
def test_closed_commit_gate_leaves_no_trace(name):
    """A NaN step, skipped as the Clipper does (gradients zeroed, gate 0), changes nothing: the
    run with it equals the run without it, state bit for bit."""
    grads_seq = make_grads(steps=45, seed=2)
    params, ref_outs, ref_states = reference_run(TRANSFORMS[name](), grads_seq)
    t = TRANSFORMS[name]()
    state = t.init(params)
    for i, grads in enumerate(grads_seq):
        if i in BAD_STEPS:
            before = snapshot(state)
            sanitized = [torch.zeros_like(g) for g in bad_grads(grads, "nan")]
            out, state = t.update(sanitized, state, params, StepContext(gate=torch.tensor(0.0)))
            assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
            assert_bitwise(comparable(state, name), comparable(before, name))
        # an open gate is the same as no gate
        out, state = t.update(clone(grads), state, params, StepContext(gate=torch.tensor(1.0)))
        for o, r in zip(out, ref_outs[i]):
            assert torch.equal(o, r)
        assert_bitwise(comparable(state, name), comparable(ref_states[i], name))
    if name == "autoclip":  # doubled from 64 slots when the committed norms filled it
        assert state.norm_history.shape[0] == 64 and int(state.num_norms) == len(grads_seq)
    elif name == "autoclip_ring":
        assert_bitwise(state, ref_states[-1])


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_nonfinite_norm_without_gate_is_skipped_by_the_statistics(name, kind):
    """Without any gate a NaN/inf gradient passes through unchanged and does not enter the
    statistics (mu, sigma^2, warm-up buffer, history): the run continues as if it never came."""
    grads_seq = make_grads(steps=45, seed=4)
    params, ref_outs, ref_states = reference_run(TRANSFORMS[name](), grads_seq)
    t = TRANSFORMS[name]()
    state = t.init(params)
    stats = ("num_norms", "warmup_norms", "norm_mean", "norm_var", "norm_history")
    for i, grads in enumerate(grads_seq):
        if i in BAD_STEPS:
            before = comparable(snapshot(state), name)
            bad = bad_grads(grads, kind)
            out, state = t.update(clone(bad), state, params)
            for o, b in zip(out, bad):  # unchanged, the non-finite entry included
                assert (
                    torch.equal(o.nan_to_num(0.0), b.nan_to_num(0.0)) and torch.isnan(o).sum() == torch.isnan(b).sum()
                )
            after = comparable(state, name)
            for field in stats:
                if field in state._fields:
                    assert torch.equal(getattr(after, field), getattr(before, field)), field
            assert float(state.fraction_clipped) == 0.0
            assert (math.isnan if kind == "nan" else math.isinf)(float(state.last_norm))
        out, state = t.update(clone(grads), state, params)
        for o, r in zip(out, ref_outs[i]):
            assert torch.equal(o, r)
        assert_bitwise(comparable(state, name), comparable(ref_states[i], name))
        if isinstance(state, ZClipState):
            assert torch.isfinite(state.norm_mean) and torch.isfinite(state.norm_var)


# --------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_resume_from_saved_state_equals_never_stopping(name):
    grads_seq = make_grads(steps=40, seed=5)
    params, ref_outs, ref_states = reference_run(TRANSFORMS[name](), grads_seq)
    t = TRANSFORMS[name]()
    state = t.init(params)
    for grads in grads_seq[:20]:
        _, state = t.update(clone(grads), state, params)
    blob = io.BytesIO()
    torch.save(state._asdict(), blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=True)

    fresh = TRANSFORMS[name]()
    state = type(state)(**loaded)
    for i, grads in enumerate(grads_seq[20:], start=20):
        out, state = fresh.update(clone(grads), state, params)
        for o, r in zip(out, ref_outs[i]):
            assert torch.equal(o, r)
        assert_bitwise(state, ref_states[i])


def clipper_run(name, grads_seq, bad_steps=(), stop_at=None):
    """Runs a Clipper(nonfinite="skip") over ``grads_seq`` (on .grad); at ``bad_steps`` a NaN
    gradient comes first (and is skipped). Returns the clipped gradients of each good step and
    the final state_dict; with ``stop_at``, the run is saved there and resumed in a new Clipper."""
    params = [torch.zeros(s, dtype=F64, requires_grad=True) for s in SHAPES]
    clipper = Clipper(params, TRANSFORMS[name](), nonfinite="skip")
    outs = []
    for i, grads in enumerate(grads_seq):
        if i == stop_at:
            blob = io.BytesIO()
            torch.save(clipper.state_dict(), blob)
            blob.seek(0)
            clipper = Clipper(params, TRANSFORMS[name](), nonfinite="skip")
            clipper.load_state_dict(torch.load(blob, weights_only=True))
        if i in bad_steps:
            for p, g in zip(params, bad_grads(grads, "nan")):
                p.grad = g
            stats = clipper.clip_()
            assert bool(stats.skipped) and all(p.grad is None for p in params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        stats = clipper.clip_()
        assert not bool(stats.skipped)
        outs.append([p.grad.clone() for p in params])
    return outs, clipper.state_dict()["shared"]


@pytest.mark.parametrize("name", TRANSFORMS)
def test_clipper_skip_and_resume(name):
    """Through steadygrad.Clipper: a skipped NaN step leaves no trace, and a run resumed from
    Clipper.state_dict equals the uninterrupted one; both equal the bare transform."""
    grads_seq = make_grads(steps=40, seed=10)
    _, ref_outs, ref_states = reference_run(TRANSFORMS[name](), grads_seq)
    for kwargs in (dict(bad_steps=BAD_STEPS), dict(stop_at=21)):
        outs, shared = clipper_run(name, grads_seq, **kwargs)
        for out, ref in zip(outs, ref_outs):
            for o, r in zip(out, ref):
                assert torch.equal(o, r)
        state_type = ZClipState if name.startswith("zclip") else AutoClipState
        assert_bitwise(comparable(state_type(**shared), name), comparable(ref_states[-1], name))


def test_state_lives_in_a_shared_store_and_keeps_torch_keys():
    """Through core.state (the optimizers' and Clipper's storage) the state is a set of shared
    tensors, and a clipper in front of Adam leaves Adam's torch keys unprefixed."""
    keys = state_keys(chain(zclip(), autoclip(), scale_by_adam()).init([]))
    names = {k.key: k.per_param for k in keys}
    assert names["step"] and names["exp_avg"] and names["exp_avg_sq"]
    assert not names["norm_mean"] and not names["norm_history"] and not names["fraction_clipped"]
    assert not names["1.fraction_clipped"]  # the second clipper's copy, prefixed

    params = [torch.zeros(s, dtype=F64) for s in SHAPES]
    grads_seq = make_grads(steps=12, seed=6)
    _, ref_outs, ref_states = reference_run(zclip(warmup_steps=5), grads_seq)
    store: dict = {p: {} for p in params}
    store["shared"] = {}
    for i, grads in enumerate(grads_seq):
        out = StateLayout(zclip(warmup_steps=5)).run(store, params, clone(grads), SharedDict(store["shared"]))
        for o, r in zip(out, ref_outs[i]):
            assert torch.equal(o, r)
    assert all(store[p] == {} for p in params)
    assert_bitwise(ZClipState(**store["shared"]), ref_states[-1])


def test_cpu_float32_template_state_moves_to_the_norms_dtype_and_low_precision_grads_work():
    t = zclip(warmup_steps=2)
    state = t.init([])
    assert state.norm_mean.dtype == torch.float32
    grads = make_grads(steps=3, seed=7)
    for g in grads:
        _, state = t.update(clone(g), state)
    assert state.norm_mean.dtype == F64 and state.warmup_norms.dtype == F64
    bf16 = [g.to(torch.bfloat16) * 100 for g in grads[0]]
    state = autoclip(50.0).init(bf16)
    for _ in range(3):
        out, state = autoclip(50.0).update(clone(bf16), state)
    assert out[0].dtype == torch.bfloat16 and state.norm_history.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Bounded history
# --------------------------------------------------------------------------------------------


def test_bounded_history_only_the_last_norms_matter():
    """Norms 10 (6 times) then 1 (4 times): the median of all 10 is 10, of the last 5 it is 1, of
    the last 8 it is 5.5 (halfway between 1 and 10)."""
    params = [torch.zeros(4, dtype=F64)]
    seq = [10.0] * 6 + [1.0] * 4
    states = {}
    for history in (None, 5, 8):
        t = autoclip(50.0, history=history)
        state = t.init(params)
        for n in seq:
            _, state = t.update([torch.full((4,), n / 2, dtype=F64)], state, params)
        states[history] = state
    assert float(states[None].threshold) == 10.0
    assert float(states[5].threshold) == 1.0
    assert float(states[8].threshold) == 5.5
    assert int(states[5].num_norms) == 10 and states[5].norm_history.shape == (5,)
    assert sorted(states[5].norm_history.tolist()) == [1.0, 1.0, 1.0, 1.0, 10.0]
    # Then a norm of 4: the whole history's median (10) lets it pass, the last 5 cut it to 1.
    for history, clipped, expected in ((None, 0.0, 4.0), (5, 1.0, 1.0)):
        out, state = autoclip(50.0, history=history).update([torch.full((4,), 2.0, dtype=F64)], states[history], params)
        assert float(state.fraction_clipped) == clipped
        assert py_norm(flat(out)) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (zclip, dict(alpha=0.0), "alpha"),
        (zclip, dict(alpha=1.0), "alpha"),
        (zclip, dict(alpha=math.nan), "alpha"),
        (zclip, dict(z_threshold=0.0), "z_threshold"),
        (zclip, dict(z_threshold=-1.0), "z_threshold"),
        (zclip, dict(warmup_steps=0), "warmup_steps"),
        (zclip, dict(eps=0.0), "eps"),
        (zclip, dict(eps=-1e-6), "eps"),
        (zclip, dict(max_norm=0.0), "max_norm"),
        (zclip, dict(max_norm=-2.0), "max_norm"),
        (autoclip, dict(percentile=0.0), "percentile"),
        (autoclip, dict(percentile=100.5), "percentile"),
        (autoclip, dict(percentile=-5.0), "percentile"),
        (autoclip, dict(history=0), "history"),
        (autoclip, dict(history=-3), "history"),
        (autoclip, dict(history=2.5), "history"),
        (zclip, dict(alpha=torch.tensor(1.5)), "alpha"),
        (autoclip, dict(percentile=torch.tensor(0.0)), "percentile"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_tensor_hyperparameters_equal_numbers():
    grads_seq = make_grads(steps=30, seed=9)
    for numbers in (
        dict(alpha=0.9, z_threshold=1.5, warmup_steps=5, eps=1e-3, max_norm=9.0),
        dict(percentile=30.0, history=6),
    ):
        factory = zclip if "alpha" in numbers else autoclip
        tensors = {k: torch.tensor(v, dtype=F64) if isinstance(v, float) else v for k, v in numbers.items()}
        _, outs_a, states_a = reference_run(factory(**numbers), grads_seq)
        _, outs_b, states_b = reference_run(factory(**tensors), grads_seq)
        for out_a, out_b in zip(outs_a, outs_b):
            for a, b in zip(out_a, out_b):
                torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
        assert_bitwise(states_a[-1], states_b[-1])


def test_state_of_another_configuration_is_refused():
    with pytest.raises(ValueError, match="warmup_steps"):
        zclip(warmup_steps=3).update([torch.ones(2)], zclip(warmup_steps=4).init([]))
    with pytest.raises(ValueError, match="history"):
        autoclip(history=3).update([torch.ones(2)], autoclip(history=4).init([]))


# --------------------------------------------------------------------------------------------
# No host sync: the update compiles as one graph
# --------------------------------------------------------------------------------------------


def test_updates_compile_fullgraph_and_equal_eager():
    """One compiled graph runs zclip_update and the bounded autoclip_update (a host sync or a
    Python branch on a value would break it) and equals the eager run."""
    torch._dynamo.reset()

    def step(updates, zstate, astate, commit):
        updates, zstate = zclip_update(
            updates, zstate, alpha=0.9, z_threshold=1.5, eps=1e-6, max_norm=20.0, gate=commit
        )
        updates, astate = autoclip_update(updates, astate, percentile=60.0, history=4, gate=commit)
        return updates, zstate, astate

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    params = [torch.zeros(s, dtype=F64) for s in [(3, 2), (4,)]]
    eager = compiled_states = (zclip(warmup_steps=3).init(params), autoclip(60.0, history=4).init(params))
    g = torch.Generator().manual_seed(8)
    for i in range(8):
        grads = [torch.randn(p.shape, generator=g, dtype=F64) * (30.0 if i in (5, 7) else 1.0) for p in params]
        gate = torch.tensor(0.0 if i == 4 else 1.0)
        eager_out, *eager = step(clone(grads), *eager, gate)
        out, *compiled_states = compiled(clone(grads), *compiled_states, gate)
        for a, b in zip(out, eager_out):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
        for c_state, e_state in zip(compiled_states, eager):
            for name, a, b in zip(c_state._fields, c_state, e_state):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=0, msg=name)
    assert float(eager[0].fraction_clipped) == 1.0  # step 7 was a spike
    assert int(eager[0].num_norms) == 7 and int(eager[1].num_norms) == 7  # step 4 was gated off
