"""Clipping in the Hugging Face ``Trainer``: :class:`ClipperCallback`.

::

    from transformers import Trainer, TrainingArguments
    import steadygrad as sg
    from steadygrad.integrations.transformers import ClipperCallback

    args = TrainingArguments("out", max_grad_norm=0.0)          # no second clipping by the Trainer
    trainer = Trainer(model, args, train_dataset=data, callbacks=[ClipperCallback(sg.zclip())])
    trainer.train()                                             # resume_from_checkpoint=True resumes it

steadygrad's optimizers go in as any torch optimizer: ``Trainer(..., optimizers=(opt, None))`` or
``Trainer(..., optimizer_cls_and_kwargs=(sg.optim.AdamW, {"lr": 1e-3, "clip": sg.zclip()}))``.

Imports ``transformers`` when this module is imported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..clipper import Clipper, ClipStats
from ..core.transform import Transform
from ._common import as_transform, build_clipper, stats_dict

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("steadygrad.integrations.transformers needs transformers: pip install transformers") from error

__all__ = ["STATE_FILE", "ClipperCallback"]

#: The file, in each ``checkpoint-<step>`` directory, that holds the clipper's state.
STATE_FILE = "steadygrad_clipper.pt"


class ClipperCallback(TrainerCallback):
    """Runs a :class:`steadygrad.Clipper` on the gradients before every optimizer step.

    Where: in ``on_pre_optimizer_step``, which the Trainer calls after the backward passes of
    the step (gradient accumulation included) and after its own ``max_grad_norm`` clipping, right
    before ``optimizer.step()``. With a float16 ``GradScaler`` the gradients are unscaled here
    first (the scaler then steps without unscaling again), so the true gradients are clipped.

    A step with inf/NaN gradients (``nonfinite="skip"``) leaves the clipper's state as it was and
    drops every gradient (``.grad = None``), so ``optimizer.step()`` changes no parameter and no
    optimizer state. The Trainer still counts the step (``global_step``, its LR scheduler), as
    the batch was consumed.

    Args:
        transform: the clipping rule (or a list of them, chained).
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"``, as for :class:`~steadygrad.Clipper`.
        prefix: the name prefix of the statistics added to the Trainer's logs (``clip/norm``,
            ``clip/clipped_norm``, ``clip/fraction_clipped``, ``clip/skipped``: of the last step
            before each log).

    State: the Trainer keeps callback state only as JSON, so this callback writes the clipper's
    tensors next to each checkpoint (``checkpoint-<step>/steadygrad_clipper.pt``) and reads them
    back when training resumes from ``output_dir/checkpoint-<step>`` (``resume_from_checkpoint``);
    a resumed run clips as the run that never stopped. For a checkpoint elsewhere, call
    :meth:`load_checkpoint` before ``train``.

    Warns when ``max_grad_norm > 0`` (the Trainer's default is 1.0): the Trainer would clip too,
    before this callback.
    """

    def __init__(
        self,
        transform: Transform | Sequence[Transform],
        nonfinite: Literal["skip", "raise", "ignore"] = "skip",
        prefix: str = "clip",
    ) -> None:
        self.transform = as_transform(transform)
        self.nonfinite = nonfinite
        self.prefix = prefix
        self.clipper: Clipper | None = None
        self.last_stats: ClipStats | None = None
        self._loaded: dict[str, Any] | None = None
        Clipper([], self.transform, nonfinite=nonfinite)  # validates nonfinite now

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike) -> None:
        """Restores the clipper's state saved in ``checkpoint_dir`` (at the start of training)."""
        path = os.path.join(os.fspath(checkpoint_dir), STATE_FILE)
        self._loaded = torch.load(path, map_location="cpu", weights_only=True)
        if self.clipper is not None:
            self.clipper.load_state_dict(self._loaded)
            self._loaded = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) makes the Trainer clip before "
                "ClipperCallback; set max_grad_norm=0 to clip with steadygrad only",
                stacklevel=2,
            )
        if self.clipper is None:
            self.clipper = build_clipper(model.named_parameters(), self.transform, self.nonfinite)
        if self._loaded is None and state.global_step > 0:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
                self.load_checkpoint(checkpoint)
            else:
                warnings.warn(
                    f"training resumes at step {state.global_step}, but {checkpoint} holds no {STATE_FILE}: "
                    "the clipper starts afresh (call ClipperCallback.load_checkpoint(dir) for a checkpoint "
                    "elsewhere)",
                    stacklevel=2,
                )
        if self._loaded is not None:
            self.clipper.load_state_dict(self._loaded)
            self._loaded = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        _unscale(optimizer)
        self.last_stats = self.clipper.clip_()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and self.last_stats is not None and "loss" in logs:
            logs.update({k: v.item() for k, v in stats_dict(self.prefix, self.last_stats).items()})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.clipper is None or not args.should_save:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            torch.save(self.clipper.state_dict(), os.path.join(checkpoint, STATE_FILE))


def _unscale(optimizer: Any) -> None:
    """Unscales the gradients of accelerate's optimizer when a GradScaler drives it (float16 AMP)
    and they are still scaled; the scaler remembers, and does not unscale them again."""
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    if scaler is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(inner)
    except RuntimeError as error:  # already unscaled this step (max_grad_norm clipping did)
        if "unscale_() has already been called" not in str(error):
            raise
