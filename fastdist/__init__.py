"""fastdist: fused DIST knowledge distillation for semantic segmentation."""

from .loss import CWDLoss, DISTLoss, KDLoss, cwd_loss, dist_loss, kd_loss

__version__ = "0.1.0"

__all__ = ["CWDLoss", "DISTLoss", "KDLoss", "__version__", "cwd_loss", "dist_loss", "kd_loss"]
