"""Coefficient tables: versioned JSON files that carry Newton–Schulz rows from calibration to ROOT.

The table is the only interface between the offline calibration tools and the optimizer (DESIGN.md §3),
so it is strict. Every load validates the whole table and either returns it complete or raises one
``TableError`` naming the file and the field. The runtime must not need jsonschema, so validation is
written out by hand here; ``coeff_tables/schema.json`` describes the same format for other tools, and
``tests/test_tables.py`` keeps the two in agreement.

Schema version 1, in JSON::

    {"schema": 1, "name": "root-paper", "version": 1, "created": "2026-11-23T00:00:00Z",
     "description": "...",                                   # optional
     "normalization": {"kind": "frobenius", "scale": 1.0, "eps": 1e-07},
     "default": {"coefficients": [[a, b, c], ...], "steps": 5},          # steps optional
     "entries": [{"shape": [min, max], "coefficients": [[a, b, c], ...],
                  "steps": 5, "metrics": {...}}, ...],                     # steps, metrics optional
     "provenance": {...},
     "content_hash": "sha256:..."}                           # optional on input, always written

A single row means "repeat it" (5 steps unless ``steps`` says otherwise); several rows are one per step.
The iteration runs on ``X = G / max(scale * ||G||_F, eps)``: ``eps`` floors the normaliser as
``torch.optim.Muon``'s ``clamp(min=eps)`` does. ROOT uses the table's eps unless its ``eps=`` is given.
For published sets normalised with an added eps (Polar Express: ``||G||_F * 1.02 + 1e-6``) the two differ
by a relative eps/(scale·||G||_F), below float32 resolution once ||G||_F > 16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from root_core.files import write_atomically
from root_core.schedule import DEFAULT_EPS, DEFAULT_SCALE, Row, Schedule

try:
    from coeff_tables import TABLES_DIR as BUNDLED_TABLES_DIR
except ImportError:  # root_core importable without the data package (e.g. an older editable install)
    BUNDLED_TABLES_DIR = Path(__file__).resolve().parent.parent / "coeff_tables"

SCHEMA_VERSION = 1
# Extra table directories, searched first (os.pathsep-separated, like PATH).
TABLES_ENV = "ROOT_COEFF_TABLES"
# The per-user table folder (see user_tables_dir): root-calibrate's default --out, always searched.
USER_TABLES_ENV = "ROOT_COEFF_HOME"
MISSING_POLICIES = ("default", "error", "nearest")
# missing="nearest": distance = |log aspect − log aspect'| + NEAREST_SIZE_WEIGHT·|log(m·n) − log(m'·n')|.
# The spectrum's shape follows the aspect ratio (Marchenko–Pastur), so aspect dominates; size only breaks
# near-ties. At 0.1, a 4x size difference weighs as much as a 1.15x aspect difference.
NEAREST_SIZE_WEIGHT = 0.1

# Python's fullmatch is used with these, so `$` cannot accept a trailing newline; schema.json uses the
# same patterns anchored with ^...$.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_CREATED = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.json")
_SPEC = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]*)(?:@(?P<version>[1-9][0-9]*))?")

_TOP_REQUIRED = ("schema", "name", "version", "created", "normalization", "default", "entries", "provenance")
_TOP_OPTIONAL = ("description", "content_hash")


class TableError(ValueError):
    """A coefficient table that cannot be used: invalid content, bad JSON, or a refused save.

    ``source`` is the file (or ``"<dict>"``) and ``field`` the path inside it, when known.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.field = field


class TableNotFoundError(TableError, LookupError):
    """No table with that name, version or path on the search path."""


class ShapeNotFoundError(KeyError):
    """A shape the table does not list, looked up with ``missing="error"``."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""


class MissingShapeWarning(UserWarning):
    """A shape fell back to the table's default rows or to the nearest listed shape."""


@dataclass(frozen=True, kw_only=True)
class Normalization:
    """How the input is scaled before the iteration: ``X = G / max(scale * ||G||_F, eps)``."""

    kind: str = "frobenius"
    scale: float = DEFAULT_SCALE
    eps: float = DEFAULT_EPS


@dataclass(frozen=True, kw_only=True)
class TableEntry:
    """The rows fitted for one canonical shape ``(min, max)``; validated by the table that holds it."""

    shape: tuple[int, int]
    coefficients: tuple[Row, ...]
    steps: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shape": list(self.shape), "coefficients": _rows_out(self.coefficients)}
        if self.steps is not None:
            data["steps"] = self.steps
        data["metrics"] = _copy_json(self.metrics)
        return data


@dataclass(frozen=True, kw_only=True)
class CoefficientTable:
    """A validated, immutable coefficient table (schema version 1); see the module docstring.

    Build one with ``create``, ``from_dict`` or ``load_table``; the constructor validates the same way and
    raises ``TableError``. ``content_hash`` is computed, never passed: it is the sha256 of the canonical JSON
    of everything except ``created`` and the hash itself, so it names the file's content, not when it was
    written. ``coefficients_hash`` covers only what the iteration uses (normalisation, default and entry
    rows and steps): two tables with the same numbers but other metrics or provenance share it, and it is
    what a resumed optimizer checks. Treat ``provenance`` and entry ``metrics`` as read-only: the hashes
    are taken at construction.
    """

    schema: int = SCHEMA_VERSION
    name: str
    version: int
    created: str = field(default_factory=lambda: utc_now())
    normalization: Normalization = field(default_factory=Normalization)
    default: tuple[Row, ...]
    default_steps: int | None = None
    entries: tuple[TableEntry, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict, hash=False)
    description: str | None = None
    content_hash: str = field(init=False, default="")
    coefficients_hash: str = field(init=False, default="")
    _by_shape: dict[tuple[int, int], TableEntry] = field(
        init=False, default_factory=dict, repr=False, compare=False, hash=False
    )
    # (shape, policy) pairs already warned about: one warning per table and shape, not one per step.
    _warned: set[tuple[tuple[int, int], str]] = field(
        init=False, default_factory=set, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        fields, _ = _parse_table(self._raw(), "<CoefficientTable>")
        for key, value in fields.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "content_hash", _hash_content(self._content()))
        object.__setattr__(self, "coefficients_hash", _hash_content(self._coefficients()))
        object.__setattr__(self, "_by_shape", {entry.shape: entry for entry in self.entries})

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> CoefficientTable:
        """Validate ``data`` (parsed JSON) and build the table; a stored ``content_hash`` must match."""
        fields, stored_hash = _parse_table(data, source)
        table = cls(**fields)
        if stored_hash is not None and stored_hash != table.content_hash:
            raise TableError(
                f"{source}: content_hash: stored {stored_hash} does not match the content "
                f"({table.content_hash}); the numbers changed after the hash was written. Restore them, "
                "or delete content_hash to accept the edit",
                source=source,
                field="content_hash",
            )
        return table

    @classmethod
    def create(
        cls,
        *,
        name: str,
        default_rows: Any,
        version: int = 1,
        entries: Mapping[Sequence[int], Any] | None = None,
        default_steps: int | None = None,
        scale: float = DEFAULT_SCALE,
        eps: float = DEFAULT_EPS,
        provenance: Mapping[str, Any] | None = None,
        description: str | None = None,
        created: str | None = None,
    ) -> CoefficientTable:
        """Convenience constructor for calibration code.

        ``default_rows`` and each value of ``entries`` are one ``(a, b, c)`` triple or a list of rows;
        an entries value may instead be a dict with ``coefficients`` and optional ``steps``/``metrics``.
        Entry keys are ``(m, n)`` in either orientation.
        """
        items = []
        for shape, spec in (entries or {}).items():
            item = dict(spec) if isinstance(spec, Mapping) else {"coefficients": spec}
            if "coefficients" in item:
                item["coefficients"] = _rows_arg(item["coefficients"])
            items.append({"shape": list(canonical_shape(shape)), **item})
        return cls(
            name=name,
            version=version,
            created=created or utc_now(),
            normalization=Normalization(scale=scale, eps=eps),
            default=_rows_arg(default_rows),
            default_steps=default_steps,
            entries=tuple(items),
            provenance=dict(provenance or {}),
            description=description,
        )

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The table as JSON-ready data, with ``content_hash``; ``from_dict`` reads it back equal."""
        return {**self._content(created=True), "content_hash": self.content_hash}

    def _content(self, created: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": self.schema, "name": self.name, "version": self.version}
        if created:
            data["created"] = self.created
        if self.description is not None:
            data["description"] = self.description
        data["normalization"] = {
            "kind": self.normalization.kind,
            "scale": self.normalization.scale,
            "eps": self.normalization.eps,
        }
        data["default"] = {"coefficients": _rows_out(self.default)}
        if self.default_steps is not None:
            data["default"]["steps"] = self.default_steps
        data["entries"] = [entry.to_dict() for entry in self.entries]
        data["provenance"] = _copy_json(self.provenance)
        return data

    def _coefficients(self) -> dict[str, Any]:
        """The part of the content the iteration uses; ``coefficients_hash`` is taken over it."""
        content = self._content()
        entries = [{k: v for k, v in e.items() if k != "metrics"} for e in content["entries"]]
        return {"normalization": content["normalization"], "default": content["default"], "entries": entries}

    def _raw(self) -> dict[str, Any]:
        """The constructor's arguments in dict form, so one validator serves both paths."""
        norm = self.normalization
        if isinstance(norm, Normalization):
            norm = {"kind": norm.kind, "scale": norm.scale, "eps": norm.eps}
        default: dict[str, Any] = {"coefficients": self.default}
        if self.default_steps is not None:
            default["steps"] = self.default_steps
        entries = self.entries
        if isinstance(entries, (list, tuple)):
            entries = [_entry_raw(e) if isinstance(e, TableEntry) else e for e in entries]
        raw = {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "normalization": norm,
            "default": default,
            "entries": entries,
            "provenance": self.provenance,
        }
        if self.description is not None:
            raw["description"] = self.description
        return raw

    # ---- lookup ----------------------------------------------------------------------------------
    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The listed canonical shapes ``(min, max)``, sorted."""
        return [entry.shape for entry in self.entries]

    @property
    def identity(self) -> str:
        """Short human-readable identity, e.g. ``root-paper@1 (sha256:1a2b3c4d…)``."""
        return f"{self.name}@{self.version} ({self.content_hash[:15]}…)"

    @property
    def ref(self) -> dict[str, Any]:
        """What names this exact table: its name, version and both hashes."""
        return {
            "name": self.name,
            "version": self.version,
            "content_hash": self.content_hash,
            "coefficients_hash": self.coefficients_hash,
        }

    def rows_differing_from(self, other: CoefficientTable) -> list[str]:
        """What the iteration would do differently with ``other``: "normalization", "default rows" and
        the listed shapes (``MxN``) whose rows or steps differ or that only one of the two lists."""
        differ = []
        if self.normalization != other.normalization:
            differ.append("normalization")
        if (self.default, self.default_steps) != (other.default, other.default_steps):
            differ.append("default rows")
        for shape in sorted(set(self._by_shape) | set(other._by_shape)):
            mine, theirs = self._by_shape.get(shape), other._by_shape.get(shape)
            if (mine and (mine.coefficients, mine.steps)) != (theirs and (theirs.coefficients, theirs.steps)):
                differ.append(f"{shape[0]}x{shape[1]}")
        return differ

    @property
    def default_schedule(self) -> Schedule:
        return Schedule(rows=self.default, scale=self.normalization.scale, steps=self.default_steps)

    def entry(self, shape: Sequence[int]) -> TableEntry | None:
        """The entry for ``shape`` in either orientation, or None if it is not listed."""
        return self._by_shape.get(canonical_shape(shape))

    def schedule_for(self, shape: Sequence[int], missing: str = "default") -> Schedule:
        """The schedule for a 2-D shape ``(m, n)``, either orientation, with this table's scale.

        For a shape that is not listed, ``missing`` decides: ``"default"`` uses the default rows,
        ``"nearest"`` the listed shape nearest by aspect ratio first and size second (see
        ``NEAREST_SIZE_WEIGHT``), both warning once per shape with ``MissingShapeWarning``; ``"error"``
        raises ``ShapeNotFoundError``. A table with no entries is shape-independent (Muon, Polar Express):
        its default is the answer for every shape, with no warning and no error.
        """
        if missing not in MISSING_POLICIES:
            raise ValueError(
                f"missing must be one of {', '.join(map(repr, MISSING_POLICIES))}, got {missing!r}"
            )
        key = canonical_shape(shape)
        entry = self._by_shape.get(key)
        if entry is not None or not self.entries:
            return self._schedule(entry)
        if missing == "error":
            raise ShapeNotFoundError(
                f"shape {key} is not listed in table {self.identity}; listed shapes: "
                f"{_format_shapes(self.shapes)}. Pass missing='default' or "
                "'nearest' to fall back, or calibrate this shape"
            )
        if missing == "nearest":
            entry = min(self.entries, key=lambda candidate: _shape_distance(key, candidate.shape))
            fallback = f"the nearest listed shape {entry.shape}"
        else:
            fallback = "its default rows"
        if (key, missing) not in self._warned:
            self._warned.add((key, missing))
            warnings.warn(
                f"table {self.identity} has no entry for shape {key}; using {fallback}. "
                f"Listed shapes: {_format_shapes(self.shapes)}",
                MissingShapeWarning,
                stacklevel=2,
            )
        return self._schedule(entry)

    def _schedule(self, entry: TableEntry | None) -> Schedule:
        if entry is None:
            return self.default_schedule
        return Schedule(rows=entry.coefficients, scale=self.normalization.scale, steps=entry.steps)


def canonical_shape(shape: Sequence[int]) -> tuple[int, int]:
    """``(m, n)`` in either orientation as the table key ``(min, max)``."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 2 or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(
            f"shape must be two positive integers (m, n), got {shape!r}; reshape conv weights to 2-D first"
        )
    m, n = int(dims[0]), int(dims[1])
    return (min(m, n), max(m, n))


def utc_now() -> str:
    """The current time in the tables' ``created`` format, e.g. ``2026-11-23T00:00:00Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shape_distance(a: tuple[int, int], b: tuple[int, int]) -> float:
    aspect = abs(math.log(a[1] / a[0]) - math.log(b[1] / b[0]))
    size = abs(math.log(a[0] * a[1]) - math.log(b[0] * b[1]))
    return aspect + NEAREST_SIZE_WEIGHT * size


def _format_shapes(shapes: Sequence[tuple[int, int]], limit: int = 12) -> str:
    text = ", ".join(str(shape) for shape in shapes[:limit])
    return text + (f", … and {len(shapes) - limit} more" if len(shapes) > limit else "")


def _rows_arg(spec: Any) -> Any:
    """Accept one flat ``(a, b, c)`` triple or a tensor as well as a list of rows."""
    if hasattr(spec, "tolist"):
        spec = spec.tolist()
    if isinstance(spec, Sequence) and len(spec) == 3 and all(_is_number(v) for v in spec):
        return [spec]
    return spec


def _entry_raw(entry: TableEntry) -> dict[str, Any]:
    # As given, not converted: the validator, not a TypeError here, reports what is wrong with it.
    raw = {"shape": entry.shape, "coefficients": entry.coefficients, "metrics": entry.metrics}
    if entry.steps is not None:
        raw["steps"] = entry.steps
    return raw


def _rows_out(rows: Sequence[Row]) -> list[list[float]]:
    return [list(row) for row in rows]


def _hash_content(content: Mapping[str, Any]) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


# ---- validation ---------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    # JSON Schema counts 1.0 as an integer, so the hand validator does too; bool is never a number.
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Checker:
    """Checks one raw table and raises ``TableError`` at the first problem, naming source and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> NoReturn:
        where = f"{path}: " if path else ""
        raise TableError(f"{self.source}: {where}{problem}", source=self.source, field=path or None)

    def fields(self, value: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()) -> Mapping:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected an object, got {_show(value)}")
        for key in value:
            if key not in required and key not in optional:
                allowed = ", ".join([*required, *optional])
                self.fail(_join(path, str(key)), f"unknown field (allowed: {allowed})")
        for key in required:
            if key not in value:
                self.fail(_join(path, key), "required field is missing")
        return value

    def integer(self, value: Any, path: str, minimum: int) -> int:
        if not _is_int(value):
            self.fail(path, f"expected an integer, got {_show(value)}")
        if value < minimum:
            self.fail(path, f"expected an integer >= {minimum}, got {_show(value)}")
        return int(value)

    def number(self, value: Any, path: str) -> float:
        if not _is_number(value):
            self.fail(path, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {_show(value)}")
        return float(value)

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_show(value)}")
        return value

    def array(self, value: Any, path: str) -> Sequence:
        if not isinstance(value, (list, tuple)):
            self.fail(path, f"expected an array, got {_show(value)}")
        return value

    def rows(self, value: Any, path: str) -> tuple[Row, ...]:
        if not self.array(value, path):
            self.fail(path, "expected at least one [a, b, c] row, got none")
        rows = []
        for index, row in enumerate(value):
            where = f"{path}[{index}]"
            if not isinstance(row, (list, tuple)) or len(row) != 3:
                got = f"{len(row)}" if isinstance(row, (list, tuple)) else _show(row)
                self.fail(where, f"expected 3 numbers [a, b, c], got {got}")
            rows.append(tuple(self.number(v, f"{where}[{i}]") for i, v in enumerate(row)))
        return tuple(rows)

    def json_value(self, value: Any, path: str) -> Any:
        """A deep copy of free-form JSON data (metrics, provenance); numbers must be finite."""
        if value is None or isinstance(value, (str, bool)):
            return value
        if _is_number(value):
            if not math.isfinite(value):
                self.fail(path, f"expected a finite number, got {_show(value)}")
            return int(value) if isinstance(value, numbers.Integral) else float(value)
        if isinstance(value, (list, tuple)):
            return [self.json_value(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, Mapping):
            return self.json_object(value, path)
        self.fail(
            path, f"expected JSON data (string, number, boolean, null, array, object), got {_show(value)}"
        )

    def json_object(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected an object, got {_show(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"object keys must be strings, got {_show(key)}")
        return {key: self.json_value(item, _join(path, key)) for key, item in value.items()}


def _parse_table(raw: Any, source: str) -> tuple[dict[str, Any], str | None]:
    """Validate a raw table; return the constructor's fields (normalised) and the stored hash, if any."""
    check = _Checker(source)
    if not isinstance(raw, Mapping):
        check.fail("", f"expected a JSON object at the top level, got {_show(raw)}")
    # The schema version first: a newer table fails on its version, not on the fields it added.
    if "schema" not in raw:
        check.fail("schema", "required field is missing")
    schema = check.integer(raw["schema"], "schema", minimum=1)
    if schema != SCHEMA_VERSION:
        check.fail(
            "schema", f"unsupported schema version {schema}; this root_core reads version {SCHEMA_VERSION}"
        )
    check.fields(raw, "", _TOP_REQUIRED, _TOP_OPTIONAL)
    name = check.string(raw["name"], "name")
    if not _NAME.fullmatch(name):
        check.fail("name", f"expected a lowercase slug matching [a-z0-9][a-z0-9._-]*, got {name!r}")
    stored_hash = None
    if "content_hash" in raw:
        stored_hash = check.string(raw["content_hash"], "content_hash")
        if not _HASH.fullmatch(stored_hash):
            check.fail("content_hash", f"expected 'sha256:' and 64 lowercase hex digits, got {stored_hash!r}")
    fields: dict[str, Any] = {"schema": schema, "name": name}
    fields["version"] = check.integer(raw["version"], "version", minimum=1)
    fields["created"] = _parse_created(check, raw["created"])
    fields["description"] = check.string(raw["description"], "description") if "description" in raw else None
    fields["normalization"] = _parse_normalization(check, raw["normalization"])
    default = check.fields(raw["default"], "default", ("coefficients",), ("steps",))
    fields["default"] = check.rows(default["coefficients"], "default.coefficients")
    fields["default_steps"] = _parse_steps(check, default, "default")
    fields["entries"] = _parse_entries(check, raw["entries"])
    fields["provenance"] = check.json_object(raw["provenance"], "provenance")
    return fields, stored_hash


def _parse_created(check: _Checker, value: Any) -> str:
    text = check.string(value, "created")
    problem = None
    if not _CREATED.fullmatch(text):
        problem = "expected an ISO-8601 UTC time like '2026-11-23T00:00:00Z'"
    else:
        try:
            datetime.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
        except ValueError:
            problem = "not a real date and time"
    if problem:
        check.fail("created", f"{problem}, got {text!r}")
    return text


def _parse_normalization(check: _Checker, value: Any) -> Normalization:
    norm = check.fields(value, "normalization", ("kind", "scale", "eps"))
    if norm["kind"] != "frobenius":
        check.fail(
            "normalization.kind",
            f"expected 'frobenius' (the only kind in schema 1), got {_show(norm['kind'])}",
        )
    scale = check.number(norm["scale"], "normalization.scale")
    if scale <= 0:
        check.fail("normalization.scale", f"expected a number > 0, got {_show(norm['scale'])}")
    eps = check.number(norm["eps"], "normalization.eps")
    if eps < 0:
        check.fail("normalization.eps", f"expected a number >= 0, got {_show(norm['eps'])}")
    return Normalization(kind="frobenius", scale=scale, eps=eps)


def _parse_steps(check: _Checker, block: Mapping, path: str) -> int | None:
    return check.integer(block["steps"], f"{path}.steps", minimum=1) if "steps" in block else None


def _parse_entries(check: _Checker, value: Any) -> tuple[TableEntry, ...]:
    entries: dict[tuple[int, int], TableEntry] = {}
    first_index: dict[tuple[int, int], int] = {}
    for index, item in enumerate(check.array(value, "entries")):
        path = f"entries[{index}]"
        item = check.fields(item, path, ("shape", "coefficients"), ("steps", "metrics"))
        shape = check.array(item["shape"], f"{path}.shape")
        if len(shape) != 2:
            check.fail(f"{path}.shape", f"expected [min, max], got {_show(shape)}")
        key = tuple(check.integer(v, f"{path}.shape[{i}]", minimum=1) for i, v in enumerate(shape))
        if key[0] > key[1]:
            check.fail(
                f"{path}.shape",
                f"expected [min, max] with min <= max, got {list(key)}; write the smaller side first",
            )
        if key in entries:
            check.fail(f"{path}.shape", f"duplicate shape {list(key)} (also entries[{first_index[key]}])")
        rows = check.rows(item["coefficients"], f"{path}.coefficients")
        steps = _parse_steps(check, item, path)
        metrics = check.json_object(item["metrics"], f"{path}.metrics") if "metrics" in item else {}
        entries[key] = TableEntry(shape=key, coefficients=rows, steps=steps, metrics=metrics)
        first_index[key] = index
    # Sorted, so two tables with the same numbers have the same hash whatever order they were listed in.
    return tuple(entries[key] for key in sorted(entries))


def _copy_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_json(item) for item in value]
    return value


# ---- files and names ----------------------------------------------------------------------------------
class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; in a table that hides an edit.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _read_file(path: Path) -> CoefficientTable:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TableNotFoundError(f"{source}: no such table file", source=source) from None
    except (OSError, UnicodeDecodeError) as error:
        raise TableError(f"{source}: cannot read the file: {error}", source=source) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        raise TableError(
            f"{source}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}", source=source
        ) from None
    except _DuplicateKeyError as error:
        raise TableError(
            f"{source}: invalid JSON: duplicate key {error.args[0]!r} in one object", source=source
        ) from None
    return CoefficientTable.from_dict(data, source=source)


def user_tables_dir() -> Path:
    """The per-user table folder: ``$ROOT_COEFF_HOME``, else ``$XDG_DATA_HOME/root-calibrate/tables``,
    else ``~/.local/share/root-calibrate/tables``. ``root-calibrate`` writes there by default and
    ``load_table`` always searches it, so a table just calibrated loads by name from any directory."""
    if os.environ.get(USER_TABLES_ENV):
        return Path(os.environ[USER_TABLES_ENV]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says to ignore a relative $XDG_DATA_HOME.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return base / "root-calibrate" / "tables"


def table_search_path() -> list[Path]:
    """Directories searched for named tables, in order: ``$ROOT_COEFF_TABLES`` entries, the user's
    folder (``user_tables_dir``), the bundled tables."""
    extra = [Path(part).expanduser() for part in os.environ.get(TABLES_ENV, "").split(os.pathsep) if part]
    return [*extra, user_tables_dir(), BUNDLED_TABLES_DIR]


def _index() -> dict[str, dict[int, Path]]:
    """name -> version -> file. A name belongs to the first directory on the search path that holds a
    version of it, whatever the version numbers elsewhere: a user's "muon" hides the bundled "muon"
    entirely, so ``name@N`` never means a different table depending on which folder has more versions."""
    index: dict[str, dict[int, Path]] = {}
    for directory in table_search_path():
        if not directory.is_dir():
            continue
        found: dict[str, dict[int, Path]] = {}
        for folder in sorted(directory.iterdir()):
            if folder.name in index or not (_NAME.fullmatch(folder.name) and folder.is_dir()):
                continue
            for file in folder.iterdir():
                match = _VERSION_FILE.fullmatch(file.name)
                if match and file.is_file():
                    found.setdefault(folder.name, {})[int(match[1])] = file
        index.update(found)
    return index


def table_spec_for(path: str | os.PathLike) -> str:
    """The ``table=`` string that loads the file at ``path``: ``name@N`` when the search path resolves
    that name and version to this very file, else the file's absolute path."""
    path = Path(path).resolve()
    match = _VERSION_FILE.fullmatch(path.name)
    if match:
        name, version = path.parent.name, int(match[1])
        found = _index().get(name, {}).get(version)
        if found is not None and found.resolve() == path:
            return f"{name}@{version}"
    return str(path)


def available_tables() -> dict[str, list[int]]:
    """Every table name on the search path with its versions, sorted."""
    return {name: sorted(versions) for name, versions in sorted(_index().items())}


def _load_named(spec: str) -> CoefficientTable:
    match = _SPEC.fullmatch(spec)
    if not match:
        raise TableError(f"{spec!r} is not a table name ('muon'), name@version ('muon@1') or a .json path")
    name, index = match["name"], _index()
    searched = ", ".join(str(d) for d in table_search_path())
    if name not in index:
        names = ", ".join(sorted(index)) or "none"
        raise TableNotFoundError(
            f"no coefficient table named {name!r}; available: {names} (searched {searched})"
        )
    versions = index[name]
    version = int(match["version"]) if match["version"] else max(versions)
    if version not in versions:
        raise TableNotFoundError(
            f"table {name!r} has no version {version}; available versions: "
            f"{', '.join(map(str, sorted(versions)))} (searched {searched})"
        )
    table = _read_file(versions[version])
    if (table.name, table.version) != (name, version):
        source = str(versions[version])
        raise TableError(
            f"{source}: name/version: the file holds {table.name}@{table.version} but sits at "
            f"{name}/v{version}.json",
            source=source,
            field="name/version",
        )
    return table


def load_table(spec: CoefficientTable | Mapping[str, Any] | str | os.PathLike) -> CoefficientTable:
    """Resolve a table: a loaded table (returned as is), a dict, a path, ``"name"`` or ``"name@N"``.

    A name is looked up on ``table_search_path``: the first directory holding the name owns it (a user
    table hides a bundled one of the same name), and ``"name"`` takes its highest version there. A string
    is a path when it ends in ``.json`` or contains a path separator.
    """
    if isinstance(spec, CoefficientTable):
        return spec
    if isinstance(spec, Mapping):
        return CoefficientTable.from_dict(spec)
    if isinstance(spec, os.PathLike):
        return _read_file(Path(spec))
    if isinstance(spec, str):
        separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
        if spec.endswith(".json") or any(sep in spec for sep in separators):
            return _read_file(Path(spec))
        return _load_named(spec)
    raise TypeError(
        f"load_table expects a CoefficientTable, dict, path or table name, got {type(spec).__name__}"
    )


def next_version(directory: str | os.PathLike, name: str) -> int:
    """One more than the highest ``v<N>.json`` under ``directory/name`` (1 if there is none)."""
    folder = Path(directory) / name
    found = [int(m[1]) for f in folder.glob("v*.json") if (m := _VERSION_FILE.fullmatch(f.name))]
    return max(found, default=0) + 1


def save_table(table: CoefficientTable, directory: str | os.PathLike, *, on_clash: str = "error") -> Path:
    """Write ``directory/<name>/v<version>.json`` atomically and return its path.

    Versions are immutable: an existing file is never replaced, even by two writers finishing together
    (``write_atomically(exclusive=True)`` links the finished file into place, which fails if the name is
    taken). If ``v<version>.json`` exists, ``on_clash="error"`` raises ``TableError`` and ``"next"``
    saves the table as the next free version instead (calibration runs, which pick a version before an
    hour of work, use it). A reader sees nothing or the whole table, and a failed save leaves no file.
    """
    if not isinstance(table, CoefficientTable):
        raise TypeError(f"save_table expects a CoefficientTable, got {type(table).__name__}")
    if on_clash not in ("error", "next"):
        raise ValueError(f"on_clash must be 'error' or 'next', got {on_clash!r}")
    folder = Path(directory) / table.name
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        while True:
            target = folder / f"v{table.version}.json"
            try:
                return write_atomically(target, _pretty_json(table.to_dict()) + "\n", exclusive=True)
            except FileExistsError:
                if on_clash == "error":
                    raise TableError(
                        f"{target}: version {table.version} of {table.name!r} already exists and versions "
                        f"are never overwritten; save as version {next_version(directory, table.name)}",
                        source=str(target),
                    ) from None
            free = max(table.version + 1, next_version(directory, table.name))
            table = dataclasses.replace(table, version=free)
    except BaseException:
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def _pretty_json(value: Any, depth: int = 0) -> str:
    """JSON indented by 2, except that arrays of plain values (a row, a shape) stay on one line,
    so a table reads, and diffs, one coefficient row per line."""
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(key, ensure_ascii=False)}: {_pretty_json(item, depth + 1)}"
            for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + _pretty_json(item, depth + 1) for item in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
