"""Gradient clipping, one module per rule: by value, by norm (global or per tensor), by running
second moment (OpenAI Five), by unit-wise ratio to the weights (AGC), by update RMS (Adafactor),
ZClip and AutoClip; their shared conventions and pieces are in :mod:`.common`."""

from .autoclip import AutoClip, AutoClipState, autoclip, autoclip_update
from .common import ClipState
from .moment import (
    ClipByMoment,
    ClipByMomentState,
    clip_by_moment,
    moment_clip_,
    moment_clip_update,
    moment_threshold,
)
from .norm import ClipByNorm, clip_by_norm, norm_clip_update
from .unit_ratio import ClipByUnitRatio, clip_by_unit_ratio, unit_ratio_clip_update
from .update_rms import ClipUpdateRms, clip_update_rms, rms_clip_update
from .value import ClipByValue, clip_by_value, value_clip_update
from .zclip import ZClip, ZClipState, zclip, zclip_update

__all__ = [
    "AutoClip",
    "AutoClipState",
    "ClipByMoment",
    "ClipByMomentState",
    "ClipByNorm",
    "ClipByUnitRatio",
    "ClipByValue",
    "ClipState",
    "ClipUpdateRms",
    "ZClip",
    "ZClipState",
    "autoclip",
    "autoclip_update",
    "clip_by_moment",
    "clip_by_norm",
    "clip_by_unit_ratio",
    "clip_by_value",
    "clip_update_rms",
    "moment_clip_",
    "moment_clip_update",
    "moment_threshold",
    "norm_clip_update",
    "rms_clip_update",
    "unit_ratio_clip_update",
    "value_clip_update",
    "zclip",
    "zclip_update",
]
