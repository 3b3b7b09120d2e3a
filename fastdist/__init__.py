"""fastdist: fused DIST knowledge distillation for semantic segmentation."""

from .loss import DISTLoss, dist_loss

__version__ = "0.1.0"

__all__ = ["DISTLoss", "__version__", "dist_loss"]
