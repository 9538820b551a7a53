"""Hybrid parallelism on 4 ranks equals single-process training.

* data 2 × tensor 2: a small vocab-parallel language model; each data-parallel
  replica trains on half of every batch and averages gradients over its data group.
* tensor 2 × pipeline 2: the same model cut into two pipeline stages whose layers are
  tensor-parallel, trained with the 1F1B schedule.

After several SGD steps every shard equals the matching slice of the dense model
trained on full batches in one process (float64).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_util import BACKENDS, run_ranks  # the same checks on Gloo and on pycomm

import pycomm.tensor_parallel as tp  # noqa: E402
import pycomm.pipeline as pipeline  # noqa: E402
import pycomm.parallel as parallel  # noqa: E402

V, D, H, SEQ, BATCH, STEPS, LR = 16, 8, 16, 5, 8, 3, 0.5
TOL = dict(rtol=1e-10, atol=1e-12)


class MLP(nn.Module):
    def __init__(self, par, group):
        super().__init__()
        self.fc1 = tp.ColumnParallelLinear(D, H, group=group) if par else nn.Linear(D, H)
        self.fc2 = tp.RowParallelLinear(H, D, group=group) if par else nn.Linear(H, D)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Embed(nn.Module):
    def __init__(self, par, group):
        super().__init__()
        self.emb = tp.VocabParallelEmbedding(V, D, group=group) if par else nn.Embedding(V, D)
        self.mlp = MLP(par, group)

    def forward(self, ids):
        return self.mlp(self.emb(ids))


class Head(nn.Module):
    def __init__(self, par, group):
        super().__init__()
        self.mlp = MLP(par, group)
        self.out = tp.ColumnParallelLinear(D, V, bias=False, group=group) if par else nn.Linear(D, V, bias=False)

    def forward(self, h):
        return self.out(self.mlp(h))


def _model(par, group=None):
    """Stage 0 and stage 1 of the LM; built in the same order dense and parallel."""
    torch.manual_seed(0)
    return nn.ModuleList([Embed(par, group), Head(par, group)])


def _data(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randint(0, V, (BATCH, SEQ), generator=g), torch.randint(0, V, (BATCH, SEQ), generator=g)


def _dense_training():
    model = _model(False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        ids, target = _data(step)
        opt.zero_grad()
        loss = F.cross_entropy(model[1](model[0](ids)).reshape(-1, V), target.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _check_shards(par_model, dense_model, tp_rank, tp_size):
    dense = dict(dense_model.named_modules())
    n = 0
    for mname, mod in par_model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            want = getattr(dense[mname], pname).detach()
            if isinstance(mod, (tp.ColumnParallelLinear, tp.VocabParallelEmbedding)):
                want = want.chunk(tp_size, 0)[tp_rank]
            elif isinstance(mod, tp.RowParallelLinear) and pname == "weight":
                want = want.chunk(tp_size, 1)[tp_rank]
            torch.testing.assert_close(p.detach(), want, **TOL, msg=lambda m: f"{mname}.{pname}: {m}")
            n += 1
    return n


def _dp2_tp2(rank, world):
    torch.set_default_dtype(torch.float64)
    g = parallel.init_groups(dp=2, tp=2)
    assert g.tp_ranks == [rank - rank % 2, rank - rank % 2 + 1]
    assert g.dp_ranks == [rank % 2, rank % 2 + 2]
    assert g.pp_ranks == [rank] and g.global_rank(g.dp_rank, g.tp_rank, g.pp_rank) == rank

    dense, losses = _dense_training()
    model = _model(True, g.tp_group)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        ids, target = _data(step)
        ids, target = ids.chunk(g.dp, 0)[g.dp_rank], target.chunk(g.dp, 0)[g.dp_rank]
        opt.zero_grad()
        logits = model[1](model[0](ids))
        loss = tp.vocab_parallel_cross_entropy(logits, target, g.tp_group).mean()
        loss.backward()
        parallel.average_gradients(model.parameters(), g.dp_group)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=g.dp_group)
        assert abs(mean.item() / g.dp - losses[step]) < 1e-12
    return _check_shards(model, dense, g.tp_rank, g.tp)


def _tp2_pp2(rank, world):
    torch.set_default_dtype(torch.float64)
    g = parallel.init_groups(dp=1, tp=2, pp=2)
    assert g.tp_ranks == [2 * g.pp_rank, 2 * g.pp_rank + 1] and g.pp_ranks == [g.tp_rank, g.tp_rank + 2]

    dense, losses = _dense_training()
    full = _model(True, g.tp_group)  # every rank builds both stages: same RNG use
    piece = full[g.pp_rank]
    stage = pipeline.PipelineStage(piece, group=g.pp_group)

    def loss_fn(logits_shard, target):
        return tp.vocab_parallel_cross_entropy(logits_shard, target, g.tp_group).mean()

    sched = pipeline.Schedule1F1B(stage, num_microbatches=4, loss_fn=loss_fn)
    opt = torch.optim.SGD(piece.parameters(), lr=LR)
    for step in range(STEPS):
        ids, target = _data(step)
        opt.zero_grad()
        loss = sched.step(ids, target=target)
        opt.step()
        if stage.is_last:
            assert abs(loss.item() - losses[step]) < 1e-12
    return _check_shards(piece, dense[g.pp_rank], g.tp_rank, g.tp)


def _both(rank, world):
    # One process group per backend: spawning ranks is the slow part here.
    return _dp2_tp2(rank, world), _tp2_pp2(rank, world)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hybrid_equals_single_process(backend):
    """dp 2 x tp 2, then tp 2 x pp 2 (1F1B), on 4 ranks."""
    out = run_ranks(4, _both, backend=backend)
    # 10 parameter shards per rank in dp x tp; 5 per pipeline stage in tp x pp.
    assert out == [(10, 5)] * 4
