"""GradAccumulator on one process: exact window gradients (float64), GradScaler skips, bad inputs."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import steadygrad as sg
from steadygrad.accumulate import GradAccumulator, WindowCounts
from steadygrad.optim import Adam

from ._accumulate_models import (
    loss_sum,
    make_micro_batches,
    make_model,
    micro_mean_grads,
    num_items,
    token_mean_grads,
    token_sum_grads,
)

# Uneven: 7, 1, 12 and 30 padded tokens per micro-batch, random lengths inside.
SHAPES = [(2, 4), (1, 1), (3, 4), (5, 6)]
TOL = dict(rtol=1e-12, atol=1e-13)


def grads_of(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def assert_grads_close(actual, expected, **tol) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or TOL))


def max_rel_diff(actual, expected) -> float:
    num = max(float((a - e).abs().max()) for a, e in zip(actual, expected))
    den = max(float(e.abs().max()) for e in expected)
    return num / den


def accumulate(model, acc, mbs, *, reduction="items", as_tensor=True) -> WindowCounts:
    """Backpropagates each micro-batch with the loss its mode documents, counts it, finalizes."""
    for mb in mbs:
        loss = loss_sum(model, mb)
        if reduction == "mean":
            loss = loss / mb.mask.sum()
        loss.backward()
        acc.count(mb.mask.sum() if as_tensor else num_items(mb))
    return acc.finalize_()


# ---- the semantics, float64 ------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor-counts", "int-counts"])
def test_items_equals_one_big_batch(as_tensor):
    mbs = make_micro_batches(0, SHAPES)
    assert len({num_items(mb) for mb in mbs}) == len(mbs)  # the token counts really differ
    model = make_model()
    expected = token_mean_grads(model, mbs)
    acc = GradAccumulator(model.parameters(), reduction="items")
    counts = accumulate(model, acc, mbs, as_tensor=as_tensor)
    assert_grads_close(grads_of(model), expected)
    assert counts.items.dtype == torch.int64 and counts.items.device == next(model.parameters()).device
    assert int(counts.items) == sum(num_items(mb) for mb in mbs)
    assert int(counts.micro_batches) == len(mbs)


def test_naive_mean_of_means_differs_from_the_item_mean():
    """The trainer bug: mean loss per micro-batch, divided by k. The test data can tell."""
    mbs = make_micro_batches(0, SHAPES)
    model = make_model()
    expected = token_mean_grads(model, mbs)
    for mb in mbs:
        (loss_sum(model, mb) / mb.mask.sum() / len(mbs)).backward()
    assert max_rel_diff(grads_of(model), expected) > 1e-2


def test_mean_mode_is_the_mean_of_micro_batch_means():
    mbs = make_micro_batches(1, SHAPES)
    model = make_model()
    expected = micro_mean_grads(model, mbs)
    acc = GradAccumulator(model.parameters(), reduction="mean")
    counts = accumulate(model, acc, mbs, reduction="mean")
    assert_grads_close(grads_of(model), expected)
    assert int(counts.micro_batches) == len(mbs)
    # ... which is not the item mean on this data
    assert max_rel_diff(grads_of(model), token_mean_grads(model, mbs)) > 1e-2


def test_mean_mode_counts_without_items():
    mbs = make_micro_batches(2, SHAPES[:3])
    model = make_model()
    expected = micro_mean_grads(model, mbs)
    acc = GradAccumulator(model.parameters(), reduction="mean")
    for mb in mbs:
        (loss_sum(model, mb) / mb.mask.sum()).backward()
        acc.count()
    counts = acc.finalize_()
    assert_grads_close(grads_of(model), expected)
    assert int(counts.items) == 0 and int(counts.micro_batches) == 3


def test_sum_mode_is_the_plain_sum():
    mbs = make_micro_batches(3, SHAPES)
    model = make_model()
    expected = token_sum_grads(model, mbs)
    acc = GradAccumulator(model.parameters(), reduction="sum")
    accumulate(model, acc, mbs, reduction="sum")
    assert_grads_close(grads_of(model), expected)
    assert max_rel_diff(grads_of(model), token_mean_grads(model, mbs)) > 1.0  # not a mean


@pytest.mark.parametrize("set_to_none", [True, False])
def test_second_window_after_zero_grad(set_to_none):
    """Counts reset at finalize_: window 2 is divided by its own items only."""
    w1 = make_micro_batches(4, SHAPES)
    w2 = make_micro_batches(5, [(4, 3), (2, 8), (1, 5)])
    model = make_model()
    acc = GradAccumulator(model.parameters())
    accumulate(model, acc, w1)
    model.zero_grad(set_to_none=set_to_none)
    counts = accumulate(model, acc, w2)
    assert int(counts.items) == sum(num_items(mb) for mb in w2)
    assert_grads_close(grads_of(model), token_mean_grads(model, w2))


def test_partial_window_at_the_end_of_an_epoch():
    """Windows of 4, 4 and then the 2 left over micro-batches: each is its own big batch."""
    data = make_micro_batches(6, [(2, 4), (1, 7), (3, 2), (2, 9), (1, 3), (4, 4), (2, 2), (3, 5), (1, 8), (2, 6)])
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model.parameters())
    for start in range(0, len(data), 4):
        window = data[start : start + 4]
        expected = token_mean_grads(model, window)
        accumulate(model, acc, window)
        assert_grads_close(grads_of(model), expected)
        opt.step()  # the next window sees new parameters
        opt.zero_grad()
    assert len(window) == 2


def test_a_window_of_only_padding_gives_zero_not_nan():
    mbs = make_micro_batches(7, [(2, 3), (1, 4)])
    mbs = [mb._replace(mask=torch.zeros_like(mb.mask)) for mb in mbs]
    model = make_model()
    acc = GradAccumulator(model.parameters())
    counts = accumulate(model, acc, mbs)
    assert int(counts.items) == 0
    for g in grads_of(model):
        assert torch.equal(g, torch.zeros_like(g))


def test_finalize_without_count_raises_and_a_second_finalize_raises():
    model = make_model()
    acc = GradAccumulator(model.parameters())
    loss_sum(model, make_micro_batches(8, [(2, 3)])[0]).backward()
    with pytest.raises(RuntimeError, match="no count"):
        acc.finalize_()
    acc.count(3)
    acc.finalize_()
    with pytest.raises(RuntimeError, match="no count"):
        acc.finalize_()


def test_parameters_without_grad_and_low_precision_grads():
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float32))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    unused = torch.nn.Parameter(torch.ones(2))
    acc = GradAccumulator([{"params": [a]}, {"params": [b, unused]}])
    (a.sum() * 6).backward()
    (b.sum() * 6).backward()
    acc.count(4)
    acc.count(np.int64(4))
    acc.finalize_()
    assert torch.equal(a.grad, torch.full((3,), 0.75))
    assert torch.equal(b.grad, torch.full((2,), 0.75, dtype=torch.bfloat16))
    assert unused.grad is None


def test_count_and_finalize_never_read_device_values_on_the_host(monkeypatch):
    mbs = make_micro_batches(9, SHAPES)
    model = make_model()
    expected = token_mean_grads(model, mbs)
    acc = GradAccumulator(model.parameters())
    losses = [loss_sum(model, mb) for mb in mbs]
    counts = [mb.mask.sum() for mb in mbs]

    def sync(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, sync)
        for loss, n in zip(losses, counts):
            loss.backward()
            acc.count(n)
        acc.count(0)  # a Python int count in the same window
        acc.finalize_()
    assert_grads_close(grads_of(model), expected)


def test_state_dict_lets_a_window_span_a_checkpoint():
    mbs = make_micro_batches(10, SHAPES)
    model = make_model()
    expected = token_mean_grads(model, mbs)
    acc = GradAccumulator(model.parameters())
    for mb in mbs[:2]:
        loss_sum(model, mb).backward()
        acc.count(mb.mask.sum())
    acc.count(0)  # a host-side count is saved too
    saved = copy.deepcopy({"acc": acc.state_dict(), "grads": grads_of(model), "model": model.state_dict()})

    model2 = make_model(seed=123)
    model2.load_state_dict(saved["model"])
    for p, g in zip(model2.parameters(), saved["grads"]):
        p.grad = g
    acc2 = GradAccumulator(model2.parameters())
    acc2.load_state_dict(saved["acc"])
    assert acc2.micro_batches == 3
    for mb in mbs[2:]:
        loss_sum(model2, mb).backward()
        acc2.count(num_items(mb))
    acc2.finalize_()
    assert_grads_close(grads_of(model2), expected)
    empty = acc2.state_dict()
    assert int(empty["items"]) == 0 and empty["micro_batches"] == 0

    with pytest.raises(ValueError, match="reduction"):
        GradAccumulator(model2.parameters(), reduction="mean").load_state_dict(saved["acc"])
    with pytest.raises(ValueError, match="lacks"):
        acc2.load_state_dict({"reduction": "items"})


# ---- bad inputs -------------------------------------------------------------------------------------


def _params():
    return [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(reduction="avg"), ValueError, "unknown reduction"),
        (dict(reduction="Items"), ValueError, "unknown reduction"),
        (dict(rank_reduction="avg"), ValueError, "unknown rank_reduction"),
        (dict(rank_reduction="mean"), ValueError, "process_group"),
        (dict(rank_reduction="sum"), ValueError, "process_group"),
        (dict(process_group=object()), ValueError, "rank_reduction"),
        (dict(process_group=object(), rank_reduction="mean"), ValueError, "not initialized"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradAccumulator(_params(), **kwargs)


def test_bad_parameters():
    p = _params()
    with pytest.raises(TypeError, match="set"):
        GradAccumulator(set(p))
    with pytest.raises(TypeError, match="tensors"):
        GradAccumulator([p[0], 1.0])
    with pytest.raises(TypeError):
        GradAccumulator(3)
    with pytest.raises(ValueError, match="empty"):
        GradAccumulator([])
    with pytest.raises(ValueError, match="twice"):
        GradAccumulator([p[0], p[1], p[0]])
    # accepted forms: one tensor, named parameters, parameter groups
    model = make_model()
    assert len(GradAccumulator(p[0]).params) == 1
    assert len(GradAccumulator(model.named_parameters()).params) == 5
    assert len(GradAccumulator(torch.optim.SGD(model.parameters(), lr=1.0).param_groups).params) == 5


@pytest.mark.parametrize(
    "n, error, match",
    [
        (-1, ValueError, ">= 0"),
        (2.5, ValueError, "whole number"),
        (math.nan, ValueError, "whole number"),
        (math.inf, ValueError, "whole number"),
        (True, TypeError, "bool"),
        ("3", TypeError, "int or an integer tensor"),
        (torch.tensor(2.0), TypeError, "integer dtype"),
        (torch.tensor(True), TypeError, "integer dtype"),
        (torch.tensor([1, 2]), ValueError, "one element"),
        (None, TypeError, "number of items"),
    ],
)
def test_bad_counts(n, error, match):
    acc = GradAccumulator(_params())
    with pytest.raises(error, match=match):
        acc.count(n)
    assert acc.micro_batches == 0  # a refused count records nothing


def test_whole_float_and_one_element_counts_are_accepted():
    p = torch.nn.Parameter(torch.ones(2))
    acc = GradAccumulator([p])
    p.grad = torch.full((2,), 10.0)
    acc.count(3.0)
    acc.count(torch.tensor([2], dtype=torch.int32))
    counts = acc.finalize_()
    assert int(counts.items) == 5
    assert torch.equal(p.grad, torch.full((2,), 2.0))


# ---- GradScaler and the end of a window --------------------------------------------------------------


class EmaNormClipper:
    """A stand-in for an adaptive clipper with state: clips the global norm to ``factor`` times
    the EMA of past norms, and learns that EMA only where ``commit`` is 1 (unless told to ignore
    it, as a naive clipper would)."""

    def __init__(self, params, *, beta=0.5, factor=0.6, respect_commit=True):
        self.params = list(params)
        self.beta, self.factor, self.respect_commit = beta, factor, respect_commit
        self.ema = torch.zeros((), dtype=torch.float64)
        self.steps = torch.zeros((), dtype=torch.float64)
        self.seen: list[list[torch.Tensor]] = []
        self.clipped: list[bool] = []

    def clip_(self, commit):
        grads = [p.grad for p in self.params]
        self.seen.append([g.clone() for g in grads])
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        learned = self.steps > 0
        threshold = torch.where(learned, self.factor * self.ema, torch.full_like(self.ema, math.inf))
        coef = (threshold / (norm + 1e-6)).clamp(max=1.0)
        self.clipped.append(bool(coef < 1))  # test bookkeeping only; a real clipper would not sync
        torch._foreach_mul_(grads, coef)
        new_ema = torch.where(learned, self.beta * self.ema + (1 - self.beta) * norm, norm)
        if self.respect_commit:
            self.ema = torch.where(commit > 0, new_ema, self.ema)
            self.steps = self.steps + commit
        else:
            self.ema, self.steps = new_ema, self.steps + 1
        return norm


def _snapshot(model, opt, clipper):
    state = opt.state_dict()["state"]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "opt": {k: {n: t.clone() for n, t in s.items()} for k, s in state.items()},
        "ema": clipper.ema.clone(),
        "steps": clipper.steps.clone(),
    }


def _assert_same(a, b, **tol):
    tol = tol or {"rtol": 0, "atol": 0}  # bit-for-bit unless a tolerance is given

    def close(x, y):
        torch.testing.assert_close(x, y, **tol)

    for x, y in zip(a["params"], b["params"]):
        close(x, y)
    assert a["opt"].keys() == b["opt"].keys()
    for k in a["opt"]:
        assert a["opt"][k].keys() == b["opt"][k].keys()
        for n in a["opt"][k]:
            close(a["opt"][k][n], b["opt"][k][n])
    close(a["ema"], b["ema"])
    close(a["steps"], b["steps"])


WINDOWS = [[(2, 5), (1, 2), (3, 3)], [(2, 2), (2, 6), (1, 4)], [(1, 7), (3, 2), (2, 3), (1, 1)]]


def _amp_run(inject, *, respect_commit=True):
    """Three windows with GradScaler("cpu"); an inf enters one micro-batch of window 1."""
    windows = [make_micro_batches(20 + i, shapes) for i, shapes in enumerate(WINDOWS)]
    model = make_model()
    opt = Adam(model.parameters(), lr=0.05)
    clipper = EmaNormClipper(model.parameters(), respect_commit=respect_commit)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    acc = GradAccumulator(model.parameters(), reduction="items")
    ends, snapshots, expected, scales = [], [], [], []
    for w, mbs in enumerate(windows):
        expected.append(token_mean_grads(model, mbs))
        for i, mb in enumerate(mbs):
            loss = loss_sum(model, mb)
            if w == 1 and i == 1 and inject == "loss":
                loss = loss * math.inf
            scaler.scale(loss).backward()
            if w == 1 and i == 1 and inject == "grad":
                model.mix.weight.grad[0, 1] = math.inf
            acc.count(mb.mask.sum())
        scales.append(scaler.get_scale())
        ends.append(acc.finish_window(opt, scaler, clip=clipper))
        assert all(p.grad is None for p in model.parameters())
        snapshots.append(_snapshot(model, opt, clipper))
    return windows, ends, snapshots, expected, scales, clipper, scaler


@pytest.mark.parametrize("inject", ["loss", "grad"])
def test_gradscaler_skips_the_step_and_the_clipper_learns_nothing(inject):
    windows, ends, snaps, expected, scales, clipper, scaler = _amp_run(inject)

    # the scaler saw the inf: window 1 is skipped, its scale backs off
    assert [float(e.commit) for e in ends] == [1.0, 0.0, 1.0]
    assert scales[2] == scales[1] * 0.5
    # nothing moved: parameters, Adam's state (step, exp_avg, exp_avg_sq), the clipper's statistics
    _assert_same(snaps[1], snaps[0])
    # the hook saw zeroed, finite gradients on the skipped window
    assert all(torch.equal(g, torch.zeros_like(g)) for g in clipper.seen[1])
    # the windows around it are exact, and the one after the skip is clipped by the clipper's EMA
    assert_grads_close(clipper.seen[0], expected[0])
    assert_grads_close(clipper.seen[2], expected[2])
    assert clipper.clipped == [False, False, True]
    assert [int(e.counts.items) for e in ends] == [sum(num_items(mb) for mb in w) for w in windows]

    # the same trajectory as a float64 run without AMP that never saw window 1
    model = make_model()
    opt = Adam(model.parameters(), lr=0.05)
    ref = EmaNormClipper(model.parameters())
    for w in (0, 2):
        grads = token_mean_grads(model, windows[w])
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        ref.clip_(torch.ones((), dtype=torch.float32))
        opt.step()
        opt.zero_grad()
    _assert_same(snaps[2], _snapshot(model, opt, ref), rtol=1e-12, atol=1e-14)


def test_a_clipper_ignoring_commit_would_learn_from_the_skipped_step():
    """The control for the test above: the scenario does tell a gated clipper from a naive one."""
    *_, snaps, _, _, clipper, _ = _amp_run("loss", respect_commit=False)
    assert float(snaps[1]["steps"]) == float(snaps[0]["steps"]) + 1
    assert not torch.equal(snaps[1]["ema"], snaps[0]["ema"])
    # ... while the step itself was skipped
    _assert_same({**snaps[1], "ema": snaps[0]["ema"], "steps": snaps[0]["steps"]}, snaps[0])


def test_finish_window_without_scaler_equals_the_manual_order():
    mbs = make_micro_batches(30, SHAPES)
    results = []
    for helper in (True, False):
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        acc = GradAccumulator(model.parameters())
        for mb in mbs:
            loss_sum(model, mb).backward()
            acc.count(num_items(mb))
        params = list(model.parameters())

        def clip(commit, params=params):
            return torch.nn.utils.clip_grad_norm_(params, 0.05)

        if helper:
            end = acc.finish_window(opt, clip=clip)
            assert float(end.commit) == 1.0 and end.clip > 0.05  # the norm, and it was clipped
        else:
            acc.finalize_()
            clip(None)
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_finish_window_reports_a_skip_without_a_clip_hook():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    acc = GradAccumulator(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    mb = make_micro_batches(31, [(2, 3)])[0]
    scaler.scale(loss_sum(model, mb) * math.nan).backward()
    acc.count(mb.mask.sum())
    end = acc.finish_window(opt, scaler)
    assert float(end.commit) == 0.0 and end.clip is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="clip"):
        scaler.scale(loss_sum(model, mb)).backward()
        acc.count(1)
        acc.finish_window(opt, scaler, clip=42)


# ---- the documented loop -----------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "accumulation.md"


def _documented_loop() -> str:
    text = DOCS.read_text()
    block = text.split("<!-- accumulation-loop -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_loop_runs_and_equals_finish_window():
    """docs/accumulation.md's copy-paste loop, on CPU with bfloat16 autocast: same result as
    ``finish_window``, including a partial last window, and nothing left open."""
    import steadygrad

    sg = SimpleNamespace(**{k: getattr(steadygrad, k) for k in dir(steadygrad) if not k.startswith("_")})
    sg.GradAccumulator = GradAccumulator
    if not hasattr(sg, "clip_grad_norm_"):  # until the package exports it
        sg.clip_grad_norm_ = torch.nn.utils.clip_grad_norm_

    gen = torch.Generator().manual_seed(0)

    def micro_batch(b, t):
        labels = torch.randint(11, (b, t), generator=gen)
        labels[torch.rand(b, t, generator=gen) < 0.4] = -100
        return {"input_ids": torch.randint(11, (b, t), generator=gen), "labels": labels}

    windows = [[micro_batch(2, 5), micro_batch(3, 2)], [micro_batch(1, 7), micro_batch(2, 3)], [micro_batch(2, 4)]]
    results = []
    for helper in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
        ns = dict(
            sg=sg,
            torch=torch,
            F=torch.nn.functional,
            contextlib=contextlib,
            device_type="cpu",
            amp_dtype=torch.bfloat16,
            max_norm=0.5,
            model=model,
            opt=Adam(model.parameters(), lr=0.01),
            scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
            acc=GradAccumulator(model.parameters(), reduction="items"),
            ddp=False,
            windows=windows,
        )
        code = _documented_loop()
        if helper:
            manual = code[code.index("    scaler.unscale_(opt)") :]
            code = code.replace(
                manual,
                "    clip = lambda commit: sg.clip_grad_norm_(model.parameters(), max_norm)\n"
                "    counts = acc.finish_window(opt, scaler, clip=clip).counts\n",
            )
        exec(compile(code, str(DOCS), "exec"), ns)
        assert ns["acc"].micro_batches == 0 and all(p.grad is None for p in model.parameters())
        assert int(ns["counts"].items) == int((windows[-1][0]["labels"] != -100).sum())
        results.append([p.detach().clone() for p in model.parameters()])
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    for a, b, p0 in zip(*results, initial.parameters()):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all() and not torch.equal(a, p0)


@pytest.mark.parametrize("inject", [False, True], ids=["finite", "inf"])
def test_finish_window_adds_no_host_sync_before_scaler_step(monkeypatch, inject):
    """Everything finish_window does before GradScaler.step (which makes its own one sync) stays
    on the device: unscale_, finalize_, the commit tensor, zeroing, the hook."""
    mbs = make_micro_batches(40, SHAPES[:2])
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    acc = GradAccumulator(model.parameters())
    losses = [loss_sum(model, mb) * (math.inf if inject and i == 1 else 1.0) for i, mb in enumerate(mbs)]
    counts = [mb.mask.sum() for mb in mbs]
    seen = []

    def hook(commit):
        seen.append(commit)
        return torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)

    real_step = scaler.step

    def step_without_the_patch(optimizer):
        monkeypatch.undo()  # GradScaler.step reads found_inf on the host: its one sync
        return real_step(optimizer)

    def sync(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(scaler, "step", step_without_the_patch)
    for loss, n in zip(losses, counts):
        scaler.scale(loss).backward()
        acc.count(n)
    end = acc.finish_window(opt, scaler, clip=hook)
    assert seen == [end.commit] and float(end.commit) == (0.0 if inject else 1.0)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(cuts=st.lists(st.integers(1, 9), min_size=0, max_size=5, unique=True))
def test_items_does_not_depend_on_how_the_sequences_are_split(cuts):
    """Invariant: the same ten sequences cut into any micro-batches give the big batch's gradient."""
    (everything,) = make_micro_batches(50, [(10, 6)])
    bounds = [0, *sorted(cuts), 10]
    mbs = [type(everything)(*(x[a:b] for x in everything)) for a, b in zip(bounds[:-1], bounds[1:])]
    model = make_model()
    acc = GradAccumulator(model.parameters())
    accumulate(model, acc, mbs)
    assert_grads_close(grads_of(model), token_mean_grads(model, [everything]))


@pytest.mark.parametrize(
    "make_transform",
    [
        lambda: sg.zclip(warmup_steps=1),
        lambda: sg.clip_by_moment(k=3.0, beta=0.9),
        lambda: sg.autoclip(50.0, history=16),
    ],
    ids=["zclip", "moment", "autoclip"],
)
def test_a_real_clipper_learns_nothing_from_a_step_the_scaler_skips(make_transform):
    """sg.Clipper through finish_window: its state after the skipped window is bit-for-bit the
    state before it, and a run with the bad window equals a run without it."""

    def run(with_bad_window):
        windows = [make_micro_batches(40 + i, shapes) for i, shapes in enumerate(WINDOWS)]
        model = make_model()
        opt = Adam(model.parameters(), lr=0.05)
        clipper = sg.Clipper(model.parameters(), make_transform())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        acc = GradAccumulator(model.parameters(), reduction="items")
        states = []
        for w, mbs in enumerate(windows):
            if w == 1 and not with_bad_window:
                continue
            for i, mb in enumerate(mbs):
                loss = loss_sum(model, mb)
                if w == 1 and i == 0:
                    loss = loss * math.inf
                scaler.scale(loss).backward()
                acc.count(mb.mask.sum())
            end = acc.finish_window(opt, scaler, clip=clipper)
            states.append((float(end.commit), copy.deepcopy(clipper.state_dict())))
            if w == 1:
                scaler.update(2.0**12)  # undo the back-off so both runs scale alike afterwards
        return [p.detach().clone() for p in model.parameters()], states

    params_bad, states_bad = run(True)
    params_good, states_good = run(False)
    assert [c for c, _ in states_bad] == [1.0, 0.0, 1.0]
    assert _state_dicts_equal(states_bad[1][1], states_bad[0][1])
    assert _state_dicts_equal(states_bad[2][1], states_good[1][1])
    for a, b in zip(params_bad, params_good):
        assert torch.equal(a, b)


def _state_dicts_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_dicts_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_dicts_equal(x, y) for x, y in zip(a, b))
    return a == b
