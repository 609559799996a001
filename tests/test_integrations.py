"""The framework callbacks with the real frameworks (CPU, tiny models, no downloads): Lightning's
Trainer and the Hugging Face Trainer clip as a plain loop does, skip a NaN step, and resume from
their checkpoints with the clipper's state, bit for bit."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import steadygrad as sg

N_SAMPLES, BATCH = 24, 4  # 6 steps an epoch
NAN_SAMPLE = 9  # in the third batch


def _data(nan: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, 4, generator=g)
    y = torch.randn(N_SAMPLES, 1, generator=g)
    if nan:
        x[NAN_SAMPLE, 0] = math.nan
    return x, y


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _plain_loop(net: nn.Module, opt: torch.optim.Optimizer, clipper: sg.Clipper, epochs: int) -> None:
    x, y = _data()
    for _ in range(epochs):
        for i in range(0, N_SAMPLES, BATCH):
            opt.zero_grad()
            nn.functional.mse_loss(net(x[i : i + BATCH]), y[i : i + BATCH]).backward()
            clipper.clip_()
            opt.step()


# ---- Lightning ------------------------------------------------------------------------------------

L = pytest.importorskip("lightning")
from steadygrad.integrations.lightning import ClipperCallback as LightningClipper  # noqa: E402


class _Module(L.LightningModule):
    def __init__(self, steadygrad_optimizer: bool = True) -> None:
        super().__init__()
        self.net = _net()
        self.steadygrad_optimizer = steadygrad_optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.steadygrad_optimizer:
            return sg.optim.AdamW(self.parameters(), lr=0.05)
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def train_dataloader(self):
        x, y = _data()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _trainer(callback, max_epochs: int, **kwargs):
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("steadygrad_optimizer", [True, False])
def test_lightning_clips_and_skips_as_a_plain_loop(steadygrad_optimizer):
    module = _Module(steadygrad_optimizer)
    callback = LightningClipper(sg.zclip(warmup_steps=2))
    _trainer(callback, max_epochs=2).fit(module)

    net = _net()
    opt = (
        sg.optim.AdamW(net.parameters(), lr=0.05)
        if steadygrad_optimizer
        else torch.optim.AdamW(net.parameters(), lr=0.05)
    )
    clipper = sg.Clipper(net.parameters(), sg.zclip(warmup_steps=2))
    _plain_loop(net, opt, clipper, epochs=2)
    for a, b in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(a, b)
    assert int(callback.clippers[0].state_dict()["shared"]["num_norms"]) == 2 * N_SAMPLES // BATCH - 2  # 2 NaN
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_lightning_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    straight = _Module()
    straight_cb = LightningClipper(sg.clip_by_moment(k=2.0, beta=0.9))
    _trainer(straight_cb, max_epochs=2).fit(straight)

    first = _Module()
    trainer = _trainer(LightningClipper(sg.clip_by_moment(k=2.0, beta=0.9)), max_epochs=1)
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "one.ckpt")

    resumed = _Module()
    resumed_cb = LightningClipper(sg.clip_by_moment(k=2.0, beta=0.9))
    _trainer(resumed_cb, max_epochs=2).fit(resumed, ckpt_path=tmp_path / "one.ckpt")
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    sa, sb = resumed_cb.clippers[0].state_dict(), straight_cb.clippers[0].state_dict()
    for i in sb["state"]:
        for key in sb["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key])


def test_lightning_logs_the_statistics_and_warns_about_a_second_clipping():
    module = _Module()
    callback = LightningClipper(sg.clip_by_norm(0.1))
    with pytest.warns(UserWarning, match="gradient_clip_val=0.5"):
        trainer = _trainer(callback, max_epochs=1, gradient_clip_val=0.5)
        trainer.fit(module)
    assert {"clip/norm", "clip/fraction_clipped", "clip/skipped"} <= set(trainer.callback_metrics)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trainer(LightningClipper(sg.clip_by_norm(0.1)), max_epochs=1).fit(_Module())


class _LateModule(_Module):
    """The layers are made in configure_model (where large models and FSDP2 sharding go)."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.steadygrad_optimizer = True
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = _net()


def test_lightning_clips_parameters_made_in_configure_model():
    module = _LateModule()
    callback = LightningClipper(sg.clip_by_value(1e-3), nonfinite="ignore")
    _trainer(callback, max_epochs=1, limit_train_batches=2).fit(module)
    (clipper,) = callback.clippers
    assert len(clipper.params) == 4
    assert float(callback.last_stats.clipped_norm) < float(callback.last_stats.norm)


class _TwoOptimizers(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for layer, opt in ((self.a, opt_a), (self.b, opt_b)):
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(layer(torch.nan_to_num(x)), y))
            opt.step()

    def configure_optimizers(self):
        return sg.optim.Adam(self.a.parameters(), lr=0.01), torch.optim.Adam(self.b.parameters(), lr=0.01)

    def train_dataloader(self):
        return _Module().train_dataloader()


def test_lightning_gives_each_optimizer_a_clipper_of_its_own():
    module = _TwoOptimizers()
    callback = LightningClipper(sg.clip_by_norm(0.01))
    trainer = _trainer(callback, max_epochs=1, limit_train_batches=3)
    trainer.fit(module)
    a, b = callback.clippers
    assert a.params == list(module.a.parameters()) and b.params == list(module.b.parameters())
    for clipper in (a, b):  # each clipped its own gradients once per step
        assert float(clipper.state_dict()["shared"]["fraction_clipped"]) == 1.0
    assert {"clip/0/norm", "clip/1/norm"} <= set(trainer.callback_metrics)


# ---- Hugging Face Trainer ---------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from steadygrad.integrations.transformers import STATE_FILE  # noqa: E402
from steadygrad.integrations.transformers import ClipperCallback as HFClipper  # noqa: E402


class _HFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


def _dataset(nan: bool = True):
    x, y = _data(nan)
    return [{"x": x[i], "labels": y[i]} for i in range(N_SAMPLES)]


class _Recorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _hf_trainer(output_dir, callback, max_steps=6, nan=True, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=3,
        per_device_train_batch_size=BATCH,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        max_grad_norm=kwargs.pop("max_grad_norm", 0.0),
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    model = _HFModel()
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_dataset(nan),
        callbacks=[callback],
        optimizer_cls_and_kwargs=(sg.optim.AdamW, {"lr": 0.05}),
        **kwargs,
    )


def test_hf_trainer_skips_a_nan_step_and_resumes_bit_for_bit(tmp_path):
    straight_cb = HFClipper(sg.zclip(warmup_steps=1))
    straight = _hf_trainer(tmp_path / "a", straight_cb)
    recorder = _Recorder()
    straight.add_callback(recorder)
    straight.train()
    assert all(torch.isfinite(p).all() for p in straight.model.parameters())
    assert (tmp_path / "a" / "checkpoint-3" / STATE_FILE).is_file()
    stats = straight_cb.clipper.state_dict()["shared"]
    assert int(stats["num_norms"]) < 6  # the NaN batch was skipped
    logged = [entry for entry in recorder.logs if "clip/norm" in entry]
    assert len(logged) == 6 and [entry["clip/skipped"] for entry in logged] == [0, 0, 0, 1, 0, 0]

    resumed_cb = HFClipper(sg.zclip(warmup_steps=1))
    resumed = _hf_trainer(tmp_path / "a", resumed_cb)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    for key, value in straight_cb.clipper.state_dict()["shared"].items():
        assert torch.equal(resumed_cb.clipper.state_dict()["shared"][key], value), key


def test_hf_trainer_warns_when_it_would_clip_too(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm=1.0"):
        _hf_trainer(tmp_path, HFClipper(sg.clip_by_norm(0.1)), max_steps=1, max_grad_norm=1.0).train()
