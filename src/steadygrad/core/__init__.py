"""The core: the transform protocol, chains, and helpers on lists of tensors."""

from .tensorlist import group_by_device_dtype
from .transform import EmptyState, Transform, chain, group_hyperparameter, hyperparameters, identity, state_leaves

__all__ = [
    "EmptyState",
    "Transform",
    "chain",
    "group_by_device_dtype",
    "group_hyperparameter",
    "hyperparameters",
    "identity",
    "state_leaves",
]
