"""What AdamP and SGDP share: argument checks, state layout, checkpoint loading, closures.

The math lives in the functional steps (``adamp.py``, ``sgdp.py``) and in ``projection.py``;
this class only validates, keeps state and converts foreign checkpoints.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from itertools import chain
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from adampx._shared_step import Decisions
from adampx._tensors import Workspace, check_param, state_dtype, step_tensor
from adampx.statistics import StatisticsRecorder, TensorStatistics

# Group keys that other optimizers write into their checkpoints and that mean nothing here.
_FOREIGN_GROUP_KEYS = ("amsgrad", "fused", "capturable", "differentiable", "decoupled_weight_decay")


def lr_value(lr: Any) -> float:
    """Validate a learning rate (float or 1-element tensor) and return it as a float."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a tensor lr must have one element, got {lr.shape}")
        if lr.requires_grad:
            raise ValueError("Invalid lr: a tensor lr must not require grad")
        value = float(lr.detach().cpu())
    elif isinstance(lr, Real) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise ValueError(f"Invalid lr: expected a float or a 1-element tensor, got {lr!r}")
    if not value >= 0.0:
        raise ValueError(f"Invalid lr: {value} (must be >= 0)")
    return value


def check_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the given interval."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if not isinstance(value, Real) or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: expected a number in {interval}, got {value!r}")
    x = float(value)
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (above and below):
        raise ValueError(f"Invalid {name}: {value} (must be in {interval})")


def check_flag(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool (or None where allowed)."""
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"Invalid {name}: expected {allowed}, got {value!r}")


def _check_fused(group: dict[str, Any]) -> None:
    """``fused=True``: CPU params, not with foreach or capturable, and a kernel that builds."""
    if group["foreach"]:
        raise ValueError("Invalid fused=True with foreach=True: choose one implementation")
    if group["capturable"]:
        raise ValueError(
            "Invalid fused=True with capturable=True: the fused kernel runs on the CPU, "
            "which CUDA graphs do not capture"
        )
    devices = sorted({p.device.type for p in group["params"]} - {"cpu"})
    if devices:
        raise ValueError(
            f"Invalid fused=True for params on {', '.join(devices)}: the fused kernel runs on "
            "the CPU; on accelerators the default (multi-tensor) path is the fast one"
        )
    from adampx import fused

    fused.load()  # build errors surface here, and the first step pays no build time


class ProjectedOptimizer(Optimizer):
    """Base of :class:`~adampx.AdamP` and :class:`~adampx.SGDP`.

    ``step`` gathers each group's params that have a gradient and hands them to the
    subclass's ``_update`` (one functional call), recording statistics where a group asks.
    Subclasses define ``_state_keys`` (their per-param state), ``_implementation_flags``
    (group keys that select a code path or a tool, never taken from a checkpoint),
    ``_check_group``, ``_init_state`` and ``_update``.
    """

    _state_keys: ClassVar[tuple[str, ...]]
    _implementation_flags: ClassVar[tuple[str, ...]] = (
        "foreach",
        "fused",
        "capturable",
        "track_statistics",
    )

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._statistics = StatisticsRecorder()
        self._workspace = Workspace()  # scratch buffers of the CPU kernels, kept between steps
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first bad hyperparameter of ``group``."""
        raise NotImplementedError

    @staticmethod
    def _check_shared(group: dict[str, Any]) -> None:
        """The checks of the hyperparameters both optimizers have."""
        lr_value(group["lr"])
        check_range("eps", group["eps"], 0.0, float("inf"), low_open=True, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0, float("inf"), high_open=True)
        check_range("delta", group["delta"], 0.0, float("inf"), high_open=True)
        check_range("wd_ratio", group["wd_ratio"], 0.0, 1.0, high_open=False)
        for flag in ("maximize", "projection", "track_statistics", "capturable"):
            check_flag(flag, group[flag])
        check_flag("foreach", group["foreach"], allow_none=True)
        check_flag("fused", group["fused"], allow_none=True)
        if group["fused"]:
            _check_fused(group)
        if group["capturable"] and group["track_statistics"]:
            raise ValueError(
                "capturable=True cannot record statistics: track_statistics keeps a host-side "
                "step counter that a CUDA graph would not replay"
            )

    @staticmethod
    def _init_state(p: Tensor, state: dict[str, Any]) -> None:
        """Fill the empty state of ``p`` (first step)."""
        raise NotImplementedError

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        decisions: Decisions | None,
    ) -> None:
        """One functional call for the params of ``group`` that have a gradient."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss; called with grad enabled.

        Returns:
            The closure's loss, or None.
        """
        loss = self._evaluate(closure)
        if any(group["track_statistics"] for group in self.param_groups):
            self._statistics.start_step()
        else:
            self._statistics.clear()
        for index, group in enumerate(self.param_groups):
            params, grads, states = self._gather(group)
            if not params:
                continue
            if not group["track_statistics"]:
                self._update(group, params, grads, states, None)
                continue
            before = self._statistics.snapshot(params)
            decisions: Decisions = {}
            self._update(group, params, grads, states, decisions)
            self._statistics.record(group, index, params, before, decisions)
        return loss

    def statistics(self) -> list[TensorStatistics]:
        """Statistics of the last step, for groups with ``track_statistics=True``.

        One record per param that had a gradient (see :mod:`adampx.statistics`); reading
        copies the numbers to the host. Empty when no group tracks statistics.
        """
        return self._statistics.read()

    @torch._disable_dynamo
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters are validated like the constructor's."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay in the optimizer
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_statistics", StatisticsRecorder())
        self.__dict__.setdefault("_workspace", Workspace())
        for group in self.param_groups:
            for key, default in self.defaults.items():
                # torch adds defaults["differentiable"]; "fused" and "capturable" are ours
                if key not in _FOREIGN_GROUP_KEYS or key in self._implementation_flags:
                    group.setdefault(key, default)

    def _gather(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """Params of ``group`` that have a gradient, their gradients and states.

        An empty state is filled by ``_init_state``. Params with ``grad is None`` are skipped
        and keep their state untouched (a frozen param resumes where it stopped).
        """
        params, grads, states = [], [], []
        name = type(self).__name__
        for p in group["params"]:
            if p.grad is None:
                continue
            check_param(p, name)
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state)
            params.append(p)
            grads.append(p.grad)
            states.append(state)
        return params, grads, states

    @staticmethod
    def _evaluate(closure: Callable[[], Any] | None) -> Any:
        """Evaluate ``closure`` with gradients enabled, as torch's optimizers do."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # ------------------------------------------------------------------ checkpoints

    def _load_param_state(self, param: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        """Copy one param's saved state onto ``param``'s device, in the state dtype.

        ``step`` becomes a 0-d float32 tensor on the device (the reference package stores a
        Python int, torch a CPU tensor); half params keep float32 moments.
        """
        if "max_exp_avg_sq" in saved:
            raise ValueError(
                f"cannot load AMSGrad state ('max_exp_avg_sq') into {type(self).__name__}: "
                "it has no AMSGrad variant; save the checkpoint with amsgrad=False"
            )
        state: dict[str, Any] = {}
        for key, value in saved.items():
            if key == "step":
                step = float(value.detach().cpu()) if isinstance(value, Tensor) else float(value)
                state[key] = step_tensor(param, step)
            elif isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
                state[key] = value.to(
                    device=param.device, dtype=state_dtype(param), copy=True
                ).clone(memory_format=torch.preserve_format)
            elif isinstance(value, Tensor):
                state[key] = value.to(device=param.device, copy=True)
            else:
                state[key] = deepcopy(value)
        missing = [k for k in self._state_keys if k not in state]
        if missing and state:
            raise ValueError(
                f"state of a param of shape {tuple(param.shape)} lacks {missing}: "
                f"not a checkpoint of {type(self).__name__} or a compatible optimizer"
            )
        return state

    def _merge_group(self, current: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        """The group after loading: saved hyperparameters, the rest as constructed."""
        if saved.get("amsgrad", False):
            raise ValueError(
                f"cannot load a checkpoint with amsgrad=True into {type(self).__name__}: "
                "it has no AMSGrad variant"
            )
        if saved.get("decoupled_weight_decay", True) is False and saved.get("weight_decay", 0):
            raise ValueError(
                f"cannot load a checkpoint with L2 (coupled) weight decay into "
                f"{type(self).__name__}, whose weight decay is decoupled (AdamW-style)"
            )
        merged = {k: v for k, v in saved.items() if k not in _FOREIGN_GROUP_KEYS}
        for key, value in current.items():
            merged.setdefault(key, value)
        for flag in self._implementation_flags:
            merged[flag] = current[flag]
        merged["params"] = current["params"]
        if "param_names" in current and "param_names" not in saved:
            merged["param_names"] = current["param_names"]
        self._check_group(merged)
        return merged

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class, of the reference ``adamp`` package or of torch.

        Works like :meth:`torch.optim.Optimizer.load_state_dict` (hooks included), with
        these differences: state tensors are copied (never aliased to ``state_dict``); the
        moments of float16/bfloat16 params stay float32; ``step`` may be an int (reference
        package) or a tensor and lands on the param's device; hyperparameters the checkpoint
        lacks come from the constructor and implementation flags (``foreach``) stay as
        constructed. AMSGrad state and coupled (L2) weight decay raise ``ValueError``.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result

        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer has {len(groups)}"
            )
        for i, (g, s) in enumerate(zip(groups, saved_groups, strict=True)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(s['params'])} params, "
                    f"the optimizer's has {len(g['params'])}"
                )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
                strict=True,
            )
        )
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key in id_map:
                param = id_map[key]
                state[param] = self._load_param_state(param, value)
            else:
                state[key] = value
        param_groups = [self._merge_group(g, s) for g, s in zip(groups, saved_groups, strict=True)]
        self.__setstate__({"state": state, "param_groups": param_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
