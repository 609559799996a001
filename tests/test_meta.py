"""Parameters on the meta device: a step computes the state's shapes only, as torch's does
(``fused=True`` raises torch's RuntimeError before any state exists), and a model built on meta
and materialised with ``to_empty`` trains as torch's."""

from __future__ import annotations

import pytest
import torch

import steadygrad as sg

NAMES = ["Adam", "AdamW", "RMSprop", "Adagrad"]


def _meta_step(cls, **options):
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    opt = cls(model.parameters(), lr=0.1, **options)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return model, opt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "options",
    [{}, {"clip": "norm"}, {"nonfinite": "skip"}, {"nonfinite": "raise"}],
    ids=["plain", "clip", "skip", "raise"],
)
def test_meta_step_creates_torchs_state_shapes(name, options):
    if options.get("clip") == "norm":
        options = {"clip": sg.clip_by_norm(1.0)}
    model, opt = _meta_step(getattr(sg.optim, name), **options)
    ref_model, ref_opt = _meta_step(getattr(torch.optim, name))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        ours, theirs = opt.state[p], ref_opt.state[q]
        assert set(theirs) <= set(ours)
        for key, value in theirs.items():
            mine = ours[key]
            assert (mine.shape, mine.dtype, mine.device) == (value.shape, value.dtype, value.device), key
        assert all(v.device.type in ("meta", "cpu") for v in ours.values())
        assert p.device.type == "meta"
    assert opt.state[model.weight]["step"].item() == ref_opt.state[ref_model.weight]["step"].item() == 1


@pytest.mark.parametrize("name", NAMES)
def test_fused_refuses_meta_parameters_as_torch_and_trains_after_to_empty(name):
    """torch's test_fused_error_on_params_on_meta: the step raises torch's RuntimeError before any
    state exists; the model, materialised, trains."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    opt = getattr(sg.optim, name)(model.parameters(), fused=True)
    state_before = {p: dict(s) for p, s in opt.state.items()}  # Adagrad's, from construction
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    assert {p: dict(s) for p, s in opt.state.items()}.keys() == state_before.keys()
    assert all(s.keys() == state_before[p].keys() for p, s in opt.state.items())
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    fresh = getattr(sg.optim, name)(model.parameters(), fused=True)
    for p in model.parameters():
        torch.nn.init.uniform_(p)
        p.grad = torch.rand_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    fresh.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_meta_and_cpu_parameters_together_still_check_the_cpu_gradients(nonfinite):
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    cpu = torch.nn.Parameter(torch.zeros(3))
    opt = sg.optim.Adam([meta, cpu], lr=0.1, nonfinite=nonfinite)
    meta.grad = torch.ones(3, device="meta")
    cpu.grad = torch.tensor([1.0, float("nan"), 1.0])
    if nonfinite == "raise":
        with pytest.raises(RuntimeError, match="parameter 1 of param group 0"):
            opt.step()
    else:
        opt.step()
    assert torch.equal(cpu.detach(), torch.zeros(3))


def _train(make_opt, model, steps=3):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    opt = make_opt(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _materialized():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.weight.copy_(torch.arange(6.0).reshape(2, 3) / 10)
        model.bias.fill_(0.5)
    return model


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_model_built_on_meta_trains_after_to_empty(name, fused):
    ours = _train(lambda ps: getattr(sg.optim, name)(ps, lr=0.1, fused=fused), _materialized())
    theirs = _train(lambda ps: getattr(torch.optim, name)(ps, lr=0.1), _materialized())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32, fused rounding


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])  # lazily created state (not Adagrad's)
def test_optimizer_made_on_meta_parameters_that_are_swapped_in_place(name):
    """With torch's swap-on-conversion, ``to_empty`` keeps the Parameter objects: an optimizer
    made before it (state not yet created) trains as torch's."""

    def run(cls):
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            with torch.device("meta"):
                model = torch.nn.Linear(3, 2)
            opt = cls(model.parameters(), lr=0.1)
            model.to_empty(device="cpu")
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)
        with torch.no_grad():
            model.weight.copy_(torch.arange(6.0).reshape(2, 3) / 10)
            model.bias.fill_(0.5)
        return _train(lambda _: opt, model)

    for a, b in zip(run(getattr(sg.optim, name)), run(getattr(torch.optim, name))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32, fused rounding
