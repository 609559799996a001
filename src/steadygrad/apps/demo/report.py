"""The pictures and the report of ``steadygrad demo``.

:func:`write_outputs` writes, into one folder, ``loss.png`` and ``grad_norm.png``
(:func:`plot_loss`, :func:`plot_grad_norm`), ``report.html`` (self-contained: the PNGs are embedded
as base64 data URIs, the style is inline, there is no script and no external resource),
``metrics.json`` (the numbers) and ``steps.csv`` (the per-step statistics). Figures use
matplotlib's object-oriented API (Agg), as :mod:`steadygrad.apps.trace.plot`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import COLORS
from . import ZCLIP_Z, DemoResult, settings_table, write_step_log

__all__ = [
    "DEMO_MISSING",
    "EXPLANATIONS",
    "OUTPUT_FILES",
    "plot_grad_norm",
    "plot_loss",
    "render_html",
    "table_rows",
    "write_outputs",
]

DEMO_MISSING = 'the demo needs matplotlib and scikit-learn: pip install "steadygrad[demo]"'

OUTPUT_FILES = ("loss.png", "grad_norm.png", "report.html", "metrics.json", "steps.csv")

DPI = 100
SMOOTH = 25  # steps in the running mean of the loss curves
SPIKE_COLOR = "#d62728"

#: One paragraph per configuration, for the report.
EXPLANATIONS = {
    "none": (
        "No clipping. The Clipper runs the identity transform; it only skips the steps whose "
        "gradients hold NaN (as every configuration does). A corrupted batch's gradient goes "
        "to the optimizer at full size."
    ),
    "clip_grad_norm_": (
        "<code>sg.clip_grad_norm_(params, max_norm)</code>, torch's drop-in: when the global L2 "
        "norm exceeds <code>max_norm</code> every gradient is scaled by "
        "<code>max_norm / norm</code>. The direction is kept; the threshold is a constant to tune "
        "(it also trims the large steps of the first epochs)."
    ),
    "clip_by_moment": (
        "<code>sg.Clipper(params, sg.clip_by_moment(k=5))</code>, OpenAI Five's rule: each element "
        "is clipped to &plusmn;5&middot;&radic;v&#770;, v the running mean (&beta; = 0.999) of "
        "its squared, unclipped gradient. It needs no threshold, but it bounds isolated outliers "
        "only: every spike enters v and loosens the limit for the next one, so it cuts the later "
        "spikes only partly (see the fraction clipped). It changes the direction of the step."
    ),
    "zclip": (
        "<code>sg.Clipper(params, sg.zclip())</code>, ZClip (Kumar et al., 2025): after a warm-up of "
        "25 steps, a norm more than 2.5 running standard deviations above the running mean is a "
        "spike and is scaled down towards the mean; the statistics learn from the clipped value, "
        "so spikes do not loosen the limit. It needs no threshold. It also clips ordinary steps where the "
        "norm rises faster than its statistics follow (early in training), those only a little."
    ),
}


def _figure(width: int, height: int) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def _steps(result: DemoResult) -> Tensor:
    return torch.arange(1, result.settings.steps + 1)


def _running_mean(values: Tensor, window: int) -> Tensor:
    """The mean of the finite values among the last ``window`` (NaN where there are none)."""
    finite = torch.isfinite(values)
    zero = values.new_zeros(1)
    sums = torch.cat([zero, torch.cumsum(torch.where(finite, values, 0.0), 0)])
    counts = torch.cat([zero, torch.cumsum(finite.to(values.dtype), 0)])
    end = torch.arange(1, len(values) + 1)
    start = (end - window).clamp_min(0)
    total, count = sums[end] - sums[start], counts[end] - counts[start]
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


def _mark_events(ax: Any, result: DemoResult) -> None:
    for i, step in enumerate(result.spike_steps):
        ax.axvline(
            step + 1,
            color=SPIKE_COLOR,
            alpha=0.35,
            linewidth=0.9,
            zorder=1,
            label="corrupted batch" if i == 0 else None,
        )
    for i, step in enumerate(result.nan_steps):
        ax.axvline(
            step + 1,
            color="0.45",
            linestyle=":",
            linewidth=0.9,
            zorder=1,
            label="NaN batch (skipped)" if i == 0 else None,
        )


def plot_loss(result: DemoResult, size: tuple[int, int] = (1000, 540)) -> Any:
    """Training loss per configuration on a log scale: the loss of each clean mini-batch (thin)
    and its running mean over 25 steps (bold); corrupted and NaN batches are left out of the
    curves and marked by vertical lines. Returns the ``matplotlib.figure.Figure``."""
    fig = _figure(*size)
    ax = fig.subplots()
    steps = _steps(result).numpy()
    excluded = torch.zeros(result.settings.steps, dtype=torch.bool)
    excluded[result.spike_steps + result.nan_steps] = True
    _mark_events(ax, result)
    for i, r in enumerate(result.configs):
        color = COLORS[i % len(COLORS)]
        loss = torch.where(excluded, math.nan, r.column("loss"))
        ax.plot(steps, loss.numpy(), color=color, linewidth=0.6, alpha=0.3)
        ax.plot(
            steps,
            _running_mean(loss, SMOOTH).numpy(),
            color=color,
            linewidth=2.0,
            label=f"{r.label}: final loss {r.final_loss:.3g}, test acc. {100 * r.test_accuracy:.1f}%",
        )
    ax.set_yscale("log")
    ax.set_xlim(1, result.settings.steps)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (clean mini-batches)")
    ax.grid(True, which="major", color="0.9")
    ax.set_title(f"Training loss; thin: each clean batch, bold: {SMOOTH}-step mean", fontsize=11)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8.5, frameon=False)
    return fig


def plot_grad_norm(result: DemoResult, size: tuple[int, int] = (1000, 700)) -> Any:
    """One panel per configuration: the global gradient norm before clipping (in the
    configuration's colour), the corrupted batches before (red dots) and after clipping (black
    triangles), the skipped NaN steps (x) and the clipper's threshold: ``max_norm``; ZClip's spike
    boundary μ + 2.5σ and the limit τ it applied; for ``clip_by_moment``, which has no single
    norm threshold, the share of elements clipped (right-hand axis). Returns the Figure."""
    from matplotlib.lines import Line2D

    fig = _figure(*size)
    count = len(result.configs)
    cols = 2 if count > 1 else 1
    rows = -(-count // cols)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    steps = _steps(result)
    spikes = torch.tensor(result.spike_steps, dtype=torch.int64)
    for i, (ax, r) in enumerate(zip(axes, result.configs)):
        norm, threshold = r.column("grad_norm"), r.column("threshold")
        ax.plot(steps.numpy(), norm.numpy(), color=COLORS[i % len(COLORS)], linewidth=0.8)
        if r.name == "clip_grad_norm_":
            ax.axhline(result.settings.max_norm, color="0.15", linestyle="--", linewidth=1.2)
        elif r.name == "zclip":
            ax.plot(steps.numpy(), r.column("zclip_boundary").numpy(), color="0.15", linestyle="--", linewidth=1.0)
            applied = (r.column("fraction_clipped") > 0) & torch.isfinite(threshold)
            ax.plot(steps[applied].numpy(), threshold[applied].numpy(), "_", color="0.15", markersize=7, mew=1.5)
        elif r.name == "clip_by_moment":
            twin = ax.twinx()
            fraction = torch.where(r.column("skipped") > 0, math.nan, r.column("fraction_clipped"))
            twin.plot(steps.numpy(), (100 * fraction).numpy(), color="0.4", linewidth=0.7)
            twin.set_ylim(0, 100)
            twin.set_ylabel("elements clipped (%)", fontsize=9)
            twin.tick_params(labelsize=8)
        if len(spikes):
            ax.plot((spikes + 1).numpy(), norm[spikes].numpy(), "o", color=SPIKE_COLOR, markersize=4, zorder=5)
            if r.name != "none":
                after = r.column("clipped_norm")[spikes]
                ax.plot((spikes + 1).numpy(), after.numpy(), "v", color="black", markersize=4, zorder=6)
        if result.nan_steps:
            ax.plot(
                [s + 1 for s in result.nan_steps],
                [0.0] * len(result.nan_steps),
                "x",
                color="0.3",
                markersize=6,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
        ax.set_yscale("log")
        ax.set_title(r.label, fontsize=10)
        ax.grid(True, which="major", color="0.92")
        ax.tick_params(labelsize=8)
        if i % cols == 0:
            ax.set_ylabel("global L2 norm of the gradient", fontsize=9)
        if i >= count - cols:
            ax.set_xlabel("step", fontsize=9)
    axes[0].set_xlim(1, result.settings.steps)
    key = [
        Line2D([], [], color="0.55", linewidth=1.2, label="norm before clipping (the panel's colour)"),
        Line2D([], [], color=SPIKE_COLOR, marker="o", linestyle="none", markersize=5, label="corrupted batch"),
        Line2D(
            [],
            [],
            color="black",
            marker="v",
            linestyle="none",
            markersize=5,
            label="the corrupted batch after clipping",
        ),
        Line2D([], [], color="0.3", marker="x", linestyle="none", markersize=6, label="NaN batch: step skipped"),
        Line2D([], [], color="0.15", linestyle="--", label=f"threshold: max_norm; ZClip's boundary μ + {ZCLIP_Z:g}σ"),
        Line2D(
            [],
            [],
            color="0.15",
            marker="_",
            linestyle="none",
            markersize=8,
            mew=1.5,
            label="ZClip's limit τ where it clipped",
        ),
        Line2D([], [], color="0.4", linewidth=0.9, label="clip_by_moment: elements clipped (%, right axis)"),
    ]
    fig.legend(handles=key, loc="outside lower center", ncols=3, fontsize=8.5, frameon=False)
    fig.suptitle("Gradient norm per step, with each clipper's threshold", fontsize=12)
    return fig


def _spike_ratio(result: DemoResult) -> str:
    """The median norm of the corrupted batches over that of the clean ones, as text (the
    median over the configurations that clip; the one without clipping may have collapsed)."""
    ratios = []
    for r in result.configs:
        m = r.metrics(result.spike_steps)
        if r.name != "none" and m["median_corrupted_grad_norm"] > 0:
            ratios.append(m["median_corrupted_grad_norm"] / m["median_clean_grad_norm"])
    return f"about {sorted(ratios)[len(ratios) // 2]:.0f}" if ratios else "many"


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def table_rows(result: DemoResult) -> tuple[list[str], list[list[str]]]:
    """The summary table: a header and one row of strings per configuration."""
    header = ["configuration", "final loss", "test accuracy", "steps clipped", "steps skipped", "time (s)"]
    rows = [
        [
            r.label,
            f"{r.final_loss:.4f}",
            f"{100 * r.test_accuracy:.1f}%",
            str(r.steps_clipped),
            str(r.steps_skipped),
            f"{r.time_s:.1f}",
        ]
        for r in result.configs
    ]
    return header, rows


def _versions() -> dict[str, str]:
    from ... import __version__

    return {"steadygrad": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1060px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.93em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
code { font: 0.9em ui-monospace, "SF Mono", Menlo, Consolas, monospace; background: #f4f4f4; padding: 0 0.2em; }
img { max-width: 100%; border: 1px solid #e4e4e4; }
dt { font-weight: 600; margin-top: 0.6em; } .muted { color: #666; font-size: 0.9em; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(result: DemoResult, images: dict[str, bytes], command: str | None = None) -> str:
    """The report as one HTML document; ``images`` maps a file name to its PNG bytes, each
    embedded as a ``data:image/png;base64`` URI."""
    s = result.settings
    header, rows = table_rows(result)
    uris = {name: "data:image/png;base64," + base64.b64encode(data).decode("ascii") for name, data in images.items()}
    explanations = "".join(f"<dt>{html.escape(r.label)}</dt><dd>{EXPLANATIONS[r.name]}</dd>" for r in result.configs)
    settings = _html_table(["setting", "value"], settings_table(s))
    versions = ", ".join(f"{k} {html.escape(v)}" for k, v in _versions().items())
    spikes = ", ".join(str(step + 1) for step in result.spike_steps) or "none"
    nans = ", ".join(str(step + 1) for step in result.nan_steps) or "none"
    rerun = f"<p class='muted'>Command: <code>{html.escape(command)}</code></p>" if command else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>steadygrad demo: clipping under gradient spikes</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Clipping under gradient spikes</h1>
<p class="muted">steadygrad demo, seed {s.seed}. {versions}.</p>
{rerun}
<p>The same MLP (64&rarr;{s.hidden}&rarr;{s.hidden}&rarr;10, ReLU) is trained {len(result.configs)} times on
scikit-learn's handwritten digits (1437 training images, 360 held out) with SGD (lr {s.lr:g},
momentum {s.momentum:g}, batches of {s.batch_size}) for {s.steps} steps, from the same initial weights on
the same batches. After a clean start of {s.clean_start} steps, {len(result.spike_steps)} batches
({100 * s.spike_rate:g}%) come from a broken shard: pixels not normalised (&times;{s.spike_scale:g})
and labels shuffled, which gives a gradient norm {_spike_ratio(result)} times the median of the clean
batches. {len(result.nan_steps)}
batches hold a NaN pixel; every configuration skips those steps with
<code>Clipper(..., nonfinite="skip")</code>. Only the clipping differs.</p>

<h2>Results</h2>
{_html_table(header, rows)}
<p class="muted">Final loss: cross-entropy on the whole clean training set after the last step. Steps clipped:
steps on which the clipper changed the gradient (for clip_by_moment: at least one element). Time: the
training loop on this machine. Corrupted batches at steps {spikes}; NaN batches at steps {nans}.</p>

<h2>Training loss</h2>
<img alt="training loss per configuration" src="{uris["loss.png"]}">
<p>Each colour is a configuration; the red lines are the corrupted batches, the dotted ones the NaN
batches. A clipper that works keeps the curve going down across the red lines; without clipping one
corrupted batch can throw the weights so far that the ReLUs die: the network gives the same answer for
every image and the loss stays at ln 10 &asymp; 2.30.</p>

<h2>Gradient norm and thresholds</h2>
<img alt="gradient norm per configuration with the clip thresholds" src="{uris["grad_norm.png"]}">
<p>The coloured line is the global gradient norm before clipping; the red dots are the corrupted batches
and the black triangles the same batches after clipping. clip_grad_norm_ cuts every step above max_norm
(dashed) down to it; ZClip clips a step whose norm is above its spike boundary (dashed, learned from the
recent norms) to a limit &tau; near the running mean. clip_by_moment works per element and has no norm
threshold: its panel shows the share of elements it clipped (right axis).</p>

<h2>The configurations</h2>
<dl>{explanations}</dl>

<h2>Settings</h2>
{settings}
<p class="muted">The numbers are in metrics.json and the per-step statistics in steps.csv, next to this
file. The run is deterministic for a seed.</p>
</body>
</html>
"""


def write_outputs(result: DemoResult, folder: str, command: str | None = None) -> list[str]:
    """Writes :data:`OUTPUT_FILES` into ``folder`` (which must exist) and returns their paths.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
        OSError: a file cannot be written.
    """
    images = {"loss.png": _png(plot_loss(result)), "grad_norm.png": _png(plot_grad_norm(result))}
    paths = []
    for name, data in images.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    path = os.path.join(folder, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(result, images, command))
    paths.append(path)
    path = os.path.join(folder, "metrics.json")
    metrics = {**result.metrics(), "versions": _versions()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(metrics), f, indent=2, allow_nan=False)
        f.write("\n")
    paths.append(path)
    path = os.path.join(folder, "steps.csv")
    write_step_log(result, path)
    paths.append(path)
    return paths
