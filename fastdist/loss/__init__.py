"""Distillation losses: DIST (:class:`DISTLoss`, :func:`dist_loss`, reference :func:`dist_loss_reference`),
pixel-wise KD (:class:`KDLoss`, :func:`kd_loss`) and channel-wise CWD (:class:`CWDLoss`, :func:`cwd_loss`)."""

from .api import BACKENDS, DISTLoss, dist_loss
from .kd import KDLoss, kd_loss, kd_loss_reference
from .reference import dist_loss_reference

__all__ = ["BACKENDS", "DISTLoss", "KDLoss", "dist_loss", "dist_loss_reference", "kd_loss",
           "kd_loss_reference"]
