"""The benchmark harness (steadygrad.apps.bench, ``steadygrad bench``): it runs end to end and reports
every field; the layouts have their sizes; the bytes model has the documented values. No speed is
asserted here: timings are benchmarks, not tests."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from steadygrad.apps import bench
from steadygrad.cli import bench as cli_bench

TINY = dict(
    sizes=[20_000],
    layouts=["big", "transformer"],
    cases=["adam+norm", "rmsprop+moment_clip"],
    repeats=2,
    warmup=1,
    contenders=("sg_ref", "torch_foreach", "torch_fused"),  # no fused: no compile in the tests
    recompile_steps=0,
    copy_mib=4,
)

CONTENDER_FIELDS = {
    "available",
    "error",
    "warnings",
    "ms",
    "ms_q1",
    "ms_q3",
    "ms_min",
    "samples_ms",
    "bytes_per_param",
    "GBps",
    "bw_fraction",
    "minflt_per_step",
    "first_step_s",
    "first_step_compiles",
}
RECORD_FIELDS = {
    "case",
    "optimizer",
    "clip",
    "torch_clip",
    "options",
    "description",
    "size",
    "size_label",
    "layout",
    "n_params",
    "n_tensors",
    "bytes_per_param",
    "repeats",
    "warmup",
    "copy_GBps",
    "contenders",
    "ratios",
    "recompile_check",
    "seconds",
}


@pytest.fixture(scope="module")
def tiny_report():
    return bench.run_benchmark(**TINY)


@pytest.mark.parametrize("layout", ["big", "transformer"])
@pytest.mark.parametrize("n", [10**6, 10**7, 10**8])
def test_layouts_hit_their_sizes(layout, n):
    shapes = bench.layout_shapes(layout, n)
    total = sum(math.prod(s) for s in shapes)
    assert abs(total - n) <= 0.01 * n
    if layout == "big":
        assert len(shapes) == 4
    else:
        assert len(shapes) == 500
        assert len({s for s in shapes if len(s) == 2}) >= 4  # embeddings, attention, MLP in and out
        assert any(len(s) == 1 for s in shapes)  # biases and LayerNorm parameters
    assert all(all(d > 0 for d in s) for s in shapes)


def test_tiny_layout_counts_tensors_of_eight():
    assert bench.layout_shapes("tiny", 32) == [(8,)] * 4
    assert len(bench.layout_shapes("tiny", 4000)) == 500
    assert bench.layout_shapes("tiny", 20) == [(8,), (8,), (4,)]
    assert bench.MODES["host"]["layouts"] == ("tiny",)


def test_new_gradients_are_new_tensors_every_step():
    """--new-grads: every step gets new .grad tensors (torch's default zero_grad() then backward);
    without it the old ones are written in place."""
    import torch

    grads = [torch.randn(8), torch.randn(3)]
    params = bench._make_params([torch.zeros(8), torch.zeros(3)], grads)
    c = bench._Contender("sg_ref", lambda: None, 28, params)
    before = [p.grad for p in params]
    c.write_grads(grads)
    assert all(p.grad is b for p, b in zip(params, before))
    c.write_grads([g * 2 for g in grads], new=True)
    assert all(p.grad is not b for p, b in zip(params, before))
    assert all(torch.equal(p.grad, g * 2) for p, g in zip(params, grads))
    report = bench.run_benchmark(**{**TINY, "layouts": ["tiny"], "cases": ["adam"], "new_grads": True})
    assert report["settings"]["new_grads"] is True
    assert report["results"][0]["n_tensors"] == 2500


def test_tiny_transformer_layout_still_exact():
    shapes = bench.layout_shapes("transformer", 20_000)
    assert abs(sum(math.prod(s) for s in shapes) - 20_000) <= 200
    with pytest.raises(ValueError, match="unknown layout"):
        bench.layout_shapes("convnet", 10**6)


def test_bytes_per_param_model():
    bpp = bench.bytes_per_param
    assert bpp("Adagrad") == 20
    assert bpp("RMSprop") == 20
    assert bpp("RMSprop", centered=True) == 28
    assert bpp("RMSprop", momentum=0.9) == 28
    assert bpp("RMSprop", centered=True, momentum=0.9) == 36
    assert bpp("Adam") == bpp("AdamW") == 28
    assert bpp("Adam", amsgrad=True) == 36
    assert bpp("Adam", "norm") == 32  # the global norm reads g once more
    assert bpp("Adam", "value") == 28
    assert bpp("Adam", "moment_clip") == 28  # the optimizer's own second moment
    assert bpp("Adam", "moment") == 36  # clip_by_moment's own nu
    assert bpp("RMSprop", "moment_clip") == 20
    assert bpp("Adam", "unit_ratio") == 36
    assert bpp("Adam", element_size=2) == 14
    cases = bench.CASES
    assert cases["rmsprop+moment_clip"].bytes_per_param == 20
    assert cases["rmsprop+moment_clip"].torch_bytes_per_param == 24  # clip_grad_norm_ + RMSprop
    assert cases["adam+moment"].bytes_per_param == 36
    assert cases["rmsprop_cm+norm"].bytes_per_param == 40
    with pytest.raises(ValueError):
        bpp("SGD")


@pytest.mark.parametrize(
    "text, n", [("1M", 10**6), ("20k", 20_000), ("2.5M", 2_500_000), ("1e6", 10**6), ("10_000_000", 10**7), (7, 7)]
)
def test_parse_size(text, n):
    assert bench.parse_size(text) == n
    assert bench.parse_size(bench.format_size(n)) == n or n == 7


@pytest.mark.parametrize("bad", ["", "M", "1X", "-5", "0"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError):
        bench.parse_size(bad)


def test_report_is_well_formed_json(tiny_report):
    report = json.loads(json.dumps(tiny_report))  # JSON through and through
    assert set(report) >= {"schema", "machine", "settings", "bytes_model", "copy", "results", "elapsed_s"}
    assert report["machine"]["threads"] >= 1 and report["machine"]["torch"]
    assert report["copy"]["GBps"] > 0 and report["copy"]["MiB"] == 4
    assert report["bytes_model"]["per_param"] == {"Adagrad": 20, "RMSprop": 20, "Adam": 28, "AdamW": 28}
    assert len(report["results"]) == 2 * 2
    for r in report["results"]:
        assert set(r) >= RECORD_FIELDS, RECORD_FIELDS - set(r)
        assert r["size"] == 20_000
        assert abs(r["n_params"] - 20_000) <= 200
        assert r["copy_GBps"] > 0
        assert set(r["contenders"]) == {"sg_ref", "torch_foreach", "torch_fused", "copy"}
        for name in ("sg_ref", "torch_foreach", "copy"):
            entry = r["contenders"][name]
            assert entry["available"] and entry["error"] is None
            assert set(entry) >= CONTENDER_FIELDS, CONTENDER_FIELDS - set(entry)
            assert len(entry["samples_ms"]) == 2
            assert entry["ms_min"] <= entry["ms"] and entry["ms_q1"] <= entry["ms"] <= entry["ms_q3"]
            assert entry["GBps"] > 0 and entry["bw_fraction"] > 0 and entry["minflt_per_step"] >= 0
        assert r["contenders"]["copy"]["bw_fraction"] == pytest.approx(1.0)
        assert r["contenders"]["sg_ref"]["bytes_per_param"] == r["bytes_per_param"]
        assert r["recompile_check"] is None  # only for the fused path
        assert "torch_foreach/sg_ref" in r["ratios"]
        fused = r["contenders"]["torch_fused"]
        if r["optimizer"] == "RMSprop":
            assert not fused["available"] and "no fused" in fused["error"]
            assert set(r["ratios"]) == {"torch_foreach/sg_ref"}
        else:
            assert fused["available"] and "torch_fused/sg_ref" in r["ratios"]
    by_case = {r["case"]: r for r in report["results"] if r["layout"] == "big"}
    assert by_case["adam+norm"]["bytes_per_param"] == 32
    assert by_case["adam+norm"]["contenders"]["torch_foreach"]["bytes_per_param"] == 32
    assert by_case["rmsprop+moment_clip"]["contenders"]["torch_foreach"]["bytes_per_param"] == 24
    transformer = [r for r in report["results"] if r["layout"] == "transformer"]
    assert all(r["n_tensors"] > 100 for r in transformer)


def test_table_reports_measurements_only(tiny_report):
    text = bench.format_report(tiny_report)
    assert "rmsprop+moment_clip" in text and "copy bandwidth" in text
    assert len([line for line in text.splitlines() if line.startswith("20k ")]) == 4
    # measurements and ratios, no pass/fail verdicts of a project's targets
    assert "target" not in text.lower() and "MISSED" not in text


def test_cli_writes_json_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--sizes", "20k", "--layouts", "big", "--cases", "adagrad+norm", "--repeats", "2", "--warmup", "0"]
    argv += ["--no-fused", "--copy-mib", "4", "--json", str(out)]
    assert cli_bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["results"]] == ["adagrad+norm"]
    assert "sg_fused" not in report["results"][0]["contenders"]
    assert "adagrad+norm" in capsys.readouterr().out
    md = tmp_path / "bench.md"
    assert cli_bench.main(["--from-json", str(out), "--markdown", str(md)]) == 0  # no run: tables only
    table = md.read_text()
    assert "| 20k | big | `adagrad+norm` | 24 |" in table and table.count("\n|") == 3
    assert "adagrad+norm" in capsys.readouterr().out

    for bad, needle in (
        (["--sizes", "ten"], "--sizes"),
        (["--cases", "sgd"], "unknown case"),
        (["--layouts", "cnn"], "unknown layout"),
        (["--repeats", "0"], "--repeats"),
        (["--quick", "--full"], "not allowed"),
        (["--from-json", str(tmp_path / "missing.json")], "--from-json"),
    ):
        assert cli_bench.main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("steadygrad: error: ") and needle in err and "\n" not in err

    assert cli_bench.main(["--list-cases"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in bench.CASES)


def test_registers_as_a_subcommand():
    parser = argparse.ArgumentParser(prog="steadygrad")
    sub = parser.add_subparsers(dest="command")
    cli_bench.add_parser(sub)
    args = parser.parse_args(["bench", "--quick", "--sizes", "1M,10M", "--json", "x.json"])
    assert args.command == "bench" and args.quick and args.sizes == "1M,10M" and args.json == "x.json"
    assert callable(cli_bench.run)


def test_runs_under_the_steadygrad_command(monkeypatch, capsys):
    """Registered in steadygrad.cli.COMMANDS (the lead's one-line change), errors are one line."""
    import steadygrad.cli as cli

    if "bench" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "bench"))
    assert cli.main(["bench", "--list-cases"]) == 0
    assert "adam+moment_clip" in capsys.readouterr().out
    assert cli.main(["bench", "--sizes", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steadygrad: error: --sizes") and err.count("\n") == 1


def test_time_limit_interrupts_a_long_first_step():
    import time

    t0 = time.perf_counter()
    with pytest.raises(bench._TimeLimit, match="longer than 0.2 s"):
        with bench._time_limit(0.2):
            while time.perf_counter() - t0 < 5:
                pass
    assert time.perf_counter() - t0 < 2
    with bench._time_limit(None):  # no limit: nothing happens
        pass


def test_instruction_set_probe_is_reported_apart_from_the_start_up(tiny_report):
    report = dict(tiny_report, compiler_startup_s=2.25, vec_isa_probe_s=7.25)
    text = bench.format_report(report)
    assert "compiler start-up (first torch.compile of the process" in text and "2.2 s" in text
    assert "vector instruction sets: 7.2 s (once per machine" in text
    assert "plus 7.2 s once per machine" in bench.format_markdown(report)
