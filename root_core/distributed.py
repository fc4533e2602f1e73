"""ROOT under data parallelism: split the Newton–Schulz work of replicated (DDP) parameters across ranks,
and give the quantile clip and NS whole matrices for FSDP2's row-sharded (DTensor) parameters.

The momentum update is elementwise and cheap, so every rank does it on what it holds. What needs a whole
matrix — the clip at the quantile of |update| and the orthogonalisation — is the expensive part, so each
matrix gets one owner rank, chosen to balance the NS cost (KellerJordan/Muon's DDP version shares the
matrices round-robin and all-gathers the results; microsoft/dion's Muon uses all-to-all for sharded ones):

* replicated parameters: every rank holds the whole update already; owners orthogonalise their share,
  batched by shape, and one ``all_gather`` per shape hands every rank every result, so all ranks apply
  the same bits;
* row-sharded DTensors (``Shard(0)`` on a 1-D mesh, what ``fully_shard`` makes): one ``all_to_all``
  per shape sends each owner the row blocks of its matrices, and a second sends every rank its rows of
  the results back. Shards may be uneven or empty, as ``torch.chunk`` splits rows.

Every rank must step the same parameters in the same order with the same set of gradients (DDP and FSDP2
guarantee it), since each shape group is one collective. So replicated parameters are split only when
asked (``data_parallel=True`` or a process group): several ranks alone do not make a DDP job — pipeline
and tensor parallel ranks hold different parameters, and splitting those would hang or hand a rank
another rank's matrices. DTensors say where they live, so they are always handled across their mesh.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DataParallelWarning",
    "assign_owners",
    "check_data_parallel",
    "check_row_sharded",
    "is_dtensor",
    "local_tensor",
    "orthogonalize_replicated",
    "orthogonalize_sharded",
    "resolve_data_parallel",
    "row_chunks",
]

# Turns a (b, m, n) batch of whole same-shape updates into their (b, m, n) orthogonalised directions; the
# second argument holds the batch's indices into the caller's list (ROOT records matrices by them).
BatchDirections = Callable[[Tensor, Sequence[int]], Tensor]


def is_dtensor(tensor: Tensor) -> bool:
    """True for ``torch.distributed.tensor.DTensor`` (FSDP2's parameters and gradients).

    No DTensor can exist before its module is imported, so a look in ``sys.modules`` answers without
    importing it (0.5 s) where nothing else has.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank's own storage: in-place ops on it update the DTensor (``to_local`` aliases under no_grad)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def check_data_parallel(data_parallel: Any) -> None:
    """Reject a ``data_parallel`` setting that is none of None, True, False or a process group."""
    if data_parallel is None or isinstance(data_parallel, bool):
        return
    if dist.is_available() and isinstance(data_parallel, dist.ProcessGroup):
        return
    raise ValueError(
        f"data_parallel must be None (unset), True, False or a torch.distributed ProcessGroup, "
        f"got {data_parallel!r}"
    )


class DataParallelWarning(UserWarning):
    """Several ranks, no ``data_parallel`` setting: each rank does all of its own NS work."""


_hinted = False  # DataParallelWarning is said once per process, not once per step


def resolve_data_parallel(data_parallel: Any) -> Any | None:
    """The process group that replicated parameters split NS across, or None to step alone.

    True splits over the default group (which must be initialised), a process group over that group.
    None (unset) and False never split; None in a job of several ranks warns once that DDP jobs can
    pass True, because only the caller knows whether every rank holds the same parameters.
    """
    check_data_parallel(data_parallel)
    if data_parallel is None:
        _hint_data_parallel()
        return None
    if data_parallel is False:
        return None
    if data_parallel is True:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "data_parallel=True needs torch.distributed initialised "
                "(torch.distributed.init_process_group) before the first step"
            )
        group = dist.group.WORLD
    else:
        group = data_parallel
    return group if dist.get_world_size(group) > 1 else None


def _hint_data_parallel() -> None:
    global _hinted
    if _hinted or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    _hinted = True
    warnings.warn(
        f"ROOT runs on {dist.get_world_size()} ranks with data_parallel unset, so each rank orthogonalises "
        "all of its own matrices; under DDP (every rank holds the same parameters) pass "
        "data_parallel=True to split that work across ranks, else data_parallel=False to silence this",
        DataParallelWarning,
        stacklevel=4,
    )


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that orthogonalises each matrix: largest first, each to the least-loaded rank.

    Longest-processing-time-first keeps the slowest rank within 4/3 of the best split; ties go to the
    lower rank, so every rank computes the same answer without talking to the others.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size!r}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def row_chunks(rows: int, world_size: int) -> list[int]:
    """Rows each rank holds under ``Shard(0)``: ``torch.chunk``'s split, trailing ranks possibly empty."""
    chunk = -(-rows // world_size)
    return [max(0, min(rows, (rank + 1) * chunk) - rank * chunk) for rank in range(world_size)]


def orthogonalize_replicated(
    updates: Sequence[Tensor], directions_of: BatchDirections, *, group: Any = None
) -> list[Tensor]:
    """Directions for whole matrices that every rank of ``group`` holds identically.

    Each rank orthogonalises only the matrices it owns, batched per shape; one ``all_gather`` per shape
    (padded to the largest share) gives every rank all the results, bit for bit the owners'.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owners = assign_owners([_ns_cost(u.shape) for u in updates], world)
    directions: list[Tensor | None] = [None] * len(updates)
    for indices in _group_indices([(tuple(u.shape), u.dtype, u.device) for u in updates]):
        shares = [[i for i in indices if owners[i] == r] for r in range(world)]
        template = updates[indices[0]]
        batch = template.new_zeros((max(map(len, shares)), *template.shape))
        mine = shares[rank]
        if mine:
            batch[: len(mine)] = directions_of(torch.stack([updates[i] for i in mine]), mine)
        gathered = [torch.empty_like(batch) for _ in range(world)]
        dist.all_gather(gathered, batch, group=group)
        for owner, share in enumerate(shares):
            for slot, index in enumerate(share):
                directions[index] = gathered[owner][slot]
    return directions  # type: ignore[return-value]  # every index belongs to one shape group


def orthogonalize_sharded(
    params: Sequence[Tensor], local_updates: Sequence[Tensor], directions_of: BatchDirections
) -> list[Tensor]:
    """Directions for FSDP2 parameters, as each rank's row block, from each rank's row block of the update.

    ``params`` are DTensors placed ``Shard(0)`` on a 1-D mesh; ``local_updates[i]`` is this rank's rows
    of parameter i's update viewed as a matrix, (local rows, columns). Per mesh and shape, one
    ``all_to_all`` assembles each owner's whole matrices, the owner clips and orthogonalises them in one
    batch, and a second ``all_to_all`` returns each rank its rows.
    """
    check_row_sharded(params)
    directions: list[Tensor | None] = [None] * len(params)
    for mesh_indices in _group_indices([p.device_mesh for p in params]):
        mesh = params[mesh_indices[0]].device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        shapes = [(params[i].shape[0], local_updates[i].shape[-1]) for i in mesh_indices]
        owners = assign_owners([_ns_cost(shape) for shape in shapes], world)
        owner_of = dict(zip(mesh_indices, owners, strict=True))
        keys = [(shape, local_updates[i].dtype) for shape, i in zip(shapes, mesh_indices, strict=True)]
        for positions in _group_indices(keys):
            indices = [mesh_indices[k] for k in positions]
            shares = [[i for i in indices if owner_of[i] == r] for r in range(world)]
            for index, block in _exchange_rows(params, local_updates, shares, directions_of, mesh, rank):
                directions[index] = block
    return directions  # type: ignore[return-value]  # every index belongs to one group


def _exchange_rows(
    params: Sequence[Tensor],
    local_updates: Sequence[Tensor],
    shares: list[list[int]],
    directions_of: BatchDirections,
    mesh: Any,
    rank: int,
) -> list[tuple[int, Tensor]]:
    """One shape group's two ``all_to_all`` rounds: row blocks to owners, direction rows back."""
    world = len(shares)
    first = next(i for share in shares for i in share)  # the group's matrices share one shape
    rows, cols = params[first].shape[0], local_updates[first].shape[-1]
    held = row_chunks(rows, world)
    for index in (i for share in shares for i in share):
        if tuple(local_updates[index].shape) != (held[rank], cols):
            raise ValueError(
                f"rank {rank} holds a {tuple(local_updates[index].shape)} block of a {rows}×{cols} "
                f"parameter, but Shard(0) over {world} ranks gives it ({held[rank]}, {cols})"
            )
    counts = [len(share) for share in shares]
    group = mesh.get_group()
    # Round 1: my rows of each matrix go to its owner; I receive every rank's rows of the ones I own.
    send_splits = [counts[owner] * held[rank] * cols for owner in range(world)]
    receive_splits = [counts[rank] * held[source] * cols for source in range(world)]
    send = torch.cat([local_updates[i].reshape(-1) for share in shares for i in share])
    received = send.new_empty(sum(receive_splits))
    dist.all_to_all_single(received, send, receive_splits, send_splits, group=group)
    pieces = received.split(receive_splits)
    whole = torch.cat([pieces[s].view(counts[rank], held[s], cols) for s in range(world)], dim=1)
    result = directions_of(whole, shares[rank]) if counts[rank] else whole
    # Round 2: the same splits reversed, each rank getting its rows of every matrix back.
    starts = [sum(held[:s]) for s in range(world)]
    back = torch.cat([result[:, starts[s] : starts[s] + held[s]].reshape(-1) for s in range(world)])
    returned = send.new_empty(sum(send_splits))
    dist.all_to_all_single(returned, back, send_splits, receive_splits, group=group)
    blocks: list[tuple[int, Tensor]] = []
    for owner, piece in enumerate(returned.split(send_splits)):
        owned = piece.view(counts[owner], held[rank], cols)
        blocks.extend((index, owned[slot]) for slot, index in enumerate(shares[owner]))
    return blocks


def check_row_sharded(params: Sequence[Tensor]) -> None:
    """Refuse DTensor layouts other than FSDP2's, before any state changes: rows are what we exchange."""
    from torch.distributed.tensor import Shard

    for p in params:
        mesh = p.device_mesh
        if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"ROOT handles DTensor parameters placed (Shard(dim=0),) on a 1-D mesh, as fully_shard "
                f"makes them; got placements {tuple(p.placements)} on a mesh of shape {tuple(mesh.shape)}"
            )
        if not is_dtensor(p.grad) or tuple(p.grad.placements) != tuple(p.placements):
            got = tuple(p.grad.placements) if is_dtensor(p.grad) else type(p.grad).__name__
            raise ValueError(f"the gradient of a {tuple(p.placements)} DTensor parameter is placed {got}")


def _group_indices(keys: Sequence[Any]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance, so every rank agrees."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _ns_cost(shape: Sequence[int]) -> float:
    """An NS step costs about m²n flops for an m×n matrix with m ≤ n (Gram matrix and products)."""
    short, long = sorted(shape[-2:])
    return float(short) * short * long
