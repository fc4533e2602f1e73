"""Offline calibration tools: samples → spectra → fitted Newton–Schulz coefficients → versioned tables.

May import ``root_core``; ``root_core`` never imports this package.
"""

__version__ = "0.1.0"
