"""steadygrad: gradient clipping, accumulation and adaptive optimizers for PyTorch.

``import steadygrad as sg``; see shared/API.md for the public contract.
"""

from . import optim
from .accumulate import GradAccumulator, WindowCounts, WindowEnd
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .core import EmptyState, Transform, chain, group_by_device_dtype, identity
from .transforms import (
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_lr,
    scale_by_rms,
    scale_by_rss,
    trace,
)

__version__ = "0.1.0"

__all__ = [
    "EmptyState",
    "GradAccumulator",
    "Transform",
    "WindowCounts",
    "WindowEnd",
    "add_decayed_weights",
    "chain",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "group_by_device_dtype",
    "identity",
    "optim",
    "scale",
    "scale_by_adam",
    "scale_by_lr",
    "scale_by_rms",
    "scale_by_rss",
    "trace",
]
