"""StatsLogger: per-step statistics kept on the device, written as numbers in blocks."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import steadygrad as sg
from steadygrad.statslog import StatsLogger, flatten_stats, optimizer_stats


def _stats(i):
    return sg.ClipStats(
        norm=torch.tensor(1.5 * i),
        clipped_norm=torch.tensor(1.0),
        fraction_clipped=torch.tensor(0.25),
        nonfinite=torch.tensor(i % 2),
        skipped=torch.tensor(i == 3),
    )


def test_csv_rows_are_exact_and_written_per_block(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    transfers = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: transfers.append(1) or real_cpu(self, *a, **k))
    log = StatsLogger(path, flush_every=3)
    for i in range(4):
        log.log(i, clip=_stats(i), lr=0.1 * (i + 1))
        if i == 1:
            assert path.read_text() == ""  # nothing written before a block is full
    assert len(transfers) == 1  # one transfer for the first block of 3 steps
    log.close()
    assert len(transfers) == 2
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == [
        "step",
        "clip/norm",
        "clip/clipped_norm",
        "clip/fraction_clipped",
        "clip/nonfinite",
        "clip/skipped",
        "lr",
    ]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert [float(r["clip/norm"]) for r in rows] == [0.0, 1.5, 3.0, 4.5]
    assert [float(r["clip/skipped"]) for r in rows] == [0.0, 0.0, 0.0, 1.0]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_jsonl_keeps_any_keys_and_writes_non_finite_values_as_strings(tmp_path):
    path = tmp_path / "log.jsonl"
    with StatsLogger(path, flush_every=10) as log:
        log.log(0, loss=torch.tensor(float("inf")))
        log.log(1, loss=torch.tensor(2.0), extra={"a": 1, "b": torch.tensor(0.5)})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 0, "loss": "inf"}, {"step": 1, "loss": 2.0, "extra/a": 1.0, "extra/b": 0.5}]


def test_logged_tensors_are_snapshots():
    """A statistic that changes in place later (optimizer state) is logged as it was."""
    value = torch.tensor(1.0)
    log = StatsLogger(keep=True, flush_every=5)
    log.log(0, x=value)
    value.fill_(7.0)
    log.log(1, x=value)
    log.close()
    assert [r["x"] for r in log.rows] == [1.0, 7.0]


def test_optimizer_stats_reads_lr_and_clip_statistics_without_sync():
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = sg.optim.Adam(params, lr=0.01, clip=sg.clip_by_value(0.1), moment_clip=3.0)
    params[0].grad = torch.ones(5)
    opt.step()
    stats = optimizer_stats(opt)
    assert set(stats) == {"lr", "optim/clip_fraction", "optim/moment_clip_fraction"}
    assert stats["optim/clip_fraction"].item() == 1.0
    two_groups = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": 0.5}], lr=0.1)
    assert optimizer_stats(two_groups) == {"lr/0": 0.1, "lr/1": 0.5}


def test_bad_input():
    with pytest.raises(ValueError, match="flush_every"):
        StatsLogger(flush_every=0)
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        StatsLogger("log.txt")
    with pytest.raises(ValueError, match="elements"):
        flatten_stats("x", torch.zeros(3))
    with pytest.raises(TypeError, match="named tuple"):
        flatten_stats("x", "text")


def test_csv_refuses_columns_that_appear_later(tmp_path):
    log = StatsLogger(tmp_path / "log.csv", flush_every=1)
    log.log(0, a=1.0)
    with pytest.raises(ValueError, match="columns"):
        log.log(1, a=1.0, b=2.0)


def test_tensorboard_needs_its_package(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tensorboard"):
            StatsLogger(tensorboard=tmp_path)
    else:
        with StatsLogger(tensorboard=tmp_path) as log:
            log.log(0, loss=1.0)
        assert any(tmp_path.iterdir())


def test_csv_and_jsonl_text_exactly(tmp_path):
    for suffix in ("csv", "jsonl"):
        path = tmp_path / f"log.{suffix}"
        with StatsLogger(path, flush_every=2) as log:
            for i in range(3):
                log.log(10 * i, clip=_stats(i), loss=torch.tensor(0.5, dtype=torch.float64) / (i + 1))
        text = path.read_bytes().decode()  # as written: the CSV's line ends are RFC 4180's \r\n
        if suffix == "csv":
            assert text == (
                "step,clip/norm,clip/clipped_norm,clip/fraction_clipped,clip/nonfinite,clip/skipped,loss\r\n"
                "0,0.0,1.0,0.25,0.0,0.0,0.5\r\n"
                "10,1.5,1.0,0.25,1.0,0.0,0.25\r\n"
                "20,3.0,1.0,0.25,0.0,0.0,0.16666666666666666\r\n"
            )
        else:
            fields = '"clip/clipped_norm": 1.0, "clip/fraction_clipped": 0.25'
            assert text == (
                f'{{"step": 0, "clip/norm": 0.0, {fields}, "clip/nonfinite": 0.0, "clip/skipped": 0.0, "loss": 0.5}}\n'
                f'{{"step": 10, "clip/norm": 1.5, {fields}, "clip/nonfinite": 1.0, "clip/skipped": 0.0, '
                '"loss": 0.25}\n'
                f'{{"step": 20, "clip/norm": 3.0, {fields}, "clip/nonfinite": 0.0, "clip/skipped": 0.0, '
                '"loss": 0.16666666666666666}\n'
            )


def test_logging_reads_nothing_on_the_host(monkeypatch):
    """log() only copies tensors on their device; values are read in flush()."""
    log = StatsLogger(keep=True, flush_every=100)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a host read inside log()")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        for i in range(5):
            log.log(i, clip=_stats(i), lr=0.1)
    log.flush()
    assert [row["clip/norm"] for row in log.rows] == [0.0, 1.5, 3.0, 4.5, 6.0]


def test_step_is_a_python_int():
    log = StatsLogger()
    with pytest.raises(TypeError, match="step must be a Python int"):
        log.log(torch.tensor(3), loss=1.0)
    with pytest.raises(TypeError):
        log.log(1.5, loss=1.0)


def test_an_open_tensorboard_writer_gets_every_scalar_and_stays_open():
    class Writer:
        def __init__(self):
            self.calls, self.flushes, self.closed = [], 0, False

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def flush(self):
            self.flushes += 1

        def close(self):
            self.closed = True

    writer = Writer()
    with StatsLogger(tensorboard=writer, flush_every=2) as log:
        log.log(0, loss=torch.tensor(2.0), clip={"skipped": torch.tensor(True)})
        log.log(1, loss=1.0)
        log.log(2, loss=torch.tensor(0.5))
    assert writer.calls == [("loss", 2.0, 0), ("clip/skipped", 1.0, 0), ("loss", 1.0, 1), ("loss", 0.5, 2)]
    assert writer.flushes == 2 and not writer.closed


def test_missing_directories_are_created_and_names_never_collide_silently(tmp_path):
    path = tmp_path / "run" / "logs" / "stats.jsonl"
    logger = StatsLogger(path, flush_every=1)
    logger.log(0, loss=1.0)
    assert path.exists()
    with pytest.raises(ValueError, match=r"\['clip/norm'\] are given twice"):
        logger.log(1, clip={"norm": 1.0}, **{"clip/norm": 2.0})
    # the Clipper's statistics and the optimizer's have distinct names
    p = torch.nn.Parameter(torch.ones(3))
    opt = sg.optim.Adam([p], clip=sg.clip_by_norm(1.0), moment_clip=2.0)
    clipper = sg.Clipper([p], sg.zclip())
    p.grad = torch.ones(3)
    stats = clipper.clip_()
    opt.step()
    logger.log(2, clip=stats, **sg.optimizer_stats(opt))
    logger.close()
    last = json.loads(path.read_text().splitlines()[-1])
    assert {"clip/fraction_clipped", "optim/clip_fraction", "optim/moment_clip_fraction"} <= set(last)
