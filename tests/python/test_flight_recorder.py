"""The flight recorder (pycomm.flight_recorder): what each entry records, and a hang
explained by torch's own trace analyser from the dumps every rank writes.
"""
import datetime
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

import reliability_cases as rc


def _init(rank, ws, store, pg_timeout):
    import torch.distributed as dist

    dist.init_process_group("pycomm", store=store, rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=pg_timeout))


# ---------------------------------------------------------------------------------------------
# Rank bodies


def record_ops(rank, ws, store):
    """A few collectives and a send/recv on the world and on a subgroup; returns the
    snapshot and the dump file as read back."""
    import torch
    import torch.distributed as dist
    import pycomm

    _init(rank, ws, store, 30)
    t = torch.ones(5)
    dist.all_reduce(t)                                             # seq 1
    out = [torch.empty(3, dtype=torch.int64) for _ in range(ws)]
    dist.all_gather(out, torch.full((3,), rank, dtype=torch.int64))  # seq 2
    rs = torch.empty(2, dtype=torch.float64)
    dist.reduce_scatter_tensor(rs, torch.ones(2 * ws, dtype=torch.float64))  # seq 3
    dist.broadcast(t, src=1)                                       # seq 4
    dist.barrier()                                                 # seq 5
    if rank == 0:
        dist.send(torch.ones(4), dst=2)
    elif rank == 2:
        dist.recv(torch.empty(4), src=0)
    sub = dist.new_group([0, 2])
    if rank in (0, 2):
        dist.all_reduce(torch.ones(1), group=sub)                  # subgroup seq 1
    snap = pycomm.flight_recorder.snapshot()
    path = os.path.join(os.environ["FR_TEST_DIR"], f"explicit_{rank}")
    written = pycomm.dump_flight_recorder(path)
    with open(written, "rb") as f:
        dumped = pickle.load(f)
    dist.barrier()
    return {"snap": snap, "dumped": dumped, "written": written, "capacity": pycomm.flight_recorder.capacity()}


def hang_one_rank(rank, ws, store, pg_timeout):
    """The last rank never calls the fifth collective (it is stuck in its own code); the
    others time out on it, dump on the failure, and rank 0 signals the stuck rank, which
    dumps on SIGUSR1."""
    import torch
    import torch.distributed as dist

    _init(rank, ws, store, pg_timeout)
    store.set(f"pid/{rank}", str(os.getpid()))
    t = torch.ones(8)
    for _ in range(3):
        dist.all_reduce(t)                                         # seq 1..3
    dist.broadcast(t, src=0)                                       # seq 4
    mine = os.environ["TORCH_FR_DUMP_TEMP_FILE"] + str(rank)
    if rank == ws - 1:
        end = time.monotonic() + pg_timeout + 60
        while not os.path.exists(mine) and time.monotonic() < end:
            time.sleep(0.05)  # "hung": the signal handler runs between these sleeps
        return {"dumped": os.path.exists(mine)}
    start = time.monotonic()
    err = None
    try:
        dist.all_reduce(torch.ones(8))                             # seq 5: rank ws-1 never joins
    except RuntimeError as e:
        err = str(e)
    elapsed = time.monotonic() - start
    dumped = os.path.exists(mine)  # written before the failure reached the caller
    if rank == 0:
        os.kill(int(store.get(f"pid/{ws - 1}")), signal.SIGUSR1)
    return {"err": err, "elapsed": elapsed, "dumped": dumped}


# ---------------------------------------------------------------------------------------------
# Tests


def _by_seq(entries, pg_name):
    return {e["collective_seq_id"]: e for e in entries
            if e["process_group"][0] == pg_name and not e["is_p2p"]}


def test_entries_record_each_collective(tmp_path):
    results = rc.launch(3, record_ops, env={"FR_TEST_DIR": str(tmp_path)}, init=False, timeout=120)
    for r in results:
        assert r["status"] == "ok", rc.describe(results)
    for rank, r in enumerate(results):
        p = r["payload"]
        assert p["capacity"] == 2000
        assert p["written"] == str(tmp_path / f"explicit_{rank}")
        for d in (p["snap"], p["dumped"]):
            assert d["version"] == "2.10"
            world = d["pg_config"]["0"]
            assert world["ranks"] == "[0, 1, 2]" and world["desc"] == "default_pg", d["pg_config"]
            world_entries = _by_seq(d["entries"], "0")
            assert sorted(world_entries) == [1, 2, 3, 4, 5], d["entries"]
            expect = {  # seq: (name, input sizes, output sizes, dtype)
                1: ("gloo:all_reduce", [[5]], [[5]], "Float"),
                2: ("gloo:all_gather", [[3]], [[9]], "Long"),
                3: ("gloo:reduce_scatter", [[6]], [[2]], "Double"),
                4: ("gloo:broadcast", [[5]], [[5]], "Float"),
                5: ("gloo:barrier", [[0]], [[0]], "Byte"),
            }
            for seq, (name, ins, outs, dt) in expect.items():
                e = world_entries[seq]
                assert e["profiling_name"] == name, e
                assert (e["input_sizes"], e["output_sizes"]) == (ins, outs), e
                assert e["input_dtypes"] == [dt] and e["output_dtypes"] == [dt], e
                assert e["state"] == "completed" and e["retired"], e
                assert e["timeout_ms"] == 30000, e
                assert 0 < e["time_created_ns"] <= e["time_discovered_started_ns"] <= e["time_discovered_completed_ns"]
                assert e["duration"] is not None and e["duration"] >= 0
                assert e["process_group"] == ("0", "default_pg")
            # Record ids are the process's history in order.
            ids = [e["record_id"] for e in d["entries"]]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            p2p = [e for e in d["entries"] if e["is_p2p"]]
            if rank == 0:
                assert [e["profiling_name"] for e in p2p] == ["gloo:send 0->2"], p2p
            elif rank == 2:
                assert [e["profiling_name"] for e in p2p] == ["gloo:recv 2<-0"], p2p
            else:
                assert p2p == []
            for e in p2p:
                assert e["input_sizes"] == [[16]] and e["state"] == "completed" and e["collective_seq_id"] == 5
            # torch creates a subgroup's backend only on its members.
            sub = [n for n, c in d["pg_config"].items() if c["ranks"] == "[0, 2]"]
            if rank in (0, 2):
                assert len(sub) == 1 and sub[0] != "0", d["pg_config"]
                sub_entries = _by_seq(d["entries"], sub[0])
                assert sorted(sub_entries) == [1], sub_entries
                assert sub_entries[1]["profiling_name"] == "gloo:all_reduce"
                assert sub_entries[1]["state"] == "completed"
            else:
                assert sub == [], d["pg_config"]
            assert d["pg_status"]["0"]["last_completed_collective"] == 5


def test_hung_rank_is_named_by_torch_analyser(tmp_path):
    pg_timeout = 3.0
    prefix = str(tmp_path / "pycomm_trace_rank_")
    results = rc.launch(3, hang_one_rank, pg_timeout, env={"TORCH_FR_DUMP_TEMP_FILE": prefix}, init=False,
                        timeout=90)
    for r in results:
        assert r["status"] == "ok", rc.describe(results)
    for r in results[:2]:
        p = r["payload"]
        assert p["err"] is not None and "all_reduce #5" in p["err"], p
        assert p["elapsed"] < pg_timeout + 5.0, p   # within the timeout, not a hang
        assert p["dumped"], p
    assert results[2]["payload"]["dumped"], results[2]
    assert sorted(os.listdir(tmp_path)) == [f"pycomm_trace_rank_{r}" for r in range(3)]
    with open(prefix + "0", "rb") as f:
        d0 = pickle.load(f)
    stuck = _by_seq(d0["entries"], "0")[5]
    assert stuck["state"] == "started" and stuck["retired"], stuck
    assert "all_reduce #5" in d0["reason"]
    with open(prefix + "2", "rb") as f:
        d2 = pickle.load(f)
    assert max(_by_seq(d2["entries"], "0")) == 4 and d2["reason"] == "signal SIGUSR1"

    # torch's own analyser, over the directory of dumps.
    out = subprocess.run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "Not all ranks joining collective, sequence number: 5" in report, report
    assert "missing ranks: {2}" in report, report
    assert "collective: gloo:all_reduce" in report, report
    # Only the fifth collective is reported: the four before it matched on every rank.
    assert report.count("Not all ranks joining collective") == 1, report
