"""Recording under DDP and FSDP2 (2 gloo ranks on CPU): each matrix recorded once, by its owner rank."""

from __future__ import annotations

import multiprocessing
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import (
    OPTIMIZER_SETTINGS,
    WORKER_TIMEOUT_S,
    WORLD_SIZE,
    join_gloo_group,
    make_net,
    train,
)
from torch import nn

from root_core import ROOT, root_param_groups
from root_core.recording import read_recordings

pytestmark = pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")

STEPS = 3  # the skipped layer (test_distributed.SKIP_STEP) has no gradient on step 2: not recorded then
# float64 everywhere; the ranks' spectra differ from one process's only by the summation order of the
# gradient all-reduce (~1e-16 relative, test_distributed.DISTRIBUTED_ATOL's reasoning) plus the float64
# eigvalsh of a Gram matrix of the same update (~1e-15 of σ_max), far below any algorithmic difference.
SPECTRUM_ATOL = 1e-10


def make_optimizer(model: nn.Module, folder: Path, data_parallel: bool | None) -> ROOT:
    groups = root_param_groups(model, adamw_lr=0.01)
    return ROOT(groups, data_parallel=data_parallel, record_dir=folder, record_every=1, **OPTIMIZER_SETTINGS)


def _worker(rank: int, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        join_gloo_group(rank, out)
        model = nn.parallel.DistributedDataParallel(make_net(), find_unused_parameters=True)
        train(model, make_optimizer(model, out / "ddp", data_parallel=True), range(STEPS), rank, WORLD_SIZE)

        from torch.distributed.fsdp import fully_shard

        model = make_net()
        for layer in model.children():
            fully_shard(layer)
        fully_shard(model)
        train(model, make_optimizer(model, out / "fsdp", data_parallel=None), range(STEPS), rank, WORLD_SIZE)
        dist.barrier()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(out: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(r, str(out))) for r in range(WORLD_SIZE)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(WORKER_TIMEOUT_S)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    errors = [p.read_text() for p in sorted(out.glob("rank*.error"))]
    assert not errors, "\n".join(errors)
    assert [w.exitcode for w in workers] == [0] * WORLD_SIZE


@pytest.mark.slow
def test_each_matrix_is_recorded_once_by_its_owner_under_ddp_and_fsdp2(tmp_path):
    single = tmp_path / "single"
    model = make_net()
    train(model, make_optimizer(model, single, data_parallel=None), range(STEPS))
    reference = {(s.step, s.name): s for s in read_recordings(single)}
    spawn(tmp_path)
    for how in ("ddp", "fsdp"):
        recorded = read_recordings(tmp_path / how)
        counts = Counter((s.step, s.name) for s in recorded)
        assert counts == Counter(reference.keys()), how  # every (step, matrix) once across both ranks
        ranks = {s.rank for s in recorded}
        assert ranks == {0, 1}, f"{how}: both ranks own matrices"
        assert {p.name.split(".")[1] for p in (tmp_path / how).iterdir()} == {"rank0", "rank1"}
        for spectrum in recorded:
            expected = reference[(spectrum.step, spectrum.name)]
            assert spectrum.shape == expected.shape, (how, spectrum.name)
            torch.testing.assert_close(
                spectrum.singular_values, expected.singular_values, rtol=0.0, atol=SPECTRUM_ATOL
            )
