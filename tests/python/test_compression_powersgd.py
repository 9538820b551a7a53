"""PowerSGD per parameter (as torch's powerSGD_hook): each matrix-shaped parameter of a
bucket gets its own rank-r factorisation, vectors and small matrices travel exactly.
Checked against a float64 per-matrix PowerSGD the test computes itself (warm start,
error feedback, orthogonalisation), on 1 rank (the C++ steps with an identity
all-reduce) and 3 ranks (the real collectives), with lengths 0, 1 and prime shapes;
and DataParallel / the DDP hook pass their bucket layouts."""
from __future__ import annotations

import math

import pytest
import torch

import pycomm._C as _C
import pycomm.compression as C
from dist_util import BACKENDS, run_ranks

RANK = 2
# (shape) of each parameter, in bucket order. Compressed at rank 2: (31, 17), (7, 13),
# (37, 3, 3) -> 37 x 9. Exact: the vectors (lengths 0, 1, 3, 5), (1, 5) and (2, 3, 5) ->
# 2 x 15 (too small to pay), (1, 1).
SHAPES = [(5,), (31, 17), (0,), (7, 13), (1,), (1, 5), (37, 3, 3), (3,), (2, 3, 5), (1, 1)]


def _layout(shapes, gap=0):
    """[(shape, offset)] back to back (with `gap` unused elements after each) and the length."""
    out, off = [], 0
    for s in shapes:
        out.append((s, off))
        off += math.prod(s) + gap
    return out, off


def _compressed(shape, rank=RANK, rate=2):
    if len(shape) < 2 or math.prod(shape) == 0:
        return None
    rows, cols = shape[0], math.prod(shape) // shape[0]
    r = min(rank, rows, cols)
    return None if (rows + cols) * r * rate >= rows * cols else (rows, cols, r)


class Reference:
    """Per-matrix PowerSGD in float64 over `world` ranks' flat tensors (all-reduce = mean)."""

    def __init__(self, layout, n, world, q0):
        self.layout, self.n, self.world = layout, n, world
        self.err = [torch.zeros(n, dtype=torch.float64) for _ in range(world)]
        self.q = {off: q.double() for off, q in q0.items()}

    def step(self, xs):
        xs = [x.double() for x in xs]
        out = sum(xs) / self.world  # exact everywhere, then the matrices are overwritten
        for shape, off in self.layout:
            plan = _compressed(shape)
            if plan is None:
                continue
            rows, cols, r = plan
            sl = slice(off, off + rows * cols)
            ms = []
            for k in range(self.world):
                self.err[k][sl] += xs[k][sl]
                ms.append(self.err[k][sl].view(rows, cols))
            p = sum(m @ self.q[off] for m in ms) / self.world
            p = torch.linalg.qr(p).Q
            qs = []
            for m in ms:
                ql = m.t() @ p
                m -= p @ ql.t()  # writes into self.err
                qs.append(ql)
            self.q[off] = sum(qs) / self.world
            out[sl] = (p @ self.q[off].t()).reshape(-1)
        return out


def _initial_q(comp, key, n):
    """The compressor's own initial Q of every compressed matrix of `key`, by offset."""
    mats = comp._matrices(key, (n,), n)
    flat = comp._initial_q(mats, torch.device("cpu"))
    out, at = {}, 0
    for off, c, r in zip(mats[0], mats[2], mats[3]):
        out[off] = flat[at:at + c * r].view(c, r)
        at += c * r
    return out


def _inputs(rank, n, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    # A low-rank trend plus noise: the factorisation has something to find.
    base = torch.sin(torch.arange(n, dtype=torch.float32) * 0.37 + step)
    return base + 0.3 * torch.randn(n, generator=g)


@pytest.mark.parametrize("gap", [0, 3])
def test_cpp_steps_match_float64_reference_one_rank(gap):
    layout, n = _layout(SHAPES, gap)
    comp = C.PowerSGD(rank=RANK)
    comp.set_layout("k", layout)
    mats = comp._matrices("k", (n,), n)
    assert [(r, c) for r, c in zip(mats[1], mats[2])] == [(31, 17), (7, 13), (37, 9)]
    exact, pc, qc = _C.powersgd_payload_sizes(n, *mats)
    assert exact == n - (31 * 17 + 7 * 13 + 37 * 9)
    assert (pc, qc) == (RANK * (31 + 7 + 37), RANK * (17 + 13 + 9))
    q0 = _initial_q(comp, "k", n)
    ref = Reference(layout, n, 1, q0)
    err = torch.zeros(n)
    q = comp._initial_q(mats, torch.device("cpu"))
    for step in range(4):
        x = _inputs(0, n, step)
        payload = _C.powersgd_compress(x, err, q, *mats)  # all-reduce of one rank: identity
        q = _C.powersgd_project(err, payload, *mats)
        out = torch.empty(n)
        _C.powersgd_decompress(out, payload, q, *mats)
        want = ref.step([x])
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(err.double(), ref.err[0], rtol=1e-4, atol=1e-4)
        # Vectors and small matrices are sent exactly (bitwise).
        for shape, off in layout:
            if _compressed(shape) is None:
                sl = slice(off, off + math.prod(shape))
                assert torch.equal(out[sl], x[sl]), shape


def test_layout_errors_are_clear():
    n = 100
    with pytest.raises(RuntimeError, match="runs past"):
        _C.powersgd_payload_sizes(n, [90], [5], [5], [2])
    with pytest.raises(RuntimeError, match="overlaps"):
        _C.powersgd_payload_sizes(n, [0, 10], [5, 5], [5, 5], [2, 2])
    with pytest.raises(RuntimeError, match="rank"):
        _C.powersgd_payload_sizes(n, [0], [5], [5], [6])
    with pytest.raises(RuntimeError, match="float32"):
        _C.powersgd_compress(torch.zeros(n, dtype=torch.float64), torch.zeros(n), torch.zeros(10),
                             [0], [5], [5], [2])
    comp = C.PowerSGD(rank=2)
    comp.set_layout("k", [((10, 10), 0), ((5,), 95)])
    with pytest.raises(ValueError, match="does not fit"):
        comp._matrices("k", (n,), n)


def _collective_body(rank, world, gap):
    layout, n = _layout(SHAPES, gap)
    comp = C.PowerSGD(rank=RANK)
    comp.set_layout("bucket", layout)
    q0 = _initial_q(comp, "bucket", n)
    ref = Reference(layout, n, world, q0)
    outs = []
    for step in range(4):
        xs = [_inputs(k, n, step) for k in range(world)]
        t = xs[rank].clone()
        if step % 2 == 0:
            comp.all_reduce(t, key="bucket")
        else:
            comp.all_reduce(t, key="bucket", async_op=True).wait()
        want = ref.step(xs)
        torch.testing.assert_close(t.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
        outs.append(t)
    # An empty tensor and one with nothing worth compressing (all exact).
    e = torch.zeros(0)
    comp.all_reduce(e, key="empty")
    v = _inputs(rank, 11, 9)
    comp.all_reduce(v, key="vector11")
    want = sum(_inputs(k, 11, 9).double() for k in range(world)) / world
    torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-6)
    return torch.cat(outs).tolist()  # plain floats: exact, and no tensor sharing between processes


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_matrix_all_reduce_matches_float64_reference_three_ranks(backend):
    outs = run_ranks(3, _collective_body, 3, backend=backend, timeout=180)
    for o in outs[1:]:
        assert o == outs[0], "ranks differ"


def _projection_ok(result, avg, r):
    """result = U U^T avg for U spanning result's columns (first compressed step, no error)."""
    u, s, _ = torch.linalg.svd(result.double(), full_matrices=False)
    assert int((s > 1e-6 * s[0]).sum()) <= r
    u = u[:, :r]
    torch.testing.assert_close(result.double(), u @ (u.t() @ avg.double()), rtol=1e-4, atol=1e-5)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(23, 40), torch.nn.ReLU(), torch.nn.Linear(40, 29),
                               torch.nn.ReLU(), torch.nn.Linear(29, 3))


def _grads(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(16, 23, generator=g), torch.randn(16, 3, generator=g)


def _wrapper_body(rank, world, which):
    import torch.distributed as dist

    import pycomm

    net = _model()
    ref = _model()
    comp = C.MomentumCorrection(C.PowerSGD(rank=RANK), momentum=0.0, warmup_steps=0)
    if which == "dp":
        model = pycomm.DataParallel(net, compression=comp, bucket_cap_mb=0.004)
    else:
        model = torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.004)
        model.register_comm_hook(pycomm.DDPHookState(compression=comp), pycomm.ddp_comm_hook)
    x, y = _grads(rank)
    torch.nn.functional.mse_loss(model(x), y).backward()
    # The exact average, per parameter, from every rank's own gradients.
    avgs = []
    for p in ref.parameters():
        p.grad = None
    for k in range(world):
        ref.zero_grad()
        xk, yk = _grads(k)
        torch.nn.functional.mse_loss(ref(xk), yk).backward()
        avgs.append([p.grad.clone() for p in ref.parameters()])
    n_compressed = 0
    for i, p in enumerate(net.parameters()):
        avg = sum(a[i] for a in avgs) / world
        if _compressed(tuple(p.shape)) is None:
            torch.testing.assert_close(p.grad, avg, rtol=1e-5, atol=1e-6)  # sent exactly
        else:
            n_compressed += 1
            _projection_ok(p.grad, avg, RANK)  # its own rank-2 factorisation
    assert n_compressed == 2  # (40, 23) and (29, 40); (3, 29) is too small to pay at rank 2
    assert comp.compressor._layouts, "no layout reached PowerSGD"
    flat = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    out = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(out, flat)
    assert all(torch.equal(o, flat) for o in out), "ranks differ"
    return True


@pytest.mark.parametrize("which", ["dp", "ddp"])
def test_data_parallel_and_ddp_hook_factorise_each_parameter(which):
    run_ranks(3, _wrapper_body, which, backend="gloo", timeout=180)
