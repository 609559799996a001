"""Gradient transforms, grouped by kind."""

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
from .basic import TraceState, add_decayed_weights, scale, scale_by_lr, trace

__all__ = [
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "TraceState",
    "adam_update",
    "add_decayed_weights",
    "rms_update",
    "rss_update",
    "scale",
    "scale_by_adam",
    "scale_by_lr",
    "scale_by_rms",
    "scale_by_rss",
    "trace",
]
