"""Triton kernels of fastdist (see kernels/dist_loss.py)."""

from .dist_loss import MAX_C, dist_backward, dist_forward_stats

__all__ = ["MAX_C", "dist_backward", "dist_forward_stats"]
