"""Sampling, the first stage: momentum samples for calibration, real and synthetic.

Real samples come from the user's files (``real``, ``recorded``) or from the built-in harvester
(``harvest``: small ``probes`` trained on text from ``corpus``); synthetic ones from seeded spectral
families (``synthetic``); ``mix`` splits them into calibration and validation sets. It imports neither
``calibrate.fitting`` nor ``calibrate.analysis``.
"""

from .base import Sample

__all__ = ["Sample"]
