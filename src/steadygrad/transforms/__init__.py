"""Gradient transforms, one module per kind: adaptive scaling (Adagrad, RMSProp, Adam), the basic
pieces (momentum, weight decay, step size), clipping, adaptive clipping (ZClip, AutoClip) and
safety (skipping non-finite steps)."""

from .adaptive import (
    ScaleByAdamState,
    ScaleByRmsState,
    ScaleByRssState,
    adam_update,
    rms_update,
    rss_update,
    scale_by_adam,
    scale_by_rms,
    scale_by_rss,
)
from .adaptive_clipping import AutoClipState, ZClipState, autoclip, autoclip_update, zclip, zclip_update
from .basic import TraceState, add_decayed_weights, scale, scale_by_lr, trace
from .clipping import (
    ClipByMomentState,
    ClipState,
    clip_by_moment,
    clip_by_norm,
    clip_by_unit_ratio,
    clip_by_value,
    clip_update_rms,
    moment_clip_update,
    norm_clip_update,
    rms_clip_update,
    unit_ratio_clip_update,
    value_clip_update,
)
from .safety import SkipNonfiniteState, skip_nonfinite

__all__ = [
    "AutoClipState",
    "ClipByMomentState",
    "ClipState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "SkipNonfiniteState",
    "TraceState",
    "ZClipState",
    "adam_update",
    "add_decayed_weights",
    "autoclip",
    "autoclip_update",
    "clip_by_moment",
    "clip_by_norm",
    "clip_by_unit_ratio",
    "clip_by_value",
    "clip_update_rms",
    "moment_clip_update",
    "norm_clip_update",
    "rms_clip_update",
    "rms_update",
    "rss_update",
    "scale",
    "scale_by_adam",
    "scale_by_lr",
    "scale_by_rms",
    "scale_by_rss",
    "skip_nonfinite",
    "trace",
    "unit_ratio_clip_update",
    "value_clip_update",
    "zclip",
    "zclip_update",
]
