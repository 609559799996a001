"""steadygrad.core.norms: validation, per-tensor and total norms, the clip coefficient, scaling.

float64 unless a test is about another dtype. The distributed paths are in
test_norms_distributed.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steadygrad.core.dtensor import local_tensor
from steadygrad.core.norms import (
    WORLD,
    check_norm_type,
    check_threshold,
    clip_coefficient,
    norm_dtype,
    scale_,
    tensor_norms,
    total_norm,
)

INF = math.inf
ORDERS = [0.5, 1.0, 2.0, 3.0, INF]
SHAPES = [(3, 4), (5,), (0,), (2, 3, 2), (), (1, 0, 3)]


def _tensors(dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in SHAPES]


def _reference_norm(tensors, p):
    """The p-norm of the concatenation, in float64, by the formula."""
    flat = torch.cat(
        [t.detach().to(torch.complex128 if t.is_complex() else torch.float64).reshape(-1) for t in tensors]
    )
    a = flat.abs()
    if a.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return a.max() if math.isinf(p) else a.pow(p).sum().pow(1 / p)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [(2, 2.0), (1, 1.0), (0.5, 0.5), (3.0, 3.0), (INF, INF), ("inf", INF), ("2", 2.0), (np.float64(2.5), 2.5)],
)
def test_check_norm_type_accepts(given, expected):
    assert check_norm_type(given) == expected


@pytest.mark.parametrize(
    "bad", [0, 0.0, -1, -0.5, math.nan, -INF, "fro", "nuc", "abc", "-inf", "nan", "0", True, False, None, [2.0], 1j]
)
def test_check_norm_type_rejects(bad):
    with pytest.raises(ValueError, match="norm_type"):
        check_norm_type(bad)


@pytest.mark.parametrize("given", [1e-3, 1, 2.5, INF, torch.tensor(2.0), np.float32(0.5)])
def test_check_threshold_accepts(given):
    assert check_threshold(given, "max_norm") == float(given)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, -INF, True, "1", None, torch.tensor(-1.0), torch.tensor(True)])
def test_check_threshold_rejects(bad):
    with pytest.raises(ValueError, match="clip_value"):
        check_threshold(bad, "clip_value")


@pytest.mark.parametrize("fn", [tensor_norms, total_norm])
def test_bad_norm_type_raises_in_norms(fn):
    with pytest.raises(ValueError, match="norm_type"):
        fn([torch.ones(2)], 0.0)


def test_process_group_validation():
    with pytest.raises(ValueError, match="process_group"):
        total_norm([torch.ones(2)], 2.0, "everyone")
    with pytest.raises(TypeError, match="process_group"):
        total_norm([torch.ones(2)], 2.0, object())
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="initialised"):
            total_norm([torch.ones(2)], 2.0, WORLD)


# --- per-tensor norms -----------------------------------------------------------------------------


@pytest.mark.parametrize("p", ORDERS)
@pytest.mark.parametrize("foreach", [None, True, False])
def test_tensor_norms_match_vector_norm(p, foreach):
    ts = _tensors()
    norms = tensor_norms(ts, p, foreach=foreach)
    assert len(norms) == len(ts)
    for t, n in zip(ts, norms):
        assert n.shape == () and n.dtype == torch.float64
        if t.numel() == 0:
            assert n.item() == 0.0  # torch raises for inf here
        else:
            torch.testing.assert_close(n, torch.linalg.vector_norm(t, p), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.complex64, torch.float32),
        (torch.complex128, torch.float64),
    ],
)
def test_norm_dtypes(dtype, expected):
    assert norm_dtype(dtype) == expected
    ts = _tensors(dtype)
    for p in (2.0, INF):
        for t, n in zip(ts, tensor_norms(ts, p)):
            assert n.dtype == expected
            ref = _reference_norm([t], p).to(expected)
            torch.testing.assert_close(n, ref, rtol=1e-6 if expected == torch.float32 else 1e-14, atol=0)
        assert total_norm(ts, p).dtype == expected


def test_complex_norm_is_norm_of_complex_values():
    z = torch.tensor([3 + 4j, 0 + 0j, -1 + 0j], dtype=torch.complex128)
    for p in ORDERS:
        torch.testing.assert_close(tensor_norms([z], p)[0], torch.linalg.vector_norm(z, p), rtol=1e-14, atol=0)
    assert tensor_norms([z], INF)[0].item() == 5.0


def test_fp16_norm_does_not_overflow():
    x = torch.full((4, 100), 60000.0, dtype=torch.float16)  # finite; |x|_2 = 1.2e6 > 65504
    assert torch.linalg.vector_norm(x).isinf()  # what fp16 accumulation gives
    (n,) = tensor_norms([x])
    assert n.dtype == torch.float32
    torch.testing.assert_close(n, torch.tensor(1.2e6), rtol=1e-6, atol=0)
    torch.testing.assert_close(total_norm([x, x]), torch.tensor(1.2e6 * math.sqrt(2)), rtol=1e-6, atol=0)


# --- no overflow -----------------------------------------------------------------------------------


def _huge(dtype, value=3e19):
    """Finite tensors whose squares overflow float32 (3e19² > 3.4e38), next to ordinary ones."""
    g = torch.Generator().manual_seed(5)
    big = torch.randn(4, 6, generator=g, dtype=torch.float64) * value
    if dtype.is_complex:
        big = torch.complex(big, big.flip(0))
    return [big.to(dtype), torch.randn(5, generator=g, dtype=torch.float64).to(dtype), (big[:2] / 7).to(dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("p", [2.0, 3.0, 1.0, INF])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_finite_gradients_have_finite_norms(dtype, p, compiled):
    """The eager CPU path (float32 pass, scaled second pass where it overflowed) and the
    float64-accumulating path (torch.compile) both give the float64 oracle's norms."""
    ts = _huge(dtype)
    if p == 2.0:
        assert torch.linalg.vector_norm(ts[0].float() if not dtype.is_complex else ts[0]).isinf()  # torch's
    norms, total = tensor_norms, total_norm
    if compiled:
        torch._dynamo.reset()
        norms = torch.compile(tensor_norms, fullgraph=True, backend="aot_eager")
        total = torch.compile(total_norm, fullgraph=True, backend="aot_eager")
    per = norms(ts, p)
    for t, n in zip(ts, per):
        assert n.dtype == torch.float32 and n.isfinite()
        torch.testing.assert_close(n, _reference_norm([t], p).float(), rtol=2e-6, atol=0)
    n = total(ts, p)
    assert n.dtype == torch.float32
    torch.testing.assert_close(n, _reference_norm(ts, p).float(), rtol=2e-6, atol=0)


def test_norm_of_norms_does_not_overflow():
    """Each tensor's norm is finite in float32, their squares are not."""
    ts = [torch.full((4,), 1e19), torch.full((9,), -2e19), torch.ones(3)]
    torch.testing.assert_close(total_norm(ts), _reference_norm(ts, 2.0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(total_norm(ts, 4.0), _reference_norm(ts, 4.0).float(), rtol=1e-6, atol=0)


def test_row_norms_of_a_tensor_subclass_do_not_overflow():
    from steadygrad.core.norms import reduced_norms

    class Sub(torch.Tensor):
        pass

    t = torch.full((2, 3), 1e20).as_subclass(Sub)
    (n,) = reduced_norms([t], [(1,)])
    torch.testing.assert_close(n.as_subclass(torch.Tensor), torch.full((2, 1), 1e20 * math.sqrt(3)))


def test_float64_beyond_its_squares():
    ts = [torch.full((3,), 1e200, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    torch.testing.assert_close(tensor_norms(ts)[0], torch.tensor(math.sqrt(3) * 1e200, dtype=torch.float64))
    torch.testing.assert_close(total_norm(ts), torch.tensor(math.sqrt(3) * 1e200, dtype=torch.float64))


def test_overflow_only_beyond_the_range():
    """inf only where the norm itself exceeds float32, or an element is inf; NaN stays NaN."""
    assert total_norm([torch.full((4,), 3e38)]).isinf()  # the norm is 6e38
    assert tensor_norms([torch.full((4,), 1e38)])[0].item() == pytest.approx(2e38, rel=1e-6)
    assert total_norm([torch.full((4,), 3e19), torch.tensor([math.inf])]).isinf()
    assert total_norm([torch.full((4,), 3e19), torch.tensor([math.nan])]).isnan()
    assert tensor_norms([torch.tensor([3e19, math.nan])])[0].isnan()


def test_clip_grad_norm_of_huge_gradients_clips_instead_of_zeroing():
    import steadygrad as sg

    w = torch.nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.full((3, 4), 3e19)
    n = sg.clip_grad_norm_([w], max_norm=1.0)
    torch.testing.assert_close(n, torch.tensor(3e19 * math.sqrt(12)))
    torch.testing.assert_close(torch.linalg.vector_norm(w.grad.double()), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(w.grad, torch.full((3, 4), 1 / math.sqrt(12)))


# --- total norm --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", ORDERS)
def test_total_norm_is_norm_of_concatenation(p):
    ts = _tensors()
    n = total_norm(ts, p)
    assert n.shape == () and n.dtype == torch.float64 and n.device == ts[0].device
    torch.testing.assert_close(n, _reference_norm(ts, p), rtol=1e-13, atol=0)
    if not math.isinf(p):  # torch raises for inf with a zero-element tensor
        torch.testing.assert_close(n, torch.nn.utils.get_total_norm(ts, p), rtol=1e-14, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, INF])
def test_total_norm_mixed_dtypes(p):
    g = torch.Generator().manual_seed(1)
    ts = [
        torch.randn(7, generator=g).to(torch.float16),
        torch.randn(3, 2, generator=g).to(torch.bfloat16),
        torch.randn(4, generator=g, dtype=torch.float32),
    ]
    n = total_norm(ts, p)
    assert n.dtype == torch.float32
    torch.testing.assert_close(n, _reference_norm(ts, p).float(), rtol=1e-6, atol=0)
    wide = total_norm([*ts, torch.randn(2, generator=g, dtype=torch.float64)], p)
    assert wide.dtype == torch.float64


def test_total_norm_single_and_empty():
    t = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert total_norm([t]).item() == 5.0
    assert total_norm([t], INF).item() == 4.0
    empty = total_norm([])
    assert empty.shape == () and empty.item() == 0.0 and empty.dtype == torch.float32
    only_empty = total_norm([torch.empty(0, 3)], INF)
    assert only_empty.item() == 0.0


def test_total_norm_nonfinite_propagates():
    assert total_norm([torch.tensor([1.0, math.inf])]).isinf()
    assert total_norm([torch.tensor([1.0, math.nan])]).isnan()
    assert total_norm([torch.tensor([1.0, math.nan])], INF).isnan()


def test_norms_of_parameters_do_not_track_gradients():
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    n = total_norm([w * 2])
    assert not n.requires_grad
    assert local_tensor(w) is w


# --- clip coefficient and scaling -------------------------------------------------------------------


def test_clip_coefficient():
    n = torch.tensor(10.0, dtype=torch.float64)
    c = clip_coefficient(n, 1.0)
    assert c.dtype == torch.float64 and c.item() == 1.0 / (10.0 + 1e-6)
    assert clip_coefficient(torch.tensor(0.5, dtype=torch.float64), 1.0).item() == 1.0  # exactly 1
    assert clip_coefficient(torch.tensor(math.inf), 1.0).item() == 0.0
    assert clip_coefficient(torch.tensor(math.nan), 1.0).isnan()
    half = clip_coefficient(torch.tensor(3000.0, dtype=torch.float16), torch.tensor(1.0))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(1 / 3000, rel=1e-7)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_applies_factor_in_float32(dtype, foreach):
    g = torch.Generator().manual_seed(2)
    ts = [(torch.randn(s, generator=g) * 100).to(dtype) for s in [(64,), (8, 8), (0,)]]
    factor = torch.tensor(1 / 3.0001, dtype=torch.float32)
    wide = [(t.float() * factor).to(dtype) for t in ts]
    rounded_first = [t * factor.to(dtype) for t in ts]
    # The data tells the two orders apart, so the assertion below can fail.
    assert any(not torch.equal(a, b) for a, b in zip(wide, rounded_first))
    scale_(ts, factor, foreach=foreach)
    for t, ref in zip(ts, wide):
        assert t.dtype == dtype
        assert torch.equal(t, ref)


def test_scale_in_chunks(monkeypatch):
    import steadygrad.core.norms as norms

    monkeypatch.setattr(norms, "_WIDEN_CHUNK", 10)  # several chunks, one tensor larger than a chunk
    ts = [torch.arange(n, dtype=torch.float16) for n in (4, 5, 30, 3)]
    expected = [(t.float() * 0.3).half() for t in ts]
    scale_(ts, torch.tensor(0.3))
    assert all(torch.equal(t, e) for t, e in zip(ts, expected))


# --- no host sync ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's inductor imports torch.jit
def test_total_norm_and_coefficient_compile_fullgraph():
    """fullgraph=True fails on a graph break (a Python branch on a tensor value), and the traced
    graph must not read a value on the host (``.item()`` is traced as a call to ``item``)."""
    from torch._inductor.compile_fx import compile_fx

    def clip_coefs(tensors, max_norm):
        n2 = total_norm(tensors, 2.0)
        ninf = total_norm(tensors, INF)
        return n2, clip_coefficient(n2, max_norm), clip_coefficient(ninf, max_norm)

    graphs = []

    def inspecting_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    ts = [t for t in _tensors(torch.float32) if t.numel() > 0]
    ts.append(torch.randn(5).to(torch.bfloat16))
    max_norm = torch.tensor(1.0)
    expected = clip_coefs(ts, max_norm)
    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):
        got = torch.compile(clip_coefs, fullgraph=True, backend=inspecting_inductor)(ts, max_norm)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert len(graphs) == 1
    assert _host_reads(graphs[0]) == []

    # The controls: the same checks catch a host read and a branch on a tensor value.
    def with_item(tensors):
        return total_norm(tensors) * total_norm(tensors).item()

    def with_branch(tensors):
        n = total_norm(tensors)
        return n * 2 if n > 0 else n

    control = []
    torch.compile(with_item, fullgraph=True, backend=lambda gm, _: control.append(gm) or gm)(ts)
    assert _host_reads(control[0]) != []
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        torch.compile(with_branch, fullgraph=True, backend="eager")(ts)
    torch._dynamo.reset()


def _host_reads(gm):
    return [
        n
        for n in gm.graph.nodes
        if (n.op == "call_method" and n.target in ("item", "tolist", "__bool__"))
        or (n.op == "call_function" and "_local_scalar_dense" in str(n.target))
    ]
