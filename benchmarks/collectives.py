"""Collectives one AdamP/SGDP step issues under FSDP2, counted with CommDebugMode.

    torchrun --nproc-per-node 2 benchmarks/collectives.py          # gloo on CPU
    torchrun --nproc-per-node 8 benchmarks/collectives.py --device cuda

Builds a ResNet-18 (CIFAR stem), shards it with ``fully_shard``, takes one step (to create
the state), then counts the collectives of the next ``optimizer.step()`` alone (not the
forward/backward) per kind with ``CommDebugMode``, and the bytes adampx all-reduces (by
wrapping ``torch.distributed.all_reduce``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

import adampx
from adampx.experiments.models import build_model


def _counting(all_reduce: Callable[..., Any], sent: list[int]) -> Callable[..., Any]:
    """``all_reduce`` that also records the bytes of every tensor it reduces."""

    def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    for name, make in (
        ("AdamP", lambda ps: adampx.AdamP(ps, weight_decay=1e-2)),
        ("SGDP", lambda ps: adampx.SGDP(ps, lr=0.1, momentum=0.9, weight_decay=1e-5)),
    ):
        torch.manual_seed(0)
        model = build_model("resnet18", 10, 3, 32).to(device)
        fully_shard(model)
        opt = make(model.parameters())
        x = torch.randn(8, 3, 32, 32, device=device)
        sent: list[int] = []
        all_reduce = dist.all_reduce
        for counted in (False, True):
            opt.zero_grad()
            model(x).square().mean().backward()
            if not counted:
                opt.step()
                continue
            dist.all_reduce = _counting(all_reduce, sent)  # type: ignore[assignment]
            try:
                with CommDebugMode() as comm:
                    opt.step()
            finally:
                dist.all_reduce = all_reduce
        tested = sum(1 for p in model.parameters() if p.dim() > 1)
        if dist.get_rank() == 0:
            counts = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
            print(
                f"{name}: world {dist.get_world_size()}, {tested} tested tensors of "
                f"{sum(1 for _ in model.parameters())}; collectives in one step: "
                f"{sum(counts.values())} {counts}; all-reduced by adampx: "
                f"{sum(sent) / 1024:.1f} KiB in {len(sent)} calls"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
