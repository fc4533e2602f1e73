"""Text for ``root-calibrate report``, ``show`` and ``list``: plain functions that return strings.

The report's numbers come from ``precision.report_frame``, the frame the figures are drawn from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from root_core.tables import (
    BUNDLED_TABLES_DIR,
    CoefficientTable,
    TableError,
    available_tables,
    load_table,
    table_search_path,
)

from ..errors import CalibrationError
from ..shapes import format_shape

REPORT_FORMATS = ("table", "csv", "markdown", "json")
# Four significant digits: errors differ between tables in the second digit, and bf16 noise is ~1e-3.
SIGNIFICANT = 4
REPORT_TITLE = (
    "Relative error vs the exact polar factor (SVD), at each table's own step count; "
    "spectral = float64 from the spectrum, bf16 = measured matrix iteration; "
    "bound = max of P on (0, 1]; ratio_vs_X = spectral mean / X's"
)
# report and plot draw their own samples (--samples, --count, --seed), never the calibration's.
SAMPLES_NOTE = (
    "These are not the samples the table was calibrated and validated on, so the numbers differ from its "
    "metrics (root-calibrate show TABLE); --samples harvest or a momentum file measures on real momentum."
)
# `show` prints lists up to this length; longer ones (per-sample sources) are summarised.
MAX_VALUE_CHARS = 100


def format_report(frame: pd.DataFrame, fmt: str) -> str:
    if fmt not in REPORT_FORMATS:
        raise CalibrationError(f"invalid --format '{fmt}': expected one of {', '.join(REPORT_FORMATS)}")
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return json.dumps(_records(frame), indent=2)
    if fmt == "markdown":
        return markdown(frame)
    return f"{REPORT_TITLE}\n\n{_rounded(frame).to_string(index=False)}"


def format_sampled_report(frame: pd.DataFrame, fmt: str, samples: Mapping[str, str]) -> str:
    """:func:`format_report`, saying which samples the numbers are on (``samples``: shape → description):
    a ``samples`` column in csv and json, a note under the table otherwise."""
    if fmt in ("csv", "json"):
        return format_report(frame.assign(samples=frame["shape"].map(samples)), fmt)
    lines = [f"samples: {description}" for description in samples.values()]
    return "\n".join([format_report(frame, fmt), "", *lines, SAMPLES_NOTE])


FRONTIER_TITLE = (
    "Error vs cost (the plot's flops figure): mean float64 spectral error at each step count; flops = "
    "matmul FLOPs per Newton–Schulz call, steps·(4m²n + 2m³), m = short side; an auto table at every k "
    "its search fitted"
)


def format_frontier(frame: pd.DataFrame, targets: Mapping[str, Mapping[str, float]], fmt: str) -> str:
    """The report's second section, in table and markdown formats (csv and json stay one table each):
    the frontier rows, then each auto table's target as measured on these samples (shape → label → level)."""
    body = markdown(frame) if fmt == "markdown" else _rounded(frame).to_string(index=False)
    lines = [f"{FRONTIER_TITLE}", "", body]
    for shape, levels in targets.items():
        lines += [f"{shape}: {label} = {level:.4g} on these samples" for label, level in levels.items()]
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON has no NaN or inf: a missing value (baseline absent) is null, a diverged one the string."""
    return [{key: _json_value(value) for key, value in row.items()} for row in frame.to_dict("records")]


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value.item() if hasattr(value, "item") else value


def _rounded(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.map(lambda v: f"{v:.{SIGNIFICANT}g}" if isinstance(v, float) else v)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub table, without the optional ``tabulate`` dependency that ``DataFrame.to_markdown`` needs."""
    cells = _rounded(frame).astype(str)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(frame.columns) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


# ---- show ---------------------------------------------------------------------------------------------


def load_for_show(spec: str) -> CoefficientTable:
    try:
        return load_table(spec)
    except TableError as error:
        raise CalibrationError(f"unknown table '{spec}': {error}") from None


def show_table(table: CoefficientTable) -> str:
    """Name, version, provenance, normalisation, default rows and every shape's rows and metrics."""
    norm = table.normalization
    lines = [
        f"table       {table.identity}",
        f"created     {table.created}",
        f"hash        {table.content_hash}",
        f"input       X = G / max({norm.scale:g}·‖G‖_F, {norm.eps:g})  ({norm.kind})",
    ]
    if table.description:
        lines.append(f"description {table.description}")
    lines += ["", "provenance", *_mapping(table.provenance, indent="  ")]
    lines += ["", f"default rows ({table.default_schedule.num_steps} steps, for shapes not listed)"]
    lines += _rows(table.default)
    shapes = ", ".join(format_shape(s) for s in table.shapes) or "none (the default serves every shape)"
    lines += ["", f"shapes      {shapes}"]
    for entry in table.entries:
        schedule = table.schedule_for(entry.shape)
        lines += [
            "",
            f"{format_shape(entry.shape)}  ({schedule.num_steps} steps)",
            *_rows(entry.coefficients),
        ]
        lines += _mapping(entry.metrics, indent="  metrics.")
    return "\n".join(lines)


def _rows(rows: Iterable[tuple[float, float, float]]) -> list[str]:
    return [f"  {i}: a={a:+.6f}  b={b:+.6f}  c={c:+.6f}" for i, (a, b, c) in enumerate(rows, start=1)]


def _mapping(values: Mapping[str, Any], indent: str) -> list[str]:
    """One ``key: value`` line each; nested mappings are flattened with dots, long values summarised."""
    lines = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            lines += _mapping(value, f"{indent}{key}.")
        else:
            lines.append(f"{indent}{key}: {_short(value)}")
    return lines


def _short(value: Any) -> str:
    """Numbers to 6 digits, text in full (a provenance note is meant to be read), long lists counted."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_VALUE_CHARS and isinstance(value, list):
        return f"[{len(value)} items, first: {_short(value[0])}]"
    return text


def left_aligned(frame: pd.DataFrame) -> str:
    """Columns padded to their widest cell, text left-aligned (pandas right-aligns every column)."""
    cells = [list(frame.columns), *frame.astype(str).itertuples(index=False)]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(frame.columns))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


# ---- list ---------------------------------------------------------------------------------------------


def list_tables() -> pd.DataFrame:
    """Every table on the search path: name, versions, where it lives, and its latest description."""
    rows = []
    for name, versions in available_tables().items():
        rows.append(
            {
                "name": name,
                "versions": ", ".join(str(v) for v in versions),
                "location": _location(name),
                "description": _description(f"{name}@{versions[-1]}"),
            }
        )
    return pd.DataFrame(rows, columns=["name", "versions", "location", "description"])


def _location(name: str) -> str:
    """The folder the name's versions come from ('bundled' for the package's): the first on the search
    path that holds it; the later ones it hides are named too, since their versions do not load by name."""
    places = []
    for directory in table_search_path():
        if any((directory / name).glob("v*.json")):
            places.append("bundled" if Path(directory) == BUNDLED_TABLES_DIR else str(directory))
    owner, *hidden = dict.fromkeys(places)
    return owner + (f" (hides {', '.join(hidden)})" if hidden else "")


def _description(spec: str) -> str:
    try:
        return load_table(spec).description or ""
    except TableError as error:  # one damaged file must not hide every other table
        return f"(cannot load: {error})"
