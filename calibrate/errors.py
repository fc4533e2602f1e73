"""The one error type the CLI turns into a single clear line and a non-zero exit code."""

from __future__ import annotations


class CalibrationError(ValueError):
    """Bad user input or an impossible request; the message names the bad value and says what to do."""
