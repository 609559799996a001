"""Clipping in Lightning's training loop: :class:`ClipperCallback`.

::

    import lightning as L
    import steadygrad as sg
    from steadygrad.integrations.lightning import ClipperCallback

    trainer = L.Trainer(callbacks=[ClipperCallback(sg.zclip())], max_steps=1000)
    trainer.fit(model)                      # and trainer.fit(model, ckpt_path=...) resumes it

Imports ``lightning`` (or, failing that, ``pytorch_lightning``) when this module is imported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

from ..clipper import Clipper, ClipStats
from ..core.transform import Transform
from ._common import as_transform, build_clipper, stats_dict

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as error:
        raise ImportError(
            "steadygrad.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)"
        ) from error

__all__ = ["ClipperCallback"]


class ClipperCallback(Callback):
    """Runs a :class:`steadygrad.Clipper` on the gradients before every optimizer step.

    Where: in ``on_before_optimizer_step``, which Lightning calls after the backward pass of
    the step (after ``scaler.unscale_`` with 16-bit AMP, so the true gradients are clipped) and
    before its own ``gradient_clip_val`` clipping and ``optimizer.step()``. With gradient
    accumulation it runs once per optimizer step, on the accumulated gradients.

    A step with inf/NaN gradients (``nonfinite="skip"``) leaves the clipper's state as it was and
    drops every gradient (``.grad = None``), so the optimizer step after it, torch's or
    steadygrad's, changes no parameter and no optimizer state.

    Args:
        transform: the clipping rule (``sg.zclip()``, ``sg.clip_by_moment()``, ... or a list of
            them, chained).
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"``, as for :class:`~steadygrad.Clipper`.
        log: log the :class:`~steadygrad.ClipStats` of every step with ``LightningModule.log``
            (``clip/norm``, ``clip/clipped_norm``, ``clip/fraction_clipped``, ``clip/skipped``).
        prefix: the prefix of those names.

    State: the clipper's :meth:`~steadygrad.Clipper.state_dict` is the callback's, so it is saved
    in Lightning's checkpoints and restored by ``trainer.fit(..., ckpt_path=...)``: a resumed run
    clips as the run that never stopped.

    Warns once when the Trainer's ``gradient_clip_val`` is also set: Lightning would then clip
    again, after this callback.
    """

    def __init__(
        self,
        transform: Transform | Sequence[Transform],
        nonfinite: Literal["skip", "raise", "ignore"] = "skip",
        log: bool = True,
        prefix: str = "clip",
    ) -> None:
        super().__init__()
        self.transform = as_transform(transform)
        self.nonfinite = nonfinite
        self.log = log
        self.prefix = prefix
        self.clipper: Clipper | None = None
        self.last_stats: ClipStats | None = None
        self._loaded: dict[str, Any] | None = None
        Clipper([], self.transform, nonfinite=nonfinite)  # validates nonfinite now

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.clipper is None:
            self.clipper = build_clipper(pl_module.named_parameters(), self.transform, self.nonfinite)
        if self._loaded is not None:
            self.clipper.load_state_dict(self._loaded)
            self._loaded = None
        if stage == "fit" and getattr(trainer, "gradient_clip_val", None):
            warnings.warn(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips again after ClipperCallback; "
                "leave it unset to clip with steadygrad only",
                stacklevel=2,
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.clipper is None:
            self.setup(trainer, pl_module, "fit")
        stats = self.clipper.clip_()
        self.last_stats = stats
        if self.log:
            pl_module.log_dict(stats_dict(self.prefix, stats), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        if self.clipper is not None:
            return self.clipper.state_dict()
        return dict(self._loaded or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.clipper is not None:
            self.clipper.load_state_dict(state_dict)
        else:
            self._loaded = state_dict
