"""Dilated ResNet-v1s backbones (deep stem, output stride 8), in the DIST/CIRKD key layout.

The "v1s" ResNet replaces the 7x7 stem by three 3x3 convolutions (64, 64, 128 channels) and keeps the
bottleneck stride on the 3x3 convolution. For segmentation, layer3 and layer4 keep stride 1 and are
dilated by 2 and 4 instead. The first block of a dilated stage uses half the stage's dilation on the
convolution that used to stride (the block's other 3x3 convolution, in the basic block, already uses
the stage's dilation), exactly as the reference, so that published weights reproduce its outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]

# Blocks per stage for each supported depth, and whether the depth uses bottleneck blocks.
RESNET_LAYERS: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; ``dilation`` applies to the first, ``last_dilation`` to the second."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, last_dilation: int,
                 downsample: nn.Module | None, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, last_dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place: batch norm does not need its output for backward
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided, dilated) - 1x1 bottleneck; ``last_dilation`` is unused (kept for symmetry)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, last_dilation: int,
                 downsample: nn.Module | None, norm_layer: NormLayer) -> None:
        super().__init__()
        del last_dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNetV1s(nn.Module):
    """Dilated ResNet-v1s trunk; ``forward`` returns ``[layer3, layer4]`` features (stride 8 both)."""

    def __init__(self, layers: tuple[int, int, int, int], bottleneck: bool,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck] = Bottleneck if bottleneck else BasicBlock
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = norm_layer(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = norm_layer(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv3x3(64, 128)
        self.bn3 = norm_layer(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 128
        self.layer1 = self._make_layer(block, 64, layers[0], 1, 1, norm_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, 1, norm_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], 1, 2, norm_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], 1, 4, norm_layer)
        self.out_channels = 512 * block.expansion
        self._init_weights()

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int, dilation: int, norm_layer: NormLayer) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, 1, stride, bias=False), norm_layer(out_planes))
        first_dilation = max(dilation // 2, 1)
        layers = [block(self.inplanes, planes, stride, first_dilation, dilation, downsample, norm_layer)]
        self.inplanes = out_planes
        layers += [block(out_planes, planes, 1, dilation, dilation, None, norm_layer)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu3(self.bn3(self.conv3(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return [c3, self.layer4(c3)]


def resnet_v1s(name: str, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNetV1s:
    """Build the dilated ResNet-v1s called ``name`` (one of ``RESNET_LAYERS``)."""
    layers, bottleneck = RESNET_LAYERS[name]
    return ResNetV1s(layers, bottleneck, norm_layer)


__all__ = ["RESNET_LAYERS", "BasicBlock", "Bottleneck", "ResNetV1s", "resnet_v1s"]
