"""``python -m calibrate …`` is ``root-calibrate …``."""

from .cli import main

main()
