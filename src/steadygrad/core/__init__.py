"""The core: the transform protocol, chains, and helpers on lists of tensors."""

from .tensorlist import group_by_device_dtype
from .transform import (
    EmptyState,
    Transform,
    chain,
    commit_gate,
    gated,
    group_hyperparameter,
    hyperparameters,
    identity,
    state_leaves,
)

__all__ = [
    "EmptyState",
    "Transform",
    "chain",
    "commit_gate",
    "gated",
    "group_by_device_dtype",
    "group_hyperparameter",
    "hyperparameters",
    "identity",
    "state_leaves",
]
