"""Process groups for hybrid data × tensor × pipeline parallelism.

``init_groups(dp, tp, pp)`` lays the ``dp * tp * pp`` ranks of the default group out as
a 3-d grid, tensor-parallel index fastest (so a tensor-parallel group is a run of
consecutive ranks, i.e. one host when hosts hold consecutive ranks), then data, then
pipeline::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

and builds one ``dist.new_group`` per row of each axis. ``new_group`` is collective
over the default group, so every rank creates every group, in the same order, and
keeps the ones it belongs to.

Example, ``init_groups(dp=2, tp=2)`` on 4 ranks: tensor groups ``[0, 1]``, ``[2, 3]``;
data groups ``[0, 2]``, ``[1, 3]``; pipeline groups ``[0]``, ``[1]``, ``[2]``, ``[3]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

__all__ = ["ParallelGroups", "init_groups", "average_gradients"]


@dataclass
class ParallelGroups:
    """This rank's place in the data × tensor × pipeline grid.

    ``*_group`` are process groups (usable as ``group=`` of any ``dist`` call and of the
    tensor-parallel layers / pipeline stages), ``*_rank`` this rank's index in each,
    ``*_ranks`` the global ranks of each of this rank's groups (in group-rank order).
    """

    world_size: int
    rank: int
    dp: int
    tp: int
    pp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    dp_group: dist.ProcessGroup = field(repr=False)
    tp_group: dist.ProcessGroup = field(repr=False)
    pp_group: dist.ProcessGroup = field(repr=False)
    dp_ranks: List[int] = field(default_factory=list)
    tp_ranks: List[int] = field(default_factory=list)
    pp_ranks: List[int] = field(default_factory=list)

    def global_rank(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        """The global rank at grid position ``(dp_rank, tp_rank, pp_rank)``."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_groups(dp: Optional[int] = None, tp: int = 1, pp: int = 1,
                backend: Optional[str] = None) -> ParallelGroups:
    """Builds the data, tensor and pipeline groups of the default process group.

    Args:
        dp, tp, pp: sizes of the data, tensor and pipeline axes; ``dp * tp * pp`` must
            equal the world size. ``dp=None`` takes ``world_size // (tp * pp)``.
        backend: backend of the new groups (default: the default group's).

    Must be called by every rank (``dist.new_group`` is collective).
    """
    if not dist.is_initialized():
        raise RuntimeError("init_groups: call dist.init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if dp is None:
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
        dp = world // (tp * pp)
    if dp * tp * pp != world:
        raise ValueError(f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} != world size {world}")

    def at(d: int, t: int, p: int) -> int:
        return (p * dp + d) * tp + t

    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    rows = {
        "tp": [[at(d, t, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[at(d, t, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[at(d, t, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
    }
    mine = {}
    for axis in ("tp", "dp", "pp"):  # identical order on every rank
        for ranks in rows[axis]:
            g = dist.new_group(ranks=ranks, backend=backend)
            if rank in ranks:
                mine[axis] = (g, ranks)
    return ParallelGroups(
        world_size=world, rank=rank, dp=dp, tp=tp, pp=pp,
        dp_rank=dp_rank, tp_rank=tp_rank, pp_rank=pp_rank,
        dp_group=mine["dp"][0], tp_group=mine["tp"][0], pp_group=mine["pp"][0],
        dp_ranks=mine["dp"][1], tp_ranks=mine["tp"][1], pp_ranks=mine["pp"][1],
    )


def average_gradients(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup] = None) -> None:
    """Averages ``.grad`` of ``params`` over ``group`` with one all-reduce per dtype.

    The plain, synchronous data-parallel step (``pycomm.DataParallel`` overlaps it with
    backward). Parameters without a gradient are skipped, so every rank must have
    gradients for the same parameters.
    """
    world = dist.get_world_size(group)
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        if world > 1:
            dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in same:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
