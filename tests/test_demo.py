"""``steadygrad demo``: the experiment (steadygrad.apps.demo), its report (steadygrad.apps.demo.report) and
the subcommand (steadygrad.cli.demo), on the quick setting (300 steps, a few seconds)."""

from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch

pytest.importorskip("sklearn", reason='the demo needs its extra: pip install -e ".[demo]"')
pytest.importorskip("matplotlib", reason='the demo needs its extra: pip install -e ".[demo]"')

from steadygrad import cli  # noqa: E402
from steadygrad.apps.demo import CONFIGS, LOG_FIELDS, DemoSettings, load_digits_split, run_demo  # noqa: E402
from steadygrad.cli.progress import ProgressBar  # noqa: E402

CLIPPED = ("clip_grad_norm_", "clip_by_moment", "zclip")


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


@pytest.fixture(scope="module")
def quick(data):
    return run_demo(DemoSettings.quick(), data=data)


def _without_times(metrics: dict) -> dict:
    configs = {k: {n: v for n, v in c.items() if n != "time_s"} for k, c in metrics["configs"].items()}
    return {**metrics, "configs": configs}


def test_data_is_the_fixed_digits_split(data):
    assert data.train_x.shape == (1437, 64) and data.test_x.shape == (360, 64)
    assert data.train_x.dtype == torch.float32 and 0 <= float(data.train_x.min()) and float(data.train_x.max()) == 1
    assert sorted(torch.unique(data.test_y).tolist()) == list(range(10))
    again = load_digits_split()
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_y, data.train_y)


def test_quick_run_schedule_and_logs(quick):
    s = quick.settings
    assert [r.name for r in quick.configs] == list(CONFIGS)
    assert len(quick.spike_steps) == s.num_spikes == 3 and len(quick.nan_steps) == s.num_nan == 1
    assert min(quick.spike_steps + quick.nan_steps) >= s.clean_start
    assert not set(quick.spike_steps) & set(quick.nan_steps)
    spikes = torch.tensor(quick.spike_steps)
    for r in quick.configs:
        assert r.log.shape == (s.steps, len(LOG_FIELDS)) and r.log.dtype == torch.float64
        skipped = r.column("skipped") > 0
        # exactly the NaN batches are skipped, in every configuration
        assert skipped.nonzero().flatten().tolist() == quick.nan_steps == [i for i in range(s.steps) if skipped[i]]
        assert r.steps_skipped == len(quick.nan_steps)
        assert torch.isnan(r.column("grad_norm")[skipped]).all() and (r.column("clipped_norm")[skipped] == 0).all()
        assert torch.isfinite(r.column("grad_norm")[~skipped]).all()
        assert r.steps_clipped == int(((r.column("fraction_clipped") > 0) & ~skipped).sum())
        assert 0 <= r.test_accuracy <= 1 and r.time_s > 0
    # the corrupted batches are genuine spikes: far above the clean norms (seen where training is healthy)
    norm = quick["clip_grad_norm_"].column("grad_norm")
    clean = torch.ones(s.steps, dtype=torch.bool)
    clean[quick.spike_steps + quick.nan_steps] = False
    assert float(norm[spikes].min()) > 20 * float(norm[clean].median())


def test_each_clipper_does_what_it_says(quick):
    s = quick.settings
    spikes = torch.tensor(quick.spike_steps)
    none = quick["none"]
    assert none.steps_clipped == 0
    ok = none.column("skipped") == 0
    assert torch.equal(none.column("clipped_norm")[ok], none.column("grad_norm")[ok])

    norm = quick["clip_grad_norm_"]
    ok = norm.column("skipped") == 0
    assert float(norm.column("clipped_norm")[ok].max()) <= s.max_norm * (1 + 1e-5)
    clipped = norm.column("fraction_clipped") > 0
    assert torch.equal(clipped[ok], norm.column("grad_norm")[ok] > s.max_norm)
    assert (norm.column("threshold") == s.max_norm).all()

    moment = quick["clip_by_moment"]
    fraction = moment.column("fraction_clipped")
    assert (fraction[spikes] > 0.05).all()  # a sizeable share of the elements of every spike
    assert float(fraction[moment.column("skipped") == 0].median()) < 0.01  # and few on clean steps
    assert (moment.column("clipped_norm")[spikes] < 0.7 * moment.column("grad_norm")[spikes]).all()

    zc = quick["zclip"]
    hit = zc.column("fraction_clipped") > 0
    assert hit[spikes].all()
    threshold = zc.column("threshold")
    assert torch.isfinite(threshold[hit]).all()
    torch.testing.assert_close(zc.column("clipped_norm")[hit], threshold[hit], rtol=1e-4, atol=0)
    # the boundary exists after the 25-step warm-up, and every clipped step was above it
    boundary = zc.column("zclip_boundary")
    assert torch.isnan(boundary[:25]).all() and torch.isfinite(boundary[25:]).all()
    assert (zc.column("grad_norm")[hit] > boundary[hit]).all()
    assert (threshold[hit] < boundary[hit]).all()


def test_clipping_ends_lower_than_no_clipping_under_spikes(quick):
    none = quick["none"]
    for name in CLIPPED:
        r = quick[name]
        assert r.final_loss < 0.5 * none.final_loss, (name, r.final_loss, none.final_loss)
        assert r.test_accuracy > none.test_accuracy + 0.2, (name, r.test_accuracy, none.test_accuracy)
    # without clipping the spikes do real damage: the loss ends far above where clipping takes it
    assert none.final_loss > 0.5


def test_same_seed_same_numbers_other_seed_other_schedule(quick, data):
    again = run_demo(DemoSettings.quick(), data=data, configs=("none", "zclip"))
    for r in again.configs:
        torch.testing.assert_close(r.log, quick[r.name].log, rtol=0, atol=0, equal_nan=True)
    first = _without_times(quick.metrics())
    second = _without_times(again.metrics())
    assert first["corrupted_steps"] == second["corrupted_steps"] and first["nan_steps"] == second["nan_steps"]
    for name in ("none", "zclip"):
        assert first["configs"][name] == second["configs"][name]
    other = run_demo(DemoSettings.quick(seed=1, steps=60, clean_start=10), data=data, configs=("none",))
    assert other.spike_steps != quick.spike_steps


def test_global_state_is_left_alone(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    run_demo(DemoSettings.quick(steps=40, clean_start=5), data=data, configs=("none",))
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_settings_are_validated():
    with pytest.raises(ValueError, match="spike_rate"):
        DemoSettings(spike_rate=1.5)
    with pytest.raises(ValueError, match="steps"):
        DemoSettings(steps=0)
    with pytest.raises(ValueError, match="do not fit"):
        DemoSettings(steps=60, spike_rate=0.5)
    with pytest.raises(ValueError, match="unknown configuration"):
        run_demo(DemoSettings.quick(), configs=("adam",))


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture
def main(monkeypatch):
    """``steadygrad.cli.main`` with ``demo`` registered (a no-op once cli/__init__.py lists it)."""
    if "demo" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "demo"))
    return cli.main


def _png_ink(path: str) -> float:
    """The share of pixels that are not the background (white) of a valid PNG."""
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = torch.from_numpy(matplotlib.image.imread(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    return float((pixels[..., :3] < 0.9).any(dim=-1).to(torch.float64).mean())


def test_cli_quick_end_to_end(main, tmp_path, capsys):
    out = tmp_path / "report"  # created by the command
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    for name in ("loss.png", "grad_norm.png", "report.html", "metrics.json", "steps.csv"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "grad_norm.png"):
        assert 0.02 < _png_ink(str(out / name)) < 0.6, name

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["configs"]) == list(CONFIGS)
    assert metrics["settings"]["steps"] == 300 and metrics["settings"]["seed"] == 0
    assert len(metrics["corrupted_steps"]) == 3
    none = metrics["configs"]["none"]
    for name in CLIPPED:
        assert metrics["configs"][name]["final_loss"] < 0.5 * none["final_loss"]

    report = (out / "report.html").read_text()
    assert report.count('src="data:image/png;base64,') == 2
    # self-contained: nothing is fetched (no script, stylesheet link, remote image or CSS url)
    for fetch in ("<script", "<link", "href=", "url(", 'src="http', "@import"):
        assert fetch not in report, fetch
    for c in metrics["configs"].values():
        assert f"<td>{c['label']}</td><td>{c['final_loss']:.4f}</td><td>{100 * c['test_accuracy']:.1f}%</td>" in report

    # the table on stdout, the progress on stderr
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("configuration"))
    assert "final loss" in lines[header] and "steps skipped" in lines[header]
    for line, c in zip(lines[header + 2 : header + 6], metrics["configs"].values()):
        assert line.startswith(c["label"]) and f"{c['final_loss']:.4f}" in line
    assert "clip_by_moment" in captured.err and "300/300" in captured.err

    rows = (out / "steps.csv").read_text().splitlines()
    assert rows[0].startswith("config,step,corrupted,nan_batch,loss,grad_norm")
    assert len(rows) == 1 + 4 * 300


def test_cli_errors_are_one_line(main, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["demo", "--out", str(blocker)], "is not a folder"),
        (["demo", "--spike-rate", "2"], "expected a number in [0, 1]"),
        (["demo", "--steps", "60", "--spike-rate", "0.9", "--out", str(tmp_path)], "do not fit"),
        (["demo", "--device", "nonsense", "--out", str(tmp_path)], "not a torch device"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("steadygrad: error: ") and message in err and err.count("\n") == 1, err

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert main(["demo", "--quick", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == 'steadygrad: error: the demo needs matplotlib and scikit-learn: pip install "steadygrad[demo]"\n'
    assert not os.path.exists(tmp_path / "x")  # refused before any work


def test_progress_bar_plain_and_interactive():
    plain = io.StringIO()
    bar = ProgressBar(plain, interactive=False)
    for step in range(0, 101, 5):
        bar("zclip", step, 100, torch.tensor(0.25) if step else None)
    lines = plain.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["25/100", "50/100", "75/100", "100/100"]
    assert all(line.startswith("zclip") and "loss 0.25" in line for line in lines)
    assert lines[-1].endswith(" s")

    tty = io.StringIO()
    bar = ProgressBar(tty, width=10, interactive=True)
    bar("none", 5, 10, 1.5)
    bar("none", 10, 10, math.pi)
    text = tty.getvalue()
    assert text.startswith("\rnone") and "[#####-----]" in text and "[##########]" in text
    assert text.endswith(" s\n") and "loss 3.142" in text
