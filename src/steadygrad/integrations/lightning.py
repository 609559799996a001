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
    accumulation it runs once per optimizer step, on the accumulated gradients. Each optimizer has
    a clipper of its own, over its own parameters (a GAN's two optimizers clip apart); the clippers
    are built in ``on_fit_start``, after ``configure_model`` and the strategy's setup (FSDP2), so
    they see the parameters the optimizers step.

    A step with inf/NaN gradients (``nonfinite="skip"``) leaves the clipper's state as it was and
    drops every gradient of that optimizer (``.grad = None``), so the optimizer step after it,
    torch's or steadygrad's, changes no parameter and no optimizer state.

    Args:
        transform: the clipping rule (``sg.zclip()``, ``sg.clip_by_moment()``, ... or a list of
            them, chained).
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"``, as for :class:`~steadygrad.Clipper`.
        log: log the :class:`~steadygrad.ClipStats` of every step with ``LightningModule.log``
            (``clip/norm``, ``clip/clipped_norm``, ``clip/fraction_clipped``, ``clip/skipped``;
            ``clip/<i>/...`` per optimizer when there are several).
        prefix: the prefix of those names.

    State: the clippers' :meth:`~steadygrad.Clipper.state_dict` are the callback's
    (``{"clippers": [...]}``, one per optimizer), so they are saved in Lightning's checkpoints and
    restored by ``trainer.fit(..., ckpt_path=...)``: a resumed run clips as the run that never
    stopped.

    Warns when the Trainer's ``gradient_clip_val`` is also set: Lightning would then clip again,
    after this callback.
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
        self.clippers: list[Clipper] = []
        self.last_stats: ClipStats | None = None
        self._loaded: list[dict[str, Any]] | None = None
        Clipper([], self.transform, nonfinite=nonfinite)  # validates nonfinite now

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "gradient_clip_val", None):
            warnings.warn(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips again after ClipperCallback; "
                "leave it unset to clip with steadygrad only",
                stacklevel=2,
            )
        names = {id(p): name for name, p in pl_module.named_parameters()}
        self.clippers = [
            build_clipper(
                [(names.get(id(p), "?"), p) for group in _inner(optimizer).param_groups for p in group["params"]],
                self.transform,
                self.nonfinite,
            )
            for optimizer in trainer.optimizers
        ]
        if self._loaded is not None:
            if len(self._loaded) != len(self.clippers):
                raise ValueError(
                    f"the checkpoint holds the state of {len(self._loaded)} clippers, this run has "
                    f"{len(self.clippers)} optimizers"
                )
            for clipper, state in zip(self.clippers, self._loaded):
                clipper.load_state_dict(state)
            self._loaded = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer or _inner(o) is _inner(optimizer))
        stats = self.clippers[index].clip_()
        self.last_stats = stats
        if self.log:
            prefix = self.prefix if len(self.clippers) == 1 else f"{self.prefix}/{index}"
            pl_module.log_dict(stats_dict(prefix, stats), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        if self.clippers:
            return {"clippers": [c.state_dict() for c in self.clippers]}
        return {"clippers": list(self._loaded)} if self._loaded is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._loaded = list(state_dict["clippers"])
        if self.clippers and len(self._loaded) == len(self.clippers):
            for clipper, state in zip(self.clippers, self._loaded):
                clipper.load_state_dict(state)
            self._loaded = None


def _inner(optimizer: Any) -> Any:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper (or the optimizer)."""
    return getattr(optimizer, "_optimizer", optimizer)
