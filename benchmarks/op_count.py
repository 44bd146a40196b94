"""Operations per optimizer step: what sets the eager math's step time on a GPU, counted on
any machine.

    python benchmarks/op_count.py                  # all shape sets
    python benchmarks/op_count.py --sets resnet50

On a GPU each operation is at least one kernel launch, a few microseconds of host time
whatever its size, so a step of many small operations is launch-bound: AdamP's eager
multi-tensor math on ResNet-50's shapes makes about 2,200 per step. CUDA's default, the
``triton`` backend, launches five Triton kernels per group (six for AdamP) whatever the
number of tensors; those launches do not pass through torch's dispatcher and are not
counted here. This script counts the operations one step dispatches (through a
``TorchDispatchMode``, views excluded, since they launch nothing) on CPU tensors of the real
shapes:

- ``AdamP eager`` / ``SGDP eager``: the ``foreach`` backend, the eager multi-tensor math,
  forced here with ``adampx.backends.force`` (what CUDA tensors take where the Triton
  kernels do not: without Triton, with ``fused=False``, with ``caution=True``, for FSDP2's
  sharded params);
- torch's ``AdamW`` / ``SGD`` with ``foreach=True`` and ``fused=True``.

A ``torch._foreach_*`` or fused operation counts once here but launches one kernel per
chunk of tensors on a GPU, so the counts are a lower bound on launches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from step_time import SHAPE_SETS, Shapes
from torch.utils._python_dispatch import TorchDispatchMode

import adampx

VIEWS = {
    "view", "as_strided", "slice", "select", "unsqueeze", "t", "transpose", "split",
    "split_with_sizes", "alias", "expand", "detach", "unbind", "_unsafe_view", "permute",
}  # fmt: skip


class Count(TorchDispatchMode):
    """Counts the non-view operations dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ not in VIEWS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count(make: Callable[[list[torch.Tensor]], Any], shapes: Shapes) -> int:
    """Operations of the third step of ``make``'s optimizer (the first two warm it up)."""
    params: list[torch.Tensor] = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    opt = make(params)
    opt.step()
    opt.step()
    with Count() as counter:
        opt.step()
    return counter.ops


def forced(backend: str, make: Callable[[list[torch.Tensor]], Any]) -> Callable[..., Any]:
    """``make`` with every step taking ``backend`` (``adampx.backends.force``)."""

    class Forced:
        def __init__(self, params: list[torch.Tensor]) -> None:
            self.opt = make(params)

        def step(self) -> None:
            with adampx.backends.force(backend):
                self.opt.step()

    return Forced


CANDIDATES: dict[str, Callable[[list[torch.Tensor]], Any]] = {
    "AdamP eager": forced("foreach", lambda ps: adampx.AdamP(ps, weight_decay=1e-2)),
    "AdamW foreach": lambda ps: torch.optim.AdamW(ps, weight_decay=1e-2, foreach=True),
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, weight_decay=1e-2, fused=True),
    "SGDP eager": forced(
        "foreach", lambda ps: adampx.SGDP(ps, lr=0.1, momentum=0.9, weight_decay=1e-2)
    ),
    "SGD foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "SGD fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", nargs="+", default=list(SHAPE_SETS), choices=list(SHAPE_SETS))
    args = parser.parse_args()
    names = list(CANDIDATES)
    print(f"torch {torch.__version__}, adampx {adampx.__version__}: operations per step")
    print(f"{'shape set':<12}" + "".join(f"{n:>15}" for n in names))
    for name in args.sets:
        shapes = SHAPE_SETS[name]()
        counts = [count(CANDIDATES[n], shapes) for n in names]
        print(f"{name:<12}" + "".join(f"{c:>15}" for c in counts), flush=True)


if __name__ == "__main__":
    main()
