"""Momentum samples for calibration: real (files or the built-in harvester) and synthetic families."""

from .base import Sample

__all__ = ["Sample"]
