"""Coefficient tables: versioned JSON files that carry Newton–Schulz rows from calibration to ROOT.

The table is the only interface between the offline calibration tools and the optimizer (docs/design.md),
so it is strict. Every load validates the whole table against ``coeff_tables/schema.json`` (jsonschema),
then checks what JSON Schema cannot say (finite numbers, min <= max, no duplicate shapes, a real date,
the content hash), and either returns the table complete or raises one ``TableError`` naming the file
and the field.

Schema version 1, in JSON::

    {"schema": 1, "name": "root-paper", "version": 1, "created": "2026-11-23T00:00:00Z",
     "description": "...",                                   # optional
     "normalization": {"kind": "frobenius", "scale": 1.0, "eps": 1e-07},
     "default": {"coefficients": [[a, b, c], ...], "steps": 5},          # steps optional
     "entries": [{"shape": [min, max], "coefficients": [[a, b, c], ...],
                  "steps": 5, "form": "gram", "metrics": {...}}, ...],     # steps, form, metrics optional
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
import functools
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
# The published sets bundled in coeff_tables/ (docs/design.md): the start points of every fit (in this
# order: it is the start population's order, so it changes fits) and the columns of the precision benchmark.
PUBLISHED_TABLES = ("muon", "polar-express", "root-paper", "you-6step", "classic")
# What calibrated rows are compared with by default (the calibration summary, `root-calibrate plot` and
# `report`): the two sets people train with and the ROOT paper's per-shape triples.
BASELINE_TABLES = ("muon", "polar-express", "root-paper")
# missing="nearest": distance = |log aspect − log aspect'| + NEAREST_SIZE_WEIGHT·|log(m·n) − log(m'·n')|.
# The spectrum's shape follows the aspect ratio (Marchenko–Pastur), so aspect dominates; size only breaks
# near-ties. At 0.1, a 4x size difference weighs as much as a 1.15x aspect difference.
NEAREST_SIZE_WEIGHT = 0.1

# Folder names and specs, matched with fullmatch; the table's own name is checked by schema.json.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_VERSION_FILE = re.compile(r"v([1-9][0-9]*)\.json")
_SPEC = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]*)(?:@(?P<version>[1-9][0-9]*))?")


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
    form: str | None = None  # "standard" or "gram"; None runs the standard form (older tables)
    metrics: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shape": list(self.shape), "coefficients": _rows_out(self.coefficients)}
        if self.steps is not None:
            data["steps"] = self.steps
        if self.form is not None:  # absent when unset, so older tables keep their bytes and hashes
            data["form"] = self.form
        data["metrics"] = _copy_json(self.metrics)
        return data


@dataclass(frozen=True, kw_only=True)
class CoefficientTable:
    """A validated, immutable coefficient table (schema version 1); see the module docstring.

    Build one with ``create``, ``from_dict`` or ``load_table``; the constructor validates the same way and
    raises ``TableError``. ``content_hash`` is computed, never passed: it is the sha256 of the canonical JSON
    of everything except ``created`` and the hash itself, so it names the file's content, not when it was
    written. ``coefficients_hash`` covers only what the iteration uses (normalisation, default and entry
    rows, steps and forms): two tables with the same numbers but other metrics or provenance share it,
    and it is what a resumed optimizer checks. Treat ``provenance`` and entry ``metrics`` as read-only:
    the hashes are taken at construction.
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
        the listed shapes (``MxN``) whose rows, steps or form differ or that only one of the two lists."""
        differ = []
        if self.normalization != other.normalization:
            differ.append("normalization")
        if (self.default, self.default_steps) != (other.default, other.default_steps):
            differ.append("default rows")
        for shape in sorted(set(self._by_shape) | set(other._by_shape)):
            mine, theirs = self._by_shape.get(shape), other._by_shape.get(shape)
            if (mine and (mine.coefficients, mine.steps, mine.form)) != (
                theirs and (theirs.coefficients, theirs.steps, theirs.form)
            ):
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
    if entry.form is not None:
        raw["form"] = entry.form
    return raw


def _rows_out(rows: Sequence[Row]) -> list[list[float]]:
    return [list(row) for row in rows]


def _hash_content(content: Mapping[str, Any]) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


# ---- validation ---------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    # JSON Schema counts 1.0 as an integer, and so does canonical_shape; bool is never a number.
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _where(path: Sequence[Any]) -> str:
    """A JSON path as the messages write it: ``entries[1].coefficients[0]``."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _fail(source: str, path: Sequence[Any] | str, problem: str) -> NoReturn:
    where = path if isinstance(path, str) else _where(path)
    message = f"{source}: {where}: {problem}" if where else f"{source}: {problem}"
    raise TableError(message, source=source, field=where or None)


@functools.cache
def _schema_validator() -> Any:
    """coeff_tables/schema.json as a jsonschema validator that also takes tuples (arrays) and Mappings
    (objects), so a table built in Python is checked as is, not after a conversion that could hide a bug."""
    import jsonschema  # imported here: loading a table pays for it, importing root_core does not

    schema = json.loads((BUNDLED_TABLES_DIR / "schema.json").read_text(encoding="utf-8"))
    base = jsonschema.Draft202012Validator
    types = base.TYPE_CHECKER.redefine_many(
        {
            "array": lambda _, value: isinstance(value, (list, tuple)),
            "object": lambda _, value: isinstance(value, Mapping),
        }
    )
    return jsonschema.validators.extend(base, type_checker=types)(schema)


_ARTICLE = {"integer": "an integer", "number": "a number", "string": "a string", "array": "an array"}


def _schema_problem(error: Any) -> tuple[list[Any], str]:
    """(path, message) for one jsonschema error; the schema's ``errorMessage`` wins where it has one."""
    path, value, kind = list(error.absolute_path), error.instance, error.validator
    custom = error.schema.get("errorMessage", {}).get(kind) if isinstance(error.schema, Mapping) else None
    if custom:
        count = len(value) if isinstance(value, (list, tuple)) else _show(value)
        return path, custom.format(value=_show(value), count=count)
    if kind == "required":
        missing = next(key for key in error.validator_value if key not in value)
        return [*path, missing], "required field is missing"
    if kind == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = next(key for key in value if key not in allowed)
        return [*path, extra], f"unknown field (allowed: {', '.join(allowed)})"
    if kind == "type":
        return path, f"expected {_ARTICLE.get(error.validator_value, 'an object')}, got {_show(value)}"
    if kind in ("minimum", "exclusiveMinimum"):
        what = _ARTICLE.get(error.schema.get("type"), "a number")
        bound = f"{'>=' if kind == 'minimum' else '>'} {error.validator_value}"
        return path, f"expected {what} {bound}, got {value}"
    return path, error.message  # a rule without a message of its own: jsonschema's words


def _validate(raw: Any, source: str) -> None:
    """Check ``raw`` against schema.json, then what JSON Schema cannot say; raise the first problem."""
    # The schema version first: a newer table fails on its version, not on the fields it added.
    if isinstance(raw, Mapping) and "schema" in raw and _is_int(raw["schema"]) and raw["schema"] != 1:
        _fail(source, "schema", f"unsupported schema version {raw['schema']}; this root_core reads version 1")
    errors = list(_schema_validator().iter_errors(raw))
    if errors:
        _fail(source, *_schema_problem(min(errors, key=_document_order)))
    _check_json_values(raw, [], source)
    _check_created(raw["created"], source)
    seen: dict[tuple[int, int], int] = {}
    for index, entry in enumerate(raw["entries"]):
        low, high = (int(v) for v in entry["shape"])
        if low > high:
            _fail(
                source,
                ["entries", index, "shape"],
                f"expected [min, max] with min <= max, got {[low, high]}; write the smaller side first",
            )
        if (low, high) in seen:
            _fail(
                source,
                ["entries", index, "shape"],
                f"duplicate shape {[low, high]} (also entries[{seen[low, high]}])",
            )
        seen[low, high] = index


def _document_order(error: Any) -> tuple[int, list[str]]:
    """Report problems of the whole table first, then field by field in the schema's order."""
    path = list(error.absolute_path)
    fields = list(_schema_validator().schema["properties"])
    rank = 1 + fields.index(path[0]) if path and path[0] in fields else 0
    return rank, [str(key) for key in path]


def _check_json_values(value: Any, path: list[Any], source: str) -> None:
    """Free-form parts (metrics, provenance) must be JSON too, and every number finite."""
    if value is None or isinstance(value, (str, bool)):
        return
    if _is_number(value):
        if not math.isfinite(value):
            _fail(source, path, f"expected a finite number, got {_show(value)}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_values(item, [*path, index], source)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                _fail(source, path, f"object keys must be strings, got {_show(key)}")
            _check_json_values(item, [*path, key], source)
        return
    kinds = "string, number, boolean, null, array, object"
    _fail(source, path, f"expected JSON data ({kinds}), got {_show(value)}")


def _check_created(text: str, source: str) -> None:
    try:
        datetime.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        _fail(source, "created", f"not a real date and time, got {text!r}")


def _parse_table(raw: Any, source: str) -> tuple[dict[str, Any], str | None]:
    """Validate a raw table; return the constructor's fields (normalised) and the stored hash, if any."""
    _validate(raw, source)
    norm = raw["normalization"]
    default = raw["default"]
    fields: dict[str, Any] = {
        "schema": int(raw["schema"]),
        "name": raw["name"],
        "version": int(raw["version"]),
        "created": raw["created"],
        "description": raw.get("description"),
        "normalization": Normalization(kind=norm["kind"], scale=float(norm["scale"]), eps=float(norm["eps"])),
        "default": _rows(default["coefficients"]),
        "default_steps": int(default["steps"]) if "steps" in default else None,
        "provenance": _copy_json(raw["provenance"]),
    }
    entries = [
        TableEntry(
            shape=(int(item["shape"][0]), int(item["shape"][1])),
            coefficients=_rows(item["coefficients"]),
            steps=int(item["steps"]) if "steps" in item else None,
            form=item.get("form"),
            metrics=_copy_json(item.get("metrics", {})),
        )
        for item in raw["entries"]
    ]
    # Sorted, so two tables with the same numbers have the same hash whatever order they were listed in.
    fields["entries"] = tuple(sorted(entries, key=lambda entry: entry.shape))
    return fields, raw.get("content_hash")


def _rows(rows: Sequence[Sequence[float]]) -> tuple[Row, ...]:
    return tuple((float(a), float(b), float(c)) for a, b, c in rows)


def _copy_json(value: Any) -> Any:
    """A deep copy of validated JSON data, with numbers as Python ints and floats."""
    if isinstance(value, Mapping):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_json(item) for item in value]
    if _is_number(value):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
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
