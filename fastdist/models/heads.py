"""Segmentation heads of the DIST/CIRKD models: DeepLabV3 ASPP head, PSP head, auxiliary FCN head.

Every convolution followed by a batch norm has no bias; ReLUs are in place. Pooled branches are
upsampled bilinearly with ``align_corners=True``, as in the reference (for the 1x1 ASPP image-pooling
branch this is an exact broadcast), and the values are those of the reference.

Memory format: with a channels-last input every activation, and every gradient, stays channels-last.
Two spots need care, because an (N, C, 1, 1) tensor is ambiguous and PyTorch then defaults to NCHW:
batch norm returns such a tensor with NCHW strides, so ``F.interpolate`` (and the ``torch.cat`` after
it) would silently produce NCHW; and the backward of a global mean materializes an NCHW gradient.
``_upsample_like`` re-strides the 1x1 tensor (a free view) and ``GlobalAvgPool2d`` has a backward that
keeps the input's format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, norm_layer: NormLayer,
                  dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel // 2)
    return [nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
            norm_layer(out_ch), nn.ReLU(inplace=True)]


def _is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _upsample_like(t: Tensor, x: Tensor) -> Tensor:
    """Bilinear (``align_corners=True``) upsampling of ``t`` to ``x``'s size, in ``x``'s memory format."""
    if t.shape[-2:] == (1, 1) and _is_channels_last(x):
        n, c = t.shape[:2]
        t = t.reshape(n, 1, 1, c).permute(0, 3, 1, 2)  # same memory, channels-last strides
    return F.interpolate(t, x.shape[2:], mode="bilinear", align_corners=True)


class _GlobalAvgPoolFn(torch.autograd.Function):
    """Mean over H and W (what ``AdaptiveAvgPool2d(1)`` computes), with a format-keeping backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.in_shape = x.shape
        ctx.channels_last = _is_channels_last(x)
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        shape: torch.Size = ctx.in_shape
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return (grad / (shape[2] * shape[3])).expand(shape).contiguous(memory_format=fmt)


def global_avg_pool(x: Tensor) -> Tensor:
    """Global average pooling to (N, C, 1, 1); the gradient keeps ``x``'s memory format."""
    return _GlobalAvgPoolFn.apply(x)


class GlobalAvgPool2d(nn.Module):
    """Module form of ``global_avg_pool`` (replaces ``nn.AdaptiveAvgPool2d(1)``; no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return global_avg_pool(x)


class _ASPPConv(nn.Module):
    """Atrous 3x3 branch (``block.*`` keys)."""

    def __init__(self, in_ch: int, out_ch: int, rate: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.block = nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 3, norm_layer, dilation=rate))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class _ASPPPooling(nn.Module):
    """Image-pooling branch: global average, 1x1 conv-BN-ReLU, upsampled back (``gap.*`` keys)."""

    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.gap = nn.Sequential(GlobalAvgPool2d(), *_conv_bn_relu(in_ch, out_ch, 1, norm_layer))

    def forward(self, x: Tensor) -> Tensor:
        return _upsample_like(self.gap(x), x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (rates 12/24/36 plus image pooling), projected to ``out_ch``."""

    rates = (12, 24, 36)

    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormLayer) -> None:
        super().__init__()
        rates = self.rates
        self.b0 = nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 1, norm_layer))
        self.b1 = _ASPPConv(in_ch, out_ch, rates[0], norm_layer)
        self.b2 = _ASPPConv(in_ch, out_ch, rates[1], norm_layer)
        self.b3 = _ASPPConv(in_ch, out_ch, rates[2], norm_layer)
        self.b4 = _ASPPPooling(in_ch, out_ch, norm_layer)
        self.project = nn.Sequential(*_conv_bn_relu(5 * out_ch, out_ch, 1, norm_layer), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabHead(nn.Module):
    """ASPP, 3x3 conv-BN-ReLU, dropout 0.1, 1x1 classifier (``aspp.*``, ``block.{0,1,4}`` keys)."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.aspp = ASPP(in_ch, channels, norm_layer)
        self.block = nn.Sequential(*_conv_bn_relu(channels, channels, 3, norm_layer), nn.Dropout(0.1),
                                   nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.aspp(x))


class PyramidPooling(nn.Module):
    """PSP module: bins 1, 2, 3, 6, each 1x1 conv-BN-ReLU to ``in_ch / 4``, upsampled and concatenated."""

    bins = (1, 2, 3, 6)

    def __init__(self, in_ch: int, norm_layer: NormLayer) -> None:
        super().__init__()
        out_ch = in_ch // 4
        self.conv1 = nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 1, norm_layer))
        self.conv2 = nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 1, norm_layer))
        self.conv3 = nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 1, norm_layer))
        self.conv4 = nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 1, norm_layer))

    def forward(self, x: Tensor) -> Tensor:
        convs = (self.conv1, self.conv2, self.conv3, self.conv4)
        feats = [_upsample_like(conv(global_avg_pool(x) if b == 1 else F.adaptive_avg_pool2d(x, b)), x)
                 for conv, b in zip(convs, self.bins, strict=True)]
        return torch.cat([x, *feats], dim=1)


class PSPHead(nn.Module):
    """Pyramid pooling, 3x3 conv-BN-ReLU, dropout 0.1, 1x1 classifier (``psp``, ``block``, ``classifier``)."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.psp = PyramidPooling(in_ch, norm_layer)
        self.block = nn.Sequential(*_conv_bn_relu(2 * in_ch, channels, 3, norm_layer), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.block(self.psp(x)))


class FCNHead(nn.Module):
    """Auxiliary head on layer3: 3x3 conv-BN-ReLU to ``in_ch / 4``, dropout 0.1, 1x1 classifier."""

    def __init__(self, in_ch: int, num_classes: int, norm_layer: NormLayer) -> None:
        super().__init__()
        inter = in_ch // 4
        self.block = nn.Sequential(*_conv_bn_relu(in_ch, inter, 3, norm_layer), nn.Dropout(0.1),
                                   nn.Conv2d(inter, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


__all__ = ["ASPP", "DeepLabHead", "FCNHead", "PSPHead", "PyramidPooling"]
