"""The optuna backend's shared storage: workers starting together, resume, study names, errors."""

from __future__ import annotations

import multiprocessing
import re

import optuna
import pytest
import torch
from optuna.trial import TrialState

from calibrate.errors import CalibrationError
from calibrate.fitting.fit import FitSettings, _study_name, fit, start_schedules
from calibrate.spectra import normalized_spectrum

ITERATIONS = 2  # a budget of 20 finished trials, 7 of them the published starts (shared form)
WORKERS = 2


def tiny_spectra(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrices = [torch.randn((16, 48), generator=generator) for _ in range(2)]
    return torch.stack([normalized_spectrum(m, clip_quantile=0.9) for m in matrices])


def _worker(storage: str, barrier, results) -> None:
    """One `root-calibrate --backend optuna --storage ...` worker: same inputs, same seed, same storage."""
    torch.set_num_threads(1)
    settings = FitSettings(form="shared", backend="optuna", iterations=ITERATIONS, storage=storage)
    spectra = tiny_spectra()
    barrier.wait(timeout=60)  # start together on the brand-new database file
    try:
        result = fit(spectra, settings, label="16x48")
        results.put(("ok", result.method["study"]))
    except BaseException as error:  # report it to the test instead of a bare exit code
        results.put(("error", f"{type(error).__name__}: {error}"))
        raise


@pytest.mark.slow
def test_workers_starting_together_on_a_new_database_share_one_study_and_one_budget(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(WORKERS), context.Queue()
    workers = [context.Process(target=_worker, args=(storage, barrier, results)) for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert [status for status, _ in outcomes] == ["ok"] * WORKERS, outcomes
    assert all(worker.exitcode == 0 for worker in workers)
    names = {name for _, name in outcomes}
    assert len(names) == 1 and optuna.get_all_study_names(storage) == list(names)
    study = optuna.load_study(study_name=names.pop(), storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    budget = ITERATIONS * 10
    # Together the workers stop at the budget; each may finish the one trial it had in flight.
    assert budget <= len(complete) <= budget + WORKERS
    starts = [t.user_attrs["start"] for t in study.trials if "start" in t.user_attrs]
    assert sorted(starts) == sorted(start_schedules(5, shared=True))  # added once, by the creator


def test_a_resume_of_a_finished_study_adds_no_trials_and_returns_the_same_best(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    settings = FitSettings(form="shared", backend="optuna", iterations=ITERATIONS, storage=storage)
    spectra = tiny_spectra()
    first = fit(spectra, settings, label="16x48")
    second = fit(spectra, settings, label="16x48")
    assert first.method["trials"] == second.method["trials"] == ITERATIONS * 10
    assert len(optuna.load_study(study_name=first.method["study"], storage=storage).trials) == ITERATIONS * 10
    assert second.schedule.rows == first.schedule.rows and first.safety.ok
    assert first.method["shared_storage"] is True and first.method["reproducible"] is False


def test_without_a_storage_the_optuna_search_is_reproducible():
    settings = FitSettings(form="shared", backend="optuna", iterations=2, seed=4)
    first, second = (fit(tiny_spectra(), settings, label="16x48") for _ in range(2))
    assert first.schedule.rows == second.schedule.rows and "reproducible" not in first.method


def test_workers_with_different_spectra_get_different_studies():
    settings = FitSettings(form="shared", backend="optuna", storage="sqlite:///study.db")
    a, b = tiny_spectra(0), tiny_spectra(1)
    assert _study_name(settings, "16x48", a) == _study_name(settings, "16x48", a.clone())
    assert _study_name(settings, "16x48", a) != _study_name(settings, "16x48", b)
    # One flipped last bit is a different objective, too.
    nudged = a.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(2.0, dtype=a.dtype))
    assert _study_name(settings, "16x48", a) != _study_name(settings, "16x48", nudged)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:////nonexistent-dir/x.db", "sqlite:////nonexistent-dir/x.db"),
        ("postgresql+nosuchdriver://user:secret@db.example/x", "postgresql+nosuchdriver://user:***@"),
        # Shown as typed: only the password changes (not re-encoded as ?host=%2Fnonexistent-dir).
        (
            "postgresql://user:secret@/x?host=/nonexistent-dir",
            "postgresql://user:***@/x?host=/nonexistent-dir'",
        ),
    ],
)
def test_a_bad_storage_is_one_line_naming_it(url, shown):
    settings = FitSettings(form="shared", backend="optuna", iterations=1, storage=url)
    with pytest.raises(CalibrationError, match=re.escape(f"optuna storage '{shown}")) as raised:
        fit(tiny_spectra(), settings, label="16x48")
    message = str(raised.value)
    assert "\n" not in message and "secret" not in message
