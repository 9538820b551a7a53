"""Tensor-parallel layers equal the dense model computed in one process.

Every rank builds the dense model and the tensor-parallel model from the same seed,
runs the same float64 input through both and compares the output and every gradient
(shards against the matching slice of the dense gradient).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_util import BACKENDS, run_ranks  # the same checks on Gloo and on pycomm

import pycomm.tensor_parallel as tp  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- dense models

class DenseMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DenseAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        hd = d // self.heads

        def split(t):
            return t.view(b, s, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q.matmul(k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        return self.out(scores.softmax(-1).matmul(v).transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-LN transformer block; ``parallel`` picks the dense or tensor-parallel parts."""

    def __init__(self, d, heads, h, parallel=False, group=None):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = tp.ParallelSelfAttention(d, heads, group=group) if parallel else DenseAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = tp.ParallelMLP(d, h, group=group) if parallel else DenseMLP(d, h)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


# --------------------------------------------------------------------------- helpers

def _shard(dense: torch.Tensor, layer: nn.Module, name: str, rank: int, world: int) -> torch.Tensor:
    """The slice of a dense parameter (or gradient) that ``layer`` holds on ``rank``."""
    if isinstance(layer, tp.ColumnParallelLinear):
        return dense.chunk(world, 0)[rank]
    if isinstance(layer, tp.RowParallelLinear):
        return dense.chunk(world, 1)[rank] if name == "weight" else dense
    if isinstance(layer, tp.VocabParallelEmbedding):
        return dense.chunk(world, 0)[rank]
    return dense


def _compare(dense_model, par_model, rank, world, what):
    dense_mods = dict(dense_model.named_modules())
    n = 0
    for mname, mod in par_model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            ref = getattr(dense_mods[mname], pname)
            want = ref.detach() if what == "value" else ref.grad
            got = p.detach() if what == "value" else p.grad
            assert got is not None, f"{mname}.{pname}: no gradient"
            torch.testing.assert_close(got, _shard(want, mod, pname, rank, world), **TOL,
                                       msg=lambda m: f"{what} of {mname}.{pname}: {m}")
            n += 1
    return n


def _mlp_and_block(rank, world):
    torch.set_default_dtype(torch.float64)
    d, heads, h = 16, 4, 32
    results = {}

    for name, make in (("mlp", lambda par: tp.ParallelMLP(d, h) if par else DenseMLP(d, h)),
                       ("block", lambda par: Block(d, heads, h, parallel=par))):
        torch.manual_seed(0)
        dense = make(False)
        torch.manual_seed(0)
        par = make(True)
        # Initialisation: same seed, same full weights.
        _compare(dense, par, rank, world, "value")

        torch.manual_seed(1)
        x = torch.randn(3, 5, d)
        w = torch.randn(3, 5, d)
        xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        yd, yp = dense(xd), par(xp)
        torch.testing.assert_close(yp, yd, **TOL)
        (yd * w).sum().backward()
        (yp * w).sum().backward()
        torch.testing.assert_close(xp.grad, xd.grad, **TOL)
        results[name] = _compare(dense, par, rank, world, "grad")
    return results


def _vocab_and_sequence(rank, world):
    torch.set_default_dtype(torch.float64)
    V, d, h = 24, 8, 16

    # --- tiny LM: vocab-parallel embedding -> MLP -> vocab-parallel head + cross-entropy
    class LM(nn.Module):
        def __init__(self, par):
            super().__init__()
            self.emb = tp.VocabParallelEmbedding(V, d) if par else nn.Embedding(V, d)
            self.mlp = tp.ParallelMLP(d, h) if par else DenseMLP(d, h)
            self.head = tp.ColumnParallelLinear(d, V, bias=False) if par else nn.Linear(d, V, bias=False)

    torch.manual_seed(0)
    dense = LM(False)
    torch.manual_seed(0)
    par = LM(True)
    _compare(dense, par, rank, world, "value")
    torch.manual_seed(2)
    ids = torch.randint(0, V, (4, 6))
    target = torch.randint(0, V, (4, 6))
    logits = dense.head(dense.mlp(dense.emb(ids)))
    loss_d = F.cross_entropy(logits.view(-1, V), target.view(-1))
    shard = par.head(par.mlp(par.emb(ids)))
    assert shard.shape == (4, 6, V // world)
    torch.testing.assert_close(shard, logits.chunk(world, -1)[rank], **TOL)
    loss_p = tp.vocab_parallel_cross_entropy(shard, target).mean()
    torch.testing.assert_close(loss_p, loss_d, **TOL)
    loss_d.backward()
    loss_p.backward()
    _compare(dense, par, rank, world, "grad")

    # --- extreme logits: the max-shift keeps the loss finite and exact
    big = torch.randn(5, V) * 300
    tgt = torch.randint(0, V, (5,))
    big_p = big.chunk(world, -1)[rank].clone().requires_grad_()
    big_d = big.clone().requires_grad_()
    lp = tp.vocab_parallel_cross_entropy(big_p, tgt)
    ld = F.cross_entropy(big_d, tgt, reduction="none")
    torch.testing.assert_close(lp, ld, **TOL)
    (lp * torch.arange(5.0)).sum().backward()
    (ld * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(big_p.grad, big_d.grad.chunk(world, -1)[rank], **TOL)

    # --- gather_output / input_is_parallel=False round trip
    torch.manual_seed(3)
    lin_d = nn.Linear(d, h)
    torch.manual_seed(3)
    col = tp.ColumnParallelLinear(d, h, gather_output=True)
    x = torch.randn(7, d)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(col(xp), lin_d(xd), **TOL)
    torch.manual_seed(4)
    row_d = nn.Linear(h, d)
    torch.manual_seed(4)
    row = tp.RowParallelLinear(h, d, input_is_parallel=False)
    z = torch.randn(7, h)
    zd, zp = z.clone().requires_grad_(), z.clone().requires_grad_()
    yd, yp = row_d(zd), row(zp)
    torch.testing.assert_close(yp, yd, **TOL)
    (yd ** 2).sum().backward()
    (yp ** 2).sum().backward()
    torch.testing.assert_close(zp.grad, zd.grad, **TOL)
    torch.testing.assert_close(row.weight.grad, row_d.weight.grad.chunk(world, 1)[rank], **TOL)

    # --- sequence parallel MLP: input and output split along dim 0 (sequence)
    s = 4 * world
    torch.manual_seed(5)
    mlp_d = DenseMLP(d, h)
    torch.manual_seed(5)
    fc1 = tp.ColumnParallelLinear(d, h, sequence_parallel=True)
    fc2 = tp.RowParallelLinear(h, d, sequence_parallel=True)
    x = torch.randn(s, 2, d)
    w = torch.randn(s, 2, d)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd = mlp_d(xd)
    x_local = tp.scatter_to_sequence_region(xp)
    y_local = fc2(F.gelu(fc1(x_local)))
    torch.testing.assert_close(y_local, yd.chunk(world, 0)[rank], **TOL)
    # The total loss is the sum of each rank's loss on its own chunk of the sequence.
    (yd * w).sum().backward()
    (y_local * w.chunk(world, 0)[rank]).sum().backward()
    torch.testing.assert_close(xp.grad, xd.grad, **TOL)  # scatter's backward all-gathers
    torch.testing.assert_close(fc1.weight.grad, mlp_d.fc1.weight.grad.chunk(world, 0)[rank], **TOL)
    torch.testing.assert_close(fc1.bias.grad, mlp_d.fc1.bias.grad.chunk(world, 0)[rank], **TOL)
    torch.testing.assert_close(fc2.weight.grad, mlp_d.fc2.weight.grad.chunk(world, 1)[rank], **TOL)
    # A replicated parameter used on a sequence chunk sees only that chunk's gradient.
    dist.all_reduce(fc2.bias.grad)
    torch.testing.assert_close(fc2.bias.grad, mlp_d.fc2.bias.grad, **TOL)
    full = tp.gather_from_sequence_region(y_local.detach())
    torch.testing.assert_close(full, yd.detach(), **TOL)

    # --- the last-dim mappings on their own
    a = torch.randn(3, 2 * world, requires_grad=True)
    part = tp.scatter_to_region(a)
    torch.testing.assert_close(part, a.detach().chunk(world, -1)[rank], **TOL)
    back = tp.gather_from_region(part * (rank + 1))
    expect = torch.cat([c * (r + 1) for r, c in enumerate(a.detach().chunk(world, -1))], -1)
    torch.testing.assert_close(back, expect, **TOL)
    back.sum().backward()
    # gather's backward keeps this rank's chunk; scatter's backward all-gathers them.
    scale = torch.cat([torch.full((3, 2), float(r + 1)) for r in range(world)], -1)
    torch.testing.assert_close(a.grad, scale, **TOL)
    return True


def _everything(rank, world):
    # One process group per (backend, world): spawning ranks is the slow part here.
    return _mlp_and_block(rank, world), _vocab_and_sequence(rank, world)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_matches_dense(backend, world):
    """MLP, transformer block, vocab-parallel LM + loss, sequence parallel, mappings."""
    out = run_ranks(world, _everything, backend=backend)
    # Every parameter of the MLP (4) and the block (4 LN + 8 attention + 4 MLP) compared.
    assert out == [({"mlp": 4, "block": 16}, True)] * world
