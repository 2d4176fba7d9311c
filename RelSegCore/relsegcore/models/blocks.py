"""Plain building blocks shared by 2D and 3D networks (chosen by ``dims``)."""

from __future__ import annotations

from torch import nn


def conv_class(dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[dims]


def transposed_conv_class(dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]


def norm_layer(dims: int, channels: int) -> nn.Module:
    # Instance norm: independent of batch size, so a frozen encoder and DDP need no batch statistics.
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](channels, affine=True)


class ConvNormAct(nn.Sequential):
    """conv -> instance norm -> leaky ReLU (the nnU-Net unit)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            conv_class(dims)(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
            norm_layer(dims, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class ConvBlock(nn.Sequential):
    """Two ConvNormAct units; the first may downsample with a strided convolution."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            ConvNormAct(dims, in_channels, out_channels, stride),
            ConvNormAct(dims, out_channels, out_channels),
        )


class Encoder(nn.Module):
    """A stack of ConvBlocks, halving resolution from the second stage on; returns every stage's features."""

    def __init__(self, dims: int, in_channels: int, channels: list[int]):
        super().__init__()
        stages = []
        previous = in_channels
        for index, width in enumerate(channels):
            stages.append(ConvBlock(dims, previous, width, stride=1 if index == 0 else 2))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels)

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class DecoderStage(nn.Module):
    """Upsample the coarser features, concatenate the skip features, fuse with a ConvBlock."""

    def __init__(self, dims: int, coarse_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.upsample = transposed_conv_class(dims)(coarse_channels, out_channels, kernel_size=2, stride=2)
        self.fuse = ConvBlock(dims, out_channels + skip_channels, out_channels)

    def forward(self, coarse, skip):
        import torch

        return self.fuse(torch.cat([self.upsample(coarse), skip], dim=1))
