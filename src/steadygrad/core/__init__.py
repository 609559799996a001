"""The core: the transform protocol and step context, chains, the gate and non-finite helpers,
validation, parameter parsing, tensor-list helpers, norms and the state layout."""

from .tensorlist import group_by_device_dtype
from .transform import Chain, EmptyState, Hyper, StepContext, Transform, chain, identity, state_leaves

__all__ = [
    "Chain",
    "EmptyState",
    "Hyper",
    "StepContext",
    "Transform",
    "chain",
    "group_by_device_dtype",
    "identity",
    "state_leaves",
]
