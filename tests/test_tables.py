"""Coefficient tables: bundled baselines, name resolution, shape lookup, validation errors, atomic saves."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings

import jsonschema
import pytest

from root_core import tables as tables_module
from root_core.schedule import Schedule
from root_core.tables import (
    BUNDLED_TABLES_DIR,
    TABLES_ENV,
    CoefficientTable,
    MissingShapeWarning,
    ShapeNotFoundError,
    TableError,
    TableNotFoundError,
    available_tables,
    canonical_shape,
    load_table,
    next_version,
    save_table,
)

BUNDLED = ("muon", "polar-express", "root-paper", "you-6step", "classic")
MUON = (3.4445, -4.7750, 2.0315)
CREATED = "2026-11-23T00:00:00Z"


@pytest.fixture(autouse=True)
def _only_bundled_tables(monkeypatch):
    # A ROOT_COEFF_TABLES set in the developer's shell must not change what these tests resolve.
    monkeypatch.delenv(TABLES_ENV, raising=False)


@pytest.fixture(scope="module")
def schema():
    schema = json.loads((BUNDLED_TABLES_DIR / "schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def raises(error: type[BaseException], message: str):
    """pytest.raises pinned to a literal part of the message."""
    return pytest.raises(error, match=re.escape(message))


def small_table(**overrides) -> dict:
    """A valid table as raw JSON data; tests break one field at a time."""
    data = {
        "schema": 1,
        "name": "tiny",
        "version": 1,
        "created": CREATED,
        "normalization": {"kind": "frobenius", "scale": 1.0, "eps": 1e-7},
        "default": {"coefficients": [list(MUON)], "steps": 5},
        "entries": [
            {"shape": [512, 512], "coefficients": [[3.0, -4.0, 2.0]], "metrics": {"rel_error": 0.14}},
            {"shape": [512, 2048], "coefficients": [[3.1, -4.1, 2.1], [3.0, -3.0, 1.0]], "steps": 2},
        ],
        "provenance": {"source": "test"},
    }
    data.update(overrides)
    return data


# ---- bundled baselines ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_table_loads_and_matches_schema(name, schema):
    path = BUNDLED_TABLES_DIR / name / "v1.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(data, schema)
    table = load_table(name)
    assert (table.name, table.version, table.created) == (name, 1, CREATED)
    assert table.to_dict() == data  # stored hash is current and the file round-trips exactly
    assert table.provenance["source"] and table.provenance["note"]
    assert all(entry.metrics == {} for entry in table.entries)
    assert path.read_text(encoding="utf-8").endswith("}\n")


def test_bundled_values_are_the_published_ones():
    # KellerJordan/Muon muon.py and torch.optim.Muon's default ns_coefficients.
    muon = load_table("muon")
    assert muon.default == ((3.4445, -4.7750, 2.0315),)
    assert (muon.normalization.scale, muon.normalization.eps) == (1.0, 1e-7)
    assert muon.default_schedule.num_steps == 5
    # Amsel et al. 2025 (arXiv 2505.16932) / modded-nanogpt: five per-step rows, ||X||_F * 1.02 + 1e-6.
    polar = load_table("polar-express")
    assert len(polar.default) == 5
    assert polar.default[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert polar.default[4] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)
    assert (polar.normalization.scale, polar.normalization.eps) == (1.02, 1e-6)
    # huawei-noah/noah-research ROOT/examples/example_train.py: per-shape triples, Muon's as fallback.
    root = load_table("root-paper")
    assert root.shapes == [(2048, 2048), (2048, 3072), (2048, 8192), (2048, 16384)]
    assert root.schedule_for((2048, 2048)).rows == ((3.4916, -4.8224, 2.1095),)
    assert root.schedule_for((16384, 2048)).rows == ((3.1943, -3.8221, 1.5322),)
    assert root.default == (MUON,)
    # You's 6-step set, published as integers / 1024.
    you = load_table("you-6step")
    assert you.default[0] == (3955 / 1024, -8306 / 1024, 5008 / 1024)
    assert you.default[5] == (2172 / 1024, -1833 / 1024, 682 / 1024)
    assert you.default_schedule.num_steps == 6
    # Textbook quintic.
    assert load_table("classic").default == ((15 / 8, -10 / 8, 3 / 8),)


def test_available_tables_lists_the_bundled_ones():
    found = available_tables()
    assert all(found[name] == [1] for name in BUNDLED)


# ---- resolving a spec -------------------------------------------------------------------------------
def test_name_belongs_to_the_first_directory_on_the_search_path_that_has_it(tmp_path, monkeypatch):
    newer = CoefficientTable.create(name="muon", version=2, default_rows=(3.0, -4.0, 2.0), created=CREATED)
    save_table(newer, tmp_path)
    save_table(CoefficientTable.create(name="muon", version=3, default_rows=MUON), tmp_path / "later")
    monkeypatch.setenv(
        TABLES_ENV, os.pathsep.join([str(tmp_path / "absent"), str(tmp_path), str(tmp_path / "later")])
    )
    assert load_table("muon").version == 2  # not 3: versions are never mixed across directories
    assert load_table("muon").default == ((3.0, -4.0, 2.0),)
    with raises(TableNotFoundError, "table 'muon' has no version 1; available versions: 2"):
        load_table("muon@1")
    assert available_tables()["muon"] == [2]
    assert load_table("classic").version == 1  # other names still come from the bundled folder


def test_path_dict_and_table_specs(tmp_path):
    path = BUNDLED_TABLES_DIR / "muon" / "v1.json"
    by_name = load_table("muon")
    assert load_table(path) == by_name
    assert load_table(str(path)) == by_name
    assert load_table(by_name.to_dict()) == by_name
    assert load_table(by_name) is by_name
    with pytest.raises(TypeError, match="got int"):
        load_table(3)


def test_unknown_name_and_version_messages():
    with pytest.raises(TableNotFoundError, match=r"no coefficient table named 'nope'; available: .*muon"):
        load_table("nope")
    with raises(TableNotFoundError, "table 'muon' has no version 7; available versions: 1"):
        load_table("muon@7")
    with raises(TableError, "'Muon!' is not a table name"):
        load_table("Muon!")
    with raises(TableNotFoundError, "missing.json: no such table file"):
        load_table("missing.json")


def test_named_file_must_hold_that_name_and_version(tmp_path, monkeypatch):
    data = small_table()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "v1.json").write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setenv(TABLES_ENV, str(tmp_path))
    with raises(TableError, "the file holds tiny@1 but sits at other/v1.json"):
        load_table("other")


# ---- lookup -----------------------------------------------------------------------------------------
def test_schedule_for_either_orientation():
    table = CoefficientTable.from_dict(small_table())
    wide, tall = table.schedule_for((512, 2048)), table.schedule_for([2048, 512])
    assert wide == tall == Schedule(rows=((3.1, -4.1, 2.1), (3.0, -3.0, 1.0)), scale=1.0, steps=2)
    assert table.schedule_for((512, 512)).num_steps == 5  # a single row repeats 5 times by default
    assert table.entry((2048, 512)).steps == 2
    assert canonical_shape((3072, 2048)) == (2048, 3072)
    with raises(ValueError, "shape must be two positive integers (m, n), got (64, 3, 3)"):
        table.schedule_for((64, 3, 3))


def test_scale_travels_with_the_schedule():
    schedule = load_table("polar-express").schedule_for((100, 300))
    assert schedule.scale == 1.02 and schedule.num_steps == 5


def test_missing_shape_default_warns_once_per_shape():
    table = CoefficientTable.from_dict(small_table())
    with pytest.warns(MissingShapeWarning, match=re.escape("no entry for shape (300, 1000)")) as record:
        assert table.schedule_for((1000, 300)).rows == (MUON,)
    assert "tiny@1" in str(record[0].message)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            table.schedule_for((300, 1000))
        table.schedule_for((7, 9))
    first_clauses = [str(w.message).split(";")[0] for w in record]
    assert first_clauses == [f"table {table.identity} has no entry for shape (7, 9)"]


def test_shape_independent_table_never_warns():
    muon = load_table("muon")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert muon.schedule_for((123, 456), missing="error").rows == (MUON,)


def test_missing_shape_error_names_shape_table_and_listed_shapes():
    table = CoefficientTable.from_dict(small_table())
    expected = (
        f"shape (300, 1000) is not listed in table {table.identity}; listed shapes: (512, 512), (512, 2048)"
    )
    with raises(ShapeNotFoundError, expected):
        table.schedule_for((300, 1000), missing="error")
    assert issubclass(ShapeNotFoundError, LookupError)


def test_missing_shape_nearest_prefers_aspect_ratio_over_size():
    table = CoefficientTable.from_dict(small_table())
    # 256x1024 has exactly the size of 512x512 and the aspect ratio of 512x2048: aspect wins.
    with pytest.warns(MissingShapeWarning, match=re.escape("using the nearest listed shape (512, 2048)")):
        assert table.schedule_for((1024, 256), missing="nearest") == table.schedule_for((512, 2048))
    # And the other way round: 1024x1024 has the size of 512x2048 and the aspect ratio of 512x512.
    with pytest.warns(MissingShapeWarning, match=re.escape("nearest listed shape (512, 512)")):
        assert table.schedule_for((1024, 1024), missing="nearest") == table.schedule_for((512, 512))


def test_bad_missing_policy():
    table = load_table("root-paper")
    with raises(ValueError, "missing must be one of 'default', 'error', 'nearest', got 'skip'"):
        table.schedule_for((2048, 2048), missing="skip")


def test_identity_and_ref():
    table = load_table("root-paper")
    assert re.fullmatch(r"root-paper@1 \(sha256:[0-9a-f]{8}…\)", table.identity)
    assert table.ref == {
        "name": "root-paper",
        "version": 1,
        "content_hash": table.content_hash,
        "coefficients_hash": table.coefficients_hash,
    }


# ---- validation errors --------------------------------------------------------------------------------
def broken(path: str, value) -> dict:
    """small_table() with the field at a dotted/indexed path set to value (or deleted when value is ...)."""
    data = small_table()
    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
    parent = data
    for key in keys[:-1]:
        parent = parent[key]
    if value is ...:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value
    return data


INVALID = [
    # (field path, new value or ... to delete, expected message after "<dict>: ")
    ("schema", 2, "schema: unsupported schema version 2; this root_core reads version 1"),
    ("name", ..., "name: required field is missing"),
    ("normalization.eps", ..., "normalization.eps: required field is missing"),
    (
        "entries.1.coefficients.0",
        [3.0, -4.0],
        "entries[1].coefficients[0]: expected 3 numbers [a, b, c], got 2",
    ),
    ("default.coefficients.0.1", math.nan, "default.coefficients[0][1]: expected a finite number, got nan"),
    (
        "entries.0.coefficients.0.2",
        math.inf,
        "entries[0].coefficients[0][2]: expected a finite number, got inf",
    ),
    ("entries.1.shape", [512, 512], "entries[1].shape: duplicate shape [512, 512] (also entries[0])"),
    ("normalization.scale", 0, "normalization.scale: expected a number > 0, got 0"),
    ("normalization.kind", "spectral", "normalization.kind: expected 'frobenius'"),
    ("version", 0, "version: expected an integer >= 1, got 0"),
    ("version", "1", "version: expected an integer, got '1'"),
    ("name", "Muon", "name: expected a lowercase slug"),
    ("created", "2026-11-23 00:00:00", "created: expected an ISO-8601 UTC time"),
    ("created", "2026-13-23T00:00:00Z", "created: not a real date and time"),
    (
        "entries.0.shape",
        [2048, 512],
        "entries[0].shape: expected [min, max] with min <= max, got [2048, 512]",
    ),
    ("entries.0.steps", 0, "entries[0].steps: expected an integer >= 1, got 0"),
    ("entries.0.metrics.rel_error", math.nan, "entries[0].metrics.rel_error: expected a finite number"),
    ("default.coefficients", [], "default.coefficients: expected at least one [a, b, c] row"),
    ("extra", 1, "extra: unknown field"),
    ("provenance", "me", "provenance: expected an object, got 'me'"),
]


@pytest.mark.parametrize(("path", "value", "message"), INVALID, ids=[case[0] for case in INVALID])
def test_invalid_table_raises_one_clear_error(path, value, message):
    with raises(TableError, f"<dict>: {message}") as caught:
        CoefficientTable.from_dict(broken(path, value))
    assert caught.value.source == "<dict>"


def test_error_names_the_file(tmp_path):
    data = broken("entries.1.coefficients.0", [3.0, -4.0])
    path = tmp_path / "tiny" / "v1.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data), encoding="utf-8")
    with raises(TableError, f"{path}: entries[1].coefficients[0]: expected 3 numbers"):
        load_table(path)


def test_hash_mismatch(tmp_path):
    data = CoefficientTable.from_dict(small_table()).to_dict()
    data["entries"][0]["coefficients"][0][0] = 3.5  # edited by hand after saving
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    stored = data["content_hash"]
    with raises(TableError, f"{path}: content_hash: stored {stored} does not match the content"):
        load_table(path)
    del data["content_hash"]  # deleting the hash accepts the edit
    assert CoefficientTable.from_dict(data).entry((512, 512)).coefficients == ((3.5, -4.0, 2.0),)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "schema": 1,\n  "name": "x",,\n}\n', encoding="utf-8")
    with raises(TableError, f"{path}: invalid JSON at line 3, column"):
        load_table(path)
    path.write_text('{"schema": 1, "schema": 1}', encoding="utf-8")
    with raises(TableError, f"{path}: invalid JSON: duplicate key 'schema'"):
        load_table(path)


def test_constructor_validates_too():
    message = "<CoefficientTable>: default.coefficients[0]: expected 3 numbers [a, b, c], got 3.4445"
    with raises(TableError, message):
        CoefficientTable(name="flat", version=1, default=MUON)  # a bare triple, not a list of rows


# ---- schema.json is what validates ----------------------------------------------------------------------
GOOD = [
    small_table(),
    small_table(entries=[], description="no entries", content_hash="sha256:" + "0" * 64),
    small_table(version=3.0, provenance={"nested": {"list": [1, "two", None, True]}}),
]
# Each breaks a rule that JSON Schema can express. What it cannot (finite numbers, min <= max, duplicate
# shapes, real dates, the hash itself) is only checked by tables.py and pinned in INVALID above.
BEYOND_SCHEMA = ("finite", "duplicate", "min <= max", "real date")
BAD = [
    broken(path, value)
    for path, value, message in INVALID
    if not any(words in message for words in BEYOND_SCHEMA)
] + [
    broken("entries", {}),
    broken("entries.0", []),
    broken("entries.0.shape", [1, 2, 3]),
    broken("entries.0.shape", [0, 2]),
    broken("entries.0.extra", 1),
    broken("default.steps", 2.5),
    broken("default.coefficients.0.0", "3"),
    broken("normalization.eps", -1e-9),
    broken("content_hash", "sha256:XYZ"),
    broken("description", 3),
    broken("schema", True),
    broken("entries.0.metrics", [1]),
    "not an object",
]


@pytest.mark.parametrize("data", GOOD)
def test_schema_and_loader_accept_the_same_good_tables(data, schema):
    jsonschema.validate(data, schema)
    if "content_hash" in data:  # a placeholder hash is valid syntax but does not match
        data = {key: value for key, value in data.items() if key != "content_hash"}
    CoefficientTable.from_dict(data)


@pytest.mark.parametrize("data", BAD, ids=range(len(BAD)))
def test_schema_and_loader_reject_the_same_bad_tables(data, schema):
    assert not jsonschema.Draft202012Validator(schema).is_valid(data)
    with pytest.raises(TableError):
        CoefficientTable.from_dict(data)


# ---- saving ---------------------------------------------------------------------------------------------
def test_save_round_trip_and_versions(tmp_path):
    table = CoefficientTable.from_dict(small_table(description="Ünïcode – kept"))
    assert next_version(tmp_path, "tiny") == 1
    path = save_table(table, tmp_path)
    assert path == tmp_path / "tiny" / "v1.json"
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and '\n  "name": "tiny",\n' in text
    assert load_table(path) == table
    assert CoefficientTable.from_dict(table.to_dict()).to_dict() == table.to_dict()
    assert next_version(tmp_path, "tiny") == 2
    with raises(
        TableError, "version 1 of 'tiny' already exists and versions are never overwritten; save as version 2"
    ):
        save_table(table, tmp_path)
    assert load_table(path) == table  # untouched


@pytest.mark.parametrize("fail", ["fsync", "link"])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, fail):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tables_module.os, fail, boom)
    table = CoefficientTable.from_dict(small_table())
    with pytest.raises(OSError, match="disk full"):
        save_table(table, tmp_path)
    assert list(tmp_path.rglob("*")) == []


def test_failed_save_into_existing_folder_keeps_other_versions(tmp_path, monkeypatch):
    save_table(CoefficientTable.from_dict(small_table()), tmp_path)

    def refuse(*args):
        raise OSError("nope")

    monkeypatch.setattr(tables_module.os, "link", refuse)
    with pytest.raises(OSError):
        save_table(CoefficientTable.from_dict(small_table(version=2)), tmp_path)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["v1.json"]


def test_content_hash_ignores_created_and_entry_order():
    table = CoefficientTable.from_dict(small_table())
    later = CoefficientTable.from_dict(small_table(created="2030-01-01T12:00:00.5Z"))
    assert later.content_hash == table.content_hash and later != table
    reordered = CoefficientTable.from_dict(small_table(entries=small_table()["entries"][::-1]))
    assert reordered.content_hash == table.content_hash
    changed = CoefficientTable.from_dict(broken("entries.0.coefficients.0.0", 3.0001))
    assert changed.content_hash != table.content_hash
    # Pinned: the hash is part of checkpoints (table.ref), so its definition must not drift silently.
    assert load_table("muon").content_hash == (
        "sha256:5502939672282a62ea6d0b086c83eb1af337e45220576408f446ad8efcb59852"
    )


def test_create_accepts_either_orientation_and_flat_triples():
    table = CoefficientTable.create(
        name="made",
        default_rows=MUON,
        scale=1.02,
        eps=1e-6,
        created=CREATED,
        entries={
            (3072, 2048): (3.0, -4.0, 2.0),
            (512, 512): {"coefficients": [MUON, MUON], "metrics": {"x": 1}},
        },
        provenance={"source": "test"},
    )
    assert table.shapes == [(512, 512), (2048, 3072)]
    assert table.schedule_for((2048, 3072)) == Schedule(rows=((3.0, -4.0, 2.0),), scale=1.02)
    assert table.entry((512, 512)).metrics == {"x": 1}
    with raises(TableError, "entries[1].shape: duplicate shape [512, 2048]"):
        CoefficientTable.create(name="dup", default_rows=MUON, entries={(512, 2048): MUON, (2048, 512): MUON})


def test_tables_are_immutable_and_independent_of_their_input():
    data = small_table()
    table = CoefficientTable.from_dict(data)
    data["provenance"]["source"] = "changed"
    data["entries"][0]["metrics"]["rel_error"] = 1.0
    assert table.provenance == {"source": "test"}
    assert table.entry((512, 512)).metrics == {"rel_error": 0.14}
    with pytest.raises(AttributeError):
        table.name = "other"
    assert copy.deepcopy(table) == table
    assert hash(table) == hash(CoefficientTable.from_dict(small_table()))


def test_tables_are_validated_with_schema_json(monkeypatch):
    # A rule that exists only in the schema (here: a made-up name length limit) is enforced by the loader.
    import jsonschema

    strict = copy.deepcopy(tables_module._schema_validator().schema)
    strict["properties"]["name"]["maxLength"] = 3
    monkeypatch.setattr(tables_module, "_schema_validator", lambda: jsonschema.Draft202012Validator(strict))
    with raises(TableError, "<dict>: name: 'tiny' is too long"):
        CoefficientTable.from_dict(small_table())


@pytest.mark.parametrize("field", ["name", "created", "content_hash"])
def test_patterns_refuse_a_trailing_newline(field, schema):
    # Python's re.search lets `$` match before a final newline; the schema's `$(?!\n)` does not.
    data = CoefficientTable.from_dict(small_table()).to_dict()
    data[field] += "\n"
    assert not jsonschema.Draft202012Validator(schema).is_valid(data)
    with raises(TableError, f"<dict>: {field}: expected"):
        CoefficientTable.from_dict(data)
