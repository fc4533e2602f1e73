"""Analysis, the last stage: how close coefficient tables get to the exact polar factor, and on whose data.

``precision`` computes the numbers (float64 spectral error and the measured bf16 matrix error, per shape,
table and step count); ``frontier`` sets error against the FLOPs of one Newton–Schulz call; ``plots``
draws the figures and ``report`` and ``real_report`` write the text of ``root-calibrate report``,
``show`` and ``list``. It may use ``calibrate.sampling`` (samples to score) and ``calibrate.fitting``
(the objective and step costs); neither of them imports it.
"""
