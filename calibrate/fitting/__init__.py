"""Fitting, the middle stage: from momentum samples to a versioned coefficient table.

``objective`` is the quantity a fit minimises and the safety bound it must respect; ``fit`` searches for
the rows (scipy or optuna); ``steps`` holds the pure parts of ``--steps auto`` (targets, the choice of k,
FLOPs); ``pipeline`` runs a calibration stage by stage (samples → clip → spectra → fit → matrix check →
table), ``ranks`` splits that run across ``torchrun`` ranks, and ``online`` is the same fit behind ROOT's
online recalibration. It takes its samples from ``calibrate.sampling`` and never imports
``calibrate.analysis``.
"""
