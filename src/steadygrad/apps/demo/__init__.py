"""The demo experiment: the same network trained four times on data with corrupted batches, with
no clipping and with three clippers, so that what clipping does is visible.

The experiment (``run_demo(DemoSettings())``; ``steadygrad demo`` runs it and draws the plots):

* **Data.** scikit-learn's bundled handwritten digits (1797 images of 8×8 pixels, 10 classes; on
  disk, no download), pixels scaled from 0–16 to 0–1. A fixed split (the same for every seed)
  keeps 360 images for the held-out accuracy; the other 1437 are the training set.
* **Model and optimizer.** An MLP 64 → 128 → 128 → 10 with ReLUs, cross-entropy, SGD with
  momentum 0.9 and lr 0.05 in mini-batches of 64 drawn epoch by epoch, 1000 steps (about 45
  epochs), written as a steadygrad chain: ``Transformed(params, chain(trace(0.9), scale_by_lr()))``
  is torch's SGD.
* **Corruption.** After a clean start of ``clean_start`` steps, a seeded 1% of the batches come
  from a "broken shard": the pixels are not normalised (0–16 instead of 0–1, ``spike_scale``) and
  the labels are shuffled within the batch. Their gradient norm is two to three orders of
  magnitude above the usual: a genuine gradient spike. Another 0.5% of the batches hold one NaN
  pixel (a damaged record), which makes every gradient NaN. Every configuration sees the same batches in the same order,
  from the same initial weights: the clipping is the only difference.
* **Configurations.** Every one runs ``sg.Clipper(params, transform, nonfinite="skip")`` after
  ``backward``, so that NaN steps are skipped (the gradients dropped, so that ``opt.step()``
  moves nothing, no statistic touched) and counted; then

  - ``none``: the identity transform, no clipping;
  - ``clip_grad_norm_``: ``sg.clip_grad_norm_(params, max_norm=1.0)``, torch's drop-in;
  - ``clip_by_moment``: ``sg.clip_by_moment(k=5)`` in the Clipper (OpenAI Five: each element
    within ±5·√v̂ of the running second moment of the unclipped gradient);
  - ``zclip``: ``sg.zclip()`` in the Clipper (z-score of the norm against its running mean).

One value is read on the host per step: whether the Clipper skipped it (it then sets every
``.grad`` to ``None``, so ``opt.step()`` leaves the weights and the momentum buffer as they
were). The per-step statistics (``LOG_FIELDS``) are stacked as tensors on the device and moved to
the CPU once per configuration, at its end. A
``progress`` callback, called every ``steps // 40`` steps with the loss tensor, may read it (one
sync per call). The results are deterministic for a seed (the same numbers on every run on one
machine).
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...clip_grad import clip_grad_norm_, get_total_norm
from ...clipper import Clipper
from ...core import chain, identity
from ...optim import Transformed
from ...transforms import clip_by_moment, scale_by_lr, trace, zclip

__all__ = [
    "CONFIGS",
    "LOG_FIELDS",
    "ConfigResult",
    "DemoData",
    "DemoResult",
    "DemoSettings",
    "Schedule",
    "load_digits_split",
    "make_schedule",
    "run_demo",
    "settings_table",
    "write_step_log",
]

#: The configurations, in the order they run and appear in tables and plots.
CONFIGS: tuple[str, ...] = ("none", "clip_grad_norm_", "clip_by_moment", "zclip")

#: The columns of :attr:`ConfigResult.log`, one row per step.
#:
#: * ``loss``: the mini-batch loss (NaN on the steps with a NaN pixel);
#: * ``grad_norm``: the global L2 norm of the gradients before clipping;
#: * ``clipped_norm``: after clipping (0 on a skipped step);
#: * ``threshold``: the norm limit applied (``max_norm``; ZClip's τ on the steps it clipped; inf
#:   where no norm limit applied; NaN for the element-wise ``clip_by_moment``);
#: * ``zclip_boundary``: ZClip only, the norm above which the step counts as a spike,
#:   μ + z_thr·σ from the statistics of the steps before (NaN during its warm-up and elsewhere);
#: * ``fraction_clipped``: the fraction of the clipper's decisions that clipped (the elements for
#:   ``clip_by_moment``, the step (0 or 1) for the norm clippers);
#: * ``skipped``: 1 if the step was skipped (non-finite gradients), else 0.
LOG_FIELDS: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "clipped_norm",
    "threshold",
    "zclip_boundary",
    "fraction_clipped",
    "skipped",
)

SPLIT_SEED = 0  # the train/test split is the same for every --seed
TEST_SIZE = 360
ZCLIP_Z = 2.5  # zclip's defaults, spelled out because the plot draws its boundary
ZCLIP_WARMUP = 25

DIGITS_MISSING = 'the demo needs scikit-learn (its bundled digits data): pip install "steadygrad[demo]"'


@dataclass(frozen=True)
class DemoSettings:
    """The knobs of the experiment; the defaults are the documented run (6–9 s of training on 2 cores).

    Attributes:
        steps: optimizer steps per configuration.
        batch_size: images per mini-batch.
        hidden: width of the two hidden layers.
        lr: SGD learning rate.
        momentum: SGD (heavy-ball) momentum.
        spike_rate: share of the steps whose batch is corrupted (unnormalised pixels and
            shuffled labels).
        spike_scale: the factor on the pixels of a corrupted batch (16: the raw 0–16 values).
        nan_rate: share of the steps whose batch holds one NaN pixel.
        clean_start: the first steps, which get no corrupted or NaN batch. ZClip learns the
            norm's scale from its first 25 steps and does not clip before (see
            ``docs/adaptive-clipping.md``); a spike inside them would pass unclipped.
        max_norm: the threshold of ``clip_grad_norm_``.
        moment_k: the ``k`` of ``clip_by_moment`` (limit ±k·√v̂ per element).
        seed: seeds the initial weights, the batch order and which batches are corrupted.
        device: where the model, the data and the statistics live (``"cpu"``, ``"cuda"``, ...).
    """

    steps: int = 1000
    batch_size: int = 64
    hidden: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    spike_rate: float = 0.01
    spike_scale: float = 16.0
    nan_rate: float = 0.005
    clean_start: int = 50
    max_norm: float = 1.0
    moment_k: float = 5.0
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """The tiny setting of the test suite (``--quick``): 300 steps, 3 corrupted batches."""
        values: dict[str, Any] = {"steps": 300, "nan_rate": 1 / 300}
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "hidden"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an integer >= 1")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0")
        need(isinstance(self.clean_start, int) and self.clean_start >= 0, "clean_start", "an integer >= 0")
        need(0 < self.lr < math.inf, "lr", "a finite number > 0")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(0 <= self.spike_rate <= 1, "spike_rate", "in [0, 1]")
        need(0 <= self.nan_rate <= 1, "nan_rate", "in [0, 1]")
        need(0 < self.spike_scale < math.inf, "spike_scale", "a finite number > 0")
        need(0 < self.max_norm < math.inf, "max_norm", "a finite number > 0")
        need(0 < self.moment_k < math.inf, "moment_k", "a finite number > 0")
        corrupted = self.num_spikes + self.num_nan
        if corrupted > max(self.steps - self.clean_start, 0):
            raise ValueError(
                f"{self.num_spikes} corrupted and {self.num_nan} NaN batches do not fit in the "
                f"{max(self.steps - self.clean_start, 0)} steps after the clean start of {self.clean_start}"
            )

    @property
    def num_spikes(self) -> int:
        """The number of corrupted batches: ``round(spike_rate · steps)``."""
        return round(self.spike_rate * self.steps)

    @property
    def num_nan(self) -> int:
        """The number of batches with a NaN pixel: ``round(nan_rate · steps)``."""
        return round(self.nan_rate * self.steps)


class DemoData(NamedTuple):
    """The fixed split of the digits: images as float32 in [0, 1] (N, 64), labels int64 (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


class Schedule(NamedTuple):
    """What each step sees, the same for every configuration (all on the CPU).

    Attributes:
        batches: (steps, batch_size) indices into the training set, epoch after epoch.
        spike_steps: sorted steps (0-based) with a corrupted batch.
        nan_steps: sorted steps with a NaN pixel.
        label_perms: (len(spike_steps), batch_size): how each corrupted batch's labels are shuffled.
        nan_pixels: (len(nan_steps), 2): the (image, pixel) set to NaN in each NaN batch.
    """

    batches: Tensor
    spike_steps: list[int]
    nan_steps: list[int]
    label_perms: Tensor
    nan_pixels: Tensor


@dataclass
class ConfigResult:
    """One configuration's run.

    Attributes:
        name: one of :data:`CONFIGS`.
        label: what it ran, in code (``"clip_grad_norm_(max_norm=1.0)"``).
        final_loss: cross-entropy on the whole (clean) training set after the last step.
        test_loss: cross-entropy on the held-out images.
        test_accuracy: accuracy on the held-out images, in [0, 1].
        steps_clipped: steps on which the clipper changed the gradient (for ``clip_by_moment``:
            at least one element).
        steps_skipped: steps skipped for non-finite gradients.
        time_s: wall time of the training loop, seconds.
        log: (steps, len(LOG_FIELDS)) float64 on the CPU, the per-step statistics.
    """

    name: str
    label: str
    final_loss: float
    test_loss: float
    test_accuracy: float
    steps_clipped: int
    steps_skipped: int
    time_s: float
    log: Tensor

    def column(self, field: str) -> Tensor:
        """One column of :attr:`log` by its name in :data:`LOG_FIELDS`."""
        return self.log[:, LOG_FIELDS.index(field)]

    def metrics(self, spike_steps: list[int]) -> dict[str, Any]:
        """The numbers of this run as plain Python values (for JSON)."""
        fraction = self.column("fraction_clipped")
        norm = self.column("grad_norm")
        corrupted = torch.zeros(len(norm), dtype=torch.bool)
        corrupted[spike_steps] = True
        finite = torch.isfinite(norm)
        on_spikes = fraction[corrupted]

        def median(values: Tensor) -> float:
            return float(values.median()) if len(values) else math.nan

        return {
            "label": self.label,
            "final_loss": self.final_loss,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "steps_clipped": self.steps_clipped,
            "steps_skipped": self.steps_skipped,
            "corrupted_steps_clipped": int((on_spikes > 0).sum()),
            "mean_fraction_clipped_on_corrupted": float(on_spikes.mean()) if len(on_spikes) else 0.0,
            "max_grad_norm": float(norm[finite].max()) if finite.any() else math.nan,
            "median_clean_grad_norm": median(norm[finite & ~corrupted]),
            "median_corrupted_grad_norm": median(norm[finite & corrupted]),
            "time_s": self.time_s,
        }


@dataclass
class DemoResult:
    """The whole experiment: its settings, its schedule and one :class:`ConfigResult` per
    configuration, in the order of :data:`CONFIGS`."""

    settings: DemoSettings
    spike_steps: list[int]
    nan_steps: list[int]
    configs: list[ConfigResult]

    def __getitem__(self, name: str) -> ConfigResult:
        for result in self.configs:
            if result.name == name:
                return result
        raise KeyError(name)

    def metrics(self) -> dict[str, Any]:
        """Everything but the per-step logs, as plain Python values (``metrics.json``)."""
        return {
            "settings": asdict(self.settings),
            "corrupted_steps": [s + 1 for s in self.spike_steps],  # 1-based, as in steps.csv and the plots
            "nan_steps": [s + 1 for s in self.nan_steps],
            "configs": {r.name: r.metrics(self.spike_steps) for r in self.configs},
        }


# ---- data and schedule --------------------------------------------------------------------------


def load_digits_split() -> DemoData:
    """scikit-learn's bundled digits, pixels in [0, 1], split by :data:`SPLIT_SEED` into
    1437 training and :data:`TEST_SIZE` held-out images.

    Raises:
        ModuleNotFoundError: scikit-learn is not installed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return DemoData(x[train], y[train], x[test], y[test])


def make_schedule(settings: DemoSettings, num_train: int) -> Schedule:
    """The batches and the corruption of every step, drawn from ``settings.seed``."""
    gen = torch.Generator().manual_seed(settings.seed)
    needed = settings.steps * settings.batch_size
    epochs = -(-needed // num_train)
    order = torch.cat([torch.randperm(num_train, generator=gen) for _ in range(epochs)])
    batches = order[:needed].reshape(settings.steps, settings.batch_size)
    candidates = settings.clean_start + torch.randperm(settings.steps - settings.clean_start, generator=gen)
    spikes = candidates[: settings.num_spikes].sort().values
    nans = candidates[settings.num_spikes : settings.num_spikes + settings.num_nan].sort().values
    perms = (
        torch.stack([torch.randperm(settings.batch_size, generator=gen) for _ in range(len(spikes))])
        if len(spikes)
        else torch.zeros(0, settings.batch_size, dtype=torch.int64)
    )
    pixels = torch.stack(
        [
            torch.randint(settings.batch_size, (len(nans),), generator=gen),
            torch.randint(64, (len(nans),), generator=gen),
        ],
        dim=1,
    )
    return Schedule(batches, spikes.tolist(), nans.tolist(), perms, pixels)


# ---- one configuration --------------------------------------------------------------------------


def _mlp(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


def _label(name: str, settings: DemoSettings) -> str:
    return {
        "none": "no clipping",
        "clip_grad_norm_": f"clip_grad_norm_(max_norm={settings.max_norm!r})",
        "clip_by_moment": f"Clipper(clip_by_moment(k={settings.moment_k!r}))",
        "zclip": "Clipper(zclip())",
    }[name]


def _transform(name: str, settings: DemoSettings):
    if name == "clip_by_moment":
        return clip_by_moment(k=settings.moment_k)
    if name == "zclip":
        return zclip(z_threshold=ZCLIP_Z, warmup_steps=ZCLIP_WARMUP)
    return identity()  # none, and the guard in front of clip_grad_norm_


def _zclip_boundary(clipper: Clipper, nan: Tensor) -> Tensor:
    """μ + z_thr·σ from ZClip's statistics before this step; NaN during its warm-up."""
    shared = clipper.state.get("shared")
    if not shared or "norm_mean" not in shared:  # before the first step
        return nan
    bound = shared["norm_mean"] + ZCLIP_Z * shared["norm_var"].sqrt()
    return torch.where(shared["num_norms"] >= ZCLIP_WARMUP, bound.to(nan.dtype), nan)


def _train(
    name: str,
    settings: DemoSettings,
    data: DemoData,
    schedule: Schedule,
    initial: dict[str, Tensor],
    progress: Callable[[str, int, int, Tensor], None] | None,
) -> ConfigResult:
    device = torch.device(settings.device)
    model = _mlp(settings.hidden).to(device)
    model.load_state_dict(initial)
    params = list(model.parameters())
    # torch's SGD with momentum, as a chain
    opt = Transformed(params, chain(trace(settings.momentum), scale_by_lr()), lr=settings.lr)
    clipper = Clipper(params, _transform(name, settings), nonfinite="skip")

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    batches = schedule.batches.to(device)
    spikes = dict(zip(schedule.spike_steps, schedule.label_perms.to(device)))
    nans = dict(zip(schedule.nan_steps, schedule.nan_pixels.tolist()))
    nan = torch.tensor(math.nan, device=device)
    inf = torch.tensor(math.inf, device=device)
    max_norm = torch.tensor(settings.max_norm, device=device)
    every = max(1, settings.steps // 40)

    rows: list[Tensor] = []
    if progress is not None:
        progress(name, 0, settings.steps, None)
    start = time.perf_counter()
    for step in range(settings.steps):
        x, y = train_x[batches[step]], train_y[batches[step]]
        if step in spikes:  # a batch from the broken shard: raw pixels, shuffled labels
            x, y = x * settings.spike_scale, y[spikes[step]]
        if step in nans:  # a damaged record
            x = x.clone()
            x[nans[step][0], nans[step][1]] = math.nan
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

        boundary = _zclip_boundary(clipper, nan) if name == "zclip" else nan
        stats = clipper.clip_()  # a skipped step drops the gradients (.grad is None)
        skipped = bool(stats.skipped)
        clipped_norm, fraction = stats.clipped_norm, stats.fraction_clipped
        if name == "clip_grad_norm_" and not skipped:
            total = clip_grad_norm_(params, settings.max_norm)
            clipped_norm = get_total_norm([p.grad for p in params])
            fraction = (max_norm / (total + 1e-6) < 1).to(torch.float32)  # torch's coefficient below 1
            threshold = max_norm
        elif name == "clip_grad_norm_":
            threshold = max_norm
        elif name == "zclip":
            threshold = clipper.state["shared"]["threshold"]
        elif name == "clip_by_moment":
            threshold = nan  # per element: no single norm limit
        else:
            threshold = inf
        opt.step()  # without gradients (a skipped step) nothing moves

        row = [loss.detach(), stats.norm, clipped_norm, threshold, boundary, fraction, stats.skipped]
        rows.append(torch.stack([t.to(device=device, dtype=torch.float64) for t in row]))
        if progress is not None and ((step + 1) % every == 0 or step + 1 == settings.steps):
            progress(name, step + 1, settings.steps, loss.detach())
    log = torch.stack(rows).cpu()  # the one transfer of the loop
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        final_loss = F.cross_entropy(model(train_x), train_y)
        test_logits = model(data.test_x.to(device))
        test_y = data.test_y.to(device)
        test_loss = F.cross_entropy(test_logits, test_y)
        accuracy = (test_logits.argmax(dim=1) == test_y).to(torch.float64).mean()
    skipped = log[:, LOG_FIELDS.index("skipped")] > 0
    clipped = (log[:, LOG_FIELDS.index("fraction_clipped")] > 0) & ~skipped
    return ConfigResult(
        name=name,
        label=_label(name, settings),
        final_loss=float(final_loss),
        test_loss=float(test_loss),
        test_accuracy=float(accuracy),
        steps_clipped=int(clipped.sum()),
        steps_skipped=int(skipped.sum()),
        time_s=elapsed,
        log=log,
    )


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Runs the block with ``count`` intra-op CPU threads, then restores the caller's setting.
    The demo's matrices are small: one thread is as fast and leaves the other cores alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    settings: DemoSettings | None = None,
    *,
    configs: tuple[str, ...] = CONFIGS,
    data: DemoData | None = None,
    progress: Callable[[str, int, int, Tensor], None] | None = None,
) -> DemoResult:
    """Runs the experiment of the module docstring and returns its numbers and per-step logs.

    Args:
        settings: the knobs (default: :class:`DemoSettings` ``()``).
        configs: which configurations to run, a subset of :data:`CONFIGS`.
        data: the digits split (default: :func:`load_digits_split`).
        progress: called as ``progress(config, step, steps, loss)`` before the first step
            (``step`` 0, ``loss`` None), every ``steps // 40`` steps and at the last one; ``loss``
            is the step's mini-batch loss, a 0-d tensor on the device (reading it is the only
            host sync of the loop).

    The caller's global random state is left as it was; the run uses one CPU thread.

    Raises:
        ValueError: an unknown configuration.
        ModuleNotFoundError: scikit-learn is missing (and ``data`` is not given).
    """
    settings = settings or DemoSettings()
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    data = data if data is not None else load_digits_split()
    schedule = make_schedule(settings, len(data.train_x))
    with torch.random.fork_rng(devices=[]), _threads(1):
        torch.manual_seed(settings.seed)
        initial = {k: v.clone() for k, v in _mlp(settings.hidden).state_dict().items()}
        results = [_train(name, settings, data, schedule, initial, progress) for name in configs]
    return DemoResult(settings, schedule.spike_steps, schedule.nan_steps, results)


def write_step_log(result: DemoResult, path: str) -> None:
    """Writes the per-step statistics of every configuration as CSV: ``config, step,
    corrupted, nan_batch`` and the columns of :data:`LOG_FIELDS` (``skipped`` as 0/1)."""
    spikes, nans = set(result.spike_steps), set(result.nan_steps)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["config", "step", "corrupted", "nan_batch", *LOG_FIELDS])
        for r in result.configs:
            for step, values in enumerate(r.log.tolist()):
                cells = [repr(v) for v in values[:-1]] + [int(values[-1])]
                out.writerow([r.name, step + 1, int(step in spikes), int(step in nans), *cells])


def settings_table(settings: DemoSettings) -> list[tuple[str, str]]:
    """``(name, value)`` rows describing the settings, for reports."""
    return [(f.name, str(getattr(settings, f.name))) for f in fields(settings)]
