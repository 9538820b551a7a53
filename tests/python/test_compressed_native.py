"""The pipelined C++ compressed all-reduce (pycomm groups, CPU tensors) against the
generic path over torch.distributed collectives: bitwise-identical results and state,
on an odd world size with pieces small enough that every chunk is cut into many."""
import hashlib

import pytest
import torch

import pycomm.compression as C  # noqa: E402

from dist_util import BACKENDS, run_ranks  # noqa: E402

pytestmark = pytest.mark.skipif("pycomm" not in BACKENDS, reason="pycomm backend not built")

NATIVE = {
    "none": lambda: None,
    "fp16_ef": lambda: C.FP16(error_feedback=True),
    "bf16": lambda: C.BF16(),
    "onebit": lambda: C.OneBit(),
    "qsgd8_ef": lambda: C.QSGD(bits=8, error_feedback=True, seed=3),
    "qsgd4": lambda: C.QSGD(bits=4, seed=5),
}


def _bits(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _state_bits(comp) -> dict:
    if comp is None:
        return {}
    out = {}
    for key, st in comp.state_dict()["states"].items():
        for name, v in st.items():
            out[f"{key}/{name}"] = _bits(v) if isinstance(v, torch.Tensor) else v
    return out


def _body(rank, world_size, n):
    import pycomm

    assert pycomm.transport() == "tcp"
    out = {}
    for name, make in NATIVE.items():
        native, generic = make(), make()
        for step in range(3):
            torch.manual_seed(1000 * step + rank)
            x = torch.randn(n)
            if step == 2:
                # A non-contiguous view: the native path stages it and writes it back.
                x = torch.randn(n, 2)[:, 1]
            a, b = x.clone(), x.clone()
            C.NATIVE = True
            s0 = pycomm.stats()["bytes_sent"]
            C.compressed_all_reduce(a, native, key="k")
            sent = pycomm.stats()["bytes_sent"] - s0
            C.NATIVE = False
            C.compressed_all_reduce(b, generic, key="k")
            out[(name, step)] = {"native": _bits(a), "generic": _bits(b), "sent": sent,
                                 "state_native": _state_bits(native), "state_generic": _state_bits(generic),
                                 "finite": bool(torch.isfinite(a).all())}
    # Every codec's async path on fresh state equals its sync path on fresh state.
    for name, make in NATIVE.items():
        if name == "none":
            continue
        torch.manual_seed(77 + rank)
        x = torch.randn(n)
        s, a = make(), make()
        y, z = x.clone(), x.clone()
        C.NATIVE = True
        s.all_reduce(y, key="q")
        futs = [a.all_reduce(z, key="q", async_op=True)]
        torch.futures.wait_all(futs)
        out[(name, "async")] = _bits(y) == _bits(z) and _state_bits(s) == _state_bits(a)
    return out


def test_native_path_equals_generic_path_bitwise():
    n = 100_003
    w = 3
    res = run_ranks(w, _body, n, backend="pycomm", timeout=240,
                    env={"PYCOMM_TRANSPORT": "tcp", "PYCOMM_COMPRESS_PIECE_BYTES": "8192"})
    for name in NATIVE:
        for step in range(3):
            r0 = res[0][(name, step)]
            for r, rr in enumerate(res):
                got = rr[(name, step)]
                assert got["finite"], (name, step, r)
                assert got["native"] == got["generic"], f"{name} step {step} rank {r}: native != generic"
                assert got["native"] == r0["native"], f"{name} step {step}: rank {r} differs from rank 0"
                assert got["state_native"] == got["state_generic"], f"{name} step {step} rank {r}: state differs"
                assert got["sent"] > 0
            # The native path moves the promised bytes (the generic one's, give or take headers).
            comp = NATIVE[name]()
            wire = (comp or C.engine._NONE).wire_bytes(n, w)
            assert abs(r0["sent"] - wire) <= 0.02 * wire + 1024, (name, r0["sent"], wire)
        for rr in res:
            if name != "none":
                assert rr[(name, "async")], f"{name}: async native differs from sync native"


def _dp_body(rank, world_size, native):
    import torch.distributed as dist

    from pycomm.data_parallel import DataParallel

    C.NATIVE = native
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 8))
    model = DataParallel(net, bucket_cap_mb=0.005, first_bucket_mb=0.001, compression=C.OneBit(),
                         gradient_as_bucket_view=native)  # either way: same values
    assert len(model.bucket_layout()) >= 3, model.bucket_layout()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(4):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    dist.barrier()
    return _bits(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))


def test_data_parallel_onebit_native_equals_generic():
    """Several compressed buckets in flight at once (async, from backward hooks): the
    native path trains to the same bits as the generic one, on every rank."""
    env = {"PYCOMM_TRANSPORT": "tcp", "PYCOMM_COMPRESS_PIECE_BYTES": "8192"}
    native = run_ranks(3, _dp_body, True, backend="pycomm", timeout=180, env=env)
    generic = run_ranks(3, _dp_body, False, backend="pycomm", timeout=180, env=env)
    assert len(set(native)) == 1 and native == generic, (native, generic)


def _mixed_body(rank, world_size):
    import time

    import torch.distributed as dist

    C.NATIVE = rank == 0  # rank 0 runs the C++ exchange, rank 1 the generic collectives
    x = torch.randn(10_000)
    start = time.monotonic()
    try:
        C.OneBit().all_reduce(x, key="k")
        out = ("completed", time.monotonic() - start)
    except RuntimeError as e:
        out = (str(e), time.monotonic() - start)
    dist.destroy_process_group()  # the group is aborted: no closing barrier
    return out


def test_native_on_one_rank_generic_on_another_fails_fast():
    res = run_ranks(2, _mixed_body, backend="pycomm", timeout=60, pg_timeout=30, env={"PYCOMM_TRANSPORT": "tcp"})
    for msg, seconds in res:
        assert msg != "completed" and "mismatch" in msg, res
        assert seconds < 20, res


def _nonfinite_body(rank, world_size):
    C.NATIVE = True
    out = {}
    for name, make in NATIVE.items():
        for n in (1, 7, 4099, 100_003):
            for case in ("finite", "nan", "inf", "overflow"):
                comp = make() or C.engine._NONE
                torch.manual_seed(10 * n + rank)
                x = torch.randn(n)
                if case == "nan" and rank == 1:
                    x[n // 2] = float("nan")
                elif case == "inf" and rank == world_size - 1:
                    x[n - 1] = float("inf")
                elif case == "overflow":
                    x.fill_(3e38)  # finite on every rank, the sum is not
                key = ("flag", n, case)
                y = comp.all_reduce(x, key=key, op="sum")
                out[(name, n, case)] = (comp.result_finite(key), bool(torch.isfinite(y).all()))
    # A call that leaves the native flat path forgets the flag (the caller looks itself).
    comp = C.OneBit()
    comp.all_reduce(torch.randn(100), key="k")
    C.NATIVE = False
    comp.all_reduce(torch.randn(100), key="k")
    out["generic"] = comp.result_finite("k")
    C.NATIVE = True
    return out


def test_native_flag_says_whether_the_result_is_finite():
    """The flag the exchange reads off the payloads (block scales, exponents) agrees with
    the result on every rank, for every codec, on awkward lengths; inf and overflowing sums
    are caught (what MomentumCorrection then relies on instead of a pass over the tensor)."""
    res = run_ranks(3, _nonfinite_body, backend="pycomm", timeout=240,
                    env={"PYCOMM_TRANSPORT": "tcp", "PYCOMM_COMPRESS_PIECE_BYTES": "8192"})
    for key, got in res[0].items():
        if key == "generic":
            continue
        (flag, finite), (name, n, case) = got, key
        for r, rr in enumerate(res):
            assert rr[key] == (flag, finite), (key, r, rr[key], (flag, finite))
        assert flag is not None and flag == finite, (key, flag, finite)
        if case == "finite":
            assert finite, key
        if case in ("inf", "overflow"):
            assert not finite, key
    assert all(rr["generic"] is None for rr in res)
