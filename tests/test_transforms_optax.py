"""The transforms give optax's numbers (float64 through JAX on the CPU), with the defaults mapped
explicitly: optax is an independent implementation of the same rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="optax oracles need the test extra: pip install -e '.[test]'")
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import steadygrad as sg  # noqa: E402
from steadygrad.core.transform import state_leaves  # noqa: E402

SHAPES = [(4, 3), (5,), (2, 3, 2)]
STEPS = 15


def random_steps(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) * rng.uniform(0.1, 3.0) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def run_ours(transform, params, grads):
    tparams = [torch.tensor(p) for p in params]
    state = transform.init(tparams)
    outs = []
    for g in grads:
        updates, state = transform.update([torch.tensor(x) for x in g], state, tparams)
        outs.append([u.numpy().copy() for u in updates])
    return outs, state


def run_optax(transform, params, grads):
    jparams = [jnp.asarray(p) for p in params]
    state = transform.init(jparams)
    outs = []
    for g in grads:
        updates, state = transform.update([jnp.asarray(x) for x in g], state, jparams)
        outs.append([np.asarray(u) for u in updates])
    return outs, state


def assert_close_runs(ours, theirs, rtol=1e-13):
    """Equal within ``rtol`` relative to each tensor's largest magnitude (a moment that cancels to
    near zero is compared on the tensor's scale, not its own)."""
    for step, (a_list, b_list) in enumerate(zip(ours, theirs)):
        for a, b in zip(a_list, b_list):
            np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max(), err_msg=f"step {step}")


CASES = {
    # optax's scale_by_rss: accumulator starts at 0.1, eps = 1e-7 inside the root.
    "rss": (
        lambda: sg.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7, eps_in_sqrt=True),
        lambda: optax.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7),
    ),
    "rss-torch-defaults": (
        lambda: sg.scale_by_rss(initial_accumulator_value=0.3, eps=1e-3, eps_in_sqrt=True),
        lambda: optax.scale_by_rss(initial_accumulator_value=0.3, eps=1e-3),
    ),
    "rms-eps-inside": (
        lambda: sg.scale_by_rms(alpha=0.9, eps=1e-3, eps_in_sqrt=True),
        lambda: optax.scale_by_rms(decay=0.9, eps=1e-3, eps_in_sqrt=True),
    ),
    "rms-eps-outside": (
        lambda: sg.scale_by_rms(alpha=0.9, eps=1e-3, eps_in_sqrt=False),
        lambda: optax.scale_by_rms(decay=0.9, eps=1e-3, eps_in_sqrt=False),
    ),
    "rms-centered-inside": (
        lambda: sg.scale_by_rms(alpha=0.95, eps=1e-3, centered=True, eps_in_sqrt=True),
        lambda: optax.scale_by_stddev(decay=0.95, eps=1e-3, eps_in_sqrt=True),
    ),
    "rms-centered-outside": (
        lambda: sg.scale_by_rms(alpha=0.95, eps=1e-3, centered=True, eps_in_sqrt=False),
        lambda: optax.scale_by_stddev(decay=0.95, eps=1e-3, eps_in_sqrt=False),
    ),
    "adam": (
        lambda: sg.scale_by_adam(betas=(0.8, 0.99), eps=1e-4),
        lambda: optax.scale_by_adam(b1=0.8, b2=0.99, eps=1e-4, eps_root=0.0),
    ),
    "adam-eps-inside": (
        lambda: sg.scale_by_adam(betas=(0.8, 0.99), eps=1e-4, eps_in_sqrt=True),
        lambda: optax.scale_by_adam(b1=0.8, b2=0.99, eps=0.0, eps_root=1e-4),
    ),
    "trace": (lambda: sg.trace(0.9), lambda: optax.trace(decay=0.9)),
    "trace-nesterov": (lambda: sg.trace(0.7, nesterov=True), lambda: optax.trace(decay=0.7, nesterov=True)),
    "add_decayed_weights": (lambda: sg.add_decayed_weights(0.3), lambda: optax.add_decayed_weights(0.3)),
    "adamw-chain": (
        lambda: sg.chain(sg.scale_by_adam(betas=(0.9, 0.99)), sg.add_decayed_weights(0.1), sg.scale_by_lr(lr=0.01)),
        lambda: optax.adamw(learning_rate=0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1),
    ),
    "rmsprop-momentum-chain": (
        lambda: sg.chain(sg.scale_by_rms(alpha=0.9, eps=1e-3, eps_in_sqrt=True), sg.trace(0.5), sg.scale_by_lr(lr=0.1)),
        lambda: optax.rmsprop(learning_rate=0.1, decay=0.9, eps=1e-3, momentum=0.5),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_transform_equals_optax(case):
    ours_factory, optax_factory = CASES[case]
    params, grads = random_steps()
    ours, _ = run_ours(ours_factory(), params, grads)
    theirs, _ = run_optax(optax_factory(), params, grads)
    assert_close_runs(ours, theirs)


def test_adam_moments_equal_optax_state():
    params, grads = random_steps(1)
    _, state = run_ours(sg.scale_by_adam(betas=(0.8, 0.99)), params, grads)
    _, ostate = run_optax(optax.scale_by_adam(b1=0.8, b2=0.99), params, grads)
    for ours, mu, nu in zip(range(len(SHAPES)), ostate.mu, ostate.nu):
        np.testing.assert_allclose(state.exp_avg[ours].numpy(), np.asarray(mu), rtol=1e-14)
        np.testing.assert_allclose(state.exp_avg_sq[ours].numpy(), np.asarray(nu), rtol=1e-14)
    assert all(int(s.item()) == STEPS for s in state.step) and int(ostate.count) == STEPS


def test_amsgrad_differs_from_optax_as_documented():
    """torch (and steadygrad) keep max(v); optax's scale_by_amsgrad keeps max(v̂). They differ
    once a gradient shrinks, while the bias correction is still changing."""
    params = [np.zeros(3)]
    grads = [[np.array([3.0, 1.0, -2.0])]] + [[np.array([0.1, 0.1, 0.1])]] * 5
    ours, _ = run_ours(sg.scale_by_adam(amsgrad=True), params, grads)
    theirs, _ = run_optax(optax.scale_by_amsgrad(), params, grads)
    np.testing.assert_allclose(ours[0][0], theirs[0][0], rtol=1e-12)  # the first step agrees
    assert not np.allclose(ours[-1][0], theirs[-1][0], rtol=1e-3)


def test_chain_state_is_the_tuple_of_part_states():
    t = sg.chain(sg.scale_by_adam(), sg.trace(0.9), sg.scale_by_lr(lr=1.0))
    state = t.init([torch.zeros(2)])
    kinds = [type(leaf).__name__ for _, leaf in state_leaves(state)]
    assert kinds == ["ScaleByAdamState", "TraceState", "EmptyState"]
