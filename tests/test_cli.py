"""The command line: `steadygrad trace` prints d2l's numbers and draws the trajectories; bad input
gives one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from steadygrad.cli import COMMANDS, main

matplotlib = pytest.importorskip("matplotlib", reason="the plots need the cli extra")
from matplotlib import image as mpimg  # noqa: E402

from steadygrad.cli.plot import COLORS  # noqa: E402

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
    pixels = mpimg.imread(out)[..., :3]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 400
    for i in range(len(specs)):
        rgb = [int(COLORS[i][k : k + 2], 16) / 255 for k in (1, 3, 5)]
        close = (abs(pixels - rgb) < 0.02).all(axis=-1)
        assert close.sum() > 150, f"trajectory {i} ({COLORS[i]}) is not drawn"


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
