"""One range checker for every hyperparameter: factories, optimizer constructors, parameter groups.

Messages start as torch.optim's do (``Invalid learning rate: -1.0``), then say what was expected
and where (``in parameter group 1``). NaN and infinities are refused wherever a finite value is
meant, also where torch silently accepts them (a NaN learning rate turns every parameter into
NaN). A tensor is read on the host once, when it is checked (a device sync for accelerator
tensors, as torch's own checks); a :class:`~steadygrad.core.transform.Hyper` reference is
checked where its value lives (the parameter group), not in the transform.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .transform import Hyper

__all__ = ["Betas", "Flag", "Optional", "Range", "check_betas", "check_bool", "check_group", "check_int", "check_range"]

# torch.optim's wording of its error messages, by option.
_TORCH_NAMES = {
    "lr": "learning rate",
    "eps": "epsilon value",
    "weight_decay": "weight_decay value",
    "lr_decay": "lr_decay value",
    "initial_accumulator_value": "initial_accumulator_value value",
    "momentum": "momentum value",
    "alpha": "alpha value",
    "betas[0]": "beta parameter at index 0",
    "betas[1]": "beta parameter at index 1",
}


def _where(group: int | None) -> str:
    return "" if group is None else f" in parameter group {group}"


def _number(name: str, value: Any, group: int | None) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(
                f"Invalid {_TORCH_NAMES.get(name, name + ' value')}: Tensor {name} must be 1-element and hold one "
                f"real number, got shape {tuple(value.shape)} and dtype {value.dtype}{_where(group)}"
            )
        return float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Invalid {_TORCH_NAMES.get(name, name + ' value')}: {value!r}; {name} must be a number or a "
            f"1-element tensor{_where(group)}"
        )
    return float(value)


def check_range(
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = True,
    finite: bool = True,
    group: int | None = None,
) -> Any:
    """Checks ``low <= value < high`` (the bounds' openness as given) and returns ``value``, a
    1-element tensor reshaped to 0-d. ``Hyper`` references pass unchecked.

    Raises:
        ValueError: out of range or NaN (and infinite unless ``finite=False``), or not a number
            or a 1-element tensor, naming the option, the value and the group.
    """
    if isinstance(value, Hyper):
        return value
    v = _number(name, value, group)
    below_high = v < high if high_open else v <= high
    if not finite and v == math.inf == high:
        below_high = True  # an infinite threshold: nothing is clipped
    ok = (low < v if low_open else low <= v) and below_high
    if not ok or math.isnan(v) or (finite and math.isinf(v)):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        kind = "a finite value" if finite else "a value"
        raise ValueError(
            f"Invalid {_TORCH_NAMES.get(name, name + ' value')}: {v!r}; {name} must be {kind} in "
            f"{lo}{low}, {high}{hi}{_where(group)}"
        )
    return value.reshape(()) if isinstance(value, Tensor) else value


def check_int(name: str, value: Any, minimum: int, *, group: int | None = None) -> int:
    """Checks that ``value`` is an ``int >= minimum`` (not a bool) and returns it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be an int >= {minimum}{_where(group)}")
    return int(value)


def check_bool(name: str, value: Any, *, group: int | None = None) -> bool:
    """Checks that ``value`` is a bool (structural switches such as ``amsgrad``)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be True or False{_where(group)}")
    return value


def check_betas(betas: Any, *, group: int | None = None) -> Any:
    """Validates Adam's ``betas`` (two numbers, or two 1-element tensors, each in [0, 1)) and
    returns them with tensors reshaped to 0-d, as torch does."""
    if isinstance(betas, Hyper):
        return betas
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; betas must be a pair (beta1, beta2){_where(group)}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError(f"betas must be either both floats or both Tensors{_where(group)}")
    return tuple(check_range(f"betas[{i}]", b, 0.0, 1.0, group=group) for i, b in enumerate(betas))


# ---- declarative specs for parameter groups ------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A number in a range (see :func:`check_range`)."""

    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def check(self, name: str, value: Any, group: int | None) -> Any:
        return check_range(
            name, value, self.low, self.high, low_open=self.low_open, high_open=self.high_open, group=group
        )


@dataclass(frozen=True)
class Betas:
    """Adam's ``(beta1, beta2)``."""

    def check(self, name: str, value: Any, group: int | None) -> Any:
        return check_betas(value, group=group)


@dataclass(frozen=True)
class Flag:
    """A bool."""

    def check(self, name: str, value: Any, group: int | None) -> Any:
        return check_bool(name, value, group=group)


@dataclass(frozen=True)
class Optional:
    """``None`` or what ``inner`` accepts."""

    inner: Any

    def check(self, name: str, value: Any, group: int | None) -> Any:
        return None if value is None else self.inner.check(name, value, group)


def check_group(spec: Mapping[str, Any], group: Mapping[str, Any], index: int | None) -> None:
    """Checks every option of ``spec`` that the parameter group ``group`` holds (the group is left
    as it is: a 1-element tensor keeps its shape, as in torch)."""
    for name, rule in spec.items():
        if name in group:
            rule.check(name, group[name], index)
