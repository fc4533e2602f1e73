"""The user's table folder: root-calibrate writes there by default and load_table always searches it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calibrate import cli
from root_core import CoefficientTable, load_table, save_table
from root_core.tables import (
    BUNDLED_TABLES_DIR,
    TABLES_ENV,
    USER_TABLES_ENV,
    available_tables,
    table_search_path,
    table_spec_for,
    user_tables_dir,
)

MUON = (3.4445, -4.7750, 2.0315)
OTHER = (3.0, -4.0, 2.0)


def test_user_tables_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(USER_TABLES_ENV, str(tmp_path / "mine"))
    assert user_tables_dir() == tmp_path / "mine"
    monkeypatch.delenv(USER_TABLES_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert user_tables_dir() == tmp_path / "data" / "root-calibrate" / "tables"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")  # the XDG spec: ignore a relative path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_tables_dir() == tmp_path / "home" / ".local" / "share" / "root-calibrate" / "tables"
    monkeypatch.delenv(TABLES_ENV, raising=False)
    assert table_search_path() == [user_tables_dir(), BUNDLED_TABLES_DIR]


def test_a_table_saved_in_the_user_folder_loads_by_name_from_anywhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the repository
    path = save_table(CoefficientTable.create(name="mymodel", default_rows=OTHER), user_tables_dir())
    assert load_table("mymodel").default == (OTHER,)
    assert available_tables()["mymodel"] == [1]
    assert table_spec_for(path) == "mymodel@1"
    elsewhere = save_table(CoefficientTable.create(name="mymodel", default_rows=MUON), tmp_path / "x")
    assert table_spec_for(elsewhere) == str(elsewhere.resolve())  # not on the search path: its path


def test_a_user_table_hides_the_bundled_one_of_that_name_whatever_the_versions(monkeypatch, tmp_path):
    # The bundled "llama-3.2-1b" has versions 1 and 2; a user's calibration of that name starts at 1.
    mine = CoefficientTable.create(name="llama-3.2-1b", default_rows=OTHER)
    path = save_table(mine, user_tables_dir())
    assert load_table("llama-3.2-1b") == mine
    assert load_table("llama-3.2-1b@1") == mine
    assert available_tables()["llama-3.2-1b"] == [1]
    with pytest.raises(LookupError, match=re.escape("table 'llama-3.2-1b' has no version 2")):
        load_table("llama-3.2-1b@2")
    assert load_table(BUNDLED_TABLES_DIR / "llama-3.2-1b" / "v2.json").version == 2  # still by path
    assert table_spec_for(path) == "llama-3.2-1b@1"
    assert table_spec_for(BUNDLED_TABLES_DIR / "llama-3.2-1b" / "v2.json").endswith("v2.json")
    # $ROOT_COEFF_TABLES comes first, and hides the user's folder the same way.
    monkeypatch.setenv(TABLES_ENV, str(tmp_path))
    save_table(CoefficientTable.create(name="llama-3.2-1b", version=5, default_rows=MUON), tmp_path)
    assert available_tables()["llama-3.2-1b"] == [5]


def fake_run(request, progress, team):
    """ranks.run without the calibration: write a small table where the real run would."""
    table = CoefficientTable.create(name=request.name, default_rows=MUON)
    return save_table(table, request.out), []


@pytest.mark.parametrize("where", ["default", "--out"])
def test_calibrate_writes_to_the_user_folder_and_prints_the_table_spec(monkeypatch, tmp_path, where):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.ranks, "run", fake_run)
    args = ["--shapes", "16x48", "--name", "mymodel", "--quiet", "--no-cache"]
    if where == "--out":
        args += ["--out", "my_tables"]
    result = CliRunner().invoke(cli.app, cli.with_default_command(args))
    assert result.exit_code == 0, result.output
    *_, hint, last = result.output.strip().splitlines()
    if where == "default":
        assert Path(last) == user_tables_dir() / "mymodel" / "v1.json"
        assert hint == 'load it with ROOT(..., table="mymodel@1")'
        assert not (tmp_path / "coeff_tables").exists()
    else:
        assert Path(last) == Path("my_tables") / "mymodel" / "v1.json"
        spec = str((tmp_path / "my_tables" / "mymodel" / "v1.json").resolve())
        assert hint == f'load it with ROOT(..., table="{spec}")'
    spec = re.fullmatch(r'load it with ROOT\(\.\.\., table="(.+)"\)', hint)[1]
    assert load_table(spec) == load_table(Path(last))  # the printed spec loads the table just written


def test_list_names_the_folder_a_table_loads_from_and_what_it_hides():
    from calibrate.analysis.report import list_tables

    save_table(CoefficientTable.create(name="muon", default_rows=OTHER), user_tables_dir())
    rows = list_tables().set_index("name")
    assert rows.loc["muon", "location"] == f"{user_tables_dir()} (hides bundled)"
    assert rows.loc["classic", "location"] == "bundled"
