"""Thin ``torch.optim.Optimizer`` wrappers around transforms.

:class:`TransformOptimizer` owns nothing but bookkeeping: at every ``step`` it builds the
transform of each parameter group from the group's current hyperparameters, hands it a copy of the
gradients of the parameters that have one, and adds the resulting updates to the parameters. The
math lives in :mod:`steadygrad.transforms`.

State layout
    Per-parameter state lives in ``self.state[p]`` under the field names of the transforms' state
    named tuples, which are torch.optim's keys (``step``, ``sum``, ``square_avg``, ``exp_avg``, ...):
    ``state_dict()`` has torch's layout and checkpoints move between the two libraries (the key
    rules are in :mod:`steadygrad.core.state`). State shared by all the parameters of a group (a
    single tensor in a state tuple) lives in ``self.state["group<i>"]``. State is created when a
    parameter first has a gradient, as in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..core.state import run_transform, state_keys
from ..core.tensorlist import as_real, split_like, working_copy
from ..core.transform import Transform, hyperparameters, state_leaves
from ..kernels.fused import FusedStep

__all__ = ["Transformed", "TransformOptimizer", "check_betas", "check_hyperparameter"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(value).__name__}")
    return float(value)


def check_hyperparameter(
    name: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = True
) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``low <= value < high`` (bounds as given by
    ``low_open``/``high_open``). NaN and infinities always fail."""
    v = _as_float(name, value)
    ok_low = low < v if low_open else low <= v
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high and math.isfinite(v)):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {v!r}; expected a finite value in {lo}{low}, {high}{hi}")


def check_betas(betas: Any) -> tuple[Any, Any]:
    """Validates Adam's ``betas`` (two numbers, or two 1-element tensors, each in [0, 1)) and
    returns them with tensors reshaped to 0-d, as torch does."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        check_hyperparameter(f"betas[{i}]", b, 0.0, 1.0)
    return tuple(b.reshape(()) if isinstance(b, Tensor) else b for b in betas)  # type: ignore[return-value]


def _refuse_unordered(params: Any) -> None:
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of "
            "tensors in sets changes between runs; use a list"
        )


class TransformOptimizer(Optimizer):
    """Base of the steadygrad optimizers: a ``torch.optim.Optimizer`` that runs a transform.

    Subclasses implement :meth:`build_transform`, which turns one parameter group (a dict of
    hyperparameters) into a transform; it is called at every step so that schedulers and
    ``param_groups`` edits take effect at once. Recognised group keys: ``maximize`` (negate the
    gradients first) and ``capturable`` (keep ``step`` counters on the parameter's device).

    ``clip`` (a transform, e.g. ``sg.clip_by_norm(1.0)`` or ``sg.zclip()``) runs first at every
    step, once over the gradients of all parameter groups together (so a global norm is the norm
    of all of them, as with ``clip_grad_norm_(model.parameters())``), on the optimizer's copy of
    the gradients: ``.grad`` is left as it is. Its per-parameter state is stored under keys
    ``"clip.<name>"`` next to the optimizer's own, its shared state (e.g. ``fraction_clipped``) in
    ``self.state["clip"]``; both travel in ``state_dict()``.

    ``fused=True`` runs the same transforms compiled over flat buffers (see
    :mod:`steadygrad.kernels.fused`): after the first step the parameters, gradients and state
    are views into one contiguous buffer per group and dtype.

    Differences from torch.optim: a parameter listed twice raises ``ValueError`` (torch warns);
    sparse gradients raise ``RuntimeError``; ``differentiable=True`` is refused.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any], clip: Transform | None = None) -> None:
        if clip is not None and not isinstance(clip, Transform):
            raise TypeError(
                f"clip must be a steadygrad Transform (e.g. sg.clip_by_norm(1.0)), not {type(clip).__name__}"
            )
        self.clip = clip
        _refuse_unordered(params)
        if defaults.get("differentiable", False):
            raise ValueError("differentiable=True is not supported by steadygrad optimizers")
        self._fused = None
        super().__init__(params, defaults)
        if defaults.get("fused", None):
            self._fused = FusedStep(self)

    def build_transform(self, group: Mapping[str, Any]) -> Transform:
        """The transform for one parameter group at this step."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        else:
            _refuse_unordered(params)
            params = list(params)
        seen: set[int] = set()
        for p in params:
            if isinstance(p, tuple):  # (name, tensor) pairs
                p = p[1]
            if isinstance(p, Tensor) and id(p) in seen:
                raise ValueError(f"a parameter (shape {tuple(p.shape)}) is listed twice in one parameter group")
            seen.add(id(p))
        param_group["params"] = params
        super().add_param_group(param_group)
        if getattr(self, "_fused", None) is not None:
            self._fused.invalidate()

    # Attributes that are not hyperparameters (transforms are functions, not state_dict material)
    # but must survive copy.deepcopy and pickling, which torch's __getstate__ would drop.
    _kept_attributes: tuple[str, ...] = ("clip", "_fused")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._kept_attributes})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping the dtype of state that steadygrad stores wider
        than the parameter.

        torch casts every loaded state tensor except ``step`` to its parameter's dtype. That is
        right for torch's own keys, which steadygrad creates in the parameter's dtype too, but it
        would round a clipper's float32 second moment of a bfloat16 parameter (or its step count)
        to 16 bits. Those entries are cast again, from the saved values, to the dtype the
        transforms create.
        """
        super().load_state_dict(state_dict)
        if self._fused is not None:
            self._fused.invalidate()
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            parts = [(self.build_transform(group), "")]
            if self.clip is not None:
                parts.append((self.clip, "clip."))
            for index, p in zip(saved_group["params"], group["params"]):
                values = saved.get(index)
                if not values:
                    continue
                meta = [p.detach().to("meta")]
                for transform, prefix in parts:
                    template = transform.init(meta)
                    leaves = [leaf for _, leaf in state_leaves(template)]
                    for k in state_keys(template, prefix):
                        if not k.per_param or k.key not in values or k.key not in self.state[p]:
                            continue
                        dtype = getattr(leaves[k.leaf], k.field)[0].dtype
                        if self.state[p][k.key].dtype != dtype:
                            device = self.state[p][k.key].device
                            self.state[p][k.key] = values[k.key].to(device=device, dtype=dtype, copy=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)

    def _clip(self, params: list[list[Tensor]], updates: list[list[Tensor]]) -> None:
        """Runs ``clip`` once over the updates of all groups (a global norm is over all of them),
        in place; its state is stored under ``"clip."`` keys and in ``self.state["clip"]``."""
        flat_params = [p for group in params for p in group]
        flat = [u for group in updates for u in group]
        clipped = run_transform(self.state, self.clip, flat_params, flat, "clip", prefix="clip.")
        for group, part in zip(updates, split_like(clipped, updates)):
            group[:] = part

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, except that with ``fused=True`` the gradients of the flat parameters are
        zeroed in their buffer and stay views into it (``set_to_none`` does not apply to them:
        autograd then accumulates into the buffer, which the fused step reads)."""
        super().zero_grad(set_to_none)
        if self._fused is not None:
            self._fused.zero_grad()

    # ---- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fused is not None and self._fused.step():
            return loss
        work = []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use torch.optim.Adagrad or torch.optim.SparseAdam for sparse embeddings"
                    )
            updates = working_copy([p.grad for p in params], group.get("maximize", False))
            work.append((index, group, params, updates))
        if self.clip is not None and work:
            self._clip([params for _, _, params, _ in work], [updates for *_, updates in work])
        for index, group, params, updates in work:
            with hyperparameters(group):
                updates = run_transform(
                    self.state,
                    self.build_transform(group),
                    params,
                    updates,
                    f"group{index}",
                    step_on_device=group.get("capturable", False),
                )
            torch._foreach_add_([as_real(p) for p in params], updates)
        return loss


class Transformed(TransformOptimizer):
    """Any transform as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        transform: the chain that maps gradients to updates; the updates are *added* to the
            parameters, so end it with :func:`steadygrad.scale_by_lr` (which reads this
            optimizer's ``lr`` at every step) or another negative scaling.
        lr: the learning rate stored in each parameter group (for schedulers and scale_by_lr).
        maximize: negate the gradients before the transform.
        clip: a clipping transform run first, over all parameter groups together (see
            :class:`TransformOptimizer`).
        **defaults: further hyperparameters stored in each parameter group.

    Example::

        opt = sg.optim.Transformed(
            model.parameters(),
            sg.chain(sg.scale_by_adam(), sg.add_decayed_weights(1e-2), sg.scale_by_lr()),
            lr=1e-3,
        )
    """

    def __init__(
        self,
        params: ParamsT,
        transform: Transform,
        lr: float | Tensor = 1e-3,
        *,
        maximize: bool = False,
        clip: Transform | None = None,
        **defaults: Any,
    ) -> None:
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a steadygrad Transform, got {type(transform).__name__}")
        check_hyperparameter("lr", lr)
        self.transform = transform
        super().__init__(params, dict(lr=lr, maximize=maximize, **defaults), clip=clip)

    _kept_attributes = ("clip", "_fused", "transform")

    def build_transform(self, group: Mapping[str, Any]) -> Transform:
        return self.transform
