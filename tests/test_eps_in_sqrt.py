"""``eps_in_sqrt`` reproduces the d2l book's 2-D examples (Dive into Deep Learning, sections 12.7
Adagrad and 12.8 RMSProp): f(x) = 0.1·x1² + 2·x2² from (−5, −2), 20 steps, eps = 1e-6 under the
square root. torch's placement (eps after the root) lands elsewhere in the 6th decimal."""

from __future__ import annotations

import pytest
import torch

import steadygrad as sg


def run_d2l(make_opt, steps: int = 20) -> tuple[float, float]:
    x = torch.nn.Parameter(torch.tensor([-5.0, -2.0], dtype=torch.float64))
    opt = make_opt([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.1 * x[0] ** 2 + 2 * x[1] ** 2).backward()
        opt.step()
    return x[0].item(), x[1].item()


D2L = [
    ("Adagrad", {"lr": 0.4}, (-2.382563, -0.158591)),
    ("Adagrad", {"lr": 2.0}, (-0.002295, -0.000000)),
    ("RMSprop", {"lr": 0.4, "alpha": 0.9}, (-0.010599, 0.000000)),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), D2L, ids=["adagrad-0.4", "adagrad-2", "rmsprop-0.4"])
def test_d2l_numbers(name, kwargs, expected):
    cls = getattr(sg.optim, name)
    x1, x2 = run_d2l(lambda p: cls(p, eps=1e-6, eps_in_sqrt=True, **kwargs))
    assert f"{x1:.6f}" == f"{expected[0]:.6f}" and f"{x2:.6f}".replace("-", "") == f"{expected[1]:.6f}".replace("-", "")


@pytest.mark.parametrize(("name", "kwargs", "expected"), D2L, ids=["adagrad-0.4", "adagrad-2", "rmsprop-0.4"])
def test_eps_outside_the_root_misses_them(name, kwargs, expected):
    """torch.optim, and steadygrad by default, put eps outside: a different trajectory, visible in
    the printed 6th decimal for Adagrad at lr 0.4 and RMSprop (at lr 2 Adagrad's x1 differs by 1.5e-8)."""
    torch_result = run_d2l(lambda p: getattr(torch.optim, name)(p, eps=1e-6, **kwargs))
    ours_default = run_d2l(lambda p: getattr(sg.optim, name)(p, eps=1e-6, **kwargs))
    inside = run_d2l(lambda p: getattr(sg.optim, name)(p, eps=1e-6, eps_in_sqrt=True, **kwargs))
    assert ours_default == pytest.approx(torch_result, rel=1e-12, abs=1e-15)
    assert abs(torch_result[0] - inside[0]) > 1e-8
    if kwargs["lr"] == 0.4:
        assert f"{torch_result[0]:.6f}" != f"{expected[0]:.6f}"


def test_d2l_reference_formula():
    """The book's own update, written out in Python floats, agrees to 1e-12."""
    import math

    x1, x2, s1, s2 = -5.0, -2.0, 0.0, 0.0
    for _ in range(20):
        g1, g2 = 0.2 * x1, 4 * x2
        s1, s2 = 0.9 * s1 + 0.1 * g1**2, 0.9 * s2 + 0.1 * g2**2
        x1 -= 0.4 / math.sqrt(s1 + 1e-6) * g1
        x2 -= 0.4 / math.sqrt(s2 + 1e-6) * g2
    ours = run_d2l(lambda p: sg.optim.RMSprop(p, lr=0.4, alpha=0.9, eps=1e-6, eps_in_sqrt=True))
    assert ours == pytest.approx((x1, x2), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_eps_in_sqrt_is_under_the_bias_corrected_root(name):
    """Adam's eps_in_sqrt: u = m̂ / sqrt(v̂ + eps), v̂ = v / (1 − β2^t) (optax's eps_root)."""
    import math

    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-3
    x, m, v = -5.0, 0.0, 0.0
    for t in range(1, 11):
        g = 0.2 * x
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x -= lr * (m / (1 - b1**t)) / math.sqrt(v / (1 - b2**t) + eps)
    p = torch.nn.Parameter(torch.tensor([-5.0], dtype=torch.float64))
    opt = getattr(sg.optim, name)([p], lr=lr, eps=eps, weight_decay=0.0, eps_in_sqrt=True)
    for _ in range(10):
        opt.zero_grad()
        (0.1 * p**2).sum().backward()
        opt.step()
    assert p.item() == pytest.approx(x, rel=1e-13)
