"""Registered buffers on real processes (issue 17 item 2): tensors in pycomm's shared
arena are read by the other ranks on the host through a mapping of the owner's memfd
segment, with no system call. Every shm collective that reads peers' buffers is checked
against float64 references on odd world sizes and awkward lengths, with every rank
registered, none, and some; a rank killed while the others read its segment fails them
within the timeout and leaves nothing in /dev/shm."""
import os
import tempfile

import pytest

import reliability_cases as rc
from dist_util import run_ranks

LENGTHS = [0, 1, 2, 97, 16411, 40009]  # primes; the last two past the one-shot limit and the 128 KiB pieces


def _tensor(values, registered):
    import torch

    from pycomm import _C

    if not registered:
        return values.clone()
    t = _C.registered_zeros(values.numel(), values.dtype)
    assert _C.is_registered(t) or values.numel() == 0
    t.copy_(values)
    return t


def _vals(rank, n, salt=0):
    import torch

    i = torch.arange(n, dtype=torch.float64)
    return ((i * 37 + rank * 11 + salt) % 101) * 0.25 - 7.0


def _collectives(rank, ws, mode):
    import torch
    import torch.distributed as dist

    import pycomm
    from pycomm import _C

    registered = mode == "all" or (mode == "some" and rank % 2 == 0)
    checked = 0

    def moved(call):
        """Runs call(); returns the bytes every rank's peers read from it (pycomm.stats'
        bytes_sent), summed over the group: mapped reads and process_vm_readv alike.
        A peer still reading the previous count's 8 bytes (this function's own
        all_reduce, counted by the reader) may land in the window: see exact()."""
        s0 = pycomm.stats()["bytes_sent"]
        call()
        d = torch.tensor([float(pycomm.stats()["bytes_sent"] - s0)], dtype=torch.float64)
        dist.all_reduce(d)
        return int(d.item())

    def exact(sent, want):
        """sent is want, give or take one late 8-byte read per rank (see moved())."""
        return 0 <= sent - want <= 8 * ws

    for n in LENGTHS:
        ref = sum(_vals(r, n) for r in range(ws)) if ws > 1 else _vals(0, n)
        # all_reduce (SUM and AVG)
        t = _tensor(_vals(rank, n).float(), registered)
        sent = moved(lambda: dist.all_reduce(t))
        torch.testing.assert_close(t.double(), ref, rtol=1e-5, atol=1e-3)
        if n == LENGTHS[-1]:  # the single-copy algorithm: every block read by every peer, twice
            assert exact(sent, 2 * (ws - 1) * n * 4), (mode, rank, sent)
        t = _tensor(_vals(rank, n).float(), registered)
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        torch.testing.assert_close(t.double(), ref / ws, rtol=1e-5, atol=1e-3)
        # out of place (pycomm.all_reduce(x, out=y)), input and output each registered or
        # not by rank: the input comes back unchanged
        x = _tensor(_vals(rank, n).float(), registered)
        y = _tensor(torch.zeros(n), (rank % 3 == 1) != registered)
        pycomm.all_reduce(x, out=y)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(x, _vals(rank, n).float(), rtol=0, atol=0)
        # reduce_scatter: rank r's output is block r of the sum
        inp = _tensor(_vals(rank, n * ws, salt=3).float(), registered)
        out = torch.empty(n)
        sent = moved(lambda: dist.reduce_scatter_tensor(out, inp))
        if n == LENGTHS[-1]:  # each rank reads its block from every peer
            assert exact(sent, ws * (ws - 1) * n * 4), (mode, rank, sent)
        full = sum(_vals(r, n * ws, salt=3) for r in range(ws))
        torch.testing.assert_close(out.double(), full[rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-3)
        # all_gather
        g = _tensor(_vals(rank, n, salt=5).float(), registered)
        allg = torch.empty(n * ws)
        sent = moved(lambda: dist.all_gather_into_tensor(allg, g))
        if n == LENGTHS[-1]:  # each rank reads every peer's block
            assert exact(sent, ws * (ws - 1) * n * 4), (mode, rank, sent)
        want = torch.cat([_vals(r, n, salt=5) for r in range(ws)])
        torch.testing.assert_close(allg.double(), want.float().double(), rtol=0, atol=0)
        # broadcast from the last rank
        b = _tensor(_vals(rank, n, salt=7).float(), registered)
        dist.broadcast(b, src=ws - 1)
        torch.testing.assert_close(b.double(), _vals(ws - 1, n, salt=7).float().double(), rtol=0, atol=0)
        checked += 1
    return {"checked": checked, "arena": dict(_C.registered_stats())}


@pytest.mark.parametrize("world_size,mode", [(3, "all"), (3, "none"), (3, "some"), (5, "some")])
def test_shm_collectives_with_registered_buffers(world_size, mode):
    results = run_ranks(world_size, _collectives, mode, env={"PYCOMM_TRANSPORT": "shm"}, timeout=300)
    for r, res in enumerate(results):
        assert res["checked"] == len(LENGTHS)
        if mode == "all" or (mode == "some" and r % 2 == 0):
            assert res["arena"]["segments"] >= 1, res


def test_unregistered_user_tensors_copied_into_registered_scratch():
    """PYCOMM_REGISTERED_COPY_MAX large: user tensors above the one-shot limit are copied into
    registered scratch and read by peers with plain loads (the default, 0, reads them with
    process_vm_readv as before)."""
    run_ranks(3, _collectives, "none", env={"PYCOMM_TRANSPORT": "shm", "PYCOMM_REGISTERED_COPY_MAX": str(1 << 40)},
              timeout=300)


def _kill_while_read(rank, ws, victim, stamp_path):
    import signal
    import threading
    import time

    import torch.distributed as dist

    from pycomm import _C

    t = _C.registered_zeros((16 << 20) // 4, __import__("torch").float32)
    t.fill_(1.0)
    dist.all_reduce(t)  # everyone is in; peers have mapped the victim's segment
    if rank == victim:
        def die():
            time.sleep(0.3)
            with open(stamp_path, "w") as f:
                f.write(repr(time.time()))
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=die, daemon=True).start()
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end:
            dist.all_reduce(t)
    except RuntimeError as e:
        return {"msg": str(e), "failed_at": time.time()}
    return {"msg": None}


def test_rank_killed_while_peers_read_its_segment_fails_them_fast_and_leaks_nothing():
    with tempfile.TemporaryDirectory() as d:
        stamp = os.path.join(d, "killed_at")
        results = rc.launch(3, _kill_while_read, 1, stamp, env={"PYCOMM_TRANSPORT": "shm"}, pg_timeout=60,
                            timeout=100)
        killed_at = float(open(stamp).read())
    assert results[1]["exitcode"] == -9, rc.describe(results)
    for r in (results[0], results[2]):
        assert r["status"] == "ok", rc.describe(results)
        p = r["payload"]
        assert p["msg"] is not None and "rank" in p["msg"], p
        assert p["failed_at"] - killed_at < 10.0, p  # far below the 60 s timeout
    assert rc.job_segments([r["pid"] for r in results]) == []


def _dp_bucket_registered(rank, ws):
    import torch

    import pycomm
    from pycomm import _C

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(31, 17), torch.nn.Linear(17, 5))
    dp = pycomm.DataParallel(model)
    x = torch.randn(8, 31) * (rank + 1)
    dp(x).sum().backward()
    dp.finalize()
    return {"registered": [bool(_C.is_registered(b.flat)) for b in dp._buckets],
            "grad": model[0].weight.grad.double().sum().item()}


def test_data_parallel_buckets_are_registered():
    results = run_ranks(3, _dp_bucket_registered, env={"PYCOMM_TRANSPORT": "shm"}, timeout=300)
    for res in results:
        assert res["registered"] and all(res["registered"]), res
    assert len({round(r["grad"], 4) for r in results}) == 1, results
