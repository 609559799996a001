"""What torch's own optimizer tests (``TestOptimRenewed``) check of an optimizer, run on
steadygrad's four classes from torch's test database (``optim_db`` in
``torch.testing._internal.common_optimizers``, shipped in the wheel): its error inputs, and every
CPU input with torch's global flags (``fused``, ``differentiable``). The checks are this
project's own; the inputs and the expected errors are torch's, so a torch release that adds an
input or changes a message shows up here. Trajectories against torch in float64 are in
test_optim_parity.py, ``differentiable`` against torch's in test_differentiable.py.

Deliberate differences (docs/optimizers.md): a tensor ``lr``/``betas`` with ``foreach=True`` is
accepted (torch's foreach kernels cannot take it; steadygrad's ``foreach`` changes nothing).
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import steadygrad as sg

NAMES = ["Adagrad", "RMSprop", "Adam", "AdamW"]


@pytest.fixture(autouse=True)
def _compile_only_float32_fused_matches(request, monkeypatch):
    """fused=True runs its step function eagerly over the flat buffers here (the same function;
    test_fused.py checks inductor's code against it), but for torch's fused-vs-forloop pattern in
    float32, which compiles: one compile per case would take minutes."""
    callspec = getattr(request.node, "callspec", None)
    compiled = request.node.name.startswith("test_fused_matches_forloop") and (
        callspec is not None and callspec.params.get("dtype") == torch.float32
    )
    if not compiled:
        monkeypatch.setenv("STEADYGRAD_COMPILE", "0")


INFOS = {name: next(i for i in optim_db if i.optim_cls is getattr(torch.optim, name)) for name in NAMES}

ERRORS = [(name, e) for name in NAMES for e in INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)]
# (optimizer, error input) pairs torch refuses and steadygrad accepts, on purpose.
ACCEPTED = {
    ("Adam", "lr as Tensor doesn't work with foreach & not capturable"),
    ("AdamW", "lr as Tensor doesn't work with foreach & not capturable"),
    ("Adam", "betas\\[0\\] as a Tensor is not supported for capturable=False and foreach=True"),
    ("AdamW", "betas\\[0\\] as a Tensor is not supported for capturable=False and foreach=True"),
}
INPUTS = [
    (name, oi.desc, oi.kwargs)
    for name in NAMES
    for oi in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, INFOS[name])
]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=dtype)),
        torch.nn.Parameter(torch.randn(4, generator=g, dtype=dtype)),
    ]


def _pair(name, kwargs, seed=0):
    ours_params, theirs_params = _params(seed), _params(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = getattr(sg.optim, name)(ours_params, **kwargs)
        theirs = getattr(torch.optim, name)(theirs_params, **kwargs)
    return ours_params, ours, theirs_params, theirs


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize(("name", "error"), ERRORS, ids=[f"{n}-{e.optimizer_error_input.desc}" for n, e in ERRORS])
def test_errors_as_torch(name, error):
    inp = error.optimizer_error_input
    cls = getattr(sg.optim, name)

    def attempt():
        if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            cls(inp.params, **inp.kwargs)
        else:
            cls(inp.params, **inp.kwargs).step()

    if (name, inp.desc) in ACCEPTED:
        cls(_params(), **inp.kwargs).step()  # works: a deliberate difference
        return
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            attempt()
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            attempt()


def test_the_accepted_differences_are_still_torch_errors():
    """If torch starts accepting these, the list above (and the docs) should shrink."""
    descs = {(name, e.optimizer_error_input.desc) for name, e in ERRORS}
    assert ACCEPTED <= descs


@pytest.mark.parametrize(("name", "desc", "kwargs"), INPUTS, ids=[f"{n}-{d}" for n, d, _ in INPUTS])
def test_param_groups_and_repr_as_torch(name, desc, kwargs):
    ours_params, ours, _, theirs = _pair(name, kwargs)
    mine, ref = ours.state_dict()["param_groups"], theirs.state_dict()["param_groups"]
    assert [sorted(g) for g in mine] == [sorted(g) for g in ref]
    for a, b in zip(mine, ref):
        for key in b:
            if isinstance(b[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize(("name", "desc", "kwargs"), INPUTS, ids=[f"{n}-{d}" for n, d, _ in INPUTS])
def test_step_without_gradients_changes_nothing(name, desc, kwargs):
    ours_params, ours, theirs_params, theirs = _pair(name, kwargs)
    before = [p.detach().clone() for p in ours_params]
    ours.step()
    theirs.step()
    assert all(torch.equal(p, b) for p, b in zip(ours_params, before))
    for p, q in zip(ours_params, theirs_params):
        assert set(ours.state[p]) == set(theirs.state[q])  # Adagrad's, made at construction


TRAJECTORY_INPUTS = [(n, d, k) for n, d, k in INPUTS if not k.get("differentiable")]  # (leaf parameters)


@pytest.mark.parametrize("gradients", ["zero", "random"])
@pytest.mark.parametrize(
    ("name", "desc", "kwargs"), TRAJECTORY_INPUTS, ids=[f"{n}-{d}" for n, d, _ in TRAJECTORY_INPUTS]
)
def test_float32_steps_as_torch(name, desc, kwargs, gradients):
    """Every CPU input, fused=True included (torch's fused CPU kernels on its side), float32:
    zero gradients (torch's no-op test) and random ones; parameters and state."""
    ours_params, ours, theirs_params, theirs = _pair(name, kwargs)
    for step in range(5):
        for params, opt in ((ours_params, ours), (theirs_params, theirs)):
            if gradients == "zero":
                for p in params:
                    p.grad = torch.zeros_like(p)
            else:
                _grads(params, step)
            opt.step()
    for p, q in zip(ours_params, theirs_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-7)
        for key, value in theirs.state[q].items():
            torch.testing.assert_close(ours.state[p][key], value, rtol=2e-6, atol=1e-7)


TENSOR_OPTIONS = [(name, "lr") for name in NAMES] + [(name, "betas") for name in ("Adam", "AdamW")]


@pytest.mark.parametrize(("name", "option"), TENSOR_OPTIONS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1d", "2d"])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_tensor_hyperparameters_of_any_single_element_shape(name, option, shape, fused):
    """As torch's test_tensor_lr: an lr (or betas) tensor of 0, 1 or 2 dimensions steps as the
    number."""
    numbers = {"lr": 0.01, "betas": (0.8, 0.95)}
    value = numbers[option]
    as_tensor = tuple(torch.full(shape, v) for v in value) if option == "betas" else torch.full(shape, value)
    number, tensor = _params(), _params()
    opt_n = getattr(sg.optim, name)(number, **{"lr": 0.01, option: value}, fused=fused)
    opt_t = getattr(sg.optim, name)(tensor, **{"lr": 0.01, option: as_tensor}, fused=fused)
    for step in range(4):
        for params, opt in ((number, opt_n), (tensor, opt_t)):
            _grads(params, step)
            opt.step()
    for a, b in zip(number, tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_with_weights_only(name):
    """torch.load(weights_only=True), the default since torch 2.6, reads the state dict, and the
    run continues as if never stopped."""
    params, opt = _params(), None
    opt = getattr(sg.optim, name)(params, lr=0.01)
    for step in range(2):
        _grads(params, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = getattr(sg.optim, name)(twins, lr=0.01)
    resumed.load_state_dict(loaded)
    for params_, opt_ in ((params, opt), (twins, resumed)):
        _grads(params_, 2)
        opt_.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_global_and_instance_hooks():
    """torch's step hooks (global and per optimizer) and state-dict hooks, in torch's order; a
    load_state_dict pre-hook may rewrite the state dict before steadygrad checks it."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = _params()
    opt = sg.optim.Adam(params, lr=0.01)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        _grads(params, 0)
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post"]

    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    saved = opt.state_dict()
    assert saved["extra"] == 1 and calls[-1] == "sd pre"

    good = saved["state"]
    broken = {"state": {0: {k: v.reshape(-1)[:1] if v.dim() else v for k, v in good[0].items()}, 1: good[1]}}
    broken["param_groups"] = saved["param_groups"]

    def repair(o, sd):
        return {"state": good, "param_groups": sd["param_groups"]}

    fresh = sg.optim.Adam(_params(), lr=0.01)
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(broken)
    fresh.register_load_state_dict_pre_hook(repair)
    fresh.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    fresh.load_state_dict(broken)
    assert calls[-1] == "load post"
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"], good[0]["exp_avg"])


def test_sparse_rosenbrock_as_torch():
    """torch's sparse Rosenbrock check for Adagrad (its ``metadata_for_sparse``): the sparse and
    the dense problem give the same path, for steadygrad as for torch."""
    kwargs, _ = INFOS["Adagrad"].metadata_for_sparse

    def rosenbrock(cls, sparse):
        x = torch.tensor([1.5, 1.5], requires_grad=True)
        opt = cls([x], **kwargs)
        for i in range(10):
            opt.zero_grad()
            loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
            loss.backward()
            if sparse:
                j = i % 2  # one coordinate at a time, as a sparse gradient
                x.grad = torch.sparse_coo_tensor(torch.tensor([[j]]), x.grad[j : j + 1], (2,), check_invariants=True)
            opt.step()
        return x.detach()

    for sparse in (False, True):
        torch.testing.assert_close(rosenbrock(sg.optim.Adagrad, sparse), rosenbrock(torch.optim.Adagrad, sparse))


def test_every_torch_input_is_covered():
    assert len(ERRORS) >= 30 and len(INPUTS) >= 60
    assert {n for n, *_ in INPUTS} == set(NAMES)
    assert any(k.get("fused") for *_, k in INPUTS) and any(k.get("differentiable") for *_, k in INPUTS)


FUSED_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FUSED_INPUTS = [
    (name, dtype, oi.desc, oi.kwargs)
    for name in NAMES
    for dtype in FUSED_DTYPES
    for oi in INFOS[name].optim_inputs_func(device="cpu", dtype=dtype)
]


@pytest.mark.parametrize(
    ("name", "dtype", "desc", "kwargs"),
    FUSED_INPUTS,
    ids=[f"{n}-{str(t)[6:]}-{d}" for n, t, d, _ in FUSED_INPUTS],
)
def test_fused_matches_forloop_as_in_torchs_test(name, dtype, desc, kwargs):
    """torch's test_fused_matches_forloop: 7 steps with ``zero_grad()`` before each, no backward
    at step 2 (every ``.grad`` is None: nothing steps), a layer frozen for steps 3-4 (its
    parameters do not step), a zero-size 0-d parameter. float32/float64: fused=True equals
    fused=False, values and state. float16/bfloat16 (the fused step computes in float32 and
    rounds once, the for-loop rounds after every operation, and centered RMSprop's
    ``v - m^2`` cancels): both are compared with the float64 run, and the fused one is at least
    about as close to it."""

    def run(fused, run_dtype, run_kwargs):
        x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=run_dtype).reshape(3, 2)
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        ).to(run_dtype)
        extra = torch.empty((), dtype=run_dtype, requires_grad=True)
        extra.grad = torch.rand_like(extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = getattr(sg.optim, name)([*model.parameters(), extra], **run_kwargs, fused=fused)
            for i in range(7):
                opt.zero_grad()
                model[2].requires_grad_(not 3 <= i < 5)
                if i != 2:
                    model(x).sum().backward()
                opt.step()
        return list(model.parameters()), opt

    params, opt = run(True, dtype, kwargs)
    assert [opt.state[p]["step"].item() for p in params] == [6, 6, 4, 4]
    if dtype in (torch.float16, torch.bfloat16):
        wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        exact, _ = run(False, torch.float64, wide)
        loop, _ = run(False, dtype, kwargs)

        def error(ps):
            return max((p.detach().double() - q.detach()).abs().max().item() for p, q in zip(ps, exact))

        if math.isnan(error(loop)):  # torch's for-loop too: eps=1e-8 is 0 in float16, 0/0 at a zero gradient
            pytest.skip("the float16 for-loop step gives NaN here, as torch's does")
        assert error(params) <= 3 * error(loop) + 4e-3
        return
    ref_params, ref_opt = run(False, dtype, kwargs)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key in ref_opt.state[q]:
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=1e-6)


def test_load_state_dict_loads_what_the_pre_hooks_return():
    """torch loads the state dict its pre-hooks return; so does steadygrad, its own entries (a
    clipping rule's shared state, re-cast entries) included."""
    import copy

    params = _params()
    opt = sg.optim.Adam(params, lr=0.01, clip=sg.clip_by_norm(1e-3))
    _grads(params, 0)
    opt.step()
    saved = opt.state_dict()

    def edit(o, sd):
        sd = copy.deepcopy(sd)
        for entry in sd["state"].values():
            entry["clip.fraction_clipped"] = torch.tensor(0.25)
            entry["step"] = torch.tensor(99.0)
        return sd

    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = sg.optim.Adam(twins, lr=0.01, clip=sg.clip_by_norm(1e-3))
    fresh.register_load_state_dict_pre_hook(edit)
    fresh.load_state_dict(saved)
    for p in twins:
        assert fresh.state[p]["clip.fraction_clipped"].item() == 0.25
        assert fresh.state[p]["step"].item() == 99.0
    assert saved["state"][0]["step"].item() == 1.0  # the caller's dict is untouched
