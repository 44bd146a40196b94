"""Loading checkpoints: this package's, the reference ``adamp`` package's and torch's.

A mixin of :class:`adampx.optim.base.ProjectedOptimizer`: ``load_state_dict`` as torch's
(hooks included), with the conversions the other packages' checkpoints need (``step`` as a
Python int, half params' moments kept float32, foreign group keys dropped) and clear errors
for state this optimizer cannot continue (AMSGrad, coupled weight decay).
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from adampx.util.tensors import state_dtype, step_tensor

__all__ = ["FOREIGN_GROUP_KEYS", "CheckpointLoading"]

# Group keys that other optimizers write into their checkpoints and that mean nothing here.
FOREIGN_GROUP_KEYS = ("amsgrad", "fused", "capturable", "differentiable", "decoupled_weight_decay")


class CheckpointLoading(Optimizer):
    """``load_state_dict`` for checkpoints of this package, of ``adamp`` and of torch."""

    _state_keys: ClassVar[tuple[str, ...]]
    _implementation_flags: ClassVar[tuple[str, ...]]

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

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
        merged = {k: v for k, v in saved.items() if k not in FOREIGN_GROUP_KEYS}
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
