"""optuna studies shared through a real PostgreSQL server: workers together, a killed worker, torchrun.

The server (pgserver's binaries, tests/postgres_server.py) starts once per session in a temp folder and
stops after; each test gets a new database, so every study starts from nothing. The workers are real
`root-calibrate` processes on a tiny synthetic-only run (no harvest), with their own --out and --cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import optuna
import pytest
from optuna.trial import TrialState
from postgres_server import PASSWORD, running_server
from typer.testing import CliRunner

from calibrate.cli import app, with_default_command
from calibrate.fitting import pipeline
from calibrate.fitting.fit import start_schedules
from root_core.tables import BUNDLED_TABLES_DIR, load_table

ITERATIONS = 3  # a budget of 30 finished trials per study, 7 of them the published starts (shared form)
BUDGET = ITERATIONS * 10
# 4 synthetic samples of 16×48 (r = 16, so the search scores the full spectra), one matrix check.
TINY = ["--shapes", "16x48", "--samples", "4", "--ratio", "0:1", "--schedule", "shared"]
TINY += ["--iterations", str(ITERATIONS), "--backend", "optuna", "--check-samples", "1", "--quiet"]
# The table ships the fitted rows even where they lose to the baseline: the test compares them with the study.
TINY += ["--keep-fitted"]
# A worker starts in ~3 s and searches in a few; three at once on a loaded 2-core machine take longer.
WORKER_TIMEOUT_S = 240
# The trial at which the victim worker freezes itself, so the test can kill it mid-trial.
VICTIM_STOPS_AT_TRIAL = 3
VICTIM = f"""
import os, signal, sys
import optuna
from calibrate.cli import main

run_optimize = optuna.study.Study.optimize


def optimize_and_freeze(study, func, *args, **kwargs):
    shared = not isinstance(study._storage, optuna.storages.InMemoryStorage)
    calls = [0]

    def objective(trial):
        value = func(trial)  # the trial is RUNNING, its parameters sampled and stored, its value not
        calls[0] += 1
        if shared and calls[0] == {VICTIM_STOPS_AT_TRIAL}:
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen here until the test kills it
        return value

    return run_optimize(study, objective, *args, **kwargs)


optuna.study.Study.optimize = optimize_and_freeze
sys.argv[0] = "root-calibrate"
main()
"""


@pytest.fixture(scope="session")
def postgres():
    with running_server() as server:
        yield server


@pytest.fixture(scope="module")
def schema():
    return json.loads((BUNDLED_TABLES_DIR / "schema.json").read_text(encoding="utf-8"))


def worker_command(storage: str, folder: Path) -> list[str]:
    """`root-calibrate` (as ``python -m calibrate``) on the tiny run, with its own --out and --cache."""
    out, cache = folder / "tables", folder / "cache"
    command = [sys.executable, "-m", "calibrate", *TINY, "--storage", storage, "--out", str(out)]
    return [*command, "--cache", str(cache)]


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or dict(os.environ)
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"a worker hung: {stderr[-2000:]}")
    return process.returncode, stdout, stderr


def written_table(stdout: str, folder: Path, schema) -> dict:
    """The one table a worker wrote (the path it printed last), checked against the schema and loader."""
    tables = list((folder / "tables").rglob("*.json"))
    assert len(tables) == 1 and stdout.strip().splitlines()[-1] == str(tables[0]), stdout
    data = json.loads(tables[0].read_text(encoding="utf-8"))
    jsonschema.validate(data, schema)
    load_table(tables[0])
    return data


def one_study(storage: str) -> optuna.Study:
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def trials(study: optuna.Study, state: TrialState) -> list:
    return study.get_trials(deepcopy=False, states=(state,))


def start_labels(study: optuna.Study) -> list[str]:
    return sorted(t.user_attrs["start"] for t in study.trials if "start" in t.user_attrs)


SHARED_STARTS = sorted(start_schedules(5, shared=True))


@pytest.mark.slow
def test_three_workers_started_together_share_one_study_and_one_budget(postgres, tmp_path, schema):
    storage = postgres.new_database()
    folders = [tmp_path / f"worker{i}" for i in range(3)]
    processes = [start(worker_command(storage, folder)) for folder in folders]  # a new, empty database
    outcomes = [finish(p) for p in processes]
    assert [code for code, _, _ in outcomes] == [0, 0, 0], [err[-2000:] for _, _, err in outcomes]
    study = one_study(storage)
    complete = trials(study, TrialState.COMPLETE)
    # Together the workers stop at the budget; the other two may each finish the trial they had in flight.
    assert BUDGET <= len(complete) <= BUDGET + 2
    assert not trials(study, TrialState.RUNNING)
    assert start_labels(study) == SHARED_STARTS  # added once, by whichever worker created the study
    tables = [written_table(o[1], folder, schema) for o, folder in zip(outcomes, folders, strict=True)]
    searches = [t["provenance"]["search"] for t in tables]
    assert {s["study"] for s in searches} == {study.study_name}
    assert all(s["shared_storage"] and not s["reproducible"] for s in searches)
    # The last worker to read the study's best read its final best; its table was polished from it.
    best = study.best_trial
    matching = [t for t, s in zip(tables, searches, strict=True) if s["best_trial"] == best.number]
    assert matching, ([s["best_trial"] for s in searches], best.number)
    for table in matching:
        (entry,) = table["entries"]
        # At r = 16 the search scores the full calibration spectra: the polish can only improve on it.
        assert entry["metrics"]["calibration_error"] <= best.value + 1e-12


@pytest.mark.slow
def test_a_worker_killed_mid_trial_costs_no_budget_and_a_rerun_resumes(postgres, tmp_path, schema):
    storage = postgres.new_database()
    victim = start([sys.executable, "-c", VICTIM, *worker_command(storage, tmp_path / "victim")[3:]])
    try:
        # It creates the study, adds the start points, and freezes inside its third trial. Only then
        # does the survivor start (started together, it could finish the budget before the victim's
        # third trial); the victim is killed while the survivor runs.
        wait_until_stopped(victim.pid)
        survivor = start(worker_command(storage, tmp_path / "survivor"))
        os.kill(victim.pid, signal.SIGKILL)  # mid-trial: no cleanup, its connections just drop
    finally:
        code, _, stderr = finish(victim)
    assert code == -signal.SIGKILL, stderr[-2000:]
    code, _, stderr = finish(survivor)
    assert code == 0, stderr[-2000:]
    study = one_study(storage)
    (orphan,) = trials(study, TrialState.RUNNING)  # the victim's trial: sampled, never told
    assert orphan.params and orphan.value is None
    # Only finished trials count, so the survivor made up for it: the budget is complete.
    assert BUDGET <= len(trials(study, TrialState.COMPLETE)) <= BUDGET + 1
    assert not list((tmp_path / "victim").rglob("*.json"))

    # Re-running the command resumes the study: nothing to add, no second copy of the start points.
    rerun = subprocess.run(worker_command(storage, tmp_path / "rerun"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    written_table(rerun.stdout, tmp_path / "rerun", schema)
    after = one_study(storage)
    assert len(after.trials) == len(study.trials) and start_labels(after) == SHARED_STARTS

    # A larger budget resumes it further, by exactly the missing finished trials; the orphan stays aside.
    more = worker_command(storage, tmp_path / "more")
    more[more.index("--iterations") + 1] = str(ITERATIONS + 1)
    resumed = subprocess.run(more, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = one_study(storage)
    finished_before = len(trials(study, TrialState.COMPLETE))
    assert len(trials(final, TrialState.COMPLETE)) == max(BUDGET + 10, finished_before)
    assert [t.number for t in trials(final, TrialState.RUNNING)] == [orphan.number]
    assert start_labels(final) == SHARED_STARTS


def wait_until_stopped(pid: int, timeout: float = WORKER_TIMEOUT_S) -> None:
    """Until the process is stopped (state T in /proc/PID/stat); fails if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        assert state != "Z", "the victim exited before its trial"
        time.sleep(0.05)
    pytest.fail("the victim never reached its trial")


@pytest.mark.slow
def test_a_torchrun_job_and_a_single_process_worker_join_one_study(postgres, tmp_path, schema):
    storage = postgres.new_database()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    job = start(
        [*torchrun, "-m", "calibrate", *worker_command(storage, tmp_path / "node")[3:]],
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    single = start(worker_command(storage, tmp_path / "single"))
    outcomes = [finish(job), finish(single)]
    assert [code for code, _, _ in outcomes] == [0, 0], [err[-2000:] for _, _, err in outcomes]
    study = one_study(storage)  # rank 0 fits; the 2-rank job's spectra equal one process's
    assert BUDGET <= len(trials(study, TrialState.COMPLETE)) <= BUDGET + 1
    assert start_labels(study) == SHARED_STARTS
    node, alone = (
        written_table(o[1], tmp_path / f, schema) for o, f in zip(outcomes, ("node", "single"), strict=True)
    )
    assert node["provenance"]["ranks"] == 2 and "ranks" not in alone["provenance"]
    assert node["provenance"]["search"]["study"] == alone["provenance"]["search"]["study"]


@pytest.mark.parametrize("fault", ["host", "password", "database"])
def test_a_bad_postgres_url_fails_with_one_line_before_any_work(fault, postgres, tmp_path, monkeypatch):
    good = postgres.new_database()
    url = {
        "host": postgres.url("postgres", host=tmp_path / "no-server-here"),
        "password": good.replace(PASSWORD, "wrong-pw"),
        "database": postgres.url("no_such_database"),
    }[fault]
    reason = {
        "host": "No such file or directory",
        "password": 'password authentication failed for user "calibrate"',
        "database": 'database "no_such_database" does not exist',
    }[fault]
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("long work started on a bad storage"))
    out = tmp_path / "tables"
    args = [*TINY, "--storage", url, "--out", str(out), "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, with_default_command(args))
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    masked = url.replace(f":{PASSWORD}@", ":***@").replace(":wrong-pw@", ":***@")
    assert re.match(re.escape(f"error: optuna storage '{masked}' failed: "), line), line
    assert reason in line and PASSWORD not in line and "wrong-pw" not in line
    assert not out.exists()
