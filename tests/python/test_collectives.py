"""Every collective on real processes, world sizes 1-5, both transports, checked
against references the ranks compute themselves; results bitwise equal across ranks."""
import os

import pytest

from collective_cases import run_all
from dist_util import run_ranks

TRANSPORTS = ["shm", "tcp"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_all_collectives(world_size, transport):
    big = world_size in (2, 4) if transport == "shm" else world_size == 3
    results = run_ranks(world_size, run_all, big, env={"PYCOMM_TRANSPORT": transport}, timeout=600,
                        pg_timeout=120)
    assert all(r["transport"] == transport for r in results)
    # All ranks hold bitwise-identical results.
    for key in results[0]:
        vals = {r[key] for r in results}
        assert len(vals) == 1, f"ranks differ on {key}"


@pytest.mark.parametrize("algo", ["ring", "rd"])
def test_forced_algorithms_tcp(algo):
    """The ring and recursive doubling are exercised at every size when forced."""
    run_ranks(3, _allreduce_only, env={"PYCOMM_TRANSPORT": "tcp", "PYCOMM_ALGO": algo}, timeout=300)


def test_forced_ring_on_shm():
    run_ranks(3, _allreduce_only, env={"PYCOMM_TRANSPORT": "shm", "PYCOMM_ALGO": "ring"}, timeout=300)


def _allreduce_only(rank, ws):
    import torch

    from collective_cases import all_reduce_cases

    all_reduce_cases(rank, ws, sizes=[0, 1, 7, 1021, 65537],
                     dtypes=[torch.float32, torch.float16, torch.int32, torch.bool])
