"""DIST loss: :class:`DISTLoss`, :func:`dist_loss` and the reference :func:`dist_loss_reference`."""

from .api import BACKENDS, DISTLoss, dist_loss
from .reference import dist_loss_reference

__all__ = ["BACKENDS", "DISTLoss", "dist_loss", "dist_loss_reference"]
