"""The projection for any optimizer: :class:`Projected` wraps a constructed torch optimizer.

The paper's fix is not specific to Adam or SGD: whatever a momentum optimizer's update
``Δ`` is, removing its radial part on scale-invariant weights keeps their norms from
growing. ``Projected(optimizer)`` steps the wrapped optimizer, then, for every tested
tensor (two or more dimensions, projection on for its group), with ``p`` the weight before
the step, ``g`` its gradient and ``Δ = p_after − p``::

    test    the cosine test of docs/algorithm.md on p and g (channel view, then layer view)
    Δ ← Δ − c·p          where the test passes, c = p·Δ / (‖p‖ + eps)² per row or for
                         the whole tensor (the radial part of Δ along p̂ = p / (‖p‖ + eps))
    p ← p·(1 − lr·λ·r) + Δ     r = wd_ratio where the test passed, else 1

An untested tensor (one dimension, or its group's projection off) gets only the decay,
``p ← p·(1 − lr·λ)``, applied before the wrapped step so that no copy of it is kept (the
wrapped optimizer's update must then not depend on the weight's value: true of the
optimizers this is for, run without weight decay of their own, which is why a wrapped
optimizer with non-zero ``weight_decay`` is refused unless ``allow_weight_decay=True``).

The test reads ``p`` and ``g`` before the wrapped step (some optimizers overwrite the
gradient: torch's multi-tensor SGD with nesterov does); only its row sums are kept.

Memory: one copy of the tested tensors, taken before the wrapped step and freed after it
(the update needs ``p`` before the step, and the wrapped optimizer does not keep it);
``Δ`` is formed in the parameters' own memory.

Exact where the math coincides (the tests check it in float64): ``Projected(AdamW(...,
weight_decay=0), weight_decay=λ)`` is ``AdamP(..., weight_decay=λ)``, and
``Projected(SGD(..., momentum=μ), weight_decay=λ/(1−μ))`` is ``SGDP(..., weight_decay=λ)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from adampx.algorithm.projection import RowStatistics, project_with_, row_statistics
from adampx.algorithm.spec import Step
from adampx.optim.flattened import FlatteningCheck
from adampx.optim.validation import check_flag, check_range
from adampx.util.tensors import compute_view, write_back_

__all__ = ["Projected"]

# The wrapped optimizer's groups hold these keys besides its own: prefixed, so that they
# cannot collide with its ``weight_decay`` or ``eps``.
KEYS = ("projected", "projected_delta", "projected_wd_ratio", "projected_weight_decay",
        "projected_eps")  # fmt: skip


class Projected(torch.optim.Optimizer):
    """Any torch optimizer with AdamP's projection and decoupled weight decay.

    Args:
        optimizer: a constructed ``torch.optim.Optimizer`` (not a :class:`Projected`, AdamP
            or SGDP, which project already). ``Projected`` shares its ``param_groups`` and
            ``state``: LR schedulers, ``GradScaler``, ``state_dict()`` and checkpoints work
            as with it, and its groups may set the keys below per group.
        delta: threshold ``δ`` of the scale-invariance test (group key ``projected_delta``),
            >= 0, default 0.1.
        wd_ratio: weight-decay multiplier for projected tensors (``projected_wd_ratio``), in
            [0, 1], default 0.1.
        weight_decay: decoupled weight decay ``λ`` (``projected_weight_decay``), applied as
            ``p·(1 − lr·λ·r)`` with the group's ``lr``, >= 0, default 0.
        eps: the ``eps`` of the test and of ``(‖p‖ + eps)²`` (``projected_eps``), > 0,
            default 1e-8.
        projection: False in a group (key ``projected``) never projects its tensors; they
            still take the weight decay.
        allow_weight_decay: accept a wrapped optimizer whose groups have non-zero
            ``weight_decay`` (its decay then acts on top of this one, and the projection
            removes the radial part of its decay too). Default False: refused.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer.
        ValueError: it already projects, its step needs a closure (LBFGS: it evaluates the
            gradient again during the step), a group has no numeric ``lr`` (Adafactor's
            relative step size), a group of it has non-zero ``weight_decay`` (see above), or
            a hyperparameter is out of range.
        RuntimeError: at ``step()``, a tested param has a sparse gradient (nothing is
            changed).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        projection: bool = True,
        allow_weight_decay: bool = False,
    ) -> None:
        from adampx.optim.base import ProjectedOptimizer  # AdamP's and SGDP's base

        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Projected wraps a constructed torch.optim.Optimizer, got {type(optimizer)!r}"
            )
        if isinstance(optimizer, (Projected, ProjectedOptimizer)):
            raise ValueError(
                f"Projected cannot wrap {type(optimizer).__name__}: it projects already"
            )
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise ValueError(
                f"Projected cannot wrap {type(optimizer).__name__}: its step needs a closure "
                "(it evaluates the gradient again during the step, while the projection's "
                "test reads it once, before the step)"
            )
        check_flag("allow_weight_decay", allow_weight_decay)
        self.allow_weight_decay = allow_weight_decay
        defaults = dict(
            projected=projection,
            projected_delta=delta,
            projected_wd_ratio=wd_ratio,
            projected_weight_decay=weight_decay,
            projected_eps=eps,
        )
        # torch's constructor sets up the hooks and fills our keys into the wrapped
        # optimizer's group dicts (the same dicts); then both share one list and one state
        super().__init__(optimizer.param_groups, defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        # the wrapped optimizer's defaults too: schedulers look for "momentum" or "betas"
        self.defaults = {**optimizer.defaults, **defaults}
        for group in self.param_groups:
            self._check_group(group)
        self._flattening = FlatteningCheck("Projected", "projected")
        self._flattening.check(self.param_groups)

    def __repr__(self) -> str:
        return f"Projected({self.optimizer!r})"

    def _check_group(self, group: dict[str, Any]) -> None:
        """Fill the group's missing keys from the defaults and check them."""
        for key in KEYS:
            group.setdefault(key, self.defaults[key])
        lr = group.get("lr")
        numeric = (isinstance(lr, Real) and not isinstance(lr, bool)) or (
            isinstance(lr, Tensor) and lr.numel() == 1 and lr.is_floating_point()
        )
        if not numeric:
            raise ValueError(
                f"Projected needs a numeric lr in every param group (its weight decay is "
                f"lr·λ), got lr={group.get('lr')!r} (an Adafactor with a relative step size "
                "has none: give it relative_step=False and an lr)"
            )
        wrapped_decay = group.get("weight_decay", 0.0)
        if not self.allow_weight_decay and wrapped_decay not in (0, 0.0, None):
            raise ValueError(
                f"the wrapped {type(self.optimizer).__name__} has weight_decay="
                f"{wrapped_decay}: give the decay to Projected (weight_decay=...), which "
                "decouples it as AdamP does, and 0 to the optimizer, or pass "
                "allow_weight_decay=True to keep both"
            )
        check_flag("projected", group["projected"])
        check_range("projected_delta", group["projected_delta"], 0.0, float("inf"),
                    high_open=True)  # fmt: skip
        check_range("projected_wd_ratio", group["projected_wd_ratio"], 0.0, 1.0,
                    high_open=False)  # fmt: skip
        check_range("projected_weight_decay", group["projected_weight_decay"], 0.0,
                    float("inf"), high_open=True)  # fmt: skip
        check_range("projected_eps", group["projected_eps"], 0.0, float("inf"),
                    low_open=True, high_open=True)  # fmt: skip

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (its defaults) and to the projection (ours)."""
        if not hasattr(self, "optimizer"):  # torch's constructor, adopting the groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            self._flattening.check(self.param_groups)
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer (a checkpoint of it alone too: the projection's
        keys then come from the defaults), keeping the two sharing groups and state. The
        checkpoint's groups are checked first: one that is refused loads nothing. The load
        hooks registered on this object run as torch's optimizers run them."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        for saved in state_dict["param_groups"]:
            self._check_group(dict(saved))  # a copy: checked, not changed
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        for group in self.param_groups:
            self._check_group(group)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["optimizer"] = self.optimizer  # pickled with the same groups and state
        state["allow_weight_decay"] = self.allow_weight_decay
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self._flattening = FlatteningCheck("Projected", "projected")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Evaluate ``closure`` (if given) with gradients on, then the wrapped optimizer's
        step, then the projection and the weight decay (see the module doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every check before anything changes: a refused step leaves the weights as they were
        if not torch.compiler.is_compiling():
            self._flattening.check_if_replaced(self.param_groups)  # DeepSpeed's replacements
        work = []
        for group in self.param_groups:
            self._check_group(group)
            params = [p for p in group["params"] if p.grad is not None]
            step = _step_of(group)
            tested, untested = step.split(params)
            for k in tested:
                if params[k].grad.is_sparse:
                    raise RuntimeError(
                        f"Projected cannot test a param with a sparse gradient (shape "
                        f"{tuple(params[k].shape)}): its test needs dense row sums; give that "
                        "param its own optimizer, or projected=False in its group"
                    )
            work.append((step, params, tested, untested))
        pending: list[tuple[Step, list[Tensor], list[Tensor], list[RowStatistics]]] = []
        for step, params, tested, untested in work:
            if untested and step.weight_decay != 0:
                # no copy kept: the decay before the wrapped step (see the module doc)
                views = [compute_view(params[k]) for k in untested]
                torch._foreach_mul_(views, step.keep(1))
                for k, view in zip(untested, views, strict=True):
                    write_back_(params[k], view.detach())
            if tested:
                chosen = [params[k] for k in tested]
                before = [compute_view(p.detach()).clone() for p in chosen]
                # the gradient as the math sees it: float32 for half ones (their norms overflow)
                stats = [
                    row_statistics(b, compute_view(p.grad))
                    for b, p in zip(before, chosen, strict=True)
                ]
                pending.append((step, chosen, before, stats))
        if torch.compiler.is_compiling():
            # torch's optimizers break the graph around their step (to set the grad mode,
            # which is off here already): traced, the wrapped step runs undecorated, and
            # so without its own step hooks
            inspect.unwrap(type(self.optimizer).step)(self.optimizer)
        else:
            self.optimizer.step()
        for step, params, before, stats in pending:
            deltas = [compute_view(p.detach()) for p in params]  # a copy for half params
            torch._foreach_sub_(deltas, before)  # Δ, in the params' memory
            keep = []
            for b, delta, row_stats in zip(before, deltas, stats, strict=True):
                ratio, _ = project_with_(
                    b, delta, row_stats, delta=step.delta, wd_ratio=step.wd_ratio, eps=step.eps
                )
                keep.append(step.keep(ratio))
            if step.weight_decay != 0:
                torch._foreach_mul_(before, keep)  # type: ignore[arg-type]  # p·(1 − lr·λ·r)
            torch._foreach_add_(deltas, before)
            for p, new in zip(params, deltas, strict=True):
                write_back_(p.detach(), new)
        return loss


def _step_of(group: dict[str, Any]) -> Step:
    """The projection's :class:`Step` for a group: its test and its decay amount
    ``lr·λ``, in AdamP's terms."""
    return Step(
        optimizer="adamp",
        lr=group["lr"],
        eps=group["projected_eps"],
        weight_decay=group["projected_weight_decay"],
        delta=group["projected_delta"],
        wd_ratio=group["projected_wd_ratio"],
        nesterov=False,
        maximize=False,
        projection=group["projected"],
    )
