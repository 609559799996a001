"""steadygrad: gradient clipping, accumulation and adaptive optimizers for PyTorch.

``import steadygrad as sg``; the public contract is shared/API.md of the project.
"""

from . import optim
from .accumulate import GradAccumulator, WindowCounts, WindowEnd
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .clipper import Clipper, ClipStats
from .core import Chain, EmptyState, Hyper, StepContext, Transform, chain, group_by_device_dtype, identity
from .statslog import StatsLogger, optimizer_stats
from .transforms import (
    add_decayed_weights,
    autoclip,
    clip_by_moment,
    clip_by_norm,
    clip_by_unit_ratio,
    clip_by_value,
    clip_update_rms,
    scale,
    scale_by_adam,
    scale_by_lr,
    scale_by_rms,
    scale_by_rss,
    skip_nonfinite,
    trace,
    zclip,
)

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "ClipStats",
    "Clipper",
    "EmptyState",
    "Hyper",
    "StepContext",
    "GradAccumulator",
    "StatsLogger",
    "Transform",
    "WindowCounts",
    "WindowEnd",
    "add_decayed_weights",
    "autoclip",
    "chain",
    "clip_by_moment",
    "clip_by_norm",
    "clip_by_unit_ratio",
    "clip_by_value",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_update_rms",
    "get_total_norm",
    "group_by_device_dtype",
    "identity",
    "optim",
    "optimizer_stats",
    "scale",
    "scale_by_adam",
    "scale_by_lr",
    "scale_by_rms",
    "scale_by_rss",
    "skip_nonfinite",
    "trace",
    "zclip",
]
