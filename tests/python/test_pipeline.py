"""Pipeline schedules train exactly like one process training the whole model.

The model is cut into ``p`` pieces; stage ``s`` runs piece ``s``. After several SGD
steps with micro-batches, every stage's parameters equal those of the unsplit model
trained on the full batches in one process (float64, tight tolerance). The same check
runs torch.distributed.pipelining's own schedules on the backend under test.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_util import BACKENDS, run_ranks  # the same checks on Gloo and on pycomm

import pycomm.pipeline as pipeline  # noqa: E402

STEPS, BATCH, MICRO, LR = 3, 8, 4, 0.1
WIDTHS = [6, 9, 5, 7, 3]  # input width, then the output width of each of 4 pieces
TOL = dict(rtol=1e-10, atol=1e-12)


class Piece(nn.Module):
    """Takes ``(h, tag)``; ``tag`` is an int64 tensor that rides along (no gradient).

    Widths differ per piece, so the receiving stage must learn shapes from the header.
    The last piece returns ``h`` only.
    """

    def __init__(self, d_in, d_out, last):
        super().__init__()
        self.lin1 = nn.Linear(d_in, 8)
        self.lin2 = nn.Linear(8, d_out)
        self.last = last

    def forward(self, h, tag):
        h = self.lin2(torch.tanh(self.lin1(h))) + 0.1 * tag.unsqueeze(-1).to(h.dtype)
        return h if self.last else (h, tag)


def _pieces(p):
    """The whole model as ``p`` pieces (4 pieces of work merged into ``p`` stages)."""
    torch.manual_seed(0)
    widths = [WIDTHS[0]] + WIDTHS[1:][4 // p - 1::4 // p]
    return [Piece(widths[s], widths[s + 1], s == p - 1) for s in range(p)]


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, WIDTHS[0], generator=g)
    tag = torch.randint(0, 3, (BATCH,), generator=g)
    y = torch.randn(BATCH, WIDTHS[-1], generator=g)
    return x, tag, y


def _reference(p):
    pieces = _pieces(p)
    params = [q for piece in pieces for q in piece.parameters()]
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for step in range(STEPS):
        x, tag, y = _data(step)
        opt.zero_grad()
        h = (x, tag)
        for piece in pieces:
            h = piece(*h) if isinstance(h, tuple) else h
        loss = F.mse_loss(h, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return pieces, losses


def _train_with_pycomm(rank, world):
    torch.set_default_dtype(torch.float64)
    ref_pieces, ref_losses = _reference(world)
    results = {}
    for name, cls in (("gpipe", pipeline.ScheduleGPipe), ("1f1b", pipeline.Schedule1F1B)):
        piece = _pieces(world)[rank]
        stage = pipeline.PipelineStage(piece)
        sched = cls(stage, MICRO, loss_fn=F.mse_loss)
        opt = torch.optim.SGD(piece.parameters(), lr=LR)
        for step in range(STEPS):
            x, tag, y = _data(step)
            opt.zero_grad()
            loss = sched.step((x, tag), target=y)
            opt.step()
            if stage.is_last:
                assert abs(loss.item() - ref_losses[step]) < 1e-12, (name, step)
            else:
                assert loss is None
            assert sched.max_live == (MICRO if name == "gpipe" else min(world - rank, MICRO))
        for (pn, got), want in zip(piece.named_parameters(), ref_pieces[rank].parameters()):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name} {pn}: {m}")
        results[name] = sum(q.numel() for q in piece.parameters())
    return results


def _train_with_torch_pipelining(rank, world):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_default_dtype(torch.float64)

    def make():
        torch.manual_seed(0)
        layers = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(world)]
        return layers

    # Reference: the whole model, one process, full batches.
    ref = nn.Sequential(*make())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(200 + step)
        x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 6, generator=g)
        ref_opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()

    for cls in (ScheduleGPipe, Schedule1F1B):
        piece = make()[rank]
        stage = PipelineStage(piece, rank, world, torch.device("cpu"))
        sched = cls(stage, MICRO, loss_fn=F.mse_loss)
        opt = torch.optim.SGD(piece.parameters(), lr=LR)
        for step in range(STEPS):
            g = torch.Generator().manual_seed(200 + step)
            x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 6, generator=g)
            opt.zero_grad()
            if rank == 0:
                sched.step(x)
            elif rank == world - 1:
                sched.step(target=y)
            else:
                sched.step()
            opt.step()
        for got, want in zip(piece.parameters(), ref[rank].parameters()):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{cls.__name__}: {m}")
    return True


def _both(rank, world):
    # One process group per (backend, stages): spawning ranks is the slow part here.
    return _train_with_pycomm(rank, world), _train_with_torch_pipelining(rank, world)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_training_equals_single_process(backend, stages):
    """pycomm GPipe and 1F1B, then torch.distributed.pipelining's, on the backend."""
    out = run_ranks(stages, _both, backend=backend)
    assert all(r["gpipe"] == r["1f1b"] > 0 and ok for r, ok in out)


def test_schedule_orders():
    """1F1B: p-s-1 warm-up forwards, alternation, drain; every micro-batch once each way."""

    class FakeStage:
        def __init__(self, s, p):
            self.stage_index, self.num_stages = s, p
            self.is_first, self.is_last = s == 0, s == p - 1

    for p in (2, 4):
        for m in (1, 3, 8):
            for s in range(p):
                for cls in (pipeline.ScheduleGPipe, pipeline.Schedule1F1B):
                    acts = cls(FakeStage(s, p), m, loss_fn=F.mse_loss).actions()
                    assert sorted(acts) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                    for i in range(m):  # backward after its forward
                        assert acts.index(("F", i)) < acts.index(("B", i))
                    live = max(sum(1 for a in acts[:k + 1] if a[0] == "F") -
                               sum(1 for a in acts[:k + 1] if a[0] == "B") for k in range(len(acts)))
                    assert live == (m if cls is pipeline.ScheduleGPipe else min(p - s, m))


def test_header_roundtrip():
    ts = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.int64),
          torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16))
    meta = pipeline._decode_header(pipeline._encode_header(ts))
    assert meta == [(t.dtype, tuple(t.shape)) for t in ts]
