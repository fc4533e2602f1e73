"""write_atomically: whole files or none, the umask's mode, and versions that two writers cannot share."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from root_core import files
from root_core.files import write_atomically
from root_core.tables import CoefficientTable, TableError, load_table, save_table

MUON = (3.4445, -4.7750, 2.0315)


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def test_bytes_text_and_writer_functions(tmp_path):
    assert write_atomically(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_atomically(tmp_path / "b.txt", "Ünïcode\n").read_text(encoding="utf-8") == "Ünïcode\n"
    write_atomically(tmp_path / "c.bin", lambda stream: stream.write(b"streamed"))
    assert (tmp_path / "c.bin").read_bytes() == b"streamed"
    write_atomically(tmp_path / "b.txt", "replaced")  # not exclusive: replaces
    assert (tmp_path / "b.txt").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.bin"]  # no temp files


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_files_get_the_umask_mode_not_0600(tmp_path, umask, mask):
    umask(mask)
    assert files.current_umask() == mask
    path = save_table(CoefficientTable.create(name="modes", default_rows=MUON), tmp_path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert write_atomically(tmp_path / "plot.png", b"png").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_writer_leaves_nothing(tmp_path):
    def half_then_fail(stream: io.BufferedWriter) -> None:
        stream.write(b"half")
        raise RuntimeError("render failed")

    with pytest.raises(RuntimeError, match="render failed"):
        write_atomically(tmp_path / "fig.png", half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_exclusive_write_never_replaces_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    # Another writer finishes between our check-free write and the link: we must lose, not overwrite.
    target = tmp_path / "v1.json"
    real_fsync = os.fsync

    def other_writer_finishes(fd):
        real_fsync(fd)
        if not target.exists():
            target.write_text("theirs")

    monkeypatch.setattr(files.os, "fsync", other_writer_finishes)
    with pytest.raises(FileExistsError):
        write_atomically(target, "ours", exclusive=True)
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["v1.json"]


def test_exclusive_write_without_hard_links_still_refuses_to_replace(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")  # EPERM, as FAT or some network mounts answer

    monkeypatch.setattr(files.os, "link", no_links)
    assert write_atomically(tmp_path / "t", "first", exclusive=True).read_text() == "first"
    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "t", "second", exclusive=True)
    assert (tmp_path / "t").read_text() == "first"


def test_on_clash_next_takes_the_next_free_version(tmp_path):
    first = CoefficientTable.create(name="clash", default_rows=MUON)
    second = CoefficientTable.create(name="clash", default_rows=(3.0, -4.0, 2.0))  # also version 1
    assert save_table(first, tmp_path).name == "v1.json"
    with pytest.raises(TableError, match=re.escape("version 1 of 'clash' already exists")):
        save_table(second, tmp_path)
    path = save_table(second, tmp_path, on_clash="next")
    assert path.name == "v2.json" and load_table(path).version == 2
    assert (
        load_table(path).default == ((3.0, -4.0, 2.0),)
        and load_table(tmp_path / "clash" / "v1.json") == first
    )
    with pytest.raises(ValueError, match=re.escape("on_clash must be 'error' or 'next', got 'replace'")):
        save_table(first, tmp_path, on_clash="replace")


ROUNDS = 8


def _race(directory: str, worker: int, barrier) -> list[str]:
    """Save ROUNDS tables, each as version 1 of a name both workers use, starting each round together."""
    saved = []
    for round_ in range(ROUNDS):
        table = CoefficientTable.create(
            name=f"race{round_}", default_rows=MUON, provenance={"worker": worker, "round": round_}
        )
        barrier.wait()
        saved.append(str(save_table(table, directory, on_clash="next")))
    return saved


@pytest.mark.slow  # spawns two interpreters that import torch: ~5-10 s
def test_two_processes_saving_the_same_version_both_keep_their_table(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    with context.Pool(2) as pool:
        results = pool.starmap(_race, [(str(tmp_path), worker, barrier) for worker in (0, 1)])
    for round_ in range(ROUNDS):
        folder = tmp_path / f"race{round_}"
        assert sorted(p.name for p in folder.iterdir()) == ["v1.json", "v2.json"]
        workers = {json.loads(p.read_text())["provenance"]["worker"] for p in folder.iterdir()}
        assert workers == {0, 1}  # neither file replaced the other
        assert {Path(results[w][round_]).name for w in (0, 1)} == {"v1.json", "v2.json"}


# ---- one definition each -------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("root_core", "calibrate", "benchmarks") for p in (REPO / folder).rglob("*.py")]


def test_every_file_is_written_through_the_one_helper():
    # Temporary files, renames and links belong to root_core/files.py; everything else calls it.
    found = [
        f"{path.relative_to(REPO)}: {word}"
        for path in SOURCES
        if path.name != "files.py"
        for word in ("mkstemp", "os.replace", "os.link", "os.fsync")
        if word in path.read_text(encoding="utf-8")
    ]
    assert found == []


def test_constants_are_defined_once():
    from calibrate.analysis import precision
    from calibrate.fitting import fit, pipeline
    from root_core import newton_schulz, optimizer, schedule, tables

    assert newton_schulz.DEFAULT_EPS is schedule.DEFAULT_EPS and tables.DEFAULT_EPS is schedule.DEFAULT_EPS
    assert optimizer.MISSING_POLICIES is tables.MISSING_POLICIES
    assert precision.DEFAULT_BASELINES is tables.BASELINE_TABLES
    assert pipeline.BASELINE_TABLES is tables.BASELINE_TABLES
    assert fit.PUBLISHED_TABLES is tables.PUBLISHED_TABLES
    # No second literal list of three or more published names anywhere else.
    name = '"(?:muon|polar-express|root-paper|you-6step|classic)"'
    pattern = re.compile(rf"{name}(?:,\s*{name}){{2,}}")
    assert [p.name for p in SOURCES if p.name != "tables.py" and pattern.search(p.read_text("utf-8"))] == []


def test_spectrum_cache_files_get_the_umask_mode(tmp_path, umask):
    import numpy as np

    from calibrate.spectra import SpectrumCache

    umask(0o022)
    SpectrumCache(tmp_path)._write(tmp_path / "s" / "x.npy", np.arange(3.0))
    assert (tmp_path / "s" / "x.npy").stat().st_mode & 0o777 == 0o644
    assert np.load(tmp_path / "s" / "x.npy").tolist() == [0.0, 1.0, 2.0]
