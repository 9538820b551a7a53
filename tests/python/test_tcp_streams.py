"""TCP with several streams per pair (PYCOMM_TCP_STREAMS): every collective over 1, 2 and
4 streams on an odd world size, at awkward lengths (0, 1, primes; large ones that are
striped, with stripes of unequal length), checked against float64 / exact references the
ranks compute themselves; the streams really exist; a dead peer still fails everyone fast.
Sizes are kept small enough that the whole file runs in seconds per setting."""
import json
import os
import tempfile

import pytest

import reliability_cases as rc
from dist_util import run_ranks


def _tcp_sockets() -> int:
    """Established TCP connections this process holds (its fds matched against /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and f[9] in inodes:  # ESTABLISHED
                n += 1
    return n


def streams_cases(rank: int, ws: int) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist

    from collective_cases import check, data, digest, red, reference, rounded, to_torch

    big = 786433      # prime; 3 MiB of float32, ~1 MiB ring chunks: striped, unequal stripes
    per = 262147      # prime; 1 MiB of float32 per peer
    odd = 1000003     # prime byte count (uint8): 3 stripes over 4 streams, 2 over 2
    seed = 9000
    out = {}
    for dtype, op in ((torch.float32, "SUM"), (torch.float64, "MAX"), (torch.int32, "SUM"), (torch.float32, "AVG")):
        for n in (0, 1, 13, big):
            seed += 1
            inputs = [rounded(data(seed, r, n, dtype, op), dtype) for r in range(ws)]
            t = to_torch(data(seed, rank, n, dtype, op), dtype)
            dist.all_reduce(t, op=red(op))
            check(t, reference(inputs, dtype, op), dtype, ws, f"all_reduce {dtype} {op} n={n}")
            out[("ar", str(dtype), op, n)] = digest(t)
    for n in (0, 1, 13, per):
        seed += 1
        inputs = [rounded(data(seed, r, n * ws, torch.float32, "SUM"), torch.float32) for r in range(ws)]
        x = to_torch(data(seed, rank, n * ws, torch.float32, "SUM"), torch.float32)
        y = torch.empty(n)
        dist.reduce_scatter_tensor(y, x)
        check(y, reference(inputs, torch.float32, "SUM")[rank * n:(rank + 1) * n], torch.float32, ws,
              f"reduce_scatter n={n}")
    for n in (0, 1, 13, odd):
        seed += 1
        inputs = [rounded(data(seed, r, n, torch.uint8, "SUM"), torch.uint8) for r in range(ws)]
        y = torch.empty(n * ws, dtype=torch.uint8)
        dist.all_gather_into_tensor(y, to_torch(data(seed, rank, n, torch.uint8, "SUM"), torch.uint8))
        check(y, np.concatenate(inputs), torch.uint8, ws, f"all_gather uint8 n={n}")
    root = ws - 1
    for n in (0, 1, 7919, big):
        seed += 1
        src = rounded(data(seed, root, n, torch.float32, "SUM"), torch.float32)
        x = to_torch(data(seed, rank, n, torch.float32, "SUM"), torch.float32)
        dist.broadcast(x, src=root)
        check(x, src, torch.float32, ws, f"broadcast n={n}")
        seed += 1
        inputs = [rounded(data(seed, r, n, torch.float64, "SUM"), torch.float64) for r in range(ws)]
        x = to_torch(data(seed, rank, n, torch.float64, "SUM"), torch.float64)
        dist.reduce(x, dst=1, op=dist.ReduceOp.SUM)
        if rank == 1:
            check(x, reference(inputs, torch.float64, "SUM"), torch.float64, ws, f"reduce n={n}")
    seed += 1
    inputs = [rounded(data(seed, r, per, torch.float32, "SUM"), torch.float32) for r in range(ws)]
    x = to_torch(inputs[rank], torch.float32)
    outs = [torch.empty(per) for _ in range(ws)] if rank == 0 else None
    dist.gather(x, gather_list=outs, dst=0)
    if rank == 0:
        for r in range(ws):
            check(outs[r], inputs[r], torch.float32, ws, f"gather from {r}")
    y = torch.empty(per)
    dist.scatter(y, scatter_list=[to_torch(i, torch.float32) for i in inputs] if rank == 0 else None, src=0)
    check(y, inputs[rank], torch.float32, ws, "scatter")
    seed += 1
    mats = [rounded(data(seed, r, per * ws, torch.float32, "SUM"), torch.float32) for r in range(ws)]
    y = torch.empty(per * ws)
    dist.all_to_all_single(y, to_torch(mats[rank], torch.float32))
    check(y, np.concatenate([mats[q][rank * per:(rank + 1) * per] for q in range(ws)]), torch.float32, ws,
          "all_to_all_single")
    # p2p around the ring (tags), then receive-from-any-source (peekHeader on stream 0)
    nxt, prv = (rank + 1) % ws, (rank - 1) % ws
    for n in (0, 1, big):
        mine = torch.full((n,), float(rank))
        got = torch.empty(n)
        sw = dist.isend(mine, nxt, tag=3)
        dist.recv(got, prv, tag=3)
        sw.wait()
        assert torch.all(got == prv), f"send/recv n={n}"
    if rank == 0:
        seen = set()
        for _ in range(ws - 1):
            got = torch.empty(odd, dtype=torch.uint8)
            src = dist.recv(got)
            assert torch.all(got == src), f"recv from any: data of {src}"
            seen.add(src)
        assert seen == set(range(1, ws)), seen
    else:
        dist.send(torch.full((odd,), rank, dtype=torch.uint8), 0)
    dist.barrier()
    return out


@pytest.mark.parametrize("streams", ["1", "2", "4"])
def test_every_collective_over_streams(streams):
    ws = 3
    results = run_ranks(ws, streams_cases, env={"PYCOMM_TRANSPORT": "tcp", "PYCOMM_TCP_STREAMS": streams},
                        timeout=300, pg_timeout=120)
    for key in results[0]:
        if key != "sockets":
            assert len({r[key] for r in results}) == 1, f"ranks differ on {key}"


def test_streams_are_opened():
    """Each rank holds (streams - 1) more connections per peer and TCP transport than with one
    stream (a group may hold more than one transport, so: a positive multiple of 3 * (ws - 1))."""
    ws = 3
    counts = {}
    for streams in ("1", "4"):
        counts[streams] = run_ranks(ws, _socket_count, env={"PYCOMM_TRANSPORT": "tcp", "PYCOMM_TCP_STREAMS": streams},
                                    timeout=120)
    for r in range(ws):
        extra = counts["4"][r] - counts["1"][r]
        assert extra > 0 and extra % (3 * (ws - 1)) == 0, counts
        # the same number of transports on every rank
        assert extra == counts["4"][1] - counts["1"][1], counts


def _socket_count(rank, ws):
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(4))
    return _tcp_sockets()


def _socket_count_on_layout(rank, ws, store, layout):
    import torch
    import torch.distributed as dist

    import topology_cases as tc

    tc._join(rank, ws, store, layout)
    dist.all_reduce(torch.ones(4))
    n = _tcp_sockets()
    dist.barrier()
    dist.destroy_process_group()
    return n


def test_auto_divides_streams_among_a_hosts_ranks():
    """Two emulated hosts with two ranks each: "auto" opens one socket per pair (the host's
    two ranks already put two flows on its link), as PYCOMM_TCP_STREAMS=1 does; an explicit
    2 opens one more per peer and TCP transport."""
    layout = [0, 0, 1, 1]
    counts = {}
    for streams in ("auto", "1", "2"):
        results = rc.launch(4, _socket_count_on_layout, layout, init=False, timeout=120,
                            env={"PYCOMM_TCP_STREAMS": streams})
        for r in results:
            assert r["status"] == "ok", rc.describe(results)
        counts[streams] = [r["payload"] for r in results]
    assert counts["auto"] == counts["1"], counts
    for r in range(4):
        extra = counts["2"][r] - counts["1"][r]
        assert extra > 0 and extra % 3 == 0, counts


def test_dead_peer_with_four_streams_fails_everyone_fast():
    victim = 1
    with tempfile.TemporaryDirectory() as d:
        stamp = os.path.join(d, "killed_at")
        results = rc.launch(3, rc.kill_mid_allreduce, victim, 32 << 20, stamp, None,
                            env={"PYCOMM_TRANSPORT": "tcp", "PYCOMM_TCP_STREAMS": "4"}, pg_timeout=60, timeout=100)
        killed_at = float(open(stamp).read())
    assert results[victim]["exitcode"] == -9, rc.describe(results)
    for r in results:
        if r["rank"] == victim:
            continue
        assert r["status"] == "ok" and r["exitcode"] == 0, rc.describe(results)
        p = r["payload"]
        assert p["msg"] is not None and "rank" in p["msg"], p
        assert p["failed_at"] - killed_at < 10.0, p  # far below the 60 s timeout
        assert p["destroy_s"] < 5.0, p


def test_bench_tcp_streams_compare_mode(tmp_path):
    """pycomm-bench --tcp-streams-compare: every variant measured in every round, right results."""
    from test_bench import _NETNS_WHY, run_bench

    if _NETNS_WHY:
        pytest.skip(_NETNS_WHY)
    jp = tmp_path / "s.json"
    p = run_bench("all_reduce", "--hosts", "2", "--ranks-per-host", "1", "--link", "10gbit", "--tcp-streams-compare",
                  "--rounds", "2", "-b", "2M", "-e", "2M", "-n", "1", "-w", "0", "--json", str(jp), timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(jp.read_text())
    variants = [r["variant"] for r in doc["rows"]]
    assert variants == ["pycomm", "pycomm-1stream", "pycomm-2streams", "pycomm-4streams", "gloo"] * 2, variants
    assert all(r["wrong"] == 0 for r in doc["rows"]), doc["rows"]
    assert "medians over 2 interleaved rounds" in p.stdout and "wire-time limit" in p.stdout, p.stdout
