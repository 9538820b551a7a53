"""Groups whose ranks span several (emulated) hosts with several ranks on some: every
collective against float64 references on 2+2 and 2+1+1 layouts (and 3+2, an odd world),
the hierarchical all-reduce chosen for large calls, one-host subgroups on shared memory
only, and a dead rank on the other host failing everyone fast."""
from __future__ import annotations

import os
import tempfile

import pytest

import reliability_cases as rc
import topology_cases as tc

pytestmark = pytest.mark.skipif(not any(b == "pycomm" for b in __import__("dist_util").BACKENDS),
                                reason="pycomm extension not built")


def _ok(results):
    for r in results:
        assert r["status"] == "ok", rc.describe(results)


@pytest.mark.parametrize("layout", [[0, 0, 1, 1], [0, 0, 1, 2], [0, 0, 0, 1, 1]], ids=["2x2", "2+1+1", "3+2"])
def test_every_collective_on_a_mixed_layout(layout):
    results = rc.launch(len(layout), tc.every_collective, layout, init=False, timeout=240)
    _ok(results)
    for r in results:
        p = r["payload"]
        # Ranks sharing their host: shm to those, TCP to the rest; a rank alone: TCP only.
        assert p["transport"] == ("shm+tcp" if layout.count(layout[r["rank"]]) > 1 else "tcp"), p
        # Large all-reduces went hierarchical; small ones recursive doubling.
        assert p["algos"].get("algo_all_reduce_hier", 0) > 0, p
        assert set(p["algos"]) <= {"algo_all_reduce_hier", "algo_all_reduce_rd"}, p
        if layout[r["rank"]] == layout[0]:
            assert p["sub_transport"] == "shm", p


def test_dead_rank_on_the_other_host_fails_everyone_fast():
    layout = [0, 0, 1, 1]
    victim = 3
    with tempfile.TemporaryDirectory() as d:
        stamp = os.path.join(d, "killed_at")
        results = rc.launch(4, tc.kill_on_other_host, layout, victim, stamp, init=False, pg_timeout=60,
                            timeout=100)
        killed_at = float(open(stamp).read())
    assert results[victim]["exitcode"] == -9, rc.describe(results)
    survivors = [r for r in results if r["rank"] != victim]
    _ok(survivors)
    for r in survivors:
        p = r["payload"]
        assert p["msg"] is not None, p
        assert p["failed_at"] - killed_at < 10.0, p
        assert p["destroy_s"] < 5.0, p
    assert rc.job_segments([r["pid"] for r in results]) == []
