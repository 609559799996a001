"""Pictures for the command line: optimizer trajectories on a contour plot.

matplotlib is an optional dependency (``pip install "steadygrad[cli]"``). Figures are made with
the object-oriented API (``matplotlib.figure.Figure`` rendered by Agg): no pyplot, no global
backend switch, no window, so it runs on servers and inside other programs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import COLORS
from . import Objective

__all__ = ["MATPLOTLIB_MISSING", "plot_trajectories", "save_figure"]

MATPLOTLIB_MISSING = 'the plot needs matplotlib: pip install "steadygrad[cli]"'

SIZE = (800, 600)  # pixels of the PNG; (1280, 600) with the loss panel
DPI = 100
_GRID = 201
_MAX_GROWTH = 3.0  # the window grows to show a trajectory, up to this many times its size


def _finite_prefix(points: Tensor) -> Tensor:
    """The points up to (not including) the first non-finite one."""
    bad = (~torch.isfinite(points)).any(dim=1).nonzero()
    return points if bad.numel() == 0 else points[: int(bad[0, 0])]


def _window(objective: Objective, trajectories: Sequence[Tensor]) -> tuple[tuple[float, float], ...]:
    """The objective's window, grown (up to ``_MAX_GROWTH`` times its size on each axis) to
    include every finite point, with a margin."""
    limits = []
    for axis, (low, high) in enumerate(objective.window):
        size = high - low
        values = [p[:, axis] for p in (_finite_prefix(t) for t in trajectories) if p.numel()]
        if values:
            every = torch.cat(values)
            lo, hi = float(every.min()), float(every.max())
            margin = 0.05 * max(hi - lo, size)
            low = max(min(low, lo - margin), low - (_MAX_GROWTH - 1) * size / 2)
            high = min(max(high, hi + margin), high + (_MAX_GROWTH - 1) * size / 2)
        limits.append((low, high))
    return tuple(limits)


def _levels(values: Any, log: bool, count: int = 14) -> list[float]:
    """Contour levels: logarithmic for steep valleys, else quadratic (evenly spaced ellipses on a
    quadratic)."""
    top = float(values.max())
    if not math.isfinite(top) or top <= 0:
        return []
    if log:
        bottom = max(float(values.min()), top * 1e-6, 1e-12)
        ratio = (top / bottom) ** (1 / count)
        return [bottom * ratio**k for k in range(1, count + 1)]
    return [top * (k / count) ** 2 for k in range(1, count + 1)]


def plot_trajectories(
    objective: Objective,
    trajectories: Sequence[Tensor],
    labels: Sequence[str],
    *,
    title: str | None = None,
    loss_panel: bool = False,
    size: tuple[int, int] | None = None,
    dpi: int = DPI,
) -> Any:
    """Draws each trajectory (``(steps + 1, 2)`` points) in its colour of :data:`COLORS` on the
    contours of ``objective``, marks the start and the minimum, and returns the
    ``matplotlib.figure.Figure``. With ``loss_panel`` a second panel shows f(x) per step on a
    log scale. Points after the first non-finite one are not drawn.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    if len(trajectories) != len(labels):
        raise ValueError(f"{len(trajectories)} trajectories but {len(labels)} labels")
    width, height = size or ((1280, 600) if loss_panel else SIZE)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    if loss_panel:
        ax, loss_ax = fig.subplots(1, 2, width_ratios=(1.35, 1))
    else:
        ax, loss_ax = fig.subplots(), None

    (x_low, x_high), (y_low, y_high) = _window(objective, trajectories)
    gx, gy = torch.meshgrid(
        torch.linspace(x_low, x_high, _GRID, dtype=torch.float64),
        torch.linspace(y_low, y_high, _GRID, dtype=torch.float64),
        indexing="xy",
    )
    grid = objective.value(torch.stack([gx, gy], dim=-1))
    levels = _levels(grid, objective.log_levels)
    if levels:
        ax.contour(gx.numpy(), gy.numpy(), grid.numpy(), levels=levels, colors="0.72", linewidths=0.8)

    starts = set()
    for i, (points, label) in enumerate(zip(trajectories, labels)):
        drawn = _finite_prefix(points)
        color = COLORS[i % len(COLORS)]
        ax.plot(
            drawn[:, 0].numpy(),
            drawn[:, 1].numpy(),
            "-o",
            color=color,
            linewidth=1.6,
            markersize=3.5,
            label=label if len(drawn) == len(points) else f"{label} (diverged)",
            zorder=5,
        )
        if len(points):
            starts.add(tuple(points[0].tolist()))
        if loss_ax is not None and len(drawn):
            loss = objective.value(drawn).clamp_min(1e-300)
            loss_ax.plot(range(len(drawn)), loss.numpy(), "-o", color=color, linewidth=1.4, markersize=2.5)
    for k, start in enumerate(sorted(starts)):
        ax.plot(
            *start,
            marker="o",
            markersize=8,
            markerfacecolor="white",
            markeredgecolor="black",
            linestyle="none",
            label="start" if k == 0 else None,
            zorder=6,
        )

    ax.plot(*objective.minimum, marker="*", markersize=13, color="0.3", linestyle="none", label="minimum", zorder=4)
    ax.set_xlim(x_low, x_high)
    ax.set_ylim(y_low, y_high)
    ratio = (y_high - y_low) / (x_high - x_low)
    if 1 / 3 <= ratio <= 3:
        ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.grid(False)
    if loss_ax is not None:
        loss_ax.set_yscale("log")
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("f(x)")
        loss_ax.set_title("loss", fontsize=11)
        loss_ax.grid(True, which="major", color="0.9")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.legend(loc="outside lower center", ncols=1 if len(labels) > 1 else 3, fontsize=9, frameon=False)
    return fig


def save_figure(fig: Any, path: str) -> None:
    """Writes ``fig`` to ``path`` (format from the extension: png, svg, pdf, ...)."""
    fig.savefig(path, dpi=fig.dpi)
