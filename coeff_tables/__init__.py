"""Bundled Newton–Schulz coefficient tables, one folder per name holding ``v<N>.json``, and ``schema.json``.

The published baselines (Muon, Polar Express, the ROOT paper's per-shape triples, ...) ship here as
tables, so every comparison is table against table. Load them with ``root_core.tables.load_table``.
"""

from pathlib import Path

TABLES_DIR = Path(__file__).resolve().parent
