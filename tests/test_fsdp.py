"""FSDP2 (``fully_shard``, DTensor parameters), DCP and ZeRO on two CPU processes (gloo).

Every optimizer, option and ``clip=`` rule, and every Clipper, on sharded parameters equals one
process (float32, 1e-5); a NaN on one rank skips the step on both; ``torch.distributed.checkpoint``
saves and loads the state of every ``clip=`` rule and ``moment_clip=`` and the run continues
identically; ``ZeroRedundancyOptimizer`` drives a steadygrad optimizer with ``clip=``.

One spawn runs every check (process start-up dominates); a failing rank makes the other fail
fast (30 s collective timeout) and the parent kills what is left at its deadline.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist

import steadygrad as sg

from ._distributed import needs_gloo, run_on_ranks

STEPS = 4
RTOL = ATOL = 1e-5

pytestmark = needs_gloo

OPTIMIZERS = {
    "adam": lambda ps, **kw: sg.optim.Adam(ps, lr=0.01, **kw),
    "adamw-amsgrad-moment_clip": lambda ps, **kw: sg.optim.AdamW(ps, lr=0.01, amsgrad=True, moment_clip=2.0, **kw),
    "rmsprop-centered-momentum": lambda ps, **kw: sg.optim.RMSprop(ps, lr=0.01, centered=True, momentum=0.9, **kw),
    "rmsprop-moment_clip": lambda ps, **kw: sg.optim.RMSprop(ps, lr=0.01, moment_clip=2.0, weight_decay=0.1, **kw),
    "adagrad": lambda ps, **kw: sg.optim.Adagrad(ps, lr=0.05, lr_decay=0.01, **kw),
    "adam-maximize-eps_in_sqrt-wd": lambda ps, **kw: sg.optim.Adam(
        ps, lr=0.01, maximize=True, eps_in_sqrt=True, weight_decay=0.1, **kw
    ),
    "rmsprop-eps_in_sqrt": lambda ps, **kw: sg.optim.RMSprop(ps, lr=0.01, eps_in_sqrt=True, **kw),
    "adagrad-initial-wd": lambda ps, **kw: sg.optim.Adagrad(
        ps, lr=0.05, initial_accumulator_value=0.1, weight_decay=0.1, **kw
    ),
    "transformed-chain": lambda ps, **kw: sg.optim.Transformed(
        ps, sg.chain(sg.scale_by_adam(), sg.trace(0.5), sg.scale_by_lr()), lr=0.01, **kw
    ),
}
CLIPS = {
    "none": lambda: None,
    "norm": lambda: sg.clip_by_norm(0.05),
    "norm-tensor": lambda: sg.clip_by_norm(0.02, scope="tensor"),
    "value": lambda: sg.clip_by_value(0.01),
    "moment": lambda: sg.clip_by_moment(k=1.5, beta=0.9),
    "agc": lambda: sg.clip_by_unit_ratio(0.01),
    "update_rms": lambda: sg.clip_update_rms(0.5),
    "zclip": lambda: sg.zclip(warmup_steps=2),
    "autoclip": lambda: sg.autoclip(percentile=50.0),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _batches(nan_at=None, nan_rank=None):
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]
    if nan_at is not None and (nan_rank is None or dist.get_rank() == nan_rank):
        x, y = out[nan_at]
        x = x.clone()
        x[0, 0] = math.nan
        out[nan_at] = (x, y)
    return out


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, batches, clipper=None, skip=()):
    stats = []
    for step, (x, y) in enumerate(batches):
        if step in skip:
            continue
        opt.zero_grad()
        _loss(model, x, y).backward()
        if clipper is not None:
            stats.append(clipper.clip_())
        opt.step()
    return stats


def _full(params):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in params]


def _close(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"{what}, tensor {i}: {m}")


def _check_optimizers():
    """Every optimizer x clip= rule: sharded equals one process."""
    for name, make in OPTIMIZERS.items():
        for clip_name, clip in CLIPS.items():
            ref = _model()
            _train(ref, make(ref.parameters(), clip=clip()), _batches())
            sharded = _shard(_model())
            opt = make(sharded.parameters(), clip=clip())
            _train(sharded, opt, _batches())
            _close(_full(sharded.parameters()), list(ref.parameters()), f"{name} + {clip_name}")
            state = opt.state[next(iter(sharded.parameters()))]
            assert any(type(v) is not torch.Tensor for v in state.values()), "per-parameter state stays DTensors"


def _check_skip_on_one_rank():
    """nonfinite="skip": a NaN in one rank's batch skips the step on both ranks, bit for bit as if
    it had not happened; "raise" raises on both."""
    for clip in (None, sg.zclip(warmup_steps=2)):
        clean = _shard(_model())
        _train(clean, sg.optim.AdamW(clean.parameters(), lr=0.01, clip=clip, nonfinite="skip"), _batches(), skip={2})
        dirty = _shard(_model())
        opt = sg.optim.AdamW(dirty.parameters(), lr=0.01, clip=clip, nonfinite="skip")
        _train(dirty, opt, _batches(nan_at=2, nan_rank=1))
        for a, b in zip(_full(dirty.parameters()), _full(clean.parameters())):
            assert torch.equal(a, b)
    model = _shard(_model())
    clipper = sg.Clipper(model.parameters(), sg.zclip(), nonfinite="raise")
    x, y = _batches(nan_at=0, nan_rank=1)[0]
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="non-finite gradient"):  # on every rank
        clipper.clip_()
    model = _shard(_model())
    opt = sg.optim.Adam(model.parameters(), nonfinite="raise")
    x, y = _batches(nan_at=0, nan_rank=0)[0]
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        opt.step()


def _check_fused_falls_back():
    ref = _model()
    _train(ref, sg.optim.Adam(ref.parameters(), lr=0.01, moment_clip=2.0), _batches())
    sharded = _shard(_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(sharded, sg.optim.Adam(sharded.parameters(), lr=0.01, moment_clip=2.0, fused=True), _batches())
    assert sum("falls back" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
    _close(_full(sharded.parameters()), list(ref.parameters()), "fused=True on DTensors")


def _check_clippers():
    """A Clipper in front of torch's AdamW, every rule and nonfinite mode: sharded equals one
    process, the statistics are global and the same on both ranks, a NaN on one rank skips on both."""
    for clip_name, clip in CLIPS.items():
        if clip_name == "none":
            continue
        for mode in ("skip", "ignore"):
            ref = _model()
            ref_stats = _train(
                ref,
                torch.optim.AdamW(ref.parameters(), lr=0.01),
                _batches(nan_at=1) if mode == "skip" else _batches(),
                sg.Clipper(ref.parameters(), clip(), nonfinite=mode),
            )
            sharded = _shard(_model())
            stats = _train(
                sharded,
                torch.optim.AdamW(sharded.parameters(), lr=0.01),
                _batches(nan_at=1, nan_rank=0) if mode == "skip" else _batches(),
                sg.Clipper(sharded.parameters(), clip(), nonfinite=mode),
            )
            _close(_full(sharded.parameters()), list(ref.parameters()), f"Clipper({clip_name}, {mode})")
            for s, r in zip(stats, ref_stats):
                assert bool(s.skipped) == bool(r.skipped)
                if not bool(r.skipped):
                    for field in ("norm", "clipped_norm", "fraction_clipped"):
                        torch.testing.assert_close(getattr(s, field), getattr(r, field), rtol=RTOL, atol=ATOL)
                mine = torch.stack([s.norm.double(), s.fraction_clipped.double(), s.nonfinite.double()])
                other = mine.clone()
                dist.broadcast(other, src=0)
                assert torch.equal(mine.nan_to_num(-1), other.nan_to_num(-1)), "the same statistics on every rank"


def _check_dcp(tmp_dir):
    """get/set_optimizer_state_dict and dcp.save/load to a directory: a run saved after 2 steps and
    loaded into a new model and optimizer continues as the run that never stopped."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def make(params):
        return sg.optim.AdamW(params, lr=0.01, clip=sg.zclip(warmup_steps=1), moment_clip=2.0, nonfinite="skip")

    batches = _batches()
    straight = _shard(_model())
    _train(straight, make(straight.parameters()), batches)

    first = _shard(_model())
    opt = make(first.parameters())
    _train(first, opt, batches[:2])
    osd = get_optimizer_state_dict(first, opt)
    assert all(isinstance(k, str) for k in osd["state"]), "parameter names, no steadygrad slot"
    dcp.save({"model": get_model_state_dict(first), "optim": osd}, checkpoint_id=f"{tmp_dir}/ckpt")

    second = _shard(_model())
    opt2 = make(second.parameters())
    loaded = {"model": get_model_state_dict(second), "optim": get_optimizer_state_dict(second, opt2)}
    dcp.load(loaded, checkpoint_id=f"{tmp_dir}/ckpt")
    set_model_state_dict(second, loaded["model"])
    set_optimizer_state_dict(second, opt2, loaded["optim"])
    _train(second, opt2, batches[2:])
    for a, b in zip(_full(second.parameters()), _full(straight.parameters())):
        assert torch.equal(a, b)
    shared = opt2.shared_state()
    assert {"clip", "group0"} <= set(shared) and int(shared["clip"]["num_norms"]) == STEPS


def _check_zero():
    """ZeroRedundancyOptimizer with a steadygrad optimizer and clip= (a per-rank norm: each rank
    clips the parameters it owns, as ZeRO steps them)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _model()
    opt = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=sg.optim.AdamW, lr=0.01, clip=sg.clip_by_value(0.01)
    )
    ref = _model()
    ref_opt = sg.optim.AdamW(ref.parameters(), lr=0.01, clip=sg.clip_by_value(0.01))
    for x, y in _batches():
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    _close([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()], "ZeRO")
    opt.consolidate_state_dict(to=0)
    if dist.get_rank() == 0:
        state = opt.state_dict()
        assert len(state["state"]) == len(list(model.parameters()))


def _check(rank, tmp_dir):
    _check_optimizers()
    _check_skip_on_one_rank()
    _check_fused_falls_back()
    _check_clippers()
    _check_dcp(tmp_dir)
    _check_zero()


def test_fsdp2_dcp_and_zero_two_ranks(tmp_path):
    run_on_ranks(tmp_path, _check, seconds=240)
