"""Online recalibration (issue 12, item 4): ROOT refits its rows on its own recorded spectra while training.

root_core/recalibration.py holds the schedule (when a fit starts and when its rows apply);
calibrate/fitting/online.py the fit itself. Sizes are tiny and the searches short (3 generations), so each
test takes seconds.
"""

from __future__ import annotations

import ast
import concurrent.futures
import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import calibrate.fitting.online as online
from calibrate.determinism import pinned_threads
from calibrate.errors import CalibrationError
from calibrate.fitting.fit import FitSettings
from calibrate.fitting.objective import safety, sample_errors
from calibrate.fitting.online import (
    OnlineRecalibrator,
    OnlineSettings,
    held_out_split,
    recalibrate,
    write_table,
)
from calibrate.fitting.pipeline import baseline_rows
from root_core import ROOT
from root_core.recalibration import (
    RecalibrationRequest,
    RecalibrationResult,
    ShapePool,
    normalised_spectrum,
)
from root_core.schedule import Schedule
from root_core.tables import CoefficientTable, load_table

ROOT_CORE = Path(__file__).resolve().parent.parent / "root_core"
QUICK_FIT = FitSettings(iterations=3)
MUON_ROW = (3.4445, -4.7750, 2.0315)  # docs/design.md §2


class Net(nn.Module):
    """A wide, a tall and a square matrix: canonical shapes 16x32 (two of them) and 16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.mix = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.tanh(self.down(torch.tanh(self.up(x)))))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: a second OpenMP thread only waits (~10 ms a 16x32 matmul
    under load, against microseconds on one thread)."""
    with pinned_threads(1):
        yield


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def train(model: nn.Module, optimizer: ROOT, steps: range) -> None:
    for step in steps:
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        (model(x) - x.flip(-1)).pow(2).mean().backward()
        optimizer.step()


def online_root(model: nn.Module, tmp_path: Path, recalibrator, **kwargs) -> ROOT:
    matrices = [p for p in model.parameters() if p.ndim == 2]
    return ROOT(
        matrices,
        lr=0.02,
        record_dir=tmp_path / "records",
        record_every=kwargs.pop("record_every", 1),
        recalibrate=recalibrator,
        recalibrate_every=kwargs.pop("every", 4),
        recalibrate_lag=kwargs.pop("lag", 2),
        **kwargs,
    )


def inline(tmp_path: Path, **kwargs) -> OnlineRecalibrator:
    return OnlineRecalibrator(out=tmp_path / "tables", processes=0, fit=QUICK_FIT, **kwargs)


# ---- layering ------------------------------------------------------------------------------------------


def test_root_core_never_imports_calibrate():
    for path in ROOT_CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n == "calibrate" or n.startswith("calibrate.") for n in names), path


# ---- bad input: one line at construction ----------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(recalibrate_every=4), "recalibrate_every=4 needs recalibrate=: the object that fits the rows"),
    (dict(recalibrate="fit"), "recalibrate must have a submit(request) method returning a future, got str"),
    (
        dict(recalibrate=object()),
        "recalibrate must have a submit(request) method returning a future, got object",
    ),
    (dict(recalibrate_lag=2), "recalibrate_lag=2 needs recalibrate= and recalibrate_every="),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_recalibration_arguments_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ROOT([nn.Parameter(torch.zeros(4, 4))], **kwargs)


@pytest.mark.parametrize(
    ("every", "lag", "message"),
    [
        (0, None, "recalibrate_every must be an integer >= 1, got 0"),
        (True, None, "recalibrate_every must be an integer >= 1, got True"),
        (2.5, None, "recalibrate_every must be an integer >= 1, got 2.5"),
        (None, None, "recalibrate= needs recalibrate_every=K: refit every K steps"),
        (4, 5, "recalibrate_lag must be an integer in [1, recalibrate_every=4], got 5"),
        (4, 0, "recalibrate_lag must be an integer in [1, recalibrate_every=4], got 0"),
    ],
)
def test_bad_period_or_lag_is_one_line(tmp_path, every, lag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ROOT(
            [nn.Parameter(torch.zeros(4, 4))],
            record_dir=tmp_path,
            recalibrate=inline(tmp_path),
            recalibrate_every=every,
            recalibrate_lag=lag,
        )


def test_recalibration_without_recording_is_one_line(tmp_path):
    message = "recalibrate_every=4 refits on recorded spectra, but this ROOT records none: pass record_dir="
    with pytest.raises(ValueError, match=re.escape(message)):
        ROOT([nn.Parameter(torch.zeros(4, 4))], recalibrate=inline(tmp_path), recalibrate_every=4)


def test_bad_recalibrator_settings_are_one_line(tmp_path):
    with pytest.raises(CalibrationError, match=re.escape("processes must be 0 (inline) or 1")):
        OnlineRecalibrator(out=tmp_path, processes=2)
    with pytest.raises(
        CalibrationError, match=re.escape("min_improvement must be a number in [0, 1), got -0.1")
    ):
        OnlineRecalibrator(out=tmp_path, min_improvement=-0.1)
    with pytest.raises(CalibrationError, match=re.escape("invalid online table name 'My Table'")):
        OnlineRecalibrator(out=tmp_path, name="My Table")


def test_an_unwritable_table_folder_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(
        CalibrationError, match=re.escape(f"cannot create the online table folder {blocker}/x")
    ):
        OnlineRecalibrator(out=blocker / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---- the pool and the split -----------------------------------------------------------------------------


def test_the_pool_keeps_an_even_spread_over_everything_recorded():
    pool = ShapePool()
    for index in range(100):
        pool.add(torch.full((2,), float(index)), f"record {index}", cap=8)
    assert len(pool.spectra) <= 8
    assert pool.indices == [0, 16, 32, 48, 64, 80, 96]  # stride 16: early, middle and late records alike
    assert [float(s[0]) for s in pool.spectra] == pool.indices
    restored = ShapePool.from_state(copy.deepcopy(pool.state_dict()))
    for pool_ in (pool, restored):
        pool_.add(torch.zeros(2), "next", cap=8)
    assert restored.state_dict()["indices"] == pool.state_dict()["indices"]


def test_held_out_spectra_cover_the_whole_run():
    assert held_out_split(2) == ([0], [1])
    assert held_out_split(9) == ([0, 1, 2, 4, 5, 6, 8], [3, 7])


def test_recorded_spectra_are_normalised_and_unusable_ones_skipped():
    spectrum = normalised_spectrum(torch.tensor([3.0, 4.0], dtype=torch.float64), (2, 5))
    assert spectrum.tolist() == [0.6, 0.8]
    assert normalised_spectrum(torch.zeros(2, dtype=torch.float64), (2, 5)) is None  # a zero update
    assert normalised_spectrum(torch.tensor([1.0, float("nan")]), (2, 5)) is None
    assert normalised_spectrum(torch.ones(3), (2, 5)) is None  # not one value per row of the short side


# ---- the fit --------------------------------------------------------------------------------------------


def low_rank_spectra(count: int, r: int, seed: int = 0) -> torch.Tensor:
    """Momentum-like spectra: a power law over three decades, normalised."""
    generator = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -3, r, dtype=torch.float64)
    spectra = decay * (1 + 0.1 * torch.rand(count, r, generator=generator, dtype=torch.float64))
    spectra = spectra.sort(dim=-1, descending=True).values
    return spectra / spectra.norm(dim=-1, keepdim=True)


def request_for(table: str, spectra: torch.Tensor, shape=(16, 32)) -> RecalibrationRequest:
    return RecalibrationRequest(
        step=8,
        table=load_table(table).to_dict(),
        spectra={shape: spectra},
        sources={shape: [f"step {i}: layer" for i in range(spectra.shape[0])]},
        clip_quantiles=[0.9],
    )


def test_a_refit_replaces_poor_rows_and_writes_the_next_version(tmp_path):
    settings = OnlineSettings(out=tmp_path, fit=QUICK_FIT)
    spectra = low_rank_spectra(12, 16)
    result = recalibrate(request_for("muon", spectra), settings)
    decision = result.report["16x32"]
    assert decision["decision"] == "swap"
    assert Path(result.path) == tmp_path / "muon-online" / "v1.json"
    table = load_table(result.path)
    assert table.to_dict() == result.table
    assert table.default == load_table("muon").default  # shapes it did not see keep their rows
    _, held = held_out_split(12)
    new, old = table.schedule_for((16, 32)), load_table("muon").schedule_for((16, 32))
    assert sample_errors(spectra[held], new).mean() < 0.99 * sample_errors(spectra[held], old).mean()
    assert safety(new).ok  # within the CLI's bound, under the rounding margin
    assert table.provenance["parent"] == load_table("muon").ref
    assert table.provenance["sources"]["16x32"][0] == "step 0: layer"
    assert table.entry((16, 32)).metrics["online"]["step"] == 8


def test_rows_that_are_already_good_are_kept_and_nothing_is_written(tmp_path):
    settings = OnlineSettings(out=tmp_path, fit=QUICK_FIT)
    first = recalibrate(request_for("muon", low_rank_spectra(12, 16)), settings)
    again = RecalibrationRequest(
        **{**request_for("muon", low_rank_spectra(12, 16)).__dict__, "table": first.table}
    )
    result = recalibrate(again, settings)
    assert result.table is None and result.path is None
    assert result.report["16x32"]["decision"] == "keep"
    assert "not 1% below the current rows'" in result.report["16x32"]["reason"]
    assert [p.name for p in (tmp_path / "muon-online").iterdir()] == ["v1.json"]


def test_fitted_rows_that_lose_to_polar_express_on_held_out_spectra_fall_back_to_its_rows(
    tmp_path, monkeypatch
):
    """The CLI's fallback: here the fit is made to return Muon's triple, which loses to Polar Express."""
    real_fit = online.fit

    def muon_fit(*args, **kwargs):
        return dataclasses.replace(real_fit(*args, **kwargs), schedule=Schedule(rows=(MUON_ROW,), steps=5))

    monkeypatch.setattr(online, "fit", muon_fit)
    result = recalibrate(
        request_for("classic", low_rank_spectra(12, 16)), OnlineSettings(out=tmp_path, fit=QUICK_FIT)
    )
    decision = result.report["16x32"]
    assert decision["decision"] == "swap"
    assert decision["fallback"] == "polar-express"
    assert decision["reason"].startswith("polar-express's rows (fitted rows lost: validation spectral error")
    entry = CoefficientTable.from_dict(result.table).entry((16, 32))
    assert entry.coefficients == baseline_rows("polar-express", 5).rows  # its 1.02 folded into row 1
    assert entry.metrics["fallback"]["fitted_coefficients"] == [list(MUON_ROW)]


def test_too_few_spectra_keep_the_rows(tmp_path):
    result = recalibrate(
        request_for("muon", low_rank_spectra(1, 16)), OnlineSettings(out=tmp_path, fit=QUICK_FIT)
    )
    assert result.table is None
    assert result.report["16x32"] == {"decision": "keep", "reason": "1 recorded spectrum; a refit needs 2"}


def test_a_scaled_table_gets_rows_for_its_own_normalisation(tmp_path):
    """Polar Express divides by 1.02·‖G‖_F: the new entry's first row is unfolded to that scale."""
    spectra = low_rank_spectra(12, 16)
    settings = OnlineSettings(out=tmp_path, fit=QUICK_FIT, min_improvement=0.0)
    result = recalibrate(request_for("polar-express", spectra), settings)
    assert result.report["16x32"]["decision"] == "swap"
    table = CoefficientTable.from_dict(result.table)
    assert table.normalization.scale == 1.02
    errors = result.report["16x32"]["errors"]
    assert errors["candidate"] < errors["current"]
    # The unfolded rows at scale 1.02 compute the fitted scale-1 rows up to float64 rounding.
    assert float(sample_errors(spectra, table.schedule_for((16, 32))).mean()) == pytest.approx(
        errors["candidate_all"], rel=1e-12
    )


def test_a_resumed_fit_reuses_the_file_it_wrote_and_a_clash_takes_the_next_version(tmp_path):
    settings = OnlineSettings(out=tmp_path, fit=QUICK_FIT)
    request = request_for("muon", low_rank_spectra(12, 16))
    first = recalibrate(request, settings)
    again = recalibrate(request, settings)  # e.g. a resumed run redoing the fit in flight
    assert again.path == first.path
    assert (
        CoefficientTable.from_dict(again.table).coefficients_hash == load_table(first.path).coefficients_hash
    )
    other = recalibrate(request_for("muon", low_rank_spectra(12, 16, seed=1)), settings)
    assert Path(other.path).name == "v2.json"  # v1 holds other rows: never overwritten
    path, _ = write_table(CoefficientTable.from_dict(other.table), tmp_path)
    assert path.name == "v2.json"


# ---- the schedule inside ROOT --------------------------------------------------------------------------


class RecordingRecalibrator:
    """Answers every request with a fixed table, and remembers the requests and when results were read."""

    def __init__(self, table: dict) -> None:
        self.table = table
        self.requests: list[RecalibrationRequest] = []

    def submit(self, request):
        self.requests.append(request)
        future = concurrent.futures.Future()
        future.set_result(RecalibrationResult(table=self.table, path=None, report={"fake": True}))
        return future


def test_rows_swap_exactly_lag_steps_after_the_launch_however_fast_the_fit(tmp_path):
    new = CoefficientTable.create(name="swapped", default_rows=(15 / 8, -10 / 8, 3 / 8)).to_dict()
    fake = RecordingRecalibrator(new)
    model = make_net()
    optimizer = online_root(model, tmp_path, fake, every=4, lag=3)
    seen = []
    for step in range(1, 9):
        train(model, optimizer, range(step, step + 1))
        seen.append(optimizer.table.name)
    assert [r.step for r in fake.requests] == [4, 8]  # a fit starts after every 4th step
    assert seen == ["muon"] * 6 + ["swapped"] * 2  # launched after step 4, in use from step 8
    assert optimizer.param_groups[0]["root_table"] == "swapped@1"
    assert optimizer.recalibrations[0] | {"report": None} == {
        "launched": 4,
        "applied": 7,
        "path": None,
        "swapped": True,
        "report": None,
    }
    first = fake.requests[0]
    assert sorted(first.spectra) == [(16, 16), (16, 32)]
    assert first.spectra[(16, 32)].shape == (8, 16)  # steps 1-4, two 16x32 matrices each
    assert first.sources[(16, 32)][0].startswith("step 1: ")
    assert first.spectra[(16, 32)].norm(dim=-1).sub(1).abs().max() < 1e-12


def test_a_fit_is_launched_only_when_something_new_was_recorded(tmp_path):
    fake = RecordingRecalibrator(None)
    model = make_net()
    optimizer = online_root(model, tmp_path, fake, every=2, lag=1, record_every=5)  # records steps 1, 6
    train(model, optimizer, range(1, 8))
    assert [r.step for r in fake.requests] == [2, 6]  # after step 4 the pool was the one fitted after 2
    assert [r.spectra[(16, 16)].shape[0] for r in fake.requests] == [1, 2]
    assert [entry["applied"] for entry in optimizer.recalibrations] == [3, 7]


def run(tmp_path: Path, steps: range, *, state=None, processes: int = 0):
    model = make_net()
    with OnlineRecalibrator(out=tmp_path / "tables", processes=processes, fit=QUICK_FIT) as recalibrator:
        optimizer = online_root(model, tmp_path, recalibrator, every=4, lag=2)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        train(model, optimizer, steps)
        return model, optimizer


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_after", [5, 6])
def test_a_resumed_run_continues_with_the_same_rows_and_parameters(tmp_path, checkpoint_after):
    """Checkpointed after step 5 (a fit launched after step 4 is in flight, due after step 6) or after step
    6 (its rows just applied) and resumed in a fresh optimizer, the run ends bit for bit where the
    uninterrupted one does."""
    whole_model, whole = run(tmp_path / "whole", range(1, 13))
    assert [r["swapped"] for r in whole.recalibrations] == [True, True]  # the rows did change, twice

    first_model, first = run(tmp_path / "resumed", range(1, checkpoint_after + 1))
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, checkpoint)
    state = torch.load(checkpoint)  # weights_only: the state is tensors and plain data
    resumed_model, resumed = run(tmp_path / "resumed", range(checkpoint_after + 1, 13), state=state)

    for (name, p), q in zip(whole_model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert resumed.table.coefficients_hash == whole.table.coefficients_hash
    assert resumed.table.ref == load_table(tmp_path / "resumed" / "tables" / "muon-online" / "v2.json").ref
    steps = [(r["launched"], r["applied"], r["swapped"], r["path"]) for r in whole.recalibrations]
    assert [(r["launched"], r["applied"], r["swapped"]) for r in resumed.recalibrations] == [
        s[:3] for s in steps
    ]


def test_a_resume_does_not_need_the_table_on_disk(tmp_path):
    model, optimizer = run(tmp_path / "a", range(1, 8))  # swapped after step 6
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    for file in (tmp_path / "a" / "tables").rglob("*.json"):
        file.unlink()
    fresh = ROOT([p for p in make_net().parameters() if p.ndim == 2], lr=0.02)  # no recalibration at all
    fresh.load_state_dict(state["optimizer"])
    assert fresh.table.coefficients_hash == optimizer.table.coefficients_hash
    assert "root_recalibration" in fresh.state_dict()  # and it keeps carrying the rows on


@pytest.mark.slow
def test_a_worker_process_gives_the_rows_an_inline_fit_gives(tmp_path):
    """The spawned worker pins its own thread count: same rows, same parameters as the inline fit."""
    inline_model, inline_optimizer = run(tmp_path / "inline", range(1, 9), processes=0)
    worker_model, worker_optimizer = run(tmp_path / "worker", range(1, 9), processes=1)
    assert worker_optimizer.table.coefficients_hash == inline_optimizer.table.coefficients_hash
    for p, q in zip(inline_model.parameters(), worker_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert json.loads(json.dumps(worker_optimizer.recalibrations))  # plain data, for logs


def test_a_multi_rank_job_is_refused_at_construction(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(
        ValueError, match=re.escape("online recalibration runs in single-process training only")
    ):
        ROOT(
            [nn.Parameter(torch.zeros(4, 4))],
            record_dir=tmp_path,
            recalibrate=inline(tmp_path),
            recalibrate_every=2,
        )


class FailingRecalibrator:
    def submit(self, request):
        future = concurrent.futures.Future()
        future.set_exception(OSError("worker died"))
        return future


def test_a_failed_fit_names_its_launch_step_where_the_training_waits_for_it(tmp_path):
    model = make_net()
    optimizer = online_root(model, tmp_path, FailingRecalibrator(), every=2, lag=1)
    train(model, optimizer, range(1, 3))  # launched after step 2
    message = "online recalibration launched after step 2 failed: OSError: worker died"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        train(model, optimizer, range(3, 4))


@pytest.mark.slow
def test_close_abandons_a_fit_in_flight(tmp_path):
    recalibrator = OnlineRecalibrator(out=tmp_path, fit=FitSettings(iterations=200))
    future = recalibrator.submit(request_for("muon", low_rank_spectra(40, 64), shape=(64, 256)))
    recalibrator.close()  # returns without waiting for the fit
    # Running in the worker, the fit dies with it (BrokenProcessPool); still queued (the worker was slow to
    # start on a loaded machine), it is cancelled. Either way no rows come back and nothing is written.
    abandoned = (concurrent.futures.process.BrokenProcessPool, concurrent.futures.CancelledError)
    with pytest.raises(abandoned):
        future.result()
    assert not (tmp_path / "muon-online").exists()


UNGUARDED_SCRIPT = """
import sys, torch
from torch import nn
from calibrate.fitting.fit import FitSettings
from calibrate.fitting.online import OnlineRecalibrator
from root_core import ROOT
print("training", flush=True)
torch.manual_seed(0)
model = nn.Linear(16, 32)
folder = sys.argv[1]
recalibrator = OnlineRecalibrator(out=folder + "/tables", fit=FitSettings(iterations=3))
optimizer = ROOT([model.weight], lr=0.02, record_dir=folder + "/records", recalibrate=recalibrator,
                 recalibrate_every=2, recalibrate_lag=1)
for step in range(3):
    optimizer.zero_grad()
    model(torch.randn(8, 16)).pow(2).mean().backward()
    optimizer.step()
recalibrator.close()
print("applied", [entry["applied"] for entry in optimizer.recalibrations], flush=True)
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_trains_once(tmp_path):
    """The worker is spawned without the script as its main module, so it never runs the training."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["training", "applied [3]"]
