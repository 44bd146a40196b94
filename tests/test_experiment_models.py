"""The reproduction's networks: layouts, parameter counts, and scale-invariant conv weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adampx.experiments.models import MODELS, build_model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_parameter_counts_match_the_known_ones() -> None:
    # torchvision's resnet18 (ImageNet stem, 1000 classes) and the usual CIFAR variant.
    assert _count(build_model("resnet18", 1000, 3, 224)) == 11_689_512
    assert _count(build_model("resnet18", 10, 3, 32)) == 11_173_962


def test_small_resnet_is_small() -> None:
    assert _count(build_model("small_resnet", 10, 1, 8)) < 100_000


@pytest.mark.parametrize(
    ("name", "in_channels", "size", "imagenet_stem"),
    [
        ("small_resnet", 1, 8, False),
        ("resnet18", 3, 32, False),
        ("resnet18", 3, 64, False),
        ("resnet18", 3, 96, True),
    ],
)
def test_forward_shape_and_stem(
    name: str, in_channels: int, size: int, imagenet_stem: bool
) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, in_channels, size)
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    has_pool = any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert first_conv.in_channels == in_channels
    assert (first_conv.kernel_size, first_conv.stride) == (
        ((7, 7), (2, 2)) if imagenet_stem else ((3, 3), (1, 1))
    )
    assert has_pool is imagenet_stem


@pytest.mark.parametrize(
    ("name", "in_channels", "size"), [("small_resnet", 1, 8), ("resnet18", 3, 96)]
)
def test_every_conv_is_bias_free_and_feeds_a_batchnorm(
    name: str, in_channels: int, size: int
) -> None:
    model = build_model(name, 5, in_channels, size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.bias is None for conv in convs)

    conv_outputs: list[torch.Tensor] = []  # kept alive, so that their ids stay unique
    bn_inputs: set[int] = set()
    hooks = [
        conv.register_forward_hook(lambda _mod, _in, out: conv_outputs.append(out))
        for conv in convs
    ] + [
        m.register_forward_hook(lambda _mod, inp, _out: bn_inputs.add(id(inp[0])))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.randn(2, in_channels, size, size))
    for hook in hooks:
        hook.remove()
    assert len(conv_outputs) == len(convs)  # every conv ran once
    # and its output went straight into a BatchNorm
    assert all(id(out) in bn_inputs for out in conv_outputs)


def test_conv_weights_are_scale_invariant() -> None:
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, 1, 8).train()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-3)


def test_unknown_model_and_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'") as info:
        build_model("vgg", 10, 3, 32)
    assert all(name in str(info.value) for name in MODELS)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_resnet", 0, 1, 8)
