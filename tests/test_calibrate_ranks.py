"""root-calibrate under torchrun: the work split, failures on one rank, and the same table as one process."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from calibrate.cli import app, resolve_device, with_default_command
from calibrate.errors import CalibrationError
from calibrate.fitting import pipeline, ranks
from calibrate.sampling.synthetic import synthetic_samples
from root_core.distributed import assign_owners

# The tiny run of tests/test_cli.py: a harvest (2 real samples) and 4 synthetic ones at 16x48.
TINY = ["--shapes", "16x48", "--samples", "6", "--ratio", "1:2", "--iterations", "4"]
TINY += ["--harvest-steps", "12", "--quiet", "--no-cache"]
# Two torchrun workers start in ~5 s each on a loaded 2-core machine; the tiny run itself takes ~3 s.
TORCHRUN_TIMEOUT_S = 240
WORKER_TIMEOUT_S = 75.0


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port, so parallel runs do not collide) with 2 CPU ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    return subprocess.run(
        [*command, "-m", "calibrate", *args],
        capture_output=True,
        text=True,
        timeout=TORCHRUN_TIMEOUT_S,
        env=env,
        check=False,
    )


def request(**overrides) -> pipeline.CalibrationRequest:
    settings = dict(
        shapes=[(16, 48)], out=Path("unused"), name="t", samples=6, ratio=(1, 2), harvest_steps=12
    )
    return pipeline.CalibrationRequest(**{**settings, **overrides})


def test_synthetic_sample_by_index_is_the_one_synthetic_samples_draws():
    drawn = synthetic_samples((16, 48), 9, seed=3)
    for index, sample in enumerate(drawn):
        alone = ranks.synthetic_at((16, 48), index, seed=3)
        assert alone.source == sample.source and alone.matrix.equal(sample.matrix)


def test_work_units_cover_each_sample_once_and_both_ranks_get_work():
    req = request(shapes=[(16, 48), (32, 32)], samples=8)
    plans = {key: pipeline.plan_samples(key, req, []) for key in req.shapes}
    units = ranks.work_units(plans, req)
    for key, plan in plans.items():
        indices = sorted(i for u in units if u.key == key for i in u.indices)
        assert indices == list(range(plan.real + plan.synthetic))
        assert [u.kind for u in units if u.key == key].count("harvest") == 1  # one training run per shape
    owners = assign_owners([u.cost for u in units], 2)
    assert set(owners) == {0, 1}
    # The harvests cost far more than a spectrum at these sizes, so they land on different ranks.
    assert len({o for u, o in zip(units, owners, strict=True) if u.kind == "harvest"}) == 2


def test_checked_indices_are_the_validation_samples_the_single_process_checks():
    req = request(samples=16, ratio=(1, 3), check_samples=3)
    plan = pipeline.plan_samples((16, 48), req, [])
    # As the pipeline orders them: the real samples, then synthetic samples 0, 1, … (their families
    # cycle from index 0, which the split reads).
    real = synthetic_samples((16, 48), plan.real, seed=1)
    for sample in real:
        object.__setattr__(sample, "kind", "real")
    samples = real + synthetic_samples((16, 48), plan.synthetic, seed=0)
    _, validation = pipeline.train_validation_split(samples, req.validation_fraction, seed=req.seed)
    position = {id(s): i for i, s in enumerate(samples)}
    expected = [position[id(s)] for s in validation[: req.check_samples]]
    assert ranks.checked_indices(plan, req) == expected


def test_outside_torchrun_one_process_is_the_whole_team(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with ranks.joined() as team:
        assert (team.rank, team.world, team.split, team.leader) == (0, 1, False, True)
        assert team.gather(lambda: 5) == [5] and team.from_leader(lambda: 6) == 6
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ranks.launch() == ranks.Launch(rank=1, world=2, local_rank=0)


TORCHRUN_RANK_1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
CUDA_N_REFUSED = (
    "invalid --device 'cuda:0' under torchrun (2 ranks): each rank computes on its own GPU, "
    "cuda:LOCAL_RANK; pass --device cuda"
)


@pytest.mark.parametrize(
    ("device", "env", "expected"),
    [
        ("cuda", TORCHRUN_RANK_1, "cuda:1"),
        (
            "cuda",
            {**TORCHRUN_RANK_1, "LOCAL_RANK": "0", "RANK": "3", "WORLD_SIZE": "4"},
            "cuda:0",
        ),  # 2nd node
        ("cpu", TORCHRUN_RANK_1, "cpu"),
        ("cuda", {}, "cuda"),  # one process: as given
        ("cuda:3", {}, "cuda:3"),
        ("cuda:0", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "cuda:0"),  # torchrun, one rank
    ],
)
def test_rank_device_gives_each_torchrun_rank_its_own_gpu(device, env, expected):
    assert ranks.rank_device(device, ranks.launch(env)) == expected


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_rank_device_refuses_a_fixed_gpu_under_torchrun(device):
    with pytest.raises(CalibrationError, match=re.escape(CUDA_N_REFUSED.replace("cuda:0", device))):
        ranks.rank_device(device, ranks.launch({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}))


def test_resolve_device_under_torchrun(monkeypatch):
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    # No CUDA needed to refuse cuda:N: the usage is wrong on any machine.
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(CalibrationError, match=re.escape(CUDA_N_REFUSED)):
        resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == resolve_device("auto") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    message = "invalid --device 'cuda': LOCAL_RANK 1 has no GPU of its own, this machine has 1"
    with pytest.raises(CalibrationError, match=re.escape(message)):
        resolve_device("cuda")
    with pytest.raises(CalibrationError, match=re.escape("invalid --device 'cuda1': expected auto, cpu")):
        resolve_device("cuda1")


def test_cli_refuses_cuda_n_under_torchrun_with_one_line(monkeypatch, tmp_path):
    """The calibrate command's own error path; the ranks' group is stood in for by a one-process team."""
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(ranks, "joined", contextlib.contextmanager(lambda: iter([ranks.Team()])))
    result = CliRunner().invoke(
        app, with_default_command([*TINY, "--device", "cuda:0", "--out", str(tmp_path / "tables")])
    )
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {CUDA_N_REFUSED}"
    assert not (tmp_path / "tables").exists()


# --------------------------------------------------------------------------- two gloo processes


def _team_worker(rank: int, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=30),
        )
        team = ranks.Team(rank, 2, rank)
        seen = [team.gather(lambda: rank * 10)]
        for attempt in (
            lambda: team.gather(lambda: 1 / rank),  # fails on rank 0 only
            lambda: team.gather(lambda: _raise_if(rank == 1, "no momentum here")),
            lambda: team.from_leader(lambda: _raise_if(True, "fit failed")),
        ):
            try:
                attempt()
                seen.append("no error")
            except Exception as error:
                seen.append(f"{type(error).__name__}: {error}")
        seen.append(team.from_leader(lambda: f"written by rank {rank}"))
        dist.barrier()
        dist.destroy_process_group()
        (out / f"rank{rank}.json").write_text(json.dumps(seen))
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _raise_if(condition: bool, message: str) -> None:
    if condition:
        raise CalibrationError(message)


@pytest.mark.slow
def test_a_failure_on_one_rank_raises_on_every_rank_and_nobody_hangs(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_team_worker, args=(r, str(tmp_path))) for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WORKER_TIMEOUT_S)
        if worker.is_alive():
            worker.kill()
    errors = [p.read_text() for p in tmp_path.glob("*.error")]
    assert not errors, errors[0]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero[0] == one[0] == [0, 10]
    assert zero[1] == "ZeroDivisionError: division by zero"
    assert one[1] == "CalibrationError: rank 0: ZeroDivisionError: division by zero"
    assert (
        zero[2] == "CalibrationError: rank 1: no momentum here"
        and one[2] == "CalibrationError: no momentum here"
    )
    assert zero[3] == "CalibrationError: fit failed" and one[3] == "CalibrationError: rank 0: fit failed"
    assert zero[4] == one[4] == "written by rank 0"


# --------------------------------------------------------------------------- torchrun end to end


@pytest.mark.slow
def test_two_ranks_write_the_same_table_as_one_process(tmp_path):
    single = CliRunner().invoke(
        app, with_default_command([*TINY, "--name", "tiny", "--out", str(tmp_path / "one")])
    )
    assert single.exit_code == 0, single.output
    split = torchrun([*TINY, "--name", "tiny", "--out", str(tmp_path / "two")], tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    # Rank 0 alone prints (how to load the table, then its path), and the table is written once.
    printed = split.stdout.strip().splitlines()
    assert len(printed) == 2 and printed[0].startswith("load it with ROOT(..., table=")
    assert printed[1] == str(tmp_path / "two" / "tiny" / "v1.json")
    assert sorted(p.name for p in (tmp_path / "two").rglob("*") if p.is_file()) == ["v1.json"]
    one = json.loads((tmp_path / "one" / "tiny" / "v1.json").read_text())
    two = json.loads((tmp_path / "two" / "tiny" / "v1.json").read_text())
    assert two["entries"][0]["coefficients"] == one["entries"][0]["coefficients"]  # bit for bit
    metrics = [{k: v for k, v in t["entries"][0]["metrics"].items() if k != "seconds"} for t in (one, two)]
    assert metrics[0] == metrics[1]
    assert two["provenance"]["ranks"] == 2 and "ranks" not in one["provenance"]
    assert two["provenance"]["sources"] == one["provenance"]["sources"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            ["--ratio", "0:0"],
            "invalid ratio '0:0': expected R:S with two non-negative integers, not both 0, e.g. 1:3",
        ),
        (["--device", "cuda:0"], CUDA_N_REFUSED),  # refused before CUDA is looked for: CPU machines too
    ],
)
def test_bad_input_under_torchrun_fails_with_one_line_from_rank_0(tmp_path, bad, message):
    result = torchrun([*TINY, *bad, "--out", str(tmp_path / "tables")], tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {message}"]
    assert not (tmp_path / "tables").exists()
