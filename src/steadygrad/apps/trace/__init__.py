"""Two-dimensional test functions for watching optimizers and clippers move.

Each :class:`Objective` has a value function written in torch (autograd gives the gradient), a
default start, a plot window and, for ``spiky``, a seeded perturbation of the gradient.
:func:`trajectory` runs any ``torch.optim.Optimizer`` on one of them in float64 and returns the
visited points; ``steadygrad trace`` prints and plots these.

========== ============================================================ ==============
name       f(x1, x2)                                                    default start
========== ============================================================ ==============
d2l        0.1·x1² + 2·x2² (the d2l book's example, sections 12.7/12.8) (−5, −2)
rotated    0.1·u² + 2·v², u = (x1 + x2)/√2, v = (x1 − x2)/√2            (−5, −2)
rosenbrock (1 − x1)² + 100·(x2 − x1²)²                                  (−1.2, 1)
spiky      d2l's function; the gradient gets seeded spikes (below)       (−5, −2)
========== ============================================================ ==============

``rotated`` is d2l's ellipse turned by 45°: its axes no longer follow the coordinates, so the
per-coordinate step sizes of Adagrad, RMSProp and Adam lose the advantage they have on ``d2l``.

``spiky``: at step t (0-based) the gradient is ∇f(x) plus a spike with probability
:data:`SPIKE_PROBABILITY`; a spike has length :data:`SPIKE_SIZE` (about 5 times the gradient's
norm at the start) and a uniformly random direction. Step t draws from its own generator seeded
with ``seed * 1_000_003 + t``, so the spikes depend only on ``(seed, t)``, not on the optimizer
or the points visited; with ``seed=0`` the first spikes are at steps 1, 3, 25 and 28 (see
:func:`spike_steps`). It shows what one bad batch does to an optimizer and what clipping saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FUNCTIONS",
    "SPIKE_PROBABILITY",
    "SPIKE_SIZE",
    "Objective",
    "get_function",
    "spike",
    "spike_steps",
    "trajectory",
]

SPIKE_PROBABILITY = 0.1
SPIKE_SIZE = 40.0


@dataclass(frozen=True)
class Objective:
    """A function of two variables with what is needed to run and draw an optimizer on it.

    Attributes:
        name: the registry name.
        formula: the function in one line, for titles and help.
        value: ``x -> f(x)`` on a tensor whose last dimension is 2 (a point or a grid of points).
        start: the default start.
        window: ``((x1_min, x1_max), (x2_min, x2_max))``, the default plot window.
        minimum: the minimiser.
        perturbation: ``(step, seed, dtype) -> Tensor`` added to the gradient at ``step``, or
            ``None``.
        log_levels: draw contours at logarithmically spaced levels (a steep valley).
    """

    name: str
    formula: str
    value: Callable[[Tensor], Tensor]
    start: tuple[float, float]
    window: tuple[tuple[float, float], tuple[float, float]]
    minimum: tuple[float, float]
    perturbation: Callable[[int, int, torch.dtype], Tensor] | None = None
    log_levels: bool = False

    def gradient(self, x: Tensor, step: int = 0, seed: int = 0) -> Tensor:
        """The gradient the optimizer sees at ``x`` on ``step``: ∇f(x) by autograd, plus the
        perturbation of ``step`` if the function has one."""
        with torch.enable_grad():
            point = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.value(point), point)
        if self.perturbation is not None:
            grad = grad + self.perturbation(step, seed, grad.dtype)
        return grad


def _d2l(x: Tensor) -> Tensor:
    return 0.1 * x[..., 0] ** 2 + 2 * x[..., 1] ** 2


def _rotated(x: Tensor) -> Tensor:
    u = (x[..., 0] + x[..., 1]) / math.sqrt(2.0)
    v = (x[..., 0] - x[..., 1]) / math.sqrt(2.0)
    return 0.1 * u**2 + 2 * v**2


def _rosenbrock(x: Tensor) -> Tensor:
    return (1 - x[..., 0]) ** 2 + 100 * (x[..., 1] - x[..., 0] ** 2) ** 2


def spike(step: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """The spike added to the ``spiky`` gradient at ``step``: zeros, or a vector of length
    :data:`SPIKE_SIZE` in a random direction (see the module docstring)."""
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draw, angle = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
    if draw >= SPIKE_PROBABILITY:
        return torch.zeros(2, dtype=dtype)
    angle *= 2 * math.pi
    return torch.tensor([SPIKE_SIZE * math.cos(angle), SPIKE_SIZE * math.sin(angle)], dtype=dtype)


def spike_steps(steps: int, seed: int = 0) -> list[int]:
    """The steps among the first ``steps`` on which ``spiky`` adds a spike."""
    return [t for t in range(steps) if bool(spike(t, seed).any())]


FUNCTIONS: dict[str, Objective] = {
    f.name: f
    for f in (
        Objective(
            "d2l",
            "f(x) = 0.1·x1² + 2·x2²",
            _d2l,
            start=(-5.0, -2.0),
            window=((-5.5, 1.0), (-3.0, 1.0)),
            minimum=(0.0, 0.0),
        ),
        Objective(
            "rotated",
            "f(x) = 0.1·u² + 2·v², u = (x1+x2)/√2, v = (x1−x2)/√2",
            _rotated,
            start=(-5.0, -2.0),
            window=((-6.0, 2.0), (-4.0, 2.0)),
            minimum=(0.0, 0.0),
        ),
        Objective(
            "rosenbrock",
            "f(x) = (1 − x1)² + 100·(x2 − x1²)²",
            _rosenbrock,
            start=(-1.2, 1.0),
            window=((-2.0, 2.0), (-1.0, 3.0)),
            minimum=(1.0, 1.0),
            log_levels=True,
        ),
        Objective(
            "spiky",
            "f(x) = 0.1·x1² + 2·x2², gradient with seeded spikes",
            _d2l,
            start=(-5.0, -2.0),
            window=((-5.5, 1.0), (-3.0, 1.0)),
            minimum=(0.0, 0.0),
            perturbation=spike,
        ),
    )
}


def get_function(name: str) -> Objective:
    """The objective called ``name``; ``KeyError`` with the valid names otherwise."""
    try:
        return FUNCTIONS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown function {name!r}; valid functions: {', '.join(FUNCTIONS)}") from None


def trajectory(
    objective: Objective,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    steps: int,
    start: tuple[float, float] | None = None,
    *,
    seed: int = 0,
) -> Tensor:
    """Runs ``steps`` optimizer steps on ``objective`` in float64 and returns the ``(steps + 1, 2)``
    tensor of points visited, the start first.

    ``make_optimizer`` receives the list holding the one parameter (the point, shape ``(2,)``).
    Each step sets ``.grad`` to :meth:`Objective.gradient` of that step and calls ``step()``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x = torch.nn.Parameter(torch.tensor(start if start is not None else objective.start, dtype=torch.float64))
    opt = make_optimizer([x])
    points = torch.empty(steps + 1, 2, dtype=torch.float64)
    points[0] = x.detach()
    for t in range(steps):
        x.grad = objective.gradient(x, t, seed)
        opt.step()
        points[t + 1] = x.detach()
    return points
