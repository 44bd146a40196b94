"""Collectives one AdamP/SGDP step issues under FSDP2, counted with CommDebugMode.

    torchrun --nproc-per-node 2 benchmarks/collectives.py          # gloo on CPU
    torchrun --nproc-per-node 8 benchmarks/collectives.py --device cuda

Builds a ResNet-18 (CIFAR stem), shards it with ``fully_shard``, takes one step (to create
the state), then counts the collectives of the next ``optimizer.step()`` alone (not the
forward/backward) per kind, and the bytes of the row statistics gathered, from the shapes.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

import adampx
from adampx.experiments.models import build_model


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
        for counted in (False, True):
            opt.zero_grad()
            model(x).square().mean().backward()
            if not counted:
                opt.step()
                continue
            with CommDebugMode() as comm:
                opt.step()
        tested = [p for p in model.parameters() if p.dim() > 1]
        # per tested tensor: g·p, ‖g_i‖, ‖p_i‖ and p·u gathered as n0-vectors
        row_bytes = sum(4 * p.shape[0] * p.element_size() for p in tested)
        if dist.get_rank() == 0:
            counts = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
            print(
                f"{name}: world {dist.get_world_size()}, {len(tested)} tested tensors of "
                f"{sum(1 for _ in model.parameters())}; collectives in one step: "
                f"{sum(counts.values())} {counts}; row statistics gathered: "
                f"{row_bytes / 1024:.1f} KiB per rank"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
