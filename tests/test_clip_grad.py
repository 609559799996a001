"""steadygrad.clip_grad: the torch.nn.utils drop-ins, against torch and against torch's invariants.

float64 unless a test is about another dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils as tnu

from steadygrad.clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

INF = math.inf
SHAPES = [(3, 4), (5,), (0,), (2, 3, 2), (1,)]


def _params(scale=1.0, dtype=torch.float64, shapes=SHAPES, seed=0, with_grad=True):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]
    if with_grad:
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return ps


def _clone(ps):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def _grads(ps):
    return [p.grad for p in ps if p.grad is not None]


def _formula_norm(tensors, p):
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return flat.abs().max() if math.isinf(p) else flat.abs().pow(p).sum().pow(1 / p)


def _assert_same(a, b, rtol=1e-14):
    torch.testing.assert_close(a, b, rtol=rtol, atol=0, equal_nan=True)


# --- parity with torch.nn.utils ---------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, INF])
@pytest.mark.parametrize("scale", [10.0, 1e-3], ids=["above", "below"])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_norm_matches_torch(p, scale, foreach):
    max_norm = 1.5
    ours = _params(scale)
    if math.isinf(p):  # torch raises on the zero-element gradient with inf
        ours = [q for q in ours if q.numel() > 0]
    theirs = _clone(ours)
    n_ours = clip_grad_norm_(ours, max_norm, p, foreach=foreach)
    n_theirs = tnu.clip_grad_norm_(theirs, max_norm, p, foreach=foreach)
    _assert_same(n_ours, n_theirs)
    assert (n_ours > max_norm).item() == (scale > 1)  # the data sits on the intended side
    for a, b in zip(_grads(ours), _grads(theirs)):
        _assert_same(a, b)


@pytest.mark.parametrize("scale", [10.0, 1e-3], ids=["above", "below"])
def test_inf_norm_with_zero_element_gradient(scale):
    ps = _params(scale)
    before = [g.clone() for g in _grads(ps)]
    expected = _formula_norm(before, INF)
    n = clip_grad_norm_(ps, 1.0, INF)
    with pytest.raises(RuntimeError):  # torch cannot do this one
        tnu.clip_grad_norm_(_clone(ps), 1.0, INF)
    assert n.item() == expected.item()
    coef = min(1.0, 1.0 / (expected.item() + 1e-6))
    for g, b in zip(_grads(ps), before):
        _assert_same(g, b * coef)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0])
def test_get_total_norm_and_clip_grads_with_norm_match_torch(p):
    ps = _params(5.0)
    grads = _grads(ps)
    n = get_total_norm(grads, p)
    _assert_same(n, tnu.get_total_norm(grads, p))
    _assert_same(get_total_norm(grads[0], p), tnu.get_total_norm(grads[0], p))
    theirs = _clone(ps)
    clip_grads_with_norm_(ps, 2.0, n)
    tnu.clip_grads_with_norm_(theirs, 2.0, n)
    for a, b in zip(_grads(ps), _grads(theirs)):
        _assert_same(a, b)


@pytest.mark.parametrize("clip_value", [0.3, 1.0, INF])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_matches_torch(clip_value, foreach):
    ps = _params(2.0)
    ps[0].grad[0, 0] = math.nan
    theirs = _clone(ps)
    clip_grad_value_(ps, clip_value, foreach=foreach)
    tnu.clip_grad_value_(theirs, clip_value, foreach=foreach)
    for a, b in zip(_grads(ps), _grads(theirs)):
        _assert_same(a, b, rtol=0)
    assert all(g.abs().max() <= clip_value for g in _grads(ps)[1:] if g.numel())


def test_complex_gradients_match_torch():
    g = torch.Generator().manual_seed(3)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.complex128)) for s in [(4,), (2, 3)]]
    for q in ours:
        q.grad = torch.randn(q.shape, generator=g, dtype=torch.complex128) * 4
    theirs = _clone(ours)
    _assert_same(clip_grad_norm_(ours, 1.0), tnu.clip_grad_norm_(theirs, 1.0))
    for a, b in zip(_grads(ours), _grads(theirs)):
        _assert_same(a, b)


# --- torch's invariants -----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, INF])
def test_clipped_norm_equals_max_norm_with_one_factor(p):
    ps = _params(10.0)
    before = [g.clone() for g in _grads(ps)]
    n = clip_grad_norm_(ps, 0.7, p)
    _assert_same(n, _formula_norm(before, p), rtol=1e-13)  # the returned norm is the pre-clip one
    after = _grads(ps)
    torch.testing.assert_close(_formula_norm(after, p), torch.tensor(0.7, dtype=torch.float64), rtol=1e-6, atol=0)
    ratios = torch.cat([(a / b).reshape(-1) for a, b in zip(after, before)])
    assert ratios.numel() > 0
    _assert_same(ratios, torch.full_like(ratios, 0.7 / (n.item() + 1e-6)))


def test_small_gradients_untouched():
    ps = _params(1e-3)
    before = [g.clone() for g in _grads(ps)]
    n = clip_grad_norm_(ps, 1.0)
    assert n.item() < 1.0
    for a, b in zip(_grads(ps), before):
        assert torch.equal(a, b)


def test_gradients_always_multiplied():
    # The coefficient is applied whatever its value, never through a branch on the host: a NaN
    # norm turns every gradient into NaN, as in torch.
    ps = _params(1e-3)
    ps[1].grad[0] = math.nan
    theirs = _clone(ps)
    n = clip_grad_norm_(ps, 1.0)
    tnu.clip_grad_norm_(theirs, 1.0)
    assert n.isnan()
    for a, b in zip(_grads(ps), _grads(theirs)):
        assert a.isnan().all()
        _assert_same(a, b)


def test_tensor_equals_one_item_list():
    (a,) = _params(10.0, shapes=[(6, 2)])
    (b,) = _clone([a])
    na = clip_grad_norm_(a, 1.0)
    nb = clip_grad_norm_([b], 1.0)
    assert torch.equal(na, nb) and torch.equal(a.grad, b.grad)
    na = get_total_norm(a.grad, 3.0)
    assert torch.equal(na, get_total_norm([a.grad], 3.0))
    clip_grad_value_(a, 0.01)
    clip_grad_value_([b], 0.01)
    assert torch.equal(a.grad, b.grad)
    clip_grads_with_norm_(a, 0.5, torch.tensor(2.0))
    clip_grads_with_norm_([b], 0.5, torch.tensor(2.0))
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("p", [2.0, INF])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_foreach_settings_agree(p, dtype):
    results = []
    for foreach in (None, True, False):
        ps = _params(10.0, dtype=dtype)
        n = clip_grad_norm_(ps, 1.0, p, foreach=foreach)
        clip_grad_value_(ps, 0.05, foreach=foreach)
        results.append((n, _grads(ps)))
    for n, grads in results[1:]:
        assert torch.equal(n, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_parameters_without_grad_ignored():
    ps = _params(10.0)
    bare = _params(shapes=[(3,), (2, 2)], with_grad=False, seed=5)
    mixed = [bare[0], *ps, bare[1]]
    reference = _clone(ps)
    n = clip_grad_norm_(mixed, 1.0)
    _assert_same(n, tnu.clip_grad_norm_(reference, 1.0))
    assert bare[0].grad is None and bare[1].grad is None
    for a, b in zip(_grads(ps), _grads(reference)):
        _assert_same(a, b)
    clip_grad_value_(mixed, 0.1)
    assert bare[0].grad is None
    assert clip_grad_norm_(bare, 1.0).item() == 0.0


def test_empty_inputs():
    assert clip_grad_norm_([], 1.0).item() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        assert clip_grad_norm_((p for p in []), 1.0).item() == 0.0
    clip_grads_with_norm_([], 1.0, torch.tensor(3.0))
    clip_grad_value_([], 1.0)
    assert get_total_norm([]).item() == 0.0


def test_generator_is_consumed_once():
    ps = _params(10.0)
    reference = _clone(ps)
    n = clip_grad_norm_((p for p in ps), 1.0)
    _assert_same(n, tnu.clip_grad_norm_(reference, 1.0))
    for a, b in zip(_grads(ps), _grads(reference)):
        _assert_same(a, b)


def test_error_if_nonfinite():
    for bad in (math.inf, math.nan):
        ps = _params(1.0)
        ps[0].grad[1, 1] = bad
        before = [g.clone() for g in _grads(ps)]
        with pytest.raises(RuntimeError, match="error_if_nonfinite"):
            clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
        with pytest.raises(RuntimeError):
            tnu.clip_grad_norm_(_clone(ps), 1.0, error_if_nonfinite=True)
        for a, b in zip(_grads(ps), before):  # raised before touching anything
            _assert_same(a, b, rtol=0)
        with pytest.raises(RuntimeError, match="error_if_nonfinite"):
            get_total_norm(_grads(ps), error_if_nonfinite=True)
    ps = _params(10.0)
    n = clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    assert torch.isfinite(n)


def test_clip_grads_with_norm_accepts_a_number():
    ps = _params(10.0)
    reference = _clone(ps)
    clip_grads_with_norm_(ps, 1.0, 20.0)
    tnu.clip_grads_with_norm_(reference, 1.0, torch.tensor(20.0, dtype=torch.float64))
    for a, b in zip(_grads(ps), _grads(reference)):
        _assert_same(a, b)


# --- low precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [None, False])
def test_fp16_overflow_is_clipped_where_torch_zeroes(foreach):
    def make():
        a = torch.nn.Parameter(torch.zeros(64, 16, dtype=torch.float16))
        b = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
        a.grad = torch.full_like(a, 30000.0)
        a.grad[::2] = -20000.0
        b.grad = torch.full_like(b, 60000.0)
        return [a, b]

    ours, theirs = make(), make()
    assert all(torch.isfinite(g).all() for g in _grads(ours))
    expected = _formula_norm(_grads(ours), 2.0)  # about 8.2e5 > 65504
    assert expected > 65504

    n = clip_grad_norm_(ours, 1.0, foreach=foreach)
    assert n.dtype == torch.float32
    torch.testing.assert_close(n.double(), expected, rtol=1e-6, atol=0)
    assert all(g.dtype == torch.float16 for g in _grads(ours))
    torch.testing.assert_close(
        _formula_norm(_grads(ours), 2.0), torch.tensor(1.0, dtype=torch.float64), rtol=1e-3, atol=0
    )

    n_torch = tnu.clip_grad_norm_(theirs, 1.0, foreach=foreach)  # torch's fp16 norm overflows
    assert n_torch.dtype == torch.float16 and n_torch.isinf()
    assert all((g == 0).all() for g in _grads(theirs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_norms_are_float32(dtype):
    ps = _params(3.0, dtype=dtype)
    assert get_total_norm(_grads(ps)).dtype == torch.float32
    assert get_total_norm(_grads(ps), INF).dtype == torch.float32
    before = [g.float() for g in _grads(ps)]
    n = clip_grad_norm_(ps, 1.0)
    assert n.dtype == torch.float32
    torch.testing.assert_close(n.double(), _formula_norm(before, 2.0), rtol=1e-6, atol=0)
    # applied in float32, then cast: exactly (g32 · coef32).to(dtype)
    coef = torch.clamp(1.0 / (n + 1e-6), max=1.0)
    for g, b in zip(_grads(ps), before):
        assert g.dtype == dtype
        assert torch.equal(g, (b * coef).to(dtype))


# --- bad inputs ------------------------------------------------------------------------------


def _bad_calls():
    def ps():
        return _params(10.0)

    calls = []
    for v in [0, 0.0, -1.0, math.nan, -INF, True, "1", None]:
        calls.append((f"clip_grad_norm_-max_norm={v!r}", "max_norm", lambda v=v: clip_grad_norm_(ps(), v)))
        calls.append(
            (
                f"clip_grads_with_norm_-max_norm={v!r}",
                "max_norm",
                lambda v=v: clip_grads_with_norm_(ps(), v, torch.tensor(3.0)),
            )
        )
        calls.append((f"clip_grad_value_-clip_value={v!r}", "clip_value", lambda v=v: clip_grad_value_(ps(), v)))
    for v in [0, -1.0, -0.5, math.nan, -INF, "fro", "nuc", "max", True, None]:
        calls.append((f"clip_grad_norm_-norm_type={v!r}", "norm_type", lambda v=v: clip_grad_norm_(ps(), 1.0, v)))
        calls.append((f"get_total_norm-norm_type={v!r}", "norm_type", lambda v=v: get_total_norm(_grads(ps()), v)))
    return calls


_BAD = _bad_calls()


@pytest.mark.parametrize(("name", "call"), [(c[1], c[2]) for c in _BAD], ids=[c[0] for c in _BAD])
def test_bad_inputs_raise_value_error(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_bad_input_leaves_gradients_alone():
    ps = _params(10.0)
    before = [g.clone() for g in _grads(ps)]
    with pytest.raises(ValueError):
        clip_grad_norm_(ps, 1.0, norm_type=-2)
    with pytest.raises(ValueError):
        clip_grad_norm_(ps, -1.0)
    assert all(torch.equal(a, b) for a, b in zip(_grads(ps), before))


def test_string_inf_norm_type():
    ps = _params(10.0)
    ps = [p for p in ps if p.numel()]
    reference = _clone(ps)
    _assert_same(clip_grad_norm_(ps, 1.0, "inf"), tnu.clip_grad_norm_(reference, 1.0, "inf"))
