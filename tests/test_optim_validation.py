"""Bad input gets a clear error naming the argument."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import steadygrad as sg

NAN, INF = math.nan, math.inf


def params():
    return [torch.nn.Parameter(torch.randn(3))]


BAD = [
    # (optimizer, argument, bad values); every optimizer also gets the lr cases
    ("Adagrad", "lr_decay", [-0.1, NAN, INF]),
    ("Adagrad", "weight_decay", [-1e-4, NAN]),
    ("Adagrad", "initial_accumulator_value", [-0.1, NAN]),
    ("Adagrad", "eps", [0.0, -1e-10, NAN]),
    ("RMSprop", "alpha", [1.5, 1.0, -0.1, NAN]),  # torch accepts alpha=1.5
    ("RMSprop", "eps", [0.0, NAN]),  # torch accepts eps=0
    ("RMSprop", "momentum", [-0.1, 1.0, NAN]),
    ("RMSprop", "weight_decay", [-0.1, NAN]),
    ("Adam", "eps", [0.0, -1e-8, NAN]),
    ("Adam", "weight_decay", [-0.1, NAN]),
    ("AdamW", "weight_decay", [-0.1, NAN, INF]),
    ("AdamW", "eps", [0.0, NAN]),
] + [(name, "lr", [-1e-3, NAN, INF, torch.tensor(NAN)]) for name in ("Adagrad", "RMSprop", "Adam", "AdamW")]

CASES = [(name, arg, value) for name, arg, values in BAD for value in values]


@pytest.mark.parametrize(("name", "arg", "value"), CASES, ids=[f"{n}-{a}={v}" for n, a, v in CASES])
def test_out_of_range_or_nan_raises_value_error_naming_the_argument(name, arg, value):
    with pytest.raises(ValueError, match=arg):
        getattr(sg.optim, name)(params(), **{arg: value})


BAD_BETAS = [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.999), (NAN, 0.999), (0.9, NAN), (0.9,), (torch.tensor(0.9), 0.999)]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("betas", BAD_BETAS, ids=[str(b) for b in BAD_BETAS])
def test_bad_betas(name, betas):
    with pytest.raises(ValueError, match="beta"):
        getattr(sg.optim, name)(params(), betas=betas)


def test_tensor_lr_must_have_one_element():
    with pytest.raises(ValueError, match="lr"):
        sg.optim.Adam(params(), lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam", "AdamW"])
def test_a_set_of_parameters_raises_type_error(name):
    with pytest.raises(TypeError, match="ordered"):
        getattr(sg.optim, name)(set(params()))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam", "AdamW"])
def test_a_parameter_listed_twice_warns_as_torch(name, fused):
    """torch warns (its own tests expect the warning, not an error) and steps it twice; so does
    steadygrad (the numbers of such a step are each library's own: torch's depend on the order of
    its foreach passes)."""
    p = torch.nn.Parameter(torch.arange(4.0, dtype=torch.float64))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = getattr(sg.optim, name)([p, p], fused=fused)
    p.grad = torch.full((4,), 0.5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fused=True falls back to the reference path
        opt.step()
    assert not torch.equal(p.detach(), torch.arange(4.0, dtype=torch.float64)) and torch.isfinite(p).all()


def test_a_parameter_in_two_groups_raises():
    p = params()[0]
    with pytest.raises(ValueError, match="more than one"):
        sg.optim.Adam([{"params": [p]}, {"params": [p], "lr": 0.1}])


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam", "AdamW"])
def test_a_non_leaf_tensor_raises(name):
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        getattr(sg.optim, name)([leaf * 2])


def test_a_single_tensor_is_not_an_iterable_of_parameters():
    with pytest.raises(TypeError):
        sg.optim.Adam(torch.nn.Parameter(torch.randn(3)))


def test_sparse_gradients_raise_a_clear_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = sg.optim.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients.*Adagrad"):
        opt.step()


def test_transformed_checks_its_arguments():
    with pytest.raises(TypeError, match="Transform"):
        sg.optim.Transformed(params(), lambda g: g)
    with pytest.raises(ValueError, match="lr"):
        sg.optim.Transformed(params(), sg.scale_by_lr(), lr=NAN)


def test_torch_would_have_accepted_and_diverged():
    """The refusals are not pedantry: torch accepts alpha=1.5 and eps=0 and produces NaN."""
    p = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    opt = torch.optim.RMSprop([p], alpha=1.5, lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    assert torch.isnan(p).any()
    q = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    opt = torch.optim.Adam([q], eps=0.0)
    opt.zero_grad()
    (q[0] ** 2).backward()
    opt.step()
    assert torch.isnan(q).any()


def _stepped(make, shape=(3, 2)):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = make([p])
    p.grad = torch.ones(shape)
    opt.step()
    return opt


FOREIGN = {
    "other-shapes": (
        lambda ps: sg.optim.Adam(ps, clip=sg.zclip(warmup_steps=3)),
        (2, 3),
        r"'exp_avg' for parameter 0 of param group 0 \(shape \(2, 3\)\) has shape \(3, 2\), "
        r"this optimizer's has \(2, 3\)",
    ),
    "other-optimizer": (
        lambda ps: sg.optim.RMSprop(ps, clip=sg.zclip(warmup_steps=3)),
        (3, 2),
        r"has \['exp_avg', 'exp_avg_sq'\] where RMSprop \(clip=ZClip\) keeps \['square_avg'\]",
    ),
    "other-clip-rule": (
        lambda ps: sg.optim.Adam(ps, clip=sg.autoclip()),
        (3, 2),
        r"has \['clip.norm_mean', 'clip.norm_var', 'clip.warmup_norms'\] where Adam \(clip=AutoClip\) keeps "
        r"\['clip.norm_history'\]",
    ),
    "other-clip-setting": (
        lambda ps: sg.optim.Adam(ps, clip=sg.zclip(warmup_steps=5)),
        (3, 2),
        r"'clip.warmup_norms' .* has shape \(3,\), this optimizer's has \(5,\): a checkpoint of other settings",
    ),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_load_state_dict_refuses_foreign_state_and_loads_nothing(case):
    """torch loads any state of the right length and fails (or computes nonsense) later;
    steadygrad names the parameter, the key and the shapes, and changes nothing."""
    make_target, shape, message = FOREIGN[case]
    saved = _stepped(lambda ps: sg.optim.Adam(ps, clip=sg.zclip(warmup_steps=3))).state_dict()
    target = _stepped(make_target, shape)
    before = {k: v.clone() for k, v in target.state[target.param_groups[0]["params"][0]].items()}
    groups = [dict(g) for g in target.param_groups]
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(saved)
    after = target.state[target.param_groups[0]["params"][0]]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [dict(g) for g in target.param_groups] == groups


def test_load_state_dict_takes_old_torch_checkpoints_and_state_of_options_switched_off():
    """A group of an older torch lacks options torch added since (Adam's decoupled_weight_decay;
    step as a float); state of an option switched off (amsgrad, momentum, moment_clip) stays,
    as in torch. Neither is foreign."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    old = torch.optim.AdamW([p])
    p.grad = torch.ones(3, 2)
    old.step()
    saved = old.state_dict()
    del saved["param_groups"][0]["decoupled_weight_decay"]
    saved["state"][0]["step"] = float(saved["state"][0]["step"])
    mine = _stepped(lambda ps: sg.optim.AdamW(ps))
    mine.load_state_dict(saved)
    assert mine.param_groups[0]["decoupled_weight_decay"] is True
    for make, option, off in [
        (lambda ps: sg.optim.Adam(ps, amsgrad=True), "amsgrad", False),
        (lambda ps: sg.optim.RMSprop(ps, momentum=0.9, centered=True), "momentum", 0.0),
        (lambda ps: sg.optim.Adam(ps, moment_clip=2.0), "moment_clip", None),
    ]:
        opt = _stepped(make)
        opt.param_groups[0][option] = off
        opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
        opt.step()
        opt.load_state_dict(opt.state_dict())


def test_load_state_dict_takes_torchs_checkpoints_and_its_own():
    torch_opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))], amsgrad=True)
    torch_opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    torch_opt.step()
    mine = _stepped(lambda ps: sg.optim.Adam(ps))
    mine.load_state_dict(torch_opt.state_dict())  # amsgrad's max_exp_avg_sq comes with its option
    assert "max_exp_avg_sq" in mine.state[mine.param_groups[0]["params"][0]]
    again = _stepped(lambda ps: sg.optim.Adam(ps, clip=sg.autoclip(), moment_clip=2.0))
    again.load_state_dict(again.state_dict())
