"""Parameters that a training engine flattened: an error for FSDP1's, a warning for the rest.

The projection tests tensors of two or more dimensions (the rows of a weight). An engine that
hands the optimizer 1-D tensors in place of the model's weights makes every AdamP, SGDP and
:class:`~adampx.Projected` step as AdamW or SGD without a word. Two rules catch it:

- **FSDP1** (``FullyShardedDataParallel``) marks every parameter it manages with the
  attribute ``_fsdp_flattened``. With ``use_orig_params=False`` the optimizer gets
  ``FlatParameter`` objects (flag ``_is_flat_param``, which ``FlatParameter``'s own
  ``isinstance`` reads too); with ``use_orig_params=True`` and a sharded strategy it gets
  each parameter as a 1-D slice of its unit's shard, or an empty ``(0,)`` tensor where the
  rank holds none of it. Under ``NO_SHARD`` the same marked parameters keep their shapes.
  A marked parameter does not record its shape before flattening, so a unit (the marked
  parameters of the optimizer that share one storage, FSDP1's flat parameter) counts as
  sharded when none of its parameters has two or more dimensions. In a group with the
  projection on, a ``FlatParameter``, an empty marked tensor and a 1-D marked tensor of a
  sharded unit are refused with a ``ValueError`` naming the way out (FSDP2's
  ``fully_shard``, or FSDP1 with ``NO_SHARD``).
- **Any other engine** (DeepSpeed ZeRO hands the optimizer one flat fp32 partition per
  group) leaves no mark. :class:`FlatteningCheck` warns, once per optimizer, when a group
  with the projection on holds a tensor and no group of the optimizer holds one of two or
  more dimensions: the optimizer then tests nothing and is AdamW (SGD). A group of biases
  and norm gains beside a group of weights (the usual no-decay split) stays silent, and
  so does a model whose weights all sit in groups with the projection off. DeepSpeed
  replaces ``group["params"]`` after the optimizer is constructed, so the check runs again
  whenever a group's ``params`` list is another object than at the last check (one
  identity comparison per group and step).

Nothing here reads a tensor's values: shapes, attributes and storage addresses only.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

from torch import Tensor

__all__ = ["FlattenedParamsWarning", "FlatteningCheck", "check_fsdp1"]


class FlattenedParamsWarning(UserWarning):
    """No tensor of two or more dimensions reaches a projecting optimizer (see the module
    doc); filter it with ``warnings.filterwarnings("ignore", category=...)``."""


def _fsdp1_flat(p: Tensor) -> bool:
    """A ``FlatParameter`` of FSDP1 (``use_orig_params=False``)."""
    return bool(getattr(p, "_is_flat_param", False))


def _fsdp1_marked(p: Tensor) -> bool:
    """A parameter that FSDP1 manages (either kind), not FSDP2's DTensor."""
    return bool(getattr(p, "_fsdp_flattened", False))


def _sharded_units(groups: Sequence[dict[str, Any]]) -> set[int]:
    """Storage addresses of the FSDP1 units whose marked parameters are all 0-d or 1-d."""
    shaped: dict[int, bool] = {}
    for group in groups:
        for p in group["params"]:
            if _fsdp1_marked(p) and p.numel() > 0:
                key = p.untyped_storage().data_ptr()
                shaped[key] = shaped.get(key, False) or p.dim() > 1
    return {key for key, keeps_shapes in shaped.items() if not keeps_shapes}


def check_fsdp1(optimizer: str, groups: Sequence[dict[str, Any]], projection_key: str) -> None:
    """Raise ``ValueError`` if a group with the projection on holds FSDP1's flattened or
    sharded parameters (see the module doc)."""
    if not any(_fsdp1_marked(p) or _fsdp1_flat(p) for group in groups for p in group["params"]):
        return  # no FSDP1: nothing more to look at
    sharded = _sharded_units(groups)
    for index, group in enumerate(groups):
        if not group[projection_key]:
            continue
        for p in group["params"]:
            if _fsdp1_flat(p):
                what = f"an FSDP1 FlatParameter of shape {tuple(p.shape)} (use_orig_params=False)"
            elif _fsdp1_marked(p) and p.dim() <= 1:
                if p.numel() > 0 and p.untyped_storage().data_ptr() not in sharded:
                    continue  # a bias or norm gain beside its unit's weights (NO_SHARD)
                what = (
                    f"a 1-D shard of shape {tuple(p.shape)} of an FSDP1 parameter "
                    "(use_orig_params=True with a sharded strategy)"
                )
            else:
                continue
            raise ValueError(
                f"{optimizer} cannot project FSDP1's flattened parameters: param group "
                f"{index} holds {what}. Its weights reach the optimizer as 1-D tensors, so "
                f"{optimizer} would test none of them and silently step as AdamW/SGD. Use "
                "FSDP2's torch.distributed.fsdp.fully_shard, which keeps every parameter's "
                "shape (DTensor), or FSDP1 with use_orig_params=True and "
                f"sharding_strategy=ShardingStrategy.NO_SHARD; or set {projection_key}=False "
                "in this group to ask for the unprojected update"
            )


class FlatteningCheck:
    """The checks of this module for one optimizer, run when its groups change.

    Args:
        optimizer: the optimizer's name, for the messages.
        projection_key: the group key that turns the projection on (``projection`` for AdamP
            and SGDP, ``projected`` for :class:`~adampx.Projected`).
    """

    def __init__(self, optimizer: str, projection_key: str) -> None:
        self.optimizer = optimizer
        self.projection_key = projection_key
        self.warned = False
        # the ``params`` lists as last checked, held so that their identities stay unique
        self._seen: list[list[Tensor]] = []

    def check(self, groups: Sequence[dict[str, Any]]) -> None:
        """Check every group: the FSDP1 error, then the warning (once per optimizer)."""
        check_fsdp1(self.optimizer, groups, self.projection_key)
        self._seen = [group["params"] for group in groups]
        if not self.warned and _flattened(groups, self.projection_key):
            self.warned = True
            warnings.warn(
                f"{self.optimizer}: no param group holds a tensor of two or more dimensions, "
                "so the projection tests nothing and every step is the unprojected one (AdamP "
                "steps as AdamW, SGDP as SGD, Projected as the optimizer it wraps). "
                "This is what an engine that flattens parameters does (DeepSpeed ZeRO hands "
                "the optimizer one flat partition per group): use one that keeps their "
                "shapes (FSDP2's fully_shard, DDP, DeepSpeed without ZeRO; see "
                "docs/integrations.md). If the model has only 0-d and 1-d parameters, set "
                f"{self.projection_key}=False to say so and silence this warning",
                FlattenedParamsWarning,
                stacklevel=_caller_level(),
            )

    def check_if_replaced(self, groups: Sequence[dict[str, Any]]) -> None:
        """:meth:`check` again if a group's ``params`` list is not the one last checked
        (an engine replaced it, as DeepSpeed ZeRO does after construction)."""
        seen = self._seen
        if len(groups) != len(seen) or any(
            group["params"] is not last for group, last in zip(groups, seen, strict=True)
        ):
            self.check(groups)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside adampx and torch, seen from
    :meth:`FlatteningCheck.check`: the user's constructor call, or the engine's ``step``
    call that replaced the params."""
    frame: FrameType | None = sys._getframe(2)  # the frame that called FlatteningCheck.check
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "adampx",
        "torch",
    ):
        frame, level = frame.f_back, level + 1
    return level


def _flattened(groups: Iterable[dict[str, Any]], projection_key: str) -> bool:
    """A group with the projection on holds a tensor, and no group holds one of two or more
    dimensions."""
    groups = list(groups)
    if any(p.dim() > 1 for group in groups for p in group["params"]):
        return False
    return any(group[projection_key] and len(group["params"]) > 0 for group in groups)
