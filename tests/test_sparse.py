"""Sparse gradients (``nn.Embedding(sparse=True)``): Adagrad steps them as torch.optim.Adagrad
does, float64, on both paths; the other optimizers and options refuse them clearly."""

from __future__ import annotations

import math

import pytest
import torch

import steadygrad as sg

F64 = torch.float64


def _models(seed: int = 0):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(12, 3, sparse=True).to(F64)
    head = torch.nn.Linear(3, 1).to(F64)
    twin_emb = torch.nn.Embedding(12, 3, sparse=True).to(F64)
    twin_head = torch.nn.Linear(3, 1).to(F64)
    twin_emb.load_state_dict(emb.state_dict())
    twin_head.load_state_dict(head.state_dict())
    return (emb, head), (twin_emb, twin_head)


def _backward(model, idx) -> None:
    emb, head = model
    head(emb(idx)).pow(2).sum().backward()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"lr_decay": 0.1},
        {"maximize": True},
        {"initial_accumulator_value": 0.5, "eps": 1e-3},
        {"lr": torch.tensor(0.2, dtype=F64)},
    ],
    ids=["default", "lr_decay", "maximize", "init_eps", "tensor_lr"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch.optim.Adagrad's
def test_adagrad_sparse_equals_torch(options, fused):
    ours, theirs = _models()
    params = [p for m in ours for p in m.parameters()]
    reference = [p for m in theirs for p in m.parameters()]
    kwargs = {"lr": 0.1, **options}
    ref_opt = torch.optim.Adagrad(reference, **kwargs)
    with pytest.warns(UserWarning, match="sparse gradient") if fused else _nothing():
        opt = sg.optim.Adagrad(params, **kwargs, fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            idx = torch.randint(0, 12, (6,), generator=gen)
            for model, o in ((ours, opt), (theirs, ref_opt)):
                o.zero_grad()
                _backward(model, idx)
                o.step()
    assert ours[0].weight.grad.is_sparse
    # A tensor lr: the dense head's step rounds differently from torch's in the last bit, and
    # the embedding's gradients follow it.
    rtol = 1e-13 if isinstance(options.get("lr"), torch.Tensor) else 1e-15
    for a, b in zip(params, reference):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
        torch.testing.assert_close(opt.state[a]["sum"], ref_opt.state[b]["sum"], rtol=rtol, atol=0)
        assert opt.state[a]["step"].item() == ref_opt.state[b]["step"].item() == 4


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_only_the_rows_of_the_gradient_change_and_eps_in_sqrt_by_the_formula():
    (emb, _), _ = _models()
    before = emb.weight.detach().clone()
    opt = sg.optim.Adagrad(emb.parameters(), lr=0.5, eps=0.25, eps_in_sqrt=True, initial_accumulator_value=0.1)
    idx = torch.tensor([2, 7, 2])
    emb(idx).mul(torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)).sum().backward()
    g = emb.weight.grad.to_dense()
    opt.step()
    rows = [2, 7]
    s = 0.1 + g**2
    expected = before - 0.5 * g / torch.sqrt(s + 0.25)
    torch.testing.assert_close(emb.weight.detach()[rows], expected[rows], rtol=1e-15, atol=0)
    untouched = [i for i in range(12) if i not in rows]
    assert torch.equal(emb.weight.detach()[untouched], before[untouched])
    assert torch.equal(opt.state[emb.weight]["sum"][untouched], torch.full((10, 3), 0.1, dtype=F64))
    assert math.isclose(float(g[2, 2]), 6.0)  # row 2 was looked up twice: the gradient is summed


def test_sparse_gradients_refused_where_unsupported():
    (emb, _), _ = _models()
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients"):
        sg.optim.Adagrad(emb.parameters(), weight_decay=0.1).step()
    with pytest.raises(RuntimeError, match="clip="):
        sg.optim.Adagrad(emb.parameters(), clip=sg.clip_by_norm(1.0)).step()
    with pytest.raises(RuntimeError, match="nonfinite"):
        sg.optim.Adagrad(emb.parameters(), nonfinite="skip").step()
    for cls in (sg.optim.Adam, sg.optim.AdamW, sg.optim.RMSprop):
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            cls(emb.parameters()).step()
    # nothing was stepped by the refusals
    assert torch.equal(emb.weight.detach(), _models()[0][0].weight.detach())
