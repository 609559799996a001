"""Statistics logging for any training loop: ``ClipStats``, optimizer statistics, losses.

Statistics stay tensors until someone reads them. :class:`StatsLogger` keeps what it is given on
the device (a detached copy of each 0-d tensor: no host sync) and converts a whole block of steps
to numbers when it writes, every ``flush_every`` steps: one device-to-host transfer per flush, not
one per value and step.

Example::

    with sg.StatsLogger("run/stats.csv", flush_every=100) as log:
        for step, batch in enumerate(loader):
            ...
            stats = clipper.clip_()
            opt.step()
            log.log(step, clip=stats, loss=loss.detach(), **sg.optimizer_stats(opt))

CSV (columns fixed by the first block written), JSON Lines (one object per step) and, when the
``tensorboard`` package is installed, TensorBoard event files (``tensorboard=DIR``, or an open
``SummaryWriter``). Every statistic is written as a float: booleans as 0.0/1.0, integers exactly up
to 2**53; JSON has no inf or NaN, so JSON Lines writes those as the strings "inf", "-inf", "nan".
"""

from __future__ import annotations

import csv
import json
import math
import operator
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["StatsLogger", "flatten_stats", "optimizer_stats"]

Value = Tensor | float | int | bool


def flatten_stats(prefix: str, value: Any) -> dict[str, Value]:
    """``{"prefix/field": value}`` for a named tuple or mapping (recursively), ``{prefix: value}``
    for a single number or 0-d tensor."""
    if hasattr(value, "_asdict"):
        value = value._asdict()
    if isinstance(value, Mapping):
        out: dict[str, Value] = {}
        for key, item in value.items():
            out.update(flatten_stats(f"{prefix}/{key}" if prefix else str(key), item))
        return out
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"statistic {prefix!r} has {value.numel()} elements; log 0-d tensors or numbers")
        return {prefix: value.detach().reshape(()).clone()}
    if isinstance(value, (bool, int, float)):
        return {prefix: value}
    raise TypeError(f"statistic {prefix!r} is a {type(value).__name__}; expected a number, a tensor or a named tuple")


def optimizer_stats(optimizer: torch.optim.Optimizer) -> dict[str, Value]:
    """The learning rate of each parameter group (``lr`` for one group, ``lr/<i>`` for several)
    and, for steadygrad optimizers, the clip statistics they keep: ``optim/clip_fraction`` (the
    ``fraction_clipped`` of ``clip=``) and ``optim/moment_clip_fraction`` (of ``moment_clip=``;
    ``optim/moment_clip_fraction/<i>`` per group when there are several). The names never collide
    with a :class:`~steadygrad.ClipStats` logged as ``clip=stats``. Nothing is read on the host."""
    groups = optimizer.param_groups
    out: dict[str, Value] = {}
    for i, group in enumerate(groups):
        key = "lr" if len(groups) == 1 else f"lr/{i}"
        out.update(flatten_stats(key, group["lr"]))
    shared = optimizer.shared_state() if hasattr(optimizer, "shared_state") else {}
    if "fraction_clipped" in shared.get("clip", {}):
        out.update(flatten_stats("optim/clip_fraction", shared["clip"]["fraction_clipped"]))
    for i in range(len(groups)):
        value = shared.get(f"group{i}", {}).get("moment_clip_fraction")
        if value is not None:
            key = "optim/moment_clip_fraction" if len(groups) == 1 else f"optim/moment_clip_fraction/{i}"
            out.update(flatten_stats(key, value))
    return out


class StatsLogger:
    """Buffers per-step statistics on the device and writes them every ``flush_every`` steps.

    Args:
        path: a ``.csv`` or ``.jsonl`` file (``None``: TensorBoard only, or just :attr:`rows`).
        flush_every: steps buffered between writes (each write is one host transfer).
        tensorboard: a log directory for ``torch.utils.tensorboard.SummaryWriter``, or an open
            writer (anything with ``add_scalar(tag, value, step)``), which is flushed but not
            closed here.
        keep: also keep every written row in memory (:attr:`rows`), e.g. for plotting.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        flush_every: int = 100,
        tensorboard: str | os.PathLike | Any = None,
        keep: bool = False,
    ) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every!r}")
        self.path = None if path is None else os.fspath(path)
        self.format = None
        if self.path is not None:
            suffix = os.path.splitext(self.path)[1].lower()
            if suffix not in (".csv", ".jsonl"):
                raise ValueError(f"the log file must end in .csv or .jsonl, got {self.path!r}")
            self.format = suffix[1:]
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            with open(self.path, "w"):
                pass
        self.writer = None
        self._owns_writer = False
        if tensorboard is not None and callable(getattr(tensorboard, "add_scalar", None)):
            self.writer = tensorboard
        elif tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "logging to TensorBoard needs the tensorboard package: pip install 'steadygrad[tensorboard]'"
                ) from error
            self.writer = SummaryWriter(os.fspath(tensorboard))
            self._owns_writer = True
        self.flush_every = flush_every
        self.keep = keep
        self.rows: list[dict[str, float]] = []
        self._columns: list[str] | None = None
        self._pending: list[tuple[int, dict[str, Value]]] = []

    def log(self, step: int, **stats: Any) -> None:
        """Records the statistics of ``step``: numbers, 0-d tensors, named tuples (``ClipStats``)
        or mappings of them, flattened to ``name/field`` columns. ``step`` is a Python integer (a
        tensor would cost a host sync)."""
        if isinstance(step, (Tensor, bool)):
            raise TypeError(f"step must be a Python int, got {type(step).__name__}")
        step = operator.index(step)
        record: dict[str, Value] = {}
        for name, value in stats.items():
            flat = flatten_stats(name, value)
            twice = record.keys() & flat.keys()
            if twice:
                raise ValueError(
                    f"the statistics {sorted(twice)} are given twice in one log() call (one would silently "
                    "overwrite the other): log them under different names"
                )
            record.update(flat)
        self._pending.append((step, record))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Converts the buffered steps to numbers (one transfer) and writes them."""
        if not self._pending:
            return
        tensors = [v for _, record in self._pending for v in record.values() if isinstance(v, Tensor)]
        numbers = iter(_to_host(tensors))
        rows = []
        for step, record in self._pending:
            row: dict[str, Any] = {"step": step}
            for key, value in record.items():
                row[key] = next(numbers) if isinstance(value, Tensor) else _number(value)
            rows.append(row)
        self._pending.clear()
        if self.format == "csv":
            self._write_csv(rows)
        elif self.format == "jsonl":
            with open(self.path, "a") as f:
                for row in rows:
                    record = {k: v if k == "step" else _json_number(v) for k, v in row.items()}
                    f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for row in rows:
                for key, value in row.items():
                    if key != "step":
                        self.writer.add_scalar(key, value, row["step"])
            if callable(getattr(self.writer, "flush", None)):
                self.writer.flush()
        if self.keep:
            self.rows.extend(rows)

    def _write_csv(self, rows: list[dict[str, float]]) -> None:
        new = self._columns is None
        if new:
            self._columns = list(dict.fromkeys(k for row in rows for k in row))
        unknown = {k for row in rows for k in row} - set(self._columns)
        if unknown:
            raise ValueError(f"a CSV log keeps the columns of its first block; new statistics {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, restval="")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def close(self) -> None:
        """Writes what is buffered and closes the TensorBoard writer it opened."""
        self.flush()
        if self.writer is not None and self._owns_writer:
            self.writer.close()
        self.writer = None

    def __enter__(self) -> StatsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _number(value: Value) -> float:
    return float(value)


def _json_number(value: float) -> float | str:
    """JSON has no inf and NaN: they are written as the strings "inf", "-inf", "nan"."""
    return value if math.isfinite(value) else str(value)


def _to_host(tensors: list[Tensor]) -> list[float]:
    """All values as Python floats, with one transfer per device."""
    out: list[float | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for device, indices in by_device.items():
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        values = torch.stack([tensors[i].to(wide) for i in indices]).cpu().tolist()
        for i, v in zip(indices, values):
            out[i] = v
    return out  # type: ignore[return-value]
