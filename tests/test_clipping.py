"""Clipping transforms: equality with torch / optax / explicit references, invariants, the
OpenAI Five moment rule step by step, the commit gate, and torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steadygrad.clipper import Clipper
from steadygrad.core.transform import StepContext, chain, state_leaves
from steadygrad.transforms.clipping import (
    clip_by_moment,
    clip_by_norm,
    clip_by_unit_ratio,
    clip_by_value,
    clip_update_rms,
    moment_clip_update,
    norm_clip_update,
    unit_ratio_clip_update,
    value_clip_update,
)

F64 = torch.float64
NORM_TYPES = [0.5, 1.0, 2.0, 3.0, math.inf]


def _grads(seed: int, shapes=((5, 4), (5,), (3, 5), (3,)), scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64) * scale for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def _jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    optax = pytest.importorskip("optax")
    return jax, optax


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (clip_by_value, dict(limit=0.0), "limit"),
        (clip_by_value, dict(limit=-1.0), "limit"),
        (clip_by_value, dict(limit=math.nan), "limit"),
        (clip_by_value, dict(limit=torch.tensor(-2.0)), "limit"),
        (clip_by_norm, dict(max_norm=0.0), "max_norm"),
        (clip_by_norm, dict(max_norm=math.nan), "max_norm"),
        (clip_by_norm, dict(max_norm=1.0, scope="layer"), "scope"),
        (clip_by_norm, dict(max_norm=1.0, norm_type=0), "norm_type"),
        (clip_by_norm, dict(max_norm=1.0, norm_type=-math.inf), "norm_type"),
        (clip_by_norm, dict(max_norm=1.0, norm_type="fro"), "norm_type"),
        (clip_by_moment, dict(k=0.0), "k"),
        (clip_by_moment, dict(k=math.nan), "k"),
        (clip_by_moment, dict(beta=1.0), "beta"),
        (clip_by_moment, dict(beta=-0.1), "beta"),
        (clip_by_moment, dict(beta=math.nan), "beta"),
        (clip_by_unit_ratio, dict(clip_factor=0.0), "clip_factor"),
        (clip_by_unit_ratio, dict(eps=0.0), "eps"),
        (clip_by_unit_ratio, dict(eps=-1e-3), "eps"),
        (clip_update_rms, dict(d=0.0), "d"),
        (clip_update_rms, dict(d=math.nan), "d"),
    ],
)
def test_invalid_hyperparameters_raise_naming_the_argument(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_agc_needs_params():
    t = clip_by_unit_ratio()
    g = _grads(0)
    with pytest.raises(ValueError, match="needs the parameters"):
        t.update(g, t.init(g), None)


# --------------------------------------------------------------------------------------------
# By value and by norm against torch and optax
# --------------------------------------------------------------------------------------------


def _as_params(grads):
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


@pytest.mark.parametrize("limit", [0.3, torch.tensor(0.7, dtype=F64)])
def test_clip_by_value_equals_torch_and_optax(limit):
    _, optax = _jax()
    grads = _grads(1)
    ps = _as_params(grads)
    torch.nn.utils.clip_grad_value_(ps, float(limit))
    t = clip_by_value(limit)
    out, state = t.update(_clone(grads), t.init(grads), None)
    for o, p in zip(out, ps):
        assert torch.equal(o, p.grad)
    ox, _ = optax.clip(float(limit)).update([g.numpy() for g in grads], None)
    for o, x in zip(out, ox):
        assert np.array_equal(o.numpy(), np.asarray(x))
    flat = torch.cat([g.flatten() for g in grads])
    expected = (flat.abs() > float(limit)).sum().item() / flat.numel()
    assert state.fraction_clipped.dtype == torch.float32
    assert state.fraction_clipped.item() == pytest.approx(expected, rel=1e-7)
    assert 0 < expected < 1


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_by_global_norm_equals_torch(norm_type):
    grads = _grads(2, scale=3.0)
    ps = _as_params(grads)
    n_torch = torch.nn.utils.clip_grad_norm_(ps, 1.5, norm_type=norm_type)
    t = clip_by_norm(1.5, norm_type=norm_type)
    out, state = t.update(_clone(grads), t.init(grads), None)
    for o, p in zip(out, ps):
        torch.testing.assert_close(o, p.grad, rtol=1e-13, atol=0)
    assert state.fraction_clipped.item() == 1.0
    # the invariant: the post-clip norm is max_norm·n/(n + 1e-6)
    n = float(n_torch)
    after = torch.linalg.vector_norm(torch.cat([o.flatten() for o in out]), norm_type).item()
    assert after == pytest.approx(1.5 * n / (n + 1e-6), rel=1e-13)
    assert after == pytest.approx(1.5, rel=1e-6)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_by_tensor_norm_equals_torch_per_tensor(norm_type):
    grads = _grads(3, scale=2.0)
    grads[1] = grads[1] * 0.01  # one tensor below the limit
    max_norm = torch.tensor(0.8, dtype=F64)
    ps = _as_params(grads)
    clipped = 0
    for p in ps:
        n = torch.nn.utils.clip_grad_norm_([p], 0.8, norm_type=norm_type)
        clipped += int(0.8 / (float(n) + 1e-6) < 1)
    t = clip_by_norm(max_norm, norm_type=norm_type, scope="tensor")
    out, state = t.update(_clone(grads), t.init(grads), None)
    for o, p in zip(out, ps):
        torch.testing.assert_close(o, p.grad, rtol=1e-13, atol=0)
    assert torch.equal(out[1], grads[1])  # untouched, bit for bit
    assert clipped == 3
    assert state.fraction_clipped.item() == pytest.approx(clipped / len(grads))


def test_clip_by_global_norm_vs_optax_differs_by_torch_eps_only():
    _, optax = _jax()
    grads = _grads(4, scale=2.0)
    t = clip_by_norm(1.0)
    out, _ = t.update(_clone(grads), t.init(grads), None)
    ox, _ = optax.clip_by_global_norm(1.0).update([g.numpy() for g in grads], None)
    n = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    for o, x in zip(out, ox):  # ours = optax · n/(n + 1e-6)
        np.testing.assert_allclose(o.numpy() * (n + 1e-6) / n, np.asarray(x), rtol=1e-13, atol=0)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_norm_clipping_small_gradients_untouched_and_twice_is_nearly_once(scope):
    grads = _grads(5)
    t = clip_by_norm(100.0, scope=scope)
    out, state = t.update(_clone(grads), t.init(grads), None)
    assert all(torch.equal(o, g) for o, g in zip(out, grads))
    assert state.fraction_clipped.item() == 0.0
    t = clip_by_norm(0.5, scope=scope)
    once, _ = t.update(_clone(grads), t.init(grads), None)
    twice, state = t.update(_clone(once), t.init(grads), None)
    # torch's rule is not exactly idempotent: the second pass rescales by ~1 - 1e-6·(1 - 0.5/n).
    for a, b in zip(once, twice):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)


def test_clip_by_value_twice_changes_nothing():
    grads = _grads(6)
    t = clip_by_value(0.5)
    once, _ = t.update(_clone(grads), t.init(grads), None)
    twice, state = t.update(_clone(once), t.init(grads), None)
    assert all(torch.equal(a, b) for a, b in zip(once, twice))
    assert state.fraction_clipped.item() == 0.0


def test_flat_buffer_gives_the_same_result_for_value_norm_and_moment():
    grads = [_grads(s, scale=1 + s) for s in range(6)]
    shapes = [g.shape for g in grads[0]]
    for make in (lambda: clip_by_value(0.9), lambda: clip_by_norm(2.0, 3.0), lambda: clip_by_moment(1.2, 0.8)):
        t_list, t_flat = make(), make()
        s_list = t_list.init(grads[0])
        flat0 = torch.cat([g.flatten() for g in grads[0]])
        s_flat = t_flat.init([flat0])
        for gs in grads:
            out, s_list = t_list.update(_clone(gs), s_list, None)
            (out_flat,), s_flat = t_flat.update([torch.cat([g.flatten() for g in gs])], s_flat, None)
            torch.testing.assert_close(torch.cat([o.flatten() for o in out]), out_flat, rtol=1e-14, atol=0)
            assert s_list.fraction_clipped.item() == pytest.approx(s_flat.fraction_clipped.item())
        assert out[0].shape == shapes[0]


# --------------------------------------------------------------------------------------------
# OpenAI Five moment clipping against a plain-Python reference
# --------------------------------------------------------------------------------------------


class MomentReference:
    """The rule of ALGORITHMS.md, element by element in Python floats."""

    def __init__(self, k: float, beta: float) -> None:
        self.k, self.beta = k, beta
        self.t: dict[int, int] = {}
        self.v: dict[int, list[float]] = {}

    def step(self, i: int, g: list[float]) -> tuple[list[float], int]:
        t = self.t.get(i, 0)
        v = self.v.setdefault(i, [0.0] * len(g))
        out, clipped = [], 0
        for j, x in enumerate(g):
            limit = math.inf if t == 0 else self.k * math.sqrt(v[j] / (1.0 - self.beta**t))
            clipped += abs(x) > limit
            out.append(min(max(x, -limit), limit))
            v[j] = self.beta * v[j] + (1.0 - self.beta) * x * x
        self.t[i] = t + 1
        return out, clipped


def _moment_gradients(step: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for s in shapes:
        x = torch.randn(s, generator=g, dtype=F64) * (1 + 0.5 * math.sin(step))
        spikes = torch.rand(s, generator=g, dtype=F64) < 0.08
        out.append(torch.where(spikes, x * 12, x))
    return out


@pytest.mark.parametrize("nonfinite", ["ignore", "skip"])  # ungated and gated code paths
def test_clip_by_moment_equals_python_reference_with_missing_gradients(nonfinite):
    shapes = [(4, 3), (3,), (6,)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=F64)) for s in shapes]
    clipper = Clipper(params, clip_by_moment(k=1.5, beta=0.9), nonfinite=nonfinite)
    ref = MomentReference(1.5, 0.9)
    total_clipped = 0
    for step in range(30):
        grads = _moment_gradients(step, shapes)
        has_grad = [True, step % 5 != 0, step % 3 != 1]
        for p, g, h in zip(params, grads, has_grad):
            p.grad = g.clone() if h else None
        stats = clipper.clip_()
        clipped, elements = 0, 0
        for i, (p, g, h) in enumerate(zip(params, grads, has_grad)):
            if not h:
                continue
            expected, c = ref.step(i, g.flatten().tolist())
            clipped += c
            elements += g.numel()
            torch.testing.assert_close(p.grad.flatten(), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
            st = clipper.state[p]
            assert st["count"].item() == ref.t[i]
            torch.testing.assert_close(st["nu"].flatten(), torch.tensor(ref.v[i], dtype=F64), rtol=1e-12, atol=0)
        assert torch.equal(stats.fraction_clipped, torch.tensor(clipped / elements, dtype=torch.float32))
        total_clipped += clipped
    assert ref.t == {0: 30, 1: 24, 2: 20}
    assert 20 < total_clipped < 300  # the run does exercise the clipping


def test_clip_by_moment_first_step_passes_unclipped():
    g = [torch.tensor([1e6, -3.0, 0.0], dtype=F64)]
    t = clip_by_moment()
    state = t.init(g)
    out, state = t.update(_clone(g), state, None)
    assert torch.equal(out[0], g[0])
    assert state.count[0].item() == 1
    assert state.fraction_clipped.item() == 0.0
    torch.testing.assert_close(state.nu[0], 0.001 * g[0] ** 2, rtol=1e-15, atol=0)
    # second step: the limit is k·sqrt(v1/(1-β)) = 5·|g1|
    out, state = t.update([torch.tensor([1e7, 20.0, 1.0], dtype=F64)], state, None)
    torch.testing.assert_close(out[0], torch.tensor([5e6, 15.0, 0.0], dtype=F64), rtol=1e-12, atol=0)
    assert state.fraction_clipped.item() == pytest.approx(1.0)


def test_spike_after_warmup_is_clipped_to_about_5_sigma_and_a_second_spike_meets_the_raised_limit():
    n, k, beta = 1000, 5.0, 0.999
    gen = torch.Generator().manual_seed(7)
    t = clip_by_moment(k=k, beta=beta)
    state = t.init([torch.zeros(n, dtype=F64)])
    ref = MomentReference(k, beta)
    for _ in range(40):
        g = torch.randn(n, generator=gen, dtype=F64)
        out, state = t.update([g.clone()], state, None)
        expected, _ = ref.step(0, g.tolist())
        torch.testing.assert_close(out[0], torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    v_hat0 = ref.v[0][0] / (1 - beta**40)
    # step 41: a 1000σ spike in element 0
    g = torch.randn(n, generator=gen, dtype=F64)
    g[0] = 1000.0
    (out,), state = t.update([g.clone()], state, None)
    expected, clipped = ref.step(0, g.tolist())
    assert clipped == 1
    assert out[0].item() == pytest.approx(k * math.sqrt(v_hat0), rel=1e-12)
    assert 3.5 < out[0].item() < 6.5  # about 5σ
    assert torch.equal(out[1:], g[1:])  # the other elements are untouched
    assert state.fraction_clipped.item() == pytest.approx(1 / n)
    # step 42: a second spike; v has seen the raw first spike, so the limit is ~790σ now
    g = torch.randn(n, generator=gen, dtype=F64)
    g[0] = 1000.0
    (out,), state = t.update([g.clone()], state, None)
    expected, clipped = ref.step(0, g.tolist())
    assert clipped == 1
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)
    assert 700 < out[0].item() < 850
    assert torch.equal(out[1:], g[1:])


def _expected_gaussian_clip_factor(k: float, beta: float, steps: range) -> float:
    """E[P(|z| > k·sqrt(v̂))] / P(|z| > k) with v̂ ~ Gamma of the EMA's effective sample size (a
    moment-matched approximation of the weighted mean of the earlier z²)."""
    p = math.erfc(k / math.sqrt(2))
    x = np.linspace(1e-4, 4.0, 8000)
    dx = x[1] - x[0]
    tail = np.array([math.erfc(k * math.sqrt(v / 2)) for v in x])
    factors = []
    for t in steps:
        w = (1 - beta) * beta ** np.arange(t - 1) / (1 - beta ** (t - 1))
        a = 1 / np.sum(w**2) / 2  # shape = rate = ESS/2, mean 1
        log_pdf = a * math.log(a) - math.lgamma(a) + (a - 1) * np.log(x) - a * x
        factors.append(float(np.sum(np.exp(log_pdf) * tail) * dx) / p)
    return float(np.mean(factors))


def test_stationary_gaussian_clip_rate_matches_theory():
    n, steps, k, beta, warmup = 20_000, 300, 2.5, 0.99, 100
    gen = torch.Generator().manual_seed(11)
    t = clip_by_moment(k=k, beta=beta)
    state = t.init([torch.zeros(n, dtype=F64)])
    fractions = []
    for step in range(1, steps + 1):
        g = torch.randn(n, generator=gen, dtype=F64)
        _, state = t.update([g], state, None)
        if step == 1:
            assert state.fraction_clipped.item() == 0.0
        if step > warmup:
            fractions.append(state.fraction_clipped.item())
    measured = float(np.mean(fractions)) / math.erfc(k / math.sqrt(2))
    expected = _expected_gaussian_clip_factor(k, beta, range(warmup + 1, steps + 1))
    assert 1.05 < expected < 1.15
    # updating v before clipping gives ~0.87, v from clipped g ~1.23, no bias correction ~2.0
    assert measured == pytest.approx(expected, rel=0.06)


def test_moment_closed_gate_leaves_state_bit_for_bit():
    gs = _grads(8)
    t = clip_by_moment(k=1.0, beta=0.9)
    state = t.init(gs)
    for s in range(3):
        _, state = t.update(_grads(20 + s), state, None)
    before = [x.clone() for x in state.count + state.nu] + [state.fraction_clipped.clone()]
    _, state = t.update(_grads(30, scale=100.0), state, None, StepContext(gate=torch.tensor(0.0)))
    after = state.count + state.nu + [state.fraction_clipped]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    _, state = t.update(_grads(30), state, None, StepContext(gate=torch.tensor(1.0)))
    assert state.count[0].item() == 4


# --------------------------------------------------------------------------------------------
# AGC against an explicit loop over units, and optax with torch's axes
# --------------------------------------------------------------------------------------------


def _agc_reference(g: torch.Tensor, w: torch.Tensor, lam: float, eps: float) -> tuple[torch.Tensor, int, int]:
    out = g.clone()
    if g.dim() <= 1:
        units = [(...,)]
    else:
        units = [(i,) for i in range(g.shape[0])]
    clipped = 0
    for u in units:
        gn = math.sqrt(sum(x * x for x in g[u].flatten().tolist()))
        wn = math.sqrt(sum(x * x for x in w[u].flatten().tolist()))
        m = lam * max(wn, eps)
        if gn > m:
            out[u] = g[u] * (m / max(gn, 1e-6))
            clipped += 1
    return out, clipped, len(units)


def test_agc_equals_unitwise_reference_for_linear_conv_and_bias():
    gen = torch.Generator().manual_seed(12)
    lin_w = torch.randn(6, 5, generator=gen, dtype=F64)
    lin_b = torch.zeros(6, dtype=F64)  # zero-initialised bias: eps sets its limit
    conv_w = torch.randn(4, 3, 3, 3, generator=gen, dtype=F64) * 0.1
    conv_b = torch.randn(4, generator=gen, dtype=F64)
    gain = torch.tensor(1.5, dtype=F64)
    empty = torch.zeros(0, 3, dtype=F64)
    params = [lin_w, lin_b, conv_w, conv_b, gain, empty]
    grads = [torch.randn(p.shape, generator=gen, dtype=F64) * s for p, s in zip(params, [0.02, 1e-3, 0.05, 0.1, 1, 1])]
    lam, eps = 0.02, 1e-3
    t = clip_by_unit_ratio(lam, eps)
    out, state = t.update(_clone(grads), t.init(params), params)
    clipped, units = 0, 0
    for o, g, w in zip(out, grads, params):
        expected, c, u = _agc_reference(g, w, lam, eps)
        torch.testing.assert_close(o, expected, rtol=1e-13, atol=0)
        clipped += c
        units += u
    assert units == 6 + 1 + 4 + 1 + 1 + 0
    assert 0 < clipped < units
    assert state.fraction_clipped.item() == pytest.approx(clipped / units)


def test_agc_equals_optax_with_torch_axes_not_with_its_default():
    jax, optax = _jax()
    gen = torch.Generator().manual_seed(13)
    params = [torch.randn(7, 5, generator=gen, dtype=F64), torch.randn(4, 3, 3, 3, generator=gen, dtype=F64)]
    grads = [torch.randn(p.shape, generator=gen, dtype=F64) * 0.05 for p in params]
    t = clip_by_unit_ratio(0.01)
    out, _ = t.update(_clone(grads), t.init(params), params)
    for o, g, p in zip(out, grads, params):
        axis = tuple(range(1, p.dim()))
        ox, _ = optax.adaptive_grad_clip(0.01, axis=axis).update([g.numpy()], None, [p.numpy()])
        np.testing.assert_allclose(o.numpy(), np.asarray(ox[0]), rtol=1e-13, atol=0)
    ox, _ = optax.adaptive_grad_clip(0.01).update([grads[0].numpy()], None, [params[0].numpy()])
    assert not np.allclose(out[0].numpy(), np.asarray(ox[0]))  # optax's default units are columns


def test_agc_in_bfloat16_is_close_to_float64():
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(8, 6, generator=gen, dtype=F64)
    g = torch.randn(8, 6, generator=gen, dtype=F64) * 0.05
    t = clip_by_unit_ratio(0.01)
    (ref,), _ = t.update([g.clone()], t.init([w]), [w])
    (low,), state = t.update([g.to(torch.bfloat16)], t.init([w]), [w.to(torch.bfloat16)])
    assert low.dtype == torch.bfloat16 and state.fraction_clipped.dtype == torch.float32
    torch.testing.assert_close(low.to(F64), ref, rtol=2e-2, atol=1e-6)


def _agc_complex_reference(g: torch.Tensor, w: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """AGC on the complex tensor itself (timm's unitwise norms over complex values)."""
    out = g.clone()
    units = [(...,)] if g.dim() <= 1 else [(i,) for i in range(g.shape[0])]
    for u in units:
        gn = math.sqrt(sum(abs(x) ** 2 for x in g[u].flatten().tolist()))
        wn = math.sqrt(sum(abs(x) ** 2 for x in w[u].flatten().tolist()))
        m = lam * max(wn, eps)
        if gn > m:
            out[u] = g[u] * (m / max(gn, 1e-6))
    return out


def test_agc_complex_parameters_have_the_units_of_the_complex_tensor():
    """A complex vector is one unit (not one per element of its real view); a complex matrix has
    one per row. Through a Clipper and an optimizer's clip= (both hand the rule real views)."""
    from steadygrad import Clipper
    from steadygrad.optim import Adam

    gen = torch.Generator().manual_seed(21)
    shapes = [(5,), (3, 4), ()]
    weights = [torch.randn(s, generator=gen, dtype=torch.complex128) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.complex128) * 0.03 for s in shapes]
    lam, eps = 0.02, 1e-3
    expected = [_agc_complex_reference(g, w, lam, eps) for g, w in zip(grads, weights)]
    assert not torch.allclose(expected[0], grads[0])  # the test clips something
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    Clipper(params, clip_by_unit_ratio(lam, eps)).clip_()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-13, atol=0)

    # Adam(clip=AGC) steps as Adam on the clipped gradients.
    clipped = [torch.nn.Parameter(w.clone()) for w in weights]
    plain = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(clipped, grads):
        p.grad = g.clone()
    for p, e in zip(plain, expected):
        p.grad = e.clone()
    Adam(clipped, lr=0.1, clip=clip_by_unit_ratio(lam, eps)).step()
    torch.optim.Adam(plain, lr=0.1).step()
    for a, b in zip(clipped, plain):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_agc_of_huge_float32_gradients_clips_instead_of_zeroing():
    """Rows whose squared norm overflows float32 (values 3e19) are clipped to the limit."""
    gen = torch.Generator().manual_seed(22)
    w = torch.randn(3, 5, generator=gen, dtype=F64)
    g = torch.randn(3, 5, generator=gen, dtype=F64) * 3e19
    expected, _, _ = _agc_reference(g, w, 0.01, 1e-3)
    t = clip_by_unit_ratio(0.01)
    for gg, ww in [(g, w), (g[0], w[0])]:  # rows, and a vector (one unit)
        exp = expected if gg.dim() == 2 else _agc_reference(gg, ww, 0.01, 1e-3)[0]
        (out,), _ = t.update([gg.float()], t.init([ww.float()]), [ww.float()])
        assert out.isfinite().all()
        torch.testing.assert_close(out.to(F64), exp, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# Update RMS (Adafactor)
# --------------------------------------------------------------------------------------------


def test_clip_update_rms_equals_formula_and_optax_block_rms():
    _, optax = _jax()
    grads = _grads(15, shapes=((5, 4), (7,), (2, 2, 3), (0,)))
    grads[1] = grads[1] * 0.1
    t = clip_update_rms(0.8)
    out, state = t.update(_clone(grads), t.init(grads), None)
    clipped = 0
    for o, g in zip(out, grads):
        values = g.flatten().tolist()
        rms = math.sqrt(sum(x * x for x in values) / len(values)) if values else 0.0
        clipped += rms > 0.8
        torch.testing.assert_close(o, g / max(1.0, rms / 0.8), rtol=1e-14, atol=0)
    assert torch.equal(out[1], grads[1])
    ox, _ = optax.clip_by_block_rms(0.8).update([g.numpy() for g in grads[:3]], None)
    for o, x in zip(out, ox):
        np.testing.assert_allclose(o.numpy(), np.asarray(x), rtol=1e-14, atol=0)
    assert clipped == 2
    assert state.fraction_clipped.item() == pytest.approx(2 / 4)


# --------------------------------------------------------------------------------------------
# torch.compile: no graph break, no host sync
# --------------------------------------------------------------------------------------------


def _all_updates(grads, params, nu, count, gate):
    out = []
    u, f1 = value_clip_update([g.clone() for g in grads], limit=0.5)
    out += u + [f1]
    u, f2 = norm_clip_update([g.clone() for g in grads], max_norm=1.0, norm_type=3.0)
    out += u + [f2]
    u, f3 = norm_clip_update([g.clone() for g in grads], max_norm=0.7, scope="tensor")
    out += u + [f3]
    u, f4 = moment_clip_update([g.clone() for g in grads], nu, count, k=1.0, beta=0.9, gate=gate)
    out += u + [f4]
    u, f5 = unit_ratio_clip_update([g.clone() for g in grads], params, clip_factor=0.1, eps=1e-3)
    out += u + [f5]
    return out


def test_updates_compile_fullgraph_and_equal_eager():
    params = _grads(16, shapes=((4, 3), (3,), (2, 3, 2, 2)))
    grads = _grads(17, shapes=((4, 3), (3,), (2, 3, 2, 2)))
    nu_e = [torch.rand_like(p) for p in params]
    count_e = [torch.tensor(float(i)) for i in range(3)]  # includes a first step (count 0)
    nu_c, count_c = _clone(nu_e), _clone(count_e)
    gate = torch.tensor(1.0)
    compiled = torch.compile(_all_updates, fullgraph=True)
    got = compiled(grads, params, nu_c, count_c, gate)
    want = _all_updates(grads, params, nu_e, count_e, gate)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    for a, b in zip(nu_c + count_c, nu_e + count_e):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_transform_update_compiles_fullgraph():
    """The whole transform update, commit gate included, traces without a graph break (the
    eager backend: dynamo's tracing is what proves the absence of host reads) and equals eager."""
    params = _grads(18)
    t = chain(clip_by_value(0.5), clip_by_norm(1.0), clip_by_moment(), clip_by_unit_ratio())
    compiled = torch.compile(t.update, fullgraph=True, backend="eager")
    for gate in (None, torch.tensor(0.0), torch.tensor(1.0)):
        state_e, state_c = t.init(params), t.init(params)
        for step in range(3):
            grads = _grads(19 + step)
            ctx = StepContext(gate=gate)
            out_e, state_e = t.update([g.clone() for g in grads], state_e, params, ctx)
            out_c, state_c = compiled([g.clone() for g in grads], state_c, params, ctx)
            for a, b in zip(out_e, out_c):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        for (_, le), (_, lc) in zip(state_leaves(state_e), state_leaves(state_c)):
            for fe, fc in zip(le, lc):
                for a, b in zip(fe if isinstance(fe, list) else [fe], fc if isinstance(fc, list) else [fc]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
