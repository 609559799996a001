"""The command line: `steadygrad trace` prints d2l's numbers and draws the trajectories; bad input
gives one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import steadygrad as sg
from steadygrad.apps import COLORS
from steadygrad.apps.trace import FUNCTIONS, SPIKE_SIZE, get_function, spike, spike_steps, trajectory
from steadygrad.apps.trace.spec import SpecError, parse_optimizer, parse_transform
from steadygrad.cli import COMMANDS, main

matplotlib = pytest.importorskip("matplotlib", reason="the plots need the cli extra")
from matplotlib import image as mpimg  # noqa: E402

from steadygrad.apps.trace.plot import plot_trajectories, save_figure  # noqa: E402

D2L = [
    ("adagrad(lr=0.4, eps=1e-6, eps_in_sqrt=True)", "epoch 20, x1: -2.382563, x2: -0.158591"),
    ("adagrad(lr=2, eps=1e-6, eps_in_sqrt=True)", "epoch 20, x1: -0.002295, x2: -0.000000"),
    ("rmsprop(lr=0.4, alpha=0.9, eps=1e-6, eps_in_sqrt=True)", "epoch 20, x1: -0.010599, x2: 0.000000"),
]


def test_trace_prints_d2l_numbers_and_draws_every_trajectory(tmp_path, capsys):
    out = tmp_path / "d2l.png"
    specs = [spec for spec, _ in D2L]
    assert main(["trace", *specs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    for spec, line in D2L:
        assert printed[printed.index(spec) + 1] == line
    assert printed[-1] == f"wrote {out}"
    pixels = mpimg.imread(out)[..., :3]
    assert pixels.shape == (600, 800, 3)
    for i in range(len(COLORS)):
        count = _colour_mask(pixels, COLORS[i]).sum()
        if i < len(specs):
            assert count > 150, f"trajectory {i} ({COLORS[i]}) is not drawn"
        else:
            assert count == 0, f"colour {COLORS[i]} drawn, but there are only {len(specs)} trajectories"


def _colour_mask(pixels, colour, tolerance=0.02):
    rgb = np.array([int(colour[k : k + 2], 16) / 255 for k in (1, 3, 5)])
    return (np.abs(pixels - rgb) < tolerance).all(axis=-1)


def test_trace_with_a_clipper_and_other_functions(tmp_path, capsys):
    for function in ("rotated", "rosenbrock", "spiky"):
        code = main(["trace", "adam(lr=0.1, clip=clip_by_moment(k=5))", "rmsprop(lr=0.01)", "--function", function])
        assert code == 0
        assert capsys.readouterr().out.count("epoch 20, x1:") == 2


BAD = [
    ["trace", "nadam(lr=0.1)"],  # unknown optimizer
    ["trace", "adam(lr=0.1, foo=1)"],  # unknown keyword
    ["trace", "__import__('os').system('true')"],
    ["trace", "adam(lr=(lambda: 1)())"],
    ["trace", "adam.__class__"],
    ["trace", "adam(lr=-1)"],  # the optimizer's own validation
    ["trace", "adam(clip=unknown(k=5))"],
    ["trace", "adam()", "--start=1,2,3"],
    ["trace", "adam()", "--function", "himmelblau"],
    ["trace", "adam()", "--steps", "0"],
    ["nosuchcommand"],
    [],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) or "(nothing)" for a in BAD])
def test_bad_input_is_one_line_and_exit_code_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steadygrad: error: ")
    assert "Traceback" not in captured.err


def test_unknown_names_are_answered_with_the_valid_ones(capsys):
    main(["trace", "nadam()"])
    assert "adagrad" in capsys.readouterr().err
    main(["trace", "adam(foo=1)"])
    assert "betas" in capsys.readouterr().err


def test_the_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "steadygrad.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_the_trajectory_is_drawn_where_its_points_are(tmp_path):
    """Pixels of the trajectory's colour lie at its points in the saved PNG (the axes' own data ->
    pixel transform), and no other trajectory colour appears."""
    d2l = get_function("d2l")
    points = trajectory(d2l, parse_optimizer("rmsprop(lr=0.4, alpha=0.9, eps=1e-6, eps_in_sqrt=True)").build, 20)
    fig = plot_trajectories(d2l, [points], ["rmsprop"], title="t")
    save_figure(fig, tmp_path / "one.png")
    pixels = mpimg.imread(tmp_path / "one.png")[..., :3]
    height = pixels.shape[0]
    blue = _colour_mask(pixels, COLORS[0], tolerance=0.05)
    assert _colour_mask(pixels, COLORS[1]).sum() == 0
    xy = fig.axes[0].transData.transform(points[2:12].numpy())
    for x, y in xy:
        row, col = int(round(height - y)), int(round(x))
        assert blue[row - 2 : row + 3, col - 2 : col + 3].any(), (x, y)
    ((x, y),) = fig.axes[0].transData.transform([[0.5, -2.5]])  # far from the path: no blue there
    row, col = int(round(height - y)), int(round(x))
    assert not blue[row - 10 : row + 11, col - 10 : col + 11].any()


def test_loss_panel_and_negative_start(tmp_path, capsys):
    out = tmp_path / "loss.png"
    assert (
        main(["trace", "sgd(0.1)", "--function", "spiky", "--start=-4,1.5", "-n", "5", "--loss", "-o", str(out)]) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    expected = trajectory(get_function("spiky"), lambda p: torch.optim.SGD(p, lr=0.1), 5, (-4.0, 1.5))[-1]
    assert printed[1] == f"epoch 5, x1: {expected[0]:f}, x2: {expected[1]:f}"
    assert mpimg.imread(out).shape[:2] == (600, 1280)


def test_without_matplotlib_the_numbers_are_printed_and_one_line_says_why(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "x.png"
    assert main(["trace", "adagrad(lr=0.4, eps=1e-6, eps_in_sqrt=True)", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1] == "epoch 20, x1: -2.382563, x2: -0.158591"
    assert captured.err.splitlines() == [
        f'steadygrad: error: {out} not written: the plot needs matplotlib: pip install "steadygrad[cli]"'
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [("missing/x.png", "does not exist"), ("x.bmp", "must end in .png, .svg, .pdf"), (".", "must end in")],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, out, message):
    assert main(["trace", "adam()", "--out", str(tmp_path / out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("steadygrad: error: --out ") and message in captured.err
    assert len(captured.err.splitlines()) == 1


def test_version_and_subcommand_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"steadygrad {sg.__version__}"
    assert main(["trace", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("SPEC", "--function", "--start", "rosenbrock", "spiky", "adagrad", "clip_by_norm"):
        assert word in text


def test_a_negative_value_after_a_space_gets_a_hint(capsys):
    assert main(["trace", "adam()", "--start", "-5,-2"]) == 2
    assert "--start=-5,-2" in capsys.readouterr().err


# ---- the spec grammar ------------------------------------------------------------------------


def test_spec_values_positional_and_nested_calls():
    spec = parse_optimizer(
        "  Adam(0.1, betas=(0.9, 0.99), eps=-1e-8, weight_decay=+2.5E-3, amsgrad=True, foreach=None) "
    )
    assert spec.name == "adam" and spec.text.startswith("Adam(")
    assert spec.args == (0.1,)
    assert spec.kwargs == dict(betas=(0.9, 0.99), eps=-1e-8, weight_decay=2.5e-3, amsgrad=True, foreach=None)
    assert parse_optimizer("rmsprop").args == () and parse_optimizer("rmsprop").kwargs == {}
    clipped = parse_optimizer("adam(lr=0.1, clip=clip_by_norm(max_norm=1.0))")
    assert isinstance(clipped.kwargs["clip"], sg.Transform)
    assert isinstance(parse_transform("zclip"), sg.Transform)
    assert (
        parse_optimizer("sgd(lr=0.1, momentum=0.9)").build([torch.zeros(1, requires_grad=True)]).defaults["momentum"]
        == 0.9
    )


def test_a_nested_clipper_is_the_one_the_optimizer_uses():
    """clip=clip_by_value(0.5) in a spec gives the same run as the optimizer built in Python."""
    f = get_function("d2l")
    from_spec = trajectory(f, parse_optimizer("adam(lr=0.4, clip=clip_by_value(0.5))").build, 10)
    direct = trajectory(f, lambda p: sg.optim.Adam(p, lr=0.4, clip=sg.clip_by_value(0.5)), 10)
    unclipped = trajectory(f, lambda p: sg.optim.Adam(p, lr=0.4), 10)
    assert torch.equal(from_spec, direct) and not torch.equal(direct, unclipped)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nadam(lr=0.1)", "unknown optimizer 'nadam'; valid optimizers: adagrad, adam, adamw, rmsprop, sgd"),
        ("adam(foo=1)", "unknown keyword 'foo' for adam; valid keywords: lr, betas, eps"),
        ("sgd(lr=0.1, clip=zclip())", "sgd does not accept clip= (torch.optim.SGD has no clip option)"),
        ("adam(params=1)", "params is supplied by the command"),
        ("adam(amsgrad=true)", "(write True, False or None)"),
        ("zclip()", "'zclip' is a transform, but an optimizer is expected"),
        ("adam(clip=adam())", "'adam' is an optimizer, but a transform is expected"),
        ("torch.optim.SGD(lr=0.1)", "attribute access is not allowed"),
        ("adam(lr=x[0])", "a subscript is not allowed"),
        ("adam(lr=1+1)", "arithmetic is not allowed"),
        ("adam(lr=lambda: 1)", "a lambda is not allowed"),
        ("adam(**{'lr': 1})", "** unpacking is not allowed"),
        ("adam(lr=-True)", "a sign is allowed only before a number"),
        ("adam(lr=1j)", "complex values are not allowed"),
        ("adam(0.1, 0.9, 0.9, 0.9, 0.9, 0.9)", "too many positional arguments"),
        ("adam(lr=0.1", "cannot parse"),
        ("adam(lr=-1)", "Invalid learning rate: -1.0"),
        ("adam(clip=clip_by_norm(max_norm=-1))", "clip_by_norm(max_norm=-1): "),
        ("__import__('os').system('echo hacked')", "attribute access is not allowed"),
        ("__import__('os')", "unknown optimizer '__import__'"),
        ("", "empty spec"),
    ],
)
def test_bad_specs_say_what_is_valid(text, message):
    with pytest.raises(SpecError) as info:
        parse_optimizer(text).build([torch.zeros(2, requires_grad=True)])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ---- the test functions ----------------------------------------------------------------------


def test_functions_values_gradients_and_spikes():
    x = torch.tensor([-5.0, -2.0], dtype=torch.float64)
    d2l, rotated, rosen, spiky = (FUNCTIONS[n] for n in ("d2l", "rotated", "rosenbrock", "spiky"))
    assert d2l.value(x).item() == pytest.approx(0.1 * 25 + 2 * 4)
    assert torch.allclose(d2l.gradient(x), torch.tensor([0.2 * -5, 4 * -2], dtype=torch.float64))
    turn = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / 2**0.5  # (u, v) = turn @ x
    assert rotated.value(x).item() == pytest.approx(d2l.value(turn @ x).item())
    assert rosen.value(torch.tensor([1.0, 1.0])).item() == 0.0
    assert torch.allclose(
        rosen.gradient(torch.tensor([-1.2, 1.0], dtype=torch.float64)),
        torch.tensor([-2 * 2.2 - 400 * -1.2 * (1 - 1.44), 200 * (1 - 1.44)], dtype=torch.float64),
    )
    assert spike_steps(30) == [1, 3, 25, 28]
    assert spike_steps(30, seed=1) == [22, 23]
    assert float(spike(1).norm()) == pytest.approx(SPIKE_SIZE) and not spike(0).any()
    assert torch.equal(spiky.gradient(x, 1) - d2l.gradient(x), spike(1))
    assert torch.equal(spiky.gradient(x, 2), d2l.gradient(x))
