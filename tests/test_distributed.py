"""ROOT under DDP and FSDP2 (CPU, gloo, 2 spawned processes) against a single-process run."""

from __future__ import annotations

import multiprocessing
import re
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import root_core.optimizer
from root_core import ROOT, root_param_groups
from root_core.distributed import DataParallelWarning, assign_owners, resolve_data_parallel, row_chunks

pytestmark = pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")

WORLD_SIZE = 2
STEPS = 4
RESUME_AT = 2  # save after this many steps, load into a fresh optimizer, finish the run
SKIP_STEP = 1  # the step on which `skipped` gets no gradient
BATCH = 8
# Collectives that hang must fail the test, not block the suite: gloo gives up on a collective after
# COLLECTIVE_TIMEOUT, and the test kills workers still running after WORKER_TIMEOUT (start-up on a loaded
# 2-core machine measured ~5 s per spawn).
COLLECTIVE_TIMEOUT = timedelta(seconds=30)
WORKER_TIMEOUT_S = 75.0
# float64 on both sides; the only differences are the summation order of the gradient all-reduce
# (each rank's half-batch mean, then averaged) and batched against single matmuls in NS, ~1e-16 per op.
# Measured ≤ 1e-15 on these parameters after 4 steps; 1e-11 still catches any algorithmic difference
# (a wrong owner, row block or skipped momentum shows at ≥ 1e-3).
DISTRIBUTED_ATOL = 1e-11
OPTIMIZER_SETTINGS: dict[str, Any] = dict(
    lr=0.05, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float64
)


class Net(nn.Module):
    """Matrices 7×5 (7 rows: 4 + 3 on 2 ranks), two 7×7 (one shape group), 3×7 and 1×7 (an empty shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 7, bias=False)
        self.middle = nn.Linear(7, 7)  # its bias goes to AdamW, sharded 4 + 3 under FSDP2
        self.skipped = nn.Linear(7, 7, bias=False)
        self.narrow = nn.Linear(7, 3, bias=False)
        self.single = nn.Linear(3, 1, bias=False)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        h = torch.tanh(self.middle(torch.tanh(self.first(x))))
        if not skip:
            h = torch.tanh(self.skipped(h))
        return self.single(torch.tanh(self.narrow(h)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step + 1000 * seed)
    x = torch.randn(BATCH, 5, generator=generator, dtype=torch.float64)
    return x, torch.randn(BATCH, 1, generator=generator, dtype=torch.float64)


def make_optimizer(model: nn.Module, data_parallel: bool | None = None) -> ROOT:
    return ROOT(root_param_groups(model, adamw_lr=0.01), data_parallel=data_parallel, **OPTIMIZER_SETTINGS)


def train(
    model: nn.Module, optimizer: ROOT, steps: range, rank: int = 0, world: int = 1, seed: int = 0
) -> None:
    """Each rank takes its contiguous slice of the batch; the mean loss makes the averaged grads equal."""
    for step in steps:
        x, y = batch(step, seed)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = nn.functional.mse_loss(model(x[rows], skip=step == SKIP_STEP), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters by name (a collective for DTensors), without DDP's ``module.`` prefix."""
    out = {}
    for name, p in model.named_parameters():
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = whole.detach().clone()
    return out


def single_process_run(seed: int = 0) -> dict[str, torch.Tensor]:
    model = make_net(seed)
    train(model, make_optimizer(model), range(STEPS), seed=seed)
    return full_parameters(model)


# --------------------------------------------------------------------------- workers (spawned processes)


def join_gloo_group(rank: int, out: Path) -> None:
    """One CPU thread, and this rank in a WORLD_SIZE gloo group that meets through a file in ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'store'}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )


def _worker(rank: int, scenario: str, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        join_gloo_group(rank, out)
        scenarios = {"ddp": _ddp_scenario, "fsdp": _fsdp_scenario, "independent": _independent_scenario}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataParallelWarning)
            results = _count_splits(lambda: scenarios[scenario](rank, out))
        results["hints"] = [str(w.message) for w in caught if w.category is DataParallelWarning]
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down its connections while another still talks to it
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _count_splits(scenario) -> dict[str, Any]:
    """The scenario's results, and how often ROOT split replicated matrices across the ranks."""
    calls = []
    split = root_core.optimizer.orthogonalize_replicated

    def counted(*args, **kwargs):
        calls.append(1)
        return split(*args, **kwargs)

    root_core.optimizer.orthogonalize_replicated = counted  # this spawned process only
    try:
        return {**scenario(), "splits": len(calls)}
    finally:
        root_core.optimizer.orthogonalize_replicated = split


def _ddp_scenario(rank: int, out: Path) -> dict[str, Any]:
    def wrapped() -> nn.Module:
        return nn.parallel.DistributedDataParallel(make_net(), find_unused_parameters=True)

    model = wrapped()
    train(model, make_optimizer(model, data_parallel=True), range(STEPS), rank, WORLD_SIZE)
    uninterrupted = full_parameters(model)

    model = wrapped()
    optimizer = make_optimizer(model, data_parallel=True)
    train(model, optimizer, range(RESUME_AT), rank, WORLD_SIZE)
    torch.save(optimizer.state_dict(), out / f"optimizer{rank}.pt")
    optimizer = make_optimizer(model, data_parallel=True)
    optimizer.load_state_dict(torch.load(out / f"optimizer{rank}.pt", weights_only=False))
    train(model, optimizer, range(RESUME_AT, STEPS), rank, WORLD_SIZE)
    return {"uninterrupted": uninterrupted, "resumed": full_parameters(model)}


def _independent_scenario(rank: int, out: Path) -> dict[str, Any]:
    """Ranks holding different parameters (as pipeline stages do), with the default data_parallel."""
    model = make_net(seed=rank)
    train(model, make_optimizer(model), range(STEPS), seed=rank)
    train(model, make_optimizer(model), range(1), seed=rank)  # a second optimizer: no second warning
    return {"own": full_parameters(model)}


def _fsdp_scenario(rank: int, out: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    def sharded() -> nn.Module:
        model = make_net()
        for layer in model.children():
            fully_shard(layer)
        return fully_shard(model)

    model = sharded()
    optimizer = make_optimizer(model)
    train(model, optimizer, range(STEPS), rank, WORLD_SIZE)
    uninterrupted = full_parameters(model)
    buffer = optimizer.state[model.first.weight]["momentum_buffer"]
    assert isinstance(buffer, DTensor) and buffer.placements == (Shard(0),), buffer
    assert buffer.to_local().shape == (row_chunks(7, WORLD_SIZE)[rank], 5)

    results = {"uninterrupted": uninterrupted}
    for how in ("state_dict", "dcp"):
        model = sharded()
        optimizer = make_optimizer(model)
        train(model, optimizer, range(RESUME_AT), rank, WORLD_SIZE)
        if how == "state_dict":
            torch.save(optimizer.state_dict(), out / f"optimizer{rank}.pt")
            optimizer = make_optimizer(model)
            optimizer.load_state_dict(torch.load(out / f"optimizer{rank}.pt", weights_only=False))
        else:
            dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=out / "dcp")
            # As in a fresh process: DCP builds the state to load into with a zero-lr step, which it
            # skips (leaving nothing to load) when gradients are still around.
            optimizer.zero_grad(set_to_none=True)
            optimizer = make_optimizer(model)
            state = get_optimizer_state_dict(model, optimizer)  # the layout to load into
            dcp.load(state, checkpoint_id=out / "dcp")
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state)
        train(model, optimizer, range(RESUME_AT, STEPS), rank, WORLD_SIZE)
        results[f"resumed_{how}"] = full_parameters(model)
    results["bad_placement"] = _column_sharded_error()
    return results


def _column_sharded_error() -> str:
    """A layout other than FSDP2's must be refused with a clear message, on every rank alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    p = nn.Parameter(distribute_tensor(torch.ones(4, 6, dtype=torch.float64), mesh, [Shard(1)]))
    p.grad = distribute_tensor(torch.ones(4, 6, dtype=torch.float64), mesh, [Shard(1)])
    try:
        ROOT([p], ns_dtype=torch.float64).step()
    except ValueError as error:
        return str(error)
    return "no error"


def spawn_workers(scenario: str, out: Path) -> list[dict[str, Any]]:
    """Run ``scenario`` on WORLD_SIZE spawned ranks; fail (never hang) if any rank fails or overruns."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(r, scenario, str(out))) for r in range(WORLD_SIZE)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(WORKER_TIMEOUT_S)  # later ranks have had at least as long by then
    finally:
        stuck = [w for w in workers if w.is_alive()]
        for worker in stuck:
            worker.kill()
            worker.join()
    errors = [p.read_text() for p in sorted(out.glob("rank*.error"))]
    assert not errors, "\n".join(errors)
    assert not stuck, f"{scenario} workers still running after {WORKER_TIMEOUT_S} s"
    codes = [w.exitcode for w in workers]
    assert codes == [0] * WORLD_SIZE, (
        f"exit codes {codes}; results from {sorted(p.name for p in out.glob('rank*.pt'))}"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def assert_matches(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        torch.testing.assert_close(
            actual[name], tensor, rtol=0.0, atol=DISTRIBUTED_ATOL, msg=f"{what}: {name}"
        )


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_ddp_matches_single_process_and_resumes(tmp_path):
    reference = single_process_run()
    ranks = spawn_workers("ddp", tmp_path)
    for rank, result in enumerate(ranks):
        assert result["splits"] > 0 and result["hints"] == []  # data_parallel=True: split, silently
        assert_matches(result["uninterrupted"], reference, f"rank {rank}")
        for name, tensor in result["uninterrupted"].items():
            # Every rank applies the owners' bits: replicas never drift apart.
            assert torch.equal(tensor, ranks[0]["uninterrupted"][name]), f"rank {rank} differs: {name}"
            assert torch.equal(result["resumed"][name], tensor), f"resumed run differs: {name}"


@pytest.mark.slow
def test_ranks_holding_different_parameters_step_alone_by_default(tmp_path):
    """Several ranks are no proof of DDP: unless told, each rank steps its own matrices, never hanging."""
    ranks = spawn_workers("independent", tmp_path)
    for rank, result in enumerate(ranks):
        model = make_net(seed=rank)
        train(model, make_optimizer(model), range(STEPS), seed=rank)
        train(model, make_optimizer(model), range(1), seed=rank)
        assert_matches(result["own"], full_parameters(model), f"rank {rank}")
        assert result["splits"] == 0
        assert len(result["hints"]) == 1 and "pass data_parallel=True to split" in result["hints"][0]
    assert not torch.equal(ranks[0]["own"]["first.weight"], ranks[1]["own"]["first.weight"])


@pytest.mark.slow
def test_fsdp2_matches_single_process_resumes_and_keeps_state_sharded(tmp_path):
    reference = single_process_run()
    ranks = spawn_workers("fsdp", tmp_path)
    for rank, result in enumerate(ranks):
        assert_matches(result["uninterrupted"], reference, f"rank {rank}")
        for how in ("state_dict", "dcp"):
            for name, tensor in result["uninterrupted"].items():
                assert torch.equal(result[f"resumed_{how}"][name], tensor), f"{how} resume differs: {name}"
        assert "(Shard(dim=0),) on a 1-D mesh" in result["bad_placement"], result["bad_placement"]
        assert result["splits"] == 0 and result["hints"] == []  # DTensors: exchanged across their mesh


def test_the_skipped_layer_really_skips_a_step():
    """Guards the scenario itself: without the skip the runs would not cover a missing gradient."""
    model = make_net()
    optimizer = make_optimizer(model)
    train(model, optimizer, range(SKIP_STEP))
    before = model.skipped.weight.detach().clone()
    train(model, optimizer, range(SKIP_STEP, SKIP_STEP + 1))
    assert model.skipped.weight.grad is None
    assert torch.equal(model.skipped.weight, before)


def test_owners_balance_the_newton_schulz_cost():
    # Two large matrices and four small ones: one large and two small on each rank.
    owners = assign_owners([8.0, 1.0, 1.0, 8.0, 1.0, 1.0], 2)
    assert sorted(owners) == [0, 0, 0, 1, 1, 1]
    assert owners[0] != owners[3]
    assert assign_owners([], 3) == []
    with pytest.raises(ValueError, match=re.escape("world_size must be at least 1, got 0")):
        assign_owners([1.0], 0)


@pytest.mark.parametrize(
    ("rows", "world", "expected"),
    [(7, 2, [4, 3]), (1, 2, [1, 0]), (10, 4, [3, 3, 3, 1]), (4, 3, [2, 2, 0]), (6, 2, [3, 3])],
)
def test_row_chunks_follow_torch_chunk(rows, world, expected):
    assert row_chunks(rows, world) == expected
    assert [len(c) for c in torch.arange(rows).chunk(world)] == [n for n in expected if n]


def test_single_process_needs_no_process_group():
    assert not dist.is_initialized()
    assert resolve_data_parallel(None) is None
    assert resolve_data_parallel(False) is None
    with pytest.raises(ValueError, match=re.escape("data_parallel=True needs torch.distributed initialised")):
        resolve_data_parallel(True)


def test_rejects_a_bad_data_parallel_setting():
    with pytest.raises(ValueError, match=re.escape("data_parallel must be None (unset), True, False or")):
        ROOT([nn.Parameter(torch.ones(2, 2))], data_parallel="yes")
