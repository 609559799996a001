"""A tiny token model with padding masks, shared by the accumulation tests (also imported by the
processes that tests/test_accumulate_distributed.py spawns)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 11
WIDTH = 5


class MicroBatch(NamedTuple):
    tokens: Tensor  # (B, T) int64, padded with random tokens
    targets: Tensor  # (B, T) int64
    mask: Tensor  # (B, T) bool, True on real tokens


class TokenModel(nn.Module):
    """Embedding -> masked mean over the sequence as context -> per-token logits.

    The context couples the tokens of a sequence, so a padding token that leaked through the mask
    would change every gradient."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, dtype=dtype)
        self.mix = nn.Linear(WIDTH, WIDTH, dtype=dtype)
        self.out = nn.Linear(WIDTH, VOCAB, dtype=dtype)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.embed(tokens)
        m = mask.unsqueeze(-1).to(h.dtype)
        context = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        return self.out(torch.tanh(h + self.mix(context)))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> TokenModel:
    torch.manual_seed(seed)
    return TokenModel(dtype)


def make_micro_batches(seed: int, shapes: list[tuple[int, int]]) -> list[MicroBatch]:
    """One micro-batch per (batch size, padded length), with random lengths in [1, T] per sequence."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, t in shapes:
        lengths = torch.randint(1, t + 1, (b,), generator=gen)
        mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
        tokens = torch.randint(VOCAB, (b, t), generator=gen)
        targets = torch.randint(VOCAB, (b, t), generator=gen)
        out.append(MicroBatch(tokens, targets, mask))
    return out


def loss_sum(model: nn.Module, mb: MicroBatch) -> Tensor:
    """The sum of the cross-entropy losses of the real (unmasked) tokens."""
    logits = model(mb.tokens, mb.mask)
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), mb.targets.reshape(-1), reduction="none")
    return (per_token * mb.mask.reshape(-1).to(per_token.dtype)).sum()


def num_items(mb: MicroBatch) -> int:
    return int(mb.mask.sum())


def big_batch(mbs: list[MicroBatch]) -> MicroBatch:
    """All micro-batches in one batch, padded to the longest (pads are masked out)."""
    t_max = max(mb.tokens.shape[1] for mb in mbs)

    def pad(x: Tensor, value) -> Tensor:
        return F.pad(x, (0, t_max - x.shape[1]), value=value)

    return MicroBatch(
        torch.cat([pad(mb.tokens, 3) for mb in mbs]),
        torch.cat([pad(mb.targets, 5) for mb in mbs]),
        torch.cat([pad(mb.mask, False) for mb in mbs]),
    )


def token_mean_grads(model: nn.Module, mbs: list[MicroBatch]) -> list[Tensor]:
    """The gradient of the mean token loss of the big batch made of ``mbs``."""
    big = big_batch(mbs)
    loss = loss_sum(model, big) / big.mask.sum()
    return list(torch.autograd.grad(loss, list(model.parameters())))


def token_sum_grads(model: nn.Module, mbs: list[MicroBatch]) -> list[Tensor]:
    """The gradient of the summed token loss of the big batch made of ``mbs``."""
    return list(torch.autograd.grad(loss_sum(model, big_batch(mbs)), list(model.parameters())))


def micro_mean_grads(model: nn.Module, mbs: list[MicroBatch]) -> list[Tensor]:
    """The mean over micro-batches of the gradients of each micro-batch's mean token loss."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for mb in mbs:
        grads = torch.autograd.grad(loss_sum(model, mb) / mb.mask.sum(), params)
        total = [a + g for a, g in zip(total, grads)]
    return [a / len(mbs) for a in total]
