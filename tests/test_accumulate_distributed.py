"""GradAccumulator across two processes (gloo, spawned here): DDP with ``no_sync()``, different token
and micro-batch counts per rank, equal to one process's big batch over both ranks' data (float64)."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from steadygrad.accumulate import GradAccumulator

from ._accumulate_models import (
    loss_sum,
    make_micro_batches,
    make_model,
    micro_mean_grads,
    num_items,
    token_mean_grads,
    token_sum_grads,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
LR = 0.3
DEADLINE_S = 120  # the whole spawned run; a hang fails the test instead of blocking the suite
# Rank 0 runs 3 micro-batches then 1 (a partial window); rank 1 runs 2 then 2; token counts differ.
SHAPES = {
    0: [[(2, 4), (1, 9), (3, 2)], [(2, 3)]],
    1: [[(4, 6), (1, 3)], [(1, 2), (3, 7)]],
}


def _data() -> dict[int, list[list]]:
    return {
        rank: [make_micro_batches(100 + 10 * rank + w, s) for w, s in enumerate(windows)]
        for rank, windows in SHAPES.items()
    }


def _sum_hook(state, bucket):
    """A DDP comm hook that sums over the ranks instead of averaging."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _run_window(model, acc, mbs, *, ddp: bool, mean_loss: bool = False):
    for i, mb in enumerate(mbs):
        last = i == len(mbs) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            loss = loss_sum(model, mb)
            if mean_loss:
                loss = loss / mb.mask.sum()
            loss.backward()
        acc.count(mb.mask.sum())


def _worker(rank: int, init_file: str, out_dir: str, data) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(args[0].clone())
        return real_all_reduce(*args, **kwargs)

    def finalize(acc):
        calls.clear()
        dist.all_reduce = counting_all_reduce
        try:
            counts = acc.finalize_()
        finally:
            dist.all_reduce = real_all_reduce
        return {"all_reduces": len(calls), "items": int(counts.items), "micro_batches": int(counts.micro_batches)}

    def grads(model):
        return [p.grad.detach().clone() for p in model.parameters()]

    out = {}
    try:
        group = dist.group.WORLD
        windows = data[rank]

        # DDP's average, "items": two windows (the second partial on rank 0) with an SGD step between
        ddp = DDP(make_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        acc = GradAccumulator(ddp.parameters(), "items", group, rank_reduction="mean")
        out["ddp-items"] = []
        for mbs in windows:
            _run_window(ddp, acc, mbs, ddp=True)
            info = finalize(acc)
            out["ddp-items"].append((info, grads(ddp)))
            opt.step()
            opt.zero_grad()

        # DDP's average, "mean" (mean losses) and "sum" (sum losses)
        for reduction in ("mean", "sum"):
            ddp = DDP(make_model())
            acc = GradAccumulator(ddp.parameters(), reduction, group, rank_reduction="mean")
            _run_window(ddp, acc, windows[0], ddp=True, mean_loss=reduction == "mean")
            out[f"ddp-{reduction}"] = (finalize(acc), grads(ddp))

        # a comm hook that sums over the ranks
        ddp = DDP(make_model())
        ddp.register_comm_hook(None, _sum_hook)
        acc = GradAccumulator(ddp.parameters(), "items", group, rank_reduction="sum")
        _run_window(ddp, acc, windows[0], ddp=True)
        out["ddp-sum-hook"] = (finalize(acc), grads(ddp))

        # no DDP: local gradients, global counts; summing over the ranks afterwards gives the mean
        model = make_model()
        acc = GradAccumulator(model.parameters(), "items", group, rank_reduction="none")
        _run_window(model, acc, windows[0], ddp=False)
        info = finalize(acc)
        for p in model.parameters():
            dist.all_reduce(p.grad)
        out["local-none"] = (info, grads(model))

        # without a process group, a multi-rank run must say what it wants
        try:
            GradAccumulator(model.parameters(), "items")
        except ValueError as e:
            out["no-group-error"] = str(e)
        out["local-only"] = GradAccumulator(model.parameters(), "items", rank_reduction="none").world_size
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # neither rank tears down gloo while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs both ranks once for all tests of this module; returns each rank's results."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = _data()
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "rendezvous"), str(tmp), data), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):  # raises if a rank failed (and stops the other one)
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} spawned ranks did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join(5)
    return data, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _all(data, window: int) -> list:
    return [mb for rank in range(WORLD) for mb in data[rank][window]]


def _assert_grads_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-13)


def _assert_same_on_every_rank(results, key):
    first = results[0][key]
    for other in results[1:]:
        for a, b in zip(first[1], other[key][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_items_under_ddp_equals_the_big_batch_over_all_ranks(ranks):
    data, results = ranks
    for w in range(2):  # the ranks hold different numbers of tokens (and of micro-batches in window 0)
        assert sum(map(num_items, data[0][w])) != sum(map(num_items, data[1][w]))
    assert len(data[0][0]) != len(data[1][0])
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for w in range(2):
        expected = token_mean_grads(model, _all(data, w))
        for rank in range(WORLD):
            info, grads = results[rank]["ddp-items"][w]
            _assert_grads_close(grads, expected)
            assert info == {
                "all_reduces": 1,
                "items": sum(num_items(mb) for mb in _all(data, w)),
                "micro_batches": len(_all(data, w)),
            }
        for p, g in zip(model.parameters(), expected):
            p.grad = g
        opt.step()
        opt.zero_grad()


def test_the_naive_local_mean_would_differ(ranks):
    """Each rank dividing by its own tokens (what DDP's average of local means gives) is wrong here."""
    data, results = ranks
    model = make_model()
    local_means = [token_mean_grads(model, data[r][0]) for r in range(WORLD)]
    naive = [sum(gs) / WORLD for gs in zip(*local_means)]
    exact = results[0]["ddp-items"][0][1]
    assert max(float((a - b).abs().max()) for a, b in zip(naive, exact)) > 1e-3


def test_mean_and_sum_under_ddp(ranks):
    data, results = ranks
    model = make_model()
    everything = _all(data, 0)
    for rank in range(WORLD):
        info, grads = results[rank]["ddp-mean"]
        _assert_grads_close(grads, micro_mean_grads(model, everything))
        assert info["all_reduces"] == 1 and info["micro_batches"] == len(everything)
        info, grads = results[rank]["ddp-sum"]
        _assert_grads_close(grads, token_sum_grads(model, everything))
    _assert_same_on_every_rank(results, "ddp-mean")


def test_summing_comm_hook_and_local_gradients(ranks):
    data, results = ranks
    expected = token_mean_grads(make_model(), _all(data, 0))
    for rank in range(WORLD):
        for key in ("ddp-sum-hook", "local-none"):
            info, grads = results[rank][key]
            _assert_grads_close(grads, expected)
            assert info["all_reduces"] == 1


def test_a_multi_rank_run_without_process_group_must_choose(ranks):
    _, results = ranks
    for rank in range(WORLD):
        assert "rank_reduction='mean'" in results[rank]["no-group-error"]
        assert results[rank]["local-only"] == 1
