"""Distillation losses: DIST (:class:`DISTLoss`, :func:`dist_loss`, reference :func:`dist_loss_reference`),
pixel-wise KD (:class:`KDLoss`, :func:`kd_loss`) and channel-wise CWD (:class:`CWDLoss`, :func:`cwd_loss`)."""

from .api import BACKENDS, DISTLoss, dist_loss
from .cwd import CWDLoss, cwd_loss, cwd_loss_reference
from .kd import KDLoss, kd_loss, kd_loss_reference
from .reference import dist_loss_reference

__all__ = ["BACKENDS", "CWDLoss", "DISTLoss", "KDLoss", "cwd_loss", "cwd_loss_reference", "dist_loss",
           "dist_loss_reference", "kd_loss", "kd_loss_reference"]
