"""One description of a param group's step, computed once per group and step.

:class:`Step` holds an AdamP or SGDP group's hyperparameters and what every backend derives
from them: the decay amount ``a`` (``lr·λ`` for AdamP, ``lr·λ/(1−μ)`` for SGDP, see
``docs/algorithm.md``), the decay factor ``1 − a·r``, Adam's step sizes and bias corrections,
SGDP's direction dots. Each formula is written here once; backends take a :class:`Step`
and never recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from adampx.algorithm.projection import Decisions, is_projectable, keep_factor

__all__ = ["Step", "lr_float"]


def lr_float(lr: float | Tensor) -> float:
    """A learning rate given as a Python float or a one-element CPU tensor (no device to
    wait for), as a Python float: backends that compute on the host use it in double, as
    torch's fused kernels do."""
    return lr.item() if isinstance(lr, Tensor) else lr


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """An AdamP or SGDP group's step (see the optimizers for the hyperparameters), made with
    keywords: ``Step(optimizer="adamp", lr=..., beta1=..., ...)``.

    ``lr`` is a Python float or a one-element tensor (kept as a 0-d tensor); ``decay``, the
    decay amount ``a``, is computed from it when the step is made (a tensor where ``lr`` is
    one); ``decisions``, where given, receives the test's decision for every tested param.
    AdamP's ``beta1``/``beta2`` and SGDP's ``momentum``/``dampening`` are 0 for the other;
    ``caution`` masks the update (:mod:`adampx.algorithm.caution`). ``grad_scale`` and
    ``found_inf`` are a ``torch.amp.GradScaler``'s (as torch's fused optimizers take them):
    the gradients are divided by ``grad_scale`` (in place) and nothing changes where
    ``found_inf`` is not 0.
    """

    optimizer: str  # "adamp" or "sgdp"
    lr: float | Tensor
    eps: float
    weight_decay: float
    delta: float
    wd_ratio: float
    nesterov: bool
    maximize: bool
    projection: bool
    caution: bool = False
    beta1: float = 0.0
    beta2: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    decisions: Decisions | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    decay: float | Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamp", "sgdp"):
            raise ValueError(f"Step.optimizer must be 'adamp' or 'sgdp', got {self.optimizer!r}")
        lr = self.lr.reshape(()) if isinstance(self.lr, Tensor) else self.lr
        object.__setattr__(self, "lr", lr)  # frozen: set once, here
        object.__setattr__(self, "decay", self.decay_amount(lr))

    # ------------------------------------------------------------ both optimizers

    @property
    def amp(self) -> bool:
        """Whether a GradScaler's scale or inf flag comes with the step."""
        return self.grad_scale is not None or self.found_inf is not None

    def decay_amount(self, lr: float | Tensor) -> float | Tensor:
        """``a = lr·λ`` (AdamP) or ``lr·λ/(1−μ)`` (SGDP: its decay is scaled by ``1/(1−μ)``).

        Computed in double, also from an lr tensor of lower precision (promoted where the
        device has float64): every backend then decays by the same factor, that of torch's
        fused kernels and of the reference package given ``lr = float(lr)``."""
        if isinstance(lr, Tensor) and lr.dtype != torch.float64 and lr.device.type != "mps":
            lr = lr.double()
        if self.optimizer == "sgdp":
            return lr * self.weight_decay / (1 - self.momentum)
        return lr * self.weight_decay

    def decay_value(self) -> float:
        """The decay amount as a Python float, from ``lr`` read on the host (CPU backends)."""
        return self.decay_amount(lr_float(self.lr))  # type: ignore[return-value]

    def keep(self, ratio: float | Tensor, decay: float | Tensor | None = None) -> float | Tensor:
        """The decay factor ``1 − a·r`` (``decay``: ``a`` if not :attr:`decay`)."""
        return keep_factor(self.decay if decay is None else decay, ratio)

    def tested(self, param: Tensor) -> bool:
        """Whether the scale-invariance test applies to ``param`` in this group."""
        return self.projection and is_projectable(param)

    def split(self, params: list[Tensor]) -> tuple[list[int], list[int]]:
        """Indices of the params the test applies to, and of the others."""
        tested: list[int] = []
        untested: list[int] = []
        for k, param in enumerate(params):
            (tested if self.tested(param) else untested).append(k)
        return tested, untested

    # ------------------------------------------------------------ AdamP

    def adam_corrections(
        self, steps: list[Tensor], dtype: torch.dtype
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per step counter ``t`` (already incremented), the step size ``lr / (1 − β1^t)``
        and ``sqrt(1 − β2^t)``, as tensors of ``dtype``."""
        ts = steps if dtype == torch.float32 else [s.to(dtype) for s in steps]
        bias_correction1 = torch._foreach_pow(self.beta1, ts)
        torch._foreach_neg_(bias_correction1)
        torch._foreach_add_(bias_correction1, 1)
        sqrt_bias_correction2 = torch._foreach_pow(self.beta2, ts)
        torch._foreach_neg_(sqrt_bias_correction2)
        torch._foreach_add_(sqrt_bias_correction2, 1)
        torch._foreach_sqrt_(sqrt_bias_correction2)
        step_sizes = torch._foreach_reciprocal(bias_correction1)
        torch._foreach_mul_(step_sizes, self.lr)
        return list(step_sizes), list(sqrt_bias_correction2)

    # ------------------------------------------------------------ SGDP

    def direction_dots(self, pb: Tensor, gp: Tensor) -> Tensor:
        """SGDP's ``p·d`` (per row, or summed) from ``p·b`` (``b`` the momentum before the
        step; overwritten) and ``p·g``, by linearity, without touching ``d``:
        ``p·b_new = μ·(p·b) + (1−τ)·(p·g)``, and with nesterov ``p·d = p·g + μ·(p·b_new)``,
        ``g`` being the gradient the step descends along (negated with ``maximize``). The
        row-sum backends use it to project before torch's fused SGD kernel computes ``d``."""
        if self.maximize:
            gp = -gp
        d = pb.mul_(self.momentum).add_(gp, alpha=1 - self.dampening)
        return torch.add(gp, d, alpha=self.momentum) if self.nesterov else d
