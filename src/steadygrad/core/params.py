"""One parameter parser for every front-end (optimizers, Clipper, GradAccumulator).

Accepted, as torch.optim accepts them: a single tensor; an iterable of tensors; of ``(name,
tensor)`` pairs (``model.named_parameters()``: the names appear in error messages); or, where the
caller allows it, of parameter groups (dicts with a ``"params"`` entry). Refused: sets (their order
changes between runs, so state would attach to other parameters after a restart), strings, dicts
in place of an iterable, and non-tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["ParamList", "check_ordered", "parse_params"]


class ParamList(NamedTuple):
    """Parsed parameters: the tensors in order and their names (``None`` where none was given)."""

    tensors: list[Tensor]
    names: list[str | None]

    def describe(self, i: int) -> str:
        """``parameter 'fc.weight' (index 3, shape (4, 2))`` for error messages."""
        shape = tuple(self.tensors[i].shape)
        if self.names[i] is None:
            return f"parameter {i} (shape {shape})"
        return f"parameter {self.names[i]!r} (index {i}, shape {shape})"


def check_ordered(params: Any, owner: str) -> None:
    """Raises ``TypeError`` for a set of parameters (torch's rule, torch's reason)."""
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"{owner} parameters need to be organized in ordered collections, but the ordering of tensors in "
            "sets will change between runs. Please use a list instead."
        )


def parse_params(params: Any, owner: str, *, groups: bool = False, duplicates: str = "raise") -> ParamList:
    """The tensors of ``params`` with their names.

    Args:
        owner: who is asking (``"Clipper"``), for messages.
        groups: whether parameter groups (dicts with ``"params"``) are accepted; their tensors are
            concatenated in order.
        duplicates: ``"raise"`` (``ValueError``) or ``"keep"`` for a tensor listed twice.

    Raises:
        TypeError: not a tensor or an ordered iterable of tensors / pairs / groups.
        ValueError: a tensor listed twice (with ``duplicates="raise"``).
    """
    check_ordered(params, owner)
    if isinstance(params, Tensor):
        return ParamList([params], [None])
    if isinstance(params, Mapping) or isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(
            f"{owner} takes a tensor or an iterable of tensors, (name, tensor) pairs"
            f"{' or parameter groups' if groups else ''}, not {type(params).__name__}"
        )
    tensors: list[Tensor] = []
    names: list[str | None] = []
    for item in params:
        if isinstance(item, Mapping):
            if not groups:
                raise TypeError(f"{owner} takes tensors or (name, tensor) pairs, not parameter groups")
            if "params" not in item:
                raise TypeError("a parameter group must be a dict with a 'params' entry")
            inner = parse_params(item["params"], owner, duplicates="keep")
            tensors += inner.tensors
            names += inner.names
            continue
        name = None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, item = item
        if not isinstance(item, Tensor):
            raise TypeError(f"{owner} parameters must be tensors, got {type(item).__name__}")
        tensors.append(item)
        names.append(name)
    if duplicates == "raise":
        seen: set[int] = set()
        for i, t in enumerate(tensors):
            if id(t) in seen:
                raise ValueError(f"{ParamList(tensors, names).describe(i)} is listed twice in the {owner}")
            seen.add(id(t))
    return ParamList(tensors, names)
