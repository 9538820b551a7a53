"""The parallel strategies an evaluation compares, as per-rank trainers.

A trainer owns this rank's part of the model and optimizer and offers
``step(x, y)`` (one optimizer step on the *global* batch ``x, y``: each rank takes the
rows its data-parallel replica owns), ``evaluate(x, y)`` (the model's metric on the
test set, the same value on every rank), ``losses_known`` (whether this rank sees the
training loss), ``comm()`` (communication seconds and exposed seconds so far, from the
library's own counters) and ``optimizers`` / ``modules`` for the memory accounting.

Where communication time comes from, per strategy (docs/EVALUATION.md):

- DataParallel: its ``comm_stats`` (union of the buckets' in-flight intervals; time the
  end of backward blocked on them = exposed);
- torch DDP: a comm hook that timestamps each bucket's all-reduce (in flight) and the
  time from the last bucket's launch to the end of backward (exposed);
- tensor parallel: ``pycomm.tensor_parallel.comm_stats`` (time blocked in its
  collectives; all of it is on the critical path, so exposed = in flight);
- pipeline: ``PipelineStage.comm_wait_seconds`` (time blocked in receives, which
  includes the pipeline bubble; exposed = in flight), plus the hybrid's gradient
  averaging over the data-parallel group (synchronous, after the pipeline step);
- local SGD: its ``comm_stats``;
- torch's DTensor tensor parallelism and torch's pipelining: none (no clock to read
  without changing what they do; the report says n/a).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from pycomm.evaluation.models import ModelSpec, pieces

Tensor = torch.Tensor

#: strategy name -> (backend, description)
STRATEGIES: Dict[str, Tuple[str, str]] = {
    "single": ("pycomm", "one rank, no communication: the baseline of speedup and efficiency"),
    "dp": ("pycomm", "pycomm.DataParallel, exact all-reduce overlapped with backward"),
    "dp-fp16": ("pycomm", "pycomm.DataParallel + FP16 compression"),
    "dp-onebit": ("pycomm", "pycomm.DataParallel + OneBit (1-bit, error feedback)"),
    "dp-topk": ("pycomm", "pycomm.DataParallel + TopK(1%) with error feedback"),
    "dp-powersgd": ("pycomm", "pycomm.DataParallel + PowerSGD(rank 4)"),
    "ddp-gloo": ("gloo", "torch DistributedDataParallel on Gloo (baseline)"),
    "localsgd": ("pycomm", "pycomm.LocalSGD: local steps, parameters averaged every 8 steps"),
    "tp": ("pycomm", "Megatron-style tensor parallelism over every rank"),
    "pp-gpipe": ("pycomm", "pipeline, GPipe schedule, 4 micro-batches"),
    "pp-1f1b": ("pycomm", "pipeline, 1F1B schedule, 4 micro-batches"),
    "tp-dtensor": ("gloo", "torch DTensor tensor parallelism (Colwise/Rowwise plans) on Gloo (baseline)"),
    "pp-torch": ("gloo", "torch.distributed.pipelining, 1F1B schedule, 4 micro-batches, on Gloo (baseline)"),
    "dp-tp": ("pycomm", "hybrid: tensor parallel over 2 ranks x data parallel over the rest"),
    "dp-pp": ("pycomm", "hybrid: 2-stage 1F1B pipeline x data parallel over the rest"),
}

COMPRESSORS = {"dp-fp16": "FP16", "dp-onebit": "OneBit", "dp-topk": "TopK", "dp-powersgd": "PowerSGD"}


def applicable(strategy: str, spec: ModelSpec, world: int) -> Optional[str]:
    """None when ``strategy`` can train ``spec`` on ``world`` ranks, else the reason."""
    from pycomm.evaluation.models import tp_applies

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy == "single":
        return None if world == 1 else "the single-rank baseline runs on 1 rank only"
    if world == 1:
        return "needs at least 2 ranks (1 rank is the 'single' baseline)"
    if spec.recipe.global_batch % world:
        return f"global batch {spec.recipe.global_batch} does not split over {world} ranks"
    if strategy == "localsgd":
        import pycomm

        if not hasattr(pycomm, "LocalSGD"):
            return "pycomm.LocalSGD is not in this build"
    if strategy == "tp":
        return tp_applies(spec, world)
    if strategy == "tp-dtensor":
        if spec.name not in ("mlp", "large"):
            return "the DTensor baseline has a parallelisation plan for the MLPs only"
        return tp_applies(spec, world)
    if strategy.startswith("pp-"):
        if 4 % world:
            return f"4 model blocks do not split into {world} pipeline stages"
        if spec.recipe.global_batch % spec.recipe.microbatches:
            return "global batch does not split into the micro-batches"
    if strategy in ("dp-tp", "dp-pp"):
        if world < 4 or world % 2:
            return "a hybrid layout needs an even world of at least 4 ranks (2 x data parallel)"
        if strategy == "dp-tp":
            return tp_applies(spec, 2)
    return None


# ------------------------------------------------------------------------------- helpers

class _HookClock:
    """DDP comm hook that averages a bucket and timestamps it (in flight, last launch)."""

    def __init__(self, group) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.spans: List[List[float]] = []
        self.comm = 0.0
        self.exposed = 0.0

    def hook(self, state, bucket):  # no annotations: DDP checks real ones, this module's are strings
        span = [time.perf_counter(), 0.0]
        self.spans.append(span)
        buf = bucket.buffer().div_(self.world)
        fut = dist.all_reduce(buf, group=self.group, async_op=True).get_future()

        def done(f: torch.futures.Future) -> Tensor:
            span[1] = time.perf_counter()
            return f.value()[0]

        return fut.then(done)

    def end_backward(self, t_end: float) -> None:
        if not self.spans:
            return
        busy, end = 0.0, None
        for s, e in sorted((s, e or t_end) for s, e in self.spans):
            if end is None or s > end:
                busy, end = busy + e - s, e
            elif e > end:
                busy, end = busy + e - end, e
        self.comm += busy
        self.exposed += max(0.0, t_end - max(s for s, _ in self.spans))
        self.spans = []


def _dp_slice(x: Tensor, dp_rank: int, dp: int) -> Tensor:
    b = x.shape[0] // dp
    return x[dp_rank * b:(dp_rank + 1) * b]


def _pipe_forward(module: nn.Module, x: Optional[Tensor], first: bool, last: bool,
                  prev: Optional[int], nxt: Optional[int]) -> Optional[Tensor]:
    """Forward-only pass of one batch through a pipeline (evaluation): shapes travel in
    a fixed-size header, then the activation."""
    with torch.no_grad():
        if not first:
            header = torch.zeros(8, dtype=torch.int64)
            dist.recv(header, prev)
            shape = [int(v) for v in header[1:1 + int(header[0])]]
            x = torch.empty(shape)
            dist.recv(x, prev)
        out = module(x)
        if not last:
            out = out.contiguous().float()
            header = torch.zeros(8, dtype=torch.int64)
            header[0] = out.dim()
            header[1:1 + out.dim()] = torch.tensor(out.shape)
            dist.send(header, nxt)
            dist.send(out, nxt)
            return None
        return out


# ------------------------------------------------------------------------------- trainers

class Trainer:
    """Base: a whole replica of the model on this rank (single / data parallel)."""

    losses_known = True

    def __init__(self, spec: ModelSpec, model: nn.Module, dp_rank: int = 0, dp: int = 1) -> None:
        self.spec = spec
        self.model = model
        self.dp_rank, self.dp = dp_rank, dp
        self.opt = spec.recipe.make_optimizer(model.parameters())
        self.optimizers = [self.opt]
        self.modules: List[nn.Module] = [model]

    def forward_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.spec.loss(self.model(x), y)

    def step(self, x: Tensor, y: Tensor) -> Optional[float]:
        x, y = _dp_slice(x, self.dp_rank, self.dp), _dp_slice(y, self.dp_rank, self.dp)
        self.opt.zero_grad()
        loss = self.forward_loss(x, y)
        loss.backward()
        self.after_backward()
        self.opt.step()
        return loss.item()

    def after_backward(self) -> None:
        pass

    def end_epoch(self) -> None:
        """Runs on every rank after an epoch's steps, inside the timed training time."""

    def evaluate(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            return self.spec.score(self.model(x), y)

    def comm(self) -> Tuple[float, float]:
        return 0.0, 0.0


class DPTrainer(Trainer):
    """pycomm.DataParallel over ``group`` (optionally compressed)."""

    def __init__(self, spec: ModelSpec, model: nn.Module, group, compression: Optional[str]) -> None:
        import pycomm
        from pycomm import compression as C

        comp = None
        if compression is not None:
            comp = {"FP16": lambda: C.FP16(), "OneBit": lambda: C.OneBit(), "TopK": lambda: C.TopK(0.01),
                    "PowerSGD": lambda: C.PowerSGD(rank=4)}[compression]()
        self.dp_model = pycomm.DataParallel(model, group=group, compression=comp)
        super().__init__(spec, model, dist.get_rank(group), dist.get_world_size(group))
        self.modules = [self.dp_model]

    def forward_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.spec.loss(self.dp_model(x), y)

    def comm(self) -> Tuple[float, float]:
        st = self.dp_model.comm_stats
        return st["comm_seconds"], st["exposed_seconds"]


class DDPTrainer(Trainer):
    """torch DistributedDataParallel on the world group (the baseline)."""

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.ddp = DDP(model)
        self.clock = _HookClock(None)
        self.ddp.register_comm_hook(None, self.clock.hook)
        super().__init__(spec, model, dist.get_rank(), dist.get_world_size())

    def forward_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.spec.loss(self.ddp(x), y)

    def after_backward(self) -> None:
        self.clock.end_backward(time.perf_counter())

    def comm(self) -> Tuple[float, float]:
        return self.clock.comm, self.clock.exposed


class LocalSGDTrainer(Trainer):
    """pycomm.LocalSGD: every rank steps on its shard; parameters averaged every 8 steps."""

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        import pycomm

        super().__init__(spec, model, dist.get_rank(), dist.get_world_size())
        self.local = pycomm.LocalSGD(model, self.opt, sync_every=8)

    def step(self, x: Tensor, y: Tensor) -> Optional[float]:
        x, y = _dp_slice(x, self.dp_rank, self.dp), _dp_slice(y, self.dp_rank, self.dp)
        self.opt.zero_grad()
        loss = self.forward_loss(x, y)
        loss.backward()
        self.local.step()
        return loss.item()

    def end_epoch(self) -> None:
        # Finish the rounds in flight and average the progress since the last one, so the
        # epoch's score is the group's model, not one rank's local copy.
        self.local.flush()

    def comm(self) -> Tuple[float, float]:
        st = self.local.comm_stats
        return st["comm_seconds"], st["exposed_seconds"]


class TPTrainer(Trainer):
    """The tensor-parallel twin over ``group``; data parallel over ``dp_group`` when set
    (through pycomm.DataParallel, so the hybrid's gradient averaging overlaps too)."""

    def __init__(self, spec: ModelSpec, group, dp_group=None) -> None:
        from pycomm import tensor_parallel as tp

        assert spec.build_tp is not None
        self.group = group
        tp.comm_stats.enabled = True
        tp.comm_stats.reset()
        model = spec.build_tp(group)
        self.dp_model = None
        dp_rank, dp = 0, 1
        if dp_group is not None:
            import pycomm

            self.dp_model = pycomm.DataParallel(model, group=dp_group)
            dp_rank, dp = dist.get_rank(dp_group), dist.get_world_size(dp_group)
        super().__init__(spec, model, dp_rank, dp)
        if self.dp_model is not None:
            self.modules = [self.dp_model]

    def forward_loss(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.dp_model(x) if self.dp_model is not None else self.model(x)
        return self.spec.tp_loss(out, y, self.group)

    def evaluate(self, x: Tensor, y: Tensor) -> float:
        from pycomm import tensor_parallel as tp

        was = tp.comm_stats.seconds, tp.comm_stats.calls
        with torch.no_grad():
            out = self.model(x)
            if self.spec.token_level:
                value = self.spec.tp_loss(out, y, self.group).item()
            else:
                value = self.spec.score(out, y)
        tp.comm_stats.seconds, tp.comm_stats.calls = was  # evaluation is not training traffic
        return value

    def comm(self) -> Tuple[float, float]:
        from pycomm import tensor_parallel as tp

        c, e = tp.comm_stats.seconds, tp.comm_stats.seconds
        if self.dp_model is not None:
            st = self.dp_model.comm_stats
            c, e = c + st["comm_seconds"], e + st["exposed_seconds"]
        return c, e


class PPTrainer(Trainer):
    """This rank's stage of a pipeline over ``group`` (GPipe or 1F1B); gradients then
    averaged over ``dp_group`` when set (synchronously, after the pipeline step)."""

    def __init__(self, spec: ModelSpec, group, schedule: str, dp_group=None) -> None:
        from pycomm import pipeline

        self.group = group
        stages = dist.get_world_size(group)
        index = dist.get_rank(group)
        module = pieces(spec.build(), stages)[index]
        self.stage = pipeline.PipelineStage(module, group)
        cls = pipeline.ScheduleGPipe if schedule == "gpipe" else pipeline.Schedule1F1B
        self.schedule = cls(self.stage, spec.recipe.microbatches, loss_fn=spec.loss)
        self.dp_group = dp_group
        dp_rank, dp = (dist.get_rank(dp_group), dist.get_world_size(dp_group)) if dp_group is not None else (0, 1)
        super().__init__(spec, module, dp_rank, dp)
        self.losses_known = self.stage.is_last
        self.dp_seconds = 0.0

    def step(self, x: Tensor, y: Tensor) -> Optional[float]:
        from pycomm import parallel

        x, y = _dp_slice(x, self.dp_rank, self.dp), _dp_slice(y, self.dp_rank, self.dp)
        self.opt.zero_grad()
        loss = self.schedule.step(x if self.stage.is_first else None, y if self.stage.is_last else None)
        if self.dp_group is not None:
            t0 = time.perf_counter()
            parallel.average_gradients(self.model.parameters(), self.dp_group)
            self.dp_seconds += time.perf_counter() - t0
        self.opt.step()
        return loss.item() if loss is not None else None

    def evaluate(self, x: Tensor, y: Tensor) -> float:
        st = self.stage
        was = st.forward_seconds, st.backward_seconds, st.comm_wait_seconds
        out = _pipe_forward(self.model, x if st.is_first else None, st.is_first, st.is_last, st.prev_rank,
                            st.next_rank)
        value = torch.zeros(1, dtype=torch.float64)
        if st.is_last:
            value[0] = self.spec.score(out, y)
        last = dist.get_global_rank(self.group, st.num_stages - 1) if self.group is not None else st.num_stages - 1
        dist.broadcast(value, last, group=self.group)
        st.forward_seconds, st.backward_seconds, st.comm_wait_seconds = was
        return float(value.item())

    def comm(self) -> Tuple[float, float]:
        c = self.stage.comm_wait_seconds + self.dp_seconds
        return c, c


class DTensorTPTrainer(Trainer):
    """torch DTensor tensor parallelism of the MLPs: column-wise then row-wise linear
    pairs over a 1-d CPU device mesh of every rank (the baseline of ``tp``)."""

    def __init__(self, spec: ModelSpec) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        model = spec.build()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        plan = {"0.0": ColwiseParallel(), "1.0": RowwiseParallel(), "2.0": ColwiseParallel(),
                "3": RowwiseParallel()}
        parallelize_module(model, mesh, plan)
        super().__init__(spec, model)

    def comm(self) -> Tuple[Optional[float], Optional[float]]:  # type: ignore[override]
        return None, None


class TorchPipelineTrainer(Trainer):
    """torch.distributed.pipelining's 1F1B over every rank (the baseline of ``pp-1f1b``)."""

    def __init__(self, spec: ModelSpec) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        world, rank = dist.get_world_size(), dist.get_rank()
        module = pieces(spec.build(), world)[rank]
        self.first, self.last = rank == 0, rank == world - 1
        self.prev = None if self.first else rank - 1
        self.next = None if self.last else rank + 1
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        self.schedule = Schedule1F1B(stage, spec.recipe.microbatches, loss_fn=spec.loss)
        super().__init__(spec, module)
        self.losses_known = self.last

    def step(self, x: Tensor, y: Tensor) -> Optional[float]:
        self.opt.zero_grad()
        losses: List[Tensor] = []
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        self.opt.step()
        return float(torch.stack(losses).mean()) if losses else None

    def evaluate(self, x: Tensor, y: Tensor) -> float:
        out = _pipe_forward(self.model, x if self.first else None, self.first, self.last, self.prev, self.next)
        value = torch.zeros(1, dtype=torch.float64)
        if self.last:
            value[0] = self.spec.score(out, y)
        dist.broadcast(value, dist.get_world_size() - 1)
        return float(value.item())

    def comm(self) -> Tuple[Optional[float], Optional[float]]:  # type: ignore[override]
        return None, None


def make_trainer(strategy: str, spec: ModelSpec) -> Trainer:
    """This rank's trainer for ``strategy`` (process group already initialised; the
    torch seed set identically on every rank, so replicas start equal)."""
    from pycomm import parallel

    if strategy == "single":
        return Trainer(spec, spec.build())
    if strategy == "dp" or strategy in COMPRESSORS:
        return DPTrainer(spec, spec.build(), None, COMPRESSORS.get(strategy))
    if strategy == "ddp-gloo":
        return DDPTrainer(spec, spec.build())
    if strategy == "localsgd":
        return LocalSGDTrainer(spec, spec.build())
    if strategy == "tp":
        return TPTrainer(spec, None)
    if strategy in ("pp-gpipe", "pp-1f1b"):
        return PPTrainer(spec, None, strategy[3:])
    if strategy == "tp-dtensor":
        return DTensorTPTrainer(spec)
    if strategy == "pp-torch":
        return TorchPipelineTrainer(spec)
    world = dist.get_world_size()
    if strategy == "dp-tp":
        g = parallel.init_groups(dp=world // 2, tp=2)
        return TPTrainer(spec, g.tp_group, g.dp_group)
    if strategy == "dp-pp":
        g = parallel.init_groups(dp=world // 2, pp=2)
        return PPTrainer(spec, g.pp_group, "1f1b", g.dp_group)
    raise ValueError(f"unknown strategy {strategy!r}")


def layout(strategy: str, world: int) -> str:
    if strategy in ("dp-tp", "dp-pp"):
        return f"dp={world // 2} {strategy[3:]}=2"
    if strategy in ("tp", "tp-dtensor"):
        return f"tp={world}"
    if strategy.startswith("pp-"):
        return f"pp={world}"
    return f"dp={world}"


__all__ = ["STRATEGIES", "applicable", "make_trainer", "layout", "Trainer"]
