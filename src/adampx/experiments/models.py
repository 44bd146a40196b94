"""The networks of the reproduction: residual networks whose conv weights are scale invariant.

Every convolution here is bias-free and feeds a ``BatchNorm2d`` directly. BatchNorm divides
out any positive rescaling of the conv's output, so the network's function, and its loss,
do not change when a conv weight ``w`` is replaced by ``c·w`` for ``c > 0``: each conv weight
is *scale invariant*. That is the case the paper is about: for such weights the gradient is
orthogonal to ``w``, momentum makes ``‖w‖`` grow, the effective step size ``lr/‖w‖²``
shrinks, and AdamP/SGDP remove the radial part of the update to stop it. Only the final
``Linear`` classifier (and the BatchNorm affine parameters) are not scale invariant.

* ``small_resnet``: a three-stage residual network for tiny inputs (8×8 digits), under 100k
  parameters, fast on a CPU. It keeps torch's default conv init (uniform, about
  ``1/sqrt(3·fan_in)`` per entry, smaller than He init), so that the norm growth the paper
  is about shows within the few hundred steps of the quick suite; with He init the weights
  start about 1.7× larger and the same training changes their norm less.
* ``resnet18``: the ResNet-18 layout with He (Kaiming, fan_out) init, as torchvision's;
  with the CIFAR stem (3×3 conv, no max-pool) for images of at most 64 pixels a side, the
  ImageNet stem (7×7 stride-2 conv and a max-pool) above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "BasicBlock", "ResNet", "build_model"]

MODELS = ("small_resnet", "resnet18")

#: Images up to this side get the CIFAR stem; larger ones the ImageNet stem.
CIFAR_STEM_MAX_SIZE = 64


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build one of :data:`MODELS`.

    Args:
        name: ``"small_resnet"`` or ``"resnet18"``.
        num_classes: Outputs of the final linear layer.
        in_channels: Channels of the input images.
        image_size: Side of the (square) input images; picks ``resnet18``'s stem.

    Returns:
        The model, freshly initialized with torch's current RNG; it maps ``[B, C, H, W]``
        to logits ``[B, num_classes]``.

    Raises:
        ValueError: For an unknown name or non-positive sizes.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    for label, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if value < 1:
            raise ValueError(f"{label} must be positive, got {value}")
    if name == "small_resnet":
        return ResNet(
            _conv_bn(in_channels, 16, kernel_size=3, stride=1),
            widths=(16, 32, 64),
            strides=(1, 2, 2),
            blocks_per_stage=1,
            num_classes=num_classes,
            he_init=False,
        )
    if image_size <= CIFAR_STEM_MAX_SIZE:
        stem = _conv_bn(in_channels, 64, kernel_size=3, stride=1)
    else:
        stem = nn.Sequential(
            *_conv_bn(in_channels, 64, kernel_size=7, stride=2),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    return ResNet(
        stem,
        widths=(64, 128, 256, 512),
        strides=(1, 2, 2, 2),
        blocks_per_stage=2,
        num_classes=num_classes,
    )


def _conv_bn(c_in: int, c_out: int, kernel_size: int, stride: int) -> nn.Sequential:
    """A bias-free conv (same padding) followed by BatchNorm and ReLU.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        kernel_size: Side of the square kernel.
        stride: Stride of the conv.

    Returns:
        ``Sequential(conv, bn, relu)``.
    """
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class BasicBlock(nn.Module):
    """The two-conv residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a bias-free 1×1 conv and a BatchNorm when the stride or
    the width changes.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the first conv (and of the projection).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``[B, c_in, H, W]``.

        Returns:
            ``[B, c_out, H / stride, W / stride]``.
        """
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, stages of :class:`BasicBlock`, global average pooling and a linear classifier.

    Args:
        stem: Maps the input images to ``widths[0]`` channels.
        widths: Channels of each stage.
        strides: Stride of each stage's first block.
        blocks_per_stage: Blocks in every stage.
        num_classes: Outputs of the classifier.
        he_init: re-initialise the convs with He (Kaiming) normal init, fan_out, as
            torchvision's ResNets do; False keeps torch's default conv init.
    """

    def __init__(
        self,
        stem: nn.Module,
        widths: tuple[int, ...],
        strides: tuple[int, ...],
        blocks_per_stage: int,
        num_classes: int,
        he_init: bool = True,
    ) -> None:
        super().__init__()
        self.stem = stem
        stages: list[nn.Module] = []
        c_in = widths[0]
        for width, stride in zip(widths, strides, strict=True):
            blocks = [BasicBlock(c_in, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if he_init and isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: ``[B, C, H, W]`` images.

        Returns:
            ``[B, num_classes]`` logits.
        """
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
