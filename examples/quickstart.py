"""A short tour of steadygrad: drop-in optimizers that follow torch.optim step for step, and the
eps placement of the d2l book.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch

import steadygrad as sg


def train(optimizer_cls, steps: int = 200, **kwargs) -> list[float]:
    """A small MLP on a synthetic regression task; returns the loss curve."""
    torch.manual_seed(0)
    x = torch.randn(512, 8, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(8, 1, dtype=torch.float64)) + 0.1 * torch.randn(512, 1, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
    opt = optimizer_cls(model.parameters(), **kwargs)
    cycle = "momentum" in opt.defaults or "betas" in opt.defaults  # Adagrad has neither
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=steps, cycle_momentum=cycle)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    print("1. Drop-in optimizers: 200 steps of an MLP with OneCycleLR, float64")
    print(f"   {'optimizer':9s} {'torch.optim loss':>18s} {'steadygrad loss':>18s} {'max rel. diff':>14s}")
    for name, kwargs in [
        ("Adagrad", {"lr_decay": 1e-3}),
        ("RMSprop", {"centered": True, "momentum": 0.5}),
        ("Adam", {"amsgrad": True}),
        ("AdamW", {"weight_decay": 0.05}),
    ]:
        ours = train(getattr(sg.optim, name), **kwargs)
        theirs = train(getattr(torch.optim, name), **kwargs)
        diff = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
        print(f"   {name:9s} {theirs[-1]:18.12f} {ours[-1]:18.12f} {diff:14.1e}")

    print("\n2. eps inside the square root (d2l): f(x) = 0.1*x1^2 + 2*x2^2 from (-5, -2), 20 steps")
    for label, make in [
        (
            "adagrad(lr=0.4, eps=1e-6, eps_in_sqrt=True)",
            lambda p: sg.optim.Adagrad(p, lr=0.4, eps=1e-6, eps_in_sqrt=True),
        ),
        ("adagrad(lr=0.4, eps=1e-6)  [torch's placement]", lambda p: sg.optim.Adagrad(p, lr=0.4, eps=1e-6)),
        (
            "rmsprop(lr=0.4, alpha=0.9, eps=1e-6, eps_in_sqrt=True)",
            lambda p: sg.optim.RMSprop(p, lr=0.4, alpha=0.9, eps=1e-6, eps_in_sqrt=True),
        ),
    ]:
        x = torch.nn.Parameter(torch.tensor([-5.0, -2.0], dtype=torch.float64))
        opt = make([x])
        for _ in range(20):
            opt.zero_grad()
            (0.1 * x[0] ** 2 + 2 * x[1] ** 2).backward()
            opt.step()
        print(f"   {label}\n      epoch 20, x1: {x[0].item():.6f}, x2: {x[1].item():.6f}")


if __name__ == "__main__":
    main()
