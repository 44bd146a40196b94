"""What AdamP and SGDP share: gathering each group's tensors, the step, statistics.

The math lives in :mod:`adampx.algorithm`, the implementations in :mod:`adampx.backends`;
this class validates (:mod:`.validation`), refuses or warns about parameters that an engine
flattened (:mod:`.flattened`), keeps state, loads checkpoints (:mod:`.checkpoint`) and makes
one functional call per param group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from adampx.algorithm.projection import Decisions
from adampx.backends import plan
from adampx.optim.checkpoint import FOREIGN_GROUP_KEYS, CheckpointLoading
from adampx.optim.flattened import FlatteningCheck
from adampx.tools.statistics import StatisticsRecorder, TensorStatistics
from adampx.util.tensors import check_param
from adampx.util.workspace import Workspace


class ProjectedOptimizer(CheckpointLoading):
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
        self._workspace = Workspace()  # the backends' scratch buffers, kept between steps
        self._flattening: FlatteningCheck | None = None  # set once every group is in
        super().__init__(params, defaults)
        self._flattening = FlatteningCheck(type(self).__name__, "projection")
        self._flattening.check(self.param_groups)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first bad hyperparameter of ``group``."""
        raise NotImplementedError

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

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """``torch.amp.GradScaler``'s protocol for fused optimizers: when True, the scaler
        neither unscales the gradients nor reads its inf flag on the host; it sets
        ``grad_scale`` and ``found_inf`` on the optimizer and calls :meth:`step`, which
        unscales and skips on the device. True where the step's tensors go to the
        ``triton`` kernels (:func:`adampx.backends.plan.takes_grad_scaler`)."""
        return plan.takes_grad_scaler(self.param_groups)

    def _grad_scaler(self) -> dict[str, Tensor | None]:
        """The GradScaler's ``grad_scale`` and ``found_inf`` set for this step (or None)."""
        return {
            "grad_scale": getattr(self, "grad_scale", None),
            "found_inf": getattr(self, "found_inf", None),
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss; called with grad enabled.

        Returns:
            The closure's loss, or None.
        """
        loss = self._evaluate(closure)
        if self._flattening is not None and not torch.compiler.is_compiling():
            self._flattening.check_if_replaced(self.param_groups)  # DeepSpeed's replacements
        if not torch.compiler.is_compiling():  # (a counter the compiler would guard on)
            self._workspace.start_step()
        tracking = any(group["track_statistics"] for group in self.param_groups)
        found_inf = getattr(self, "found_inf", None)
        if tracking and found_inf is not None and found_inf.item() != 0:
            # a GradScaler step to skip: the statistics read the host anyway
            self._statistics.clear()
            return loss
        if tracking:
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

        One record per param that had a gradient (see :mod:`adampx.tools.statistics`); reading
        copies the numbers to the host. Empty when no group tracks statistics.
        """
        return self._statistics.read()

    @torch._disable_dynamo
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters are validated like the constructor's."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            if self._flattening is not None:  # after construction: the groups are all in
                self._flattening.check(self.param_groups)
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay in the optimizer
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_statistics", StatisticsRecorder())
        self.__dict__.setdefault("_workspace", Workspace())
        self.__dict__.setdefault("_flattening", FlatteningCheck(type(self).__name__, "projection"))
        for group in self.param_groups:
            for key, default in self.defaults.items():
                # torch adds defaults["differentiable"]; "fused" and "capturable" are ours
                if key not in FOREIGN_GROUP_KEYS or key in self._implementation_flags:
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
