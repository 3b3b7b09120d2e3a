"""Segmentation models of DIST knowledge distillation (DeepLabV3 / PSPNet on dilated ResNet-v1s and
MobileNetV2), key-compatible with the published DIST/CIRKD checkpoints."""

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_pretrained_backbone,
    to_reference_state_dict,
    unwrap_model,
)
from .segmentation import BACKBONE_NAMES, MODEL_NAMES, VALID_COMBINATIONS, SegmentationModel, build_model

__all__ = [
    "BACKBONE_NAMES",
    "MODEL_NAMES",
    "VALID_COMBINATIONS",
    "CheckpointError",
    "SegmentationModel",
    "build_model",
    "load_checkpoint",
    "load_pretrained_backbone",
    "to_reference_state_dict",
    "unwrap_model",
]
