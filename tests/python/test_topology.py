"""Groups whose ranks span several (emulated) hosts with several ranks on some: every
collective against float64 references on 2+2 and 2+1+1 layouts (and 3+2, an odd world),
broadcast and reduce from every root, the hierarchical algorithms chosen (all_reduce:
hierarchical for large calls, recursive doubling among host leaders for small ones;
broadcast, reduce; reduce_scatter / all_gather on even hosts only), one-host subgroups on
shared memory only, and a dead rank on the other host failing everyone fast."""
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
        algos = p["algos"]

        def by(coll):
            return {k for k in algos if k.startswith(f"algo_{coll}_") and not k.startswith(f"algo_{coll}_scatter_")}

        # Large all-reduces went hierarchical, small ones to recursive doubling among the
        # hosts' first ranks; broadcast and reduce hierarchical at every size.
        assert by("all_reduce") == {"algo_all_reduce_hier", "algo_all_reduce_hier_rd"}, algos
        assert by("broadcast") == {"algo_broadcast_hier"}, algos
        assert by("reduce") == {"algo_reduce_hier"}, algos
        # reduce_scatter / all_gather: hierarchical (large calls) when every host holds two
        # or more ranks, equally many or not (2x2, 3+2); with a host of one rank (2+1+1) the
        # flat ring, already at that host link's bound; small all_gathers run Bruck's
        # log2(n) rounds.
        hier = min(layout.count(h) for h in layout) >= 2
        assert by("reduce_scatter") == ({"algo_reduce_scatter_hier", "algo_reduce_scatter_ring"} if hier
                                        else {"algo_reduce_scatter_ring"}), algos
        assert by("all_gather") == ({"algo_all_gather_hier", "algo_all_gather_bruck"} if hier
                                    else {"algo_all_gather_bruck", "algo_all_gather_ring"}), algos
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
