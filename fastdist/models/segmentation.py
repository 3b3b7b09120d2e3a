"""``build_model``: the DIST/CIRKD segmentation models under the reference names and key layout.

A model has ``pretrained`` (the backbone), ``head`` and, with an auxiliary head, ``auxlayer`` (an FCN
head on ResNet layer3), so its ``state_dict`` keys are exactly those of the published checkpoints.
``forward(x)`` returns ``{"out": logits, "aux": aux logits}`` (``"aux"`` only with an auxiliary head),
both at 1/8 of the input resolution (``ceil(H / 8) x ceil(W / 8)``), not upsampled.

The models are channels-last clean: after ``model.to(memory_format=torch.channels_last)`` and with a
channels-last input, every 4-D activation stays channels-last (no hidden NCHW copies).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .heads import DeepLabHead, FCNHead, PSPHead
from .mobilenetv2 import DilatedMobileNetV2
from .resnet import RESNET_LAYERS, resnet_v1s

NormLayer = Callable[[int], nn.Module]

MODEL_NAMES: tuple[str, ...] = ("deeplabv3", "psp", "deeplab_mobile", "psp_mobile")
BACKBONE_NAMES: tuple[str, ...] = ("resnet18", "resnet50", "resnet101", "mobilenetv2")
# The combinations the reference scripts use.
VALID_COMBINATIONS: dict[str, tuple[str, ...]] = {
    "deeplabv3": ("resnet18", "resnet50", "resnet101"),
    "psp": ("resnet18", "resnet101"),
    "deeplab_mobile": ("mobilenetv2",),
    "psp_mobile": ("mobilenetv2",),
}
# Head width by backbone output channels (reference values: 128 for ResNet-18 and MobileNetV2).
_DEEPLAB_CHANNELS = {320: 128, 512: 128, 2048: 256}
_PSP_CHANNELS = {320: 128, 512: 128, 2048: 512}


class SegmentationModel(nn.Module):
    """Backbone + main head (+ auxiliary head on the backbone's second-to-last feature map).

    ``model.auxlayer = None`` (e.g. on a teacher, after loading its checkpoint) skips the auxiliary head.
    """

    def __init__(self, pretrained: nn.Module, head: nn.Module, auxlayer: nn.Module | None = None) -> None:
        super().__init__()
        self.pretrained = pretrained
        self.head = head
        self.auxlayer = auxlayer

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.pretrained(x)
        out = {"out": self.head(feats[-1])}
        if self.auxlayer is not None:
            out["aux"] = self.auxlayer(feats[-2])
        return out


def _check_names(model: str, backbone: str) -> None:
    if backbone not in VALID_COMBINATIONS.get(model, ()):
        valid = "; ".join(f"{m} on {', '.join(bs)}" for m, bs in VALID_COMBINATIONS.items())
        raise ValueError(f"unknown model/backbone combination {model!r}/{backbone!r}; valid: {valid}")


def build_model(model: str, backbone: str, num_classes: int = 19, aux: bool | None = None,
                norm_layer: NormLayer | None = None) -> SegmentationModel:
    """Build ``model`` ("deeplabv3", "psp", "deeplab_mobile", "psp_mobile") on ``backbone``.

    ``aux`` (auxiliary FCN head on layer3) defaults to True for ResNet backbones and False for
    MobileNetV2, which has no auxiliary head. ``norm_layer`` (default ``nn.BatchNorm2d``) is called with
    the channel count, e.g. ``nn.SyncBatchNorm``. Weights are randomly initialised; see
    ``load_checkpoint`` and ``load_pretrained_backbone``. Raises ``ValueError`` on unknown names.
    """
    _check_names(model, backbone)
    norm = nn.BatchNorm2d if norm_layer is None else norm_layer
    is_resnet = backbone in RESNET_LAYERS
    if aux is None:
        aux = is_resnet
    if aux and not is_resnet:
        raise ValueError(f"{model!r} on {backbone!r} has no auxiliary head (aux must be False or None)")
    trunk: nn.Module = resnet_v1s(backbone, norm) if is_resnet else DilatedMobileNetV2(norm)
    in_ch: int = trunk.out_channels  # type: ignore[assignment]
    if model in ("deeplabv3", "deeplab_mobile"):
        head: nn.Module = DeepLabHead(in_ch, _DEEPLAB_CHANNELS[in_ch], num_classes, norm)
    else:
        head = PSPHead(in_ch, _PSP_CHANNELS[in_ch], num_classes, norm)
    auxlayer = FCNHead(in_ch // 2, num_classes, norm) if aux else None
    return SegmentationModel(trunk, head, auxlayer)


__all__ = ["BACKBONE_NAMES", "MODEL_NAMES", "VALID_COMBINATIONS", "SegmentationModel", "build_model"]
