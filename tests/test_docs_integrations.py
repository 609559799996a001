"""docs/integrations.md: every recipe runs as written (the distributed one on two gloo processes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ._distributed import needs_gloo, run_on_ranks

DOC = Path(__file__).parent.parent / "docs" / "integrations.md"


def recipe(name: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if b.startswith(f"# recipe: {name}\n")]
    assert len(found) == 1, f"docs/integrations.md has {len(found)} recipes named {name!r}"
    return found[0]


def _batches(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _loader():
    x = torch.cat([b[0] for b in _batches()])
    y = torch.cat([b[1] for b in _batches()])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def test_every_recipe_is_tested():
    names = re.findall(r"```python\n# recipe: (\w+)\n", DOC.read_text())
    assert sorted(names) == ["accelerate", "distributed", "lightning", "plain", "transformers"]


def test_plain_loop():
    batches = _batches()
    batches[2][0][0, 0] = float("nan")
    namespace = {"batches": batches}
    exec(compile(recipe("plain"), "integrations.md", "exec"), namespace)
    assert all(torch.isfinite(p).all() for p in namespace["model"].parameters())
    assert namespace["opt"].state_dict()["state"][0]["step"].item() == 5  # the NaN step did not count


def test_lightning(tmp_path):
    pytest.importorskip("lightning")
    namespace = {"loader": _loader(), "checkpoint_dir": str(tmp_path)}
    exec(compile(recipe("lightning"), "integrations.md", "exec"), namespace)
    assert (tmp_path / "last.ckpt").is_file()
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert any(key.startswith("ClipperCallback") for key in saved["callbacks"])


def test_transformers(tmp_path):
    pytest.importorskip("transformers")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    data = [{"x": x[i], "labels": y[i]} for x, y in _batches() for i in range(4)]
    namespace = {"model": Model(), "dataset": data, "checkpoint_dir": str(tmp_path)}
    exec(compile(recipe("transformers"), "integrations.md", "exec"), namespace)
    assert (tmp_path / "checkpoint-6" / "steadygrad_clipper.pt").is_file()


def test_accelerate(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        namespace = {"loader": _loader(), "checkpoint_dir": str(tmp_path)}
        exec(compile(recipe("accelerate"), "integrations.md", "exec"), namespace)
        opt = namespace["opt"].optimizer  # accelerate's wrapper holds steadygrad's
        assert opt.state_dict()["state"][0]["step"].item() == 3  # 6 batches, a step every 2
        assert any(p.name.startswith("optimizer") for p in (tmp_path / "accelerate").iterdir())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ---- the distributed recipe on two processes ---------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _check(rank, tmp_dir):
    namespace: dict = {}
    exec(compile(recipe("distributed"), "integrations.md", "exec"), namespace)
    batches = _batches(4)
    ddp = namespace["train_ddp"](_model(), batches)
    assert all(torch.isfinite(p).all() for p in ddp.parameters())

    model, opt = namespace["train_fsdp2"](_model(), batches[:2], f"{tmp_dir}/dcp")
    for x, y in batches[2:]:  # the run that never stopped
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    fresh = _model()
    for layer in fresh:
        if isinstance(layer, torch.nn.Linear):
            namespace["fully_shard"](layer)
    namespace["fully_shard"](fresh)
    fresh_opt = namespace["sg"].optim.AdamW(
        fresh.parameters(),
        lr=1e-3,
        clip=namespace["sg"].clip_by_norm(1.0),
        moment_clip=5.0,
        nonfinite="skip",
    )
    namespace["resume_fsdp2"](fresh, fresh_opt, f"{tmp_dir}/dcp")
    for x, y in batches[2:]:
        fresh_opt.zero_grad()
        torch.nn.functional.mse_loss(fresh(x), y).backward()
        fresh_opt.step()
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())


@needs_gloo
def test_distributed_recipe_on_two_ranks(tmp_path):
    run_on_ranks(tmp_path, _check)
