"""Run-time half of the toolkit: Newton–Schulz, soft-thresholding, coefficient tables, the ROOT optimizer.

Depends on torch only; the offline calibration tools live in ``calibrate``.
"""

from .newton_schulz import coefficient_tensor, orthogonalize
from .optimizer import ROOT, root_param_groups
from .outliers import soft_threshold
from .schedule import Schedule
from .spectral import composition_range, spectral_error
from .tables import CoefficientTable, TableError, available_tables, load_table, save_table

__all__ = [
    "ROOT",
    "CoefficientTable",
    "Schedule",
    "TableError",
    "available_tables",
    "coefficient_tensor",
    "composition_range",
    "load_table",
    "orthogonalize",
    "root_param_groups",
    "save_table",
    "soft_threshold",
    "spectral_error",
]
