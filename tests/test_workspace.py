"""Kept scratch memory for the reference step's large temporaries on the CPU."""

from __future__ import annotations

import pickle

import pytest
import torch

import steadygrad as sg
import steadygrad.core.workspace as workspace
from steadygrad.core.workspace import Workspace, compute_into


def test_large_tensors_get_kept_buffers_small_ones_allocate_and_the_order_is_kept():
    big = 1 + workspace.BIG_BYTES // 4
    params = [torch.zeros(3), torch.zeros(big), torch.zeros(2, 2), torch.zeros(big + 5)]
    ws = Workspace()
    scratch = ws.scratch(params)
    assert scratch.big == [1, 3] and scratch.small == [0, 2]
    assert ws.scratch(params) is scratch  # cached for the same parameters
    values = [torch.rand_like(p) for p in params]
    got = compute_into(scratch, torch.sqrt, torch._foreach_sqrt, values)
    assert [g.shape for g in got] == [v.shape for v in values]
    for g, v in zip(got, values):
        torch.testing.assert_close(g, v.sqrt(), rtol=0, atol=0)
    assert got[1] is scratch.buffers[0] and got[3] is scratch.buffers[1]
    # the next step writes into the same memory
    again = compute_into(scratch, torch.sqrt, torch._foreach_sqrt, values)
    assert again[1].data_ptr() == got[1].data_ptr()
    # another set of parameters with a gradient shares the buffers
    assert ws.scratch(params[1:]).buffers[0] is scratch.buffers[0]


def test_a_buffer_that_no_longer_fits_its_value_is_replaced():
    big = 1 + workspace.BIG_BYTES // 4
    params = [torch.zeros(big)]
    ws = Workspace()
    scratch = ws.scratch(params)
    value = torch.rand(big + 7, dtype=torch.float64)
    (got,) = compute_into(scratch, torch.sqrt, torch._foreach_sqrt, [value])
    assert got.shape == value.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, value.sqrt(), rtol=0, atol=0)


def test_no_workspace_where_it_does_not_apply():
    ws = Workspace()
    assert ws.scratch([]) is None
    assert ws.scratch([torch.zeros(4)]) is None  # nothing large
    assert ws.scratch([torch.zeros(1 << 20, device="meta")]) is None  # not on the CPU
    big = 1 + workspace.BIG_BYTES // 8
    scratch = ws.scratch([torch.zeros(big, dtype=torch.complex64)])
    assert scratch.buffers[0].shape == (big, 2) and scratch.buffers[0].dtype == torch.float32


def test_an_optimizer_keeps_its_workspace_out_of_state_dict_and_pickles():
    big = 1 + workspace.BIG_BYTES // 4
    p = torch.nn.Parameter(torch.randn(big))
    opt = sg.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(big)
    opt.step()
    assert opt._workspace.scratch([p]) is not None
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert len(pickle.dumps(opt)) < 4 * 3 * big + 10_000  # parameter, two moments; no scratch
    copy = pickle.loads(pickle.dumps(opt))
    (q,) = copy.param_groups[0]["params"]
    grad = torch.randn(big)
    p.grad, q.grad = grad, grad.clone()
    opt.step()
    copy.step()  # builds its own workspace
    assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg_sq"], copy.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Adam", "AdamW"])
def test_large_tensors_follow_torch_with_and_without_gradients(name):
    """Large float32 tensors (the workspace in use), one of them without a gradient on some
    steps (another set of parameters): the same trajectory as torch.optim."""
    big = 2 + workspace.BIG_BYTES // 4
    g = torch.Generator().manual_seed(0)
    params_t = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (big, 7, big + 3)]
    params_s = [torch.nn.Parameter(p.detach().clone()) for p in params_t]
    opt_t = getattr(torch.optim, name)(params_t, lr=0.01)
    opt_s = getattr(sg.optim, name)(params_s, lr=0.01)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in params_t]
        for ps in (params_t, params_s):
            for i, (p, grad) in enumerate(zip(ps, grads)):
                p.grad = None if (i == 2 and step % 2) else grad.clone()
        opt_t.step()
        opt_s.step()
    for a, b in zip(params_s, params_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
