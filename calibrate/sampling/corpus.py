"""Text corpora for the built-in harvester: the Python standard library by default, or the user's own text.

The default needs no download: every machine that runs this tool has CPython's ``.py`` sources. Order is
fixed (sorted paths), so the same ``max_bytes`` always gives the same bytes, and so the same harvest.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from ..errors import CalibrationError

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "DEFAULT_MAX_BYTES",
    "default_corpus_files",
    "dist_info_corpus_files",
    "load_corpus",
    "split_corpus",
]

DEFAULT_CORPUS_NAME = "stdlib"
# A harvest reads at most a few hundred steps × a few hundred bytes; 8 MiB gives variety many times over
# while reading in well under a second.
DEFAULT_MAX_BYTES = 8 * 2**20
# Folders skipped in the standard library: third-party code, and test suites (many are generated data,
# not representative source, and some are deliberately malformed).
EXCLUDED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# The package whose own metadata the prose corpus leaves out: ours, whose METADATA is this repository's
# README as of the last install (it changes with the README, and it is text we wrote).
OWN_DISTRIBUTION = "root_calibrate-"
# A file whose first bytes hold a NUL is binary, not text (the rule git and grep use).
BINARY_SNIFF_BYTES = 8192


def default_corpus_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without site-packages and test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if p.is_file())
    kept = (p for p in files if not EXCLUDED_STDLIB_DIRS.intersection(p.relative_to(root).parts[:-1]))
    return sorted(kept, key=lambda p: p.relative_to(root).as_posix())


def dist_info_corpus_files() -> list[Path]:
    """English prose on every machine with this toolkit: the ``METADATA`` (package descriptions) and
    ``LICENSE*`` files of the installed packages' ``*.dist-info`` folders, ours aside, sorted."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = [
        p
        for folder in root.glob("*.dist-info")
        if not folder.name.startswith(OWN_DISTRIBUTION)
        for p in folder.rglob("*")
        if p.is_file() and (p.name == "METADATA" or p.name.upper().startswith(("LICENSE", "LICENCE")))
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(
    path: str | Path | Sequence[Path] | None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[bytes, str]:
    """Return up to ``max_bytes`` of corpus text and a short description for provenance.

    ``None`` is the standard library's sources ("stdlib"); a file is read as is; a folder gives all the
    text files under it in sorted order; a list of files is read in its order. Missing, empty or
    unreadable input raises :class:`CalibrationError` naming the path.
    """
    if max_bytes < 1:
        raise CalibrationError(f"corpus max_bytes must be at least 1, got {max_bytes}")
    if path is None:
        return _concatenate(default_corpus_files(), max_bytes), DEFAULT_CORPUS_NAME
    if isinstance(path, (list, tuple)):
        return _listed_corpus([Path(p) for p in path], max_bytes)
    where = Path(path).expanduser()
    if not where.exists():
        raise CalibrationError(f"corpus {str(path)!r} does not exist")
    files = [where] if where.is_file() else _text_files_under(where)
    data = _concatenate(files, max_bytes)
    if not data:
        raise CalibrationError(f"corpus {str(path)!r} holds no text")
    return data, str(where.resolve())


def _listed_corpus(files: list[Path], max_bytes: int) -> tuple[bytes, str]:
    data = _concatenate(files, max_bytes)
    if not data:
        raise CalibrationError(f"corpus of {len(files)} listed files holds no text")
    return data, f"{len(files)} files under {os.path.commonpath([p.resolve() for p in files])}"


def split_corpus(data: bytes, validation_fraction: float) -> tuple[bytes, bytes]:
    """Split into (training, validation) at one point, so no byte window straddles both."""
    if not 0.0 <= validation_fraction < 1.0:
        raise CalibrationError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    cut = len(data) - int(len(data) * validation_fraction)
    return data[:cut], data[cut:]


def _text_files_under(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    return [p for p in files if b"\0" not in _read(p, BINARY_SNIFF_BYTES)]


def _concatenate(files: list[Path], max_bytes: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    for file in files:
        if total >= max_bytes:
            break
        chunk = _read(file, max_bytes - total)
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def _read(file: Path, limit: int) -> bytes:
    try:
        with file.open("rb") as handle:
            return handle.read(limit)
    except OSError as error:
        raise CalibrationError(f"cannot read corpus file {str(file)!r}: {error.strerror or error}") from error
