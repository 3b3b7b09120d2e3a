"""fastdist: fused DIST knowledge distillation for semantic segmentation."""

from .loss import DISTLoss, KDLoss, dist_loss, kd_loss

__version__ = "0.1.0"

__all__ = ["DISTLoss", "KDLoss", "__version__", "dist_loss", "kd_loss"]
