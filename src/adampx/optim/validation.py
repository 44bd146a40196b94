"""The checks of the optimizers' arguments: a ``ValueError`` naming the argument and the
allowed range, raised at construction (and when a param group is added or loaded)."""

from __future__ import annotations

from numbers import Real
from typing import Any

from torch import Tensor

from adampx.algorithm.caution import check_unsharded

__all__ = ["check_flag", "check_fused", "check_range", "check_shared", "lr_value"]


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


def check_fused(group: dict[str, Any]) -> None:
    """``fused=True``: not with foreach or capturable, and a kernel that builds.

    Params on another device than the CPU are refused at ``step()``, not here, so that a
    model built on the meta device and moved with ``to_empty`` can construct its optimizer
    first (as with torch's optimizers). The kernel is built here when a param is on the CPU,
    so that a build error surfaces at construction and the first step pays no build time.
    """
    if group["foreach"]:
        raise ValueError("Invalid fused=True with foreach=True: choose one implementation")
    if group["capturable"]:
        raise ValueError(
            "Invalid fused=True with capturable=True: the fused kernel runs on the CPU, "
            "which CUDA graphs do not capture"
        )
    if any(p.device.type == "cpu" for p in group["params"]):
        from adampx.backends import cpu_kernel

        cpu_kernel.load()  # build errors surface here, and the first step pays no build time


def check_shared(group: dict[str, Any]) -> None:
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
        check_fused(group)
    if group.get("caution"):
        check_unsharded(group["params"])  # FSDP2's shards: the mask needs the whole tensor
    if group["capturable"] and group["track_statistics"]:
        raise ValueError(
            "capturable=True cannot record statistics: track_statistics keeps a host-side "
            "step counter that a CUDA graph would not replay"
        )
