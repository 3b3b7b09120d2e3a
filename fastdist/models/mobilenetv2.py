"""MobileNetV2 feature trunk dilated to output stride 8, in the DIST/CIRKD key layout.

The trunk is the 18 ImageNet MobileNetV2 feature blocks (``features.0`` .. ``features.17``; the final
1x1 convolution to 1280 channels is not used) ending in 320 channels. Output stride 8 as in the
reference: blocks 7..13 (the 1/16 stage) and 14..17 (the 1/32 stage) drop their stride and dilate
their depthwise 3x3 convolution by 2 and 4 respectively; a block whose stride was removed uses half
the dilation of its stage.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]

# (expansion t, output channels c, repeats n, first stride s) of the ImageNet MobileNetV2.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
# First block index of the 1/16 and of the 1/32 stages (the blocks dilated for output stride 8).
_STAGE16, _STAGE32 = 7, 14


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, dilation: int, groups: int,
             norm_layer: NormLayer) -> list[nn.Module]:
    padding = dilation * (kernel // 2)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=False)
    return [conv, norm_layer(out_ch)]


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 - project (1x1, linear), with a residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dilation: int,
                 norm_layer: NormLayer) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(inp, hidden, 1, 1, 1, 1, norm_layer), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, dilation, hidden, norm_layer), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, oup, 1, 1, 1, 1, norm_layer)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.use_residual:
            out += x  # in place: the last layer is a batch norm, which does not need its output for backward
        return out


def _block_geometry(index: int, stride: int) -> tuple[int, int]:
    """(stride, dilation) of feature block ``index`` after dilating the trunk to output stride 8."""
    if index < _STAGE16:
        return stride, 1
    stage_dilation = 2 if index < _STAGE32 else 4
    if stride == 2:
        return 1, stage_dilation // 2
    return 1, stage_dilation


class MobileNetV2Features(nn.Module):
    """The ``features`` trunk of MobileNetV2, dilated to output stride 8 (320 output channels)."""

    def __init__(self, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        stem = nn.Sequential(*_conv_bn(3, 32, 3, 2, 1, 1, norm_layer), nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = [stem]
        in_ch = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                stride, dilation = _block_geometry(len(blocks), s if i == 0 else 1)
                blocks.append(InvertedResidual(in_ch, c, stride, t, dilation, norm_layer))
                in_ch = c
        self.features = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class DilatedMobileNetV2(nn.Module):
    """Backbone wrapper (``net.features.*`` keys, as the reference); ``forward`` returns ``[features]``."""

    def __init__(self, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.net = MobileNetV2Features(norm_layer)
        self.out_channels = 320

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]


__all__ = ["DilatedMobileNetV2", "InvertedResidual", "MobileNetV2Features"]
