"""Same inputs and seed give bit-identical samples, spectra and coefficients at any thread count or load."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from calibrate.determinism import pinned_threads
from calibrate.fitting.fit import FitSettings
from calibrate.fitting.pipeline import CalibrationRequest, fit_shape
from calibrate.progress import Stages
from calibrate.sampling.harvest import harvest
from calibrate.spectra import normalized_spectrum

SHAPE = (32, 96)
TEXT = ("def add(a, b):\n    return a + b\n\n" * 200).encode()
# Big enough that eigvalsh splits its work across threads: at 512×1376 one and two threads gave spectra
# 2.3e-16 apart before the spectra were pinned to one thread.
SPECTRUM_SHAPE = (512, 1376)


@contextmanager
def busy_cpu() -> Iterator[None]:
    """A concurrent process spinning on a core, as another job on the machine would."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def bitwise_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(
        a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(first, second, strict=True)
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_bytes(TEXT)
    return path


def harvested(corpus) -> list[torch.Tensor]:
    samples = harvest(SHAPE, 2, seed=0, corpus=corpus, steps=12, tokens_per_step=128)
    return [sample.matrix for sample in samples]


def test_harvest_is_bit_identical_across_thread_counts_and_under_load(corpus):
    with pinned_threads(1):
        reference = harvested(corpus)
    with pinned_threads(2):
        assert bitwise_equal(harvested(corpus), reference)
    with pinned_threads(2), busy_cpu():
        assert bitwise_equal(harvested(corpus), reference)


def test_spectra_are_bit_identical_across_thread_counts_and_under_load():
    matrix = torch.randn(*SPECTRUM_SHAPE, generator=torch.Generator().manual_seed(0))
    spectra = {}
    for count in (1, 2):
        with pinned_threads(count):
            spectra[count] = normalized_spectrum(matrix, clip_quantile=0.9)
    with pinned_threads(2), busy_cpu():
        loaded = normalized_spectrum(matrix, clip_quantile=0.9)
    assert bitwise_equal([spectra[2], loaded], [spectra[1], spectra[1]])


def test_fit_is_identical_across_thread_counts(tmp_path):
    matrices = [torch.randn(16, 48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    spectra = [normalized_spectrum(m, clip_quantile=0.9) for m in matrices]
    request = CalibrationRequest(shapes=[(16, 48)], out=tmp_path, name="t", fit=FitSettings(iterations=3))
    rows = {}
    for count in (1, 2):
        with pinned_threads(count):
            rows[count] = fit_shape((16, 48), spectra, request, Stages(None)).schedule.rows
    assert rows[1] == rows[2]


def test_the_callers_thread_count_is_restored():
    with pinned_threads(2):
        with pinned_threads():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        normalized_spectrum(torch.randn(8, 24), clip_quantile=None)
        assert torch.get_num_threads() == 2
