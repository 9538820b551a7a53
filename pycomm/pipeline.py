"""Pipeline parallelism: a stage wrapper and GPipe / 1F1B schedules over send/recv.

A pipeline group of ``p`` ranks holds ``p`` consecutive pieces of a model; rank ``s``
of the group runs stage ``s``. A training step splits the batch into ``m``
micro-batches; activations flow forward from stage ``s`` to ``s+1`` and their gradients
flow back, all with ``torch.distributed`` point-to-point calls (``isend`` / ``irecv``)
on the group, so any backend with send/recv works.

::

    stage = PipelineStage(my_piece, group=pp_group)
    schedule = Schedule1F1B(stage, num_microbatches=8, loss_fn=F.cross_entropy)
    optimizer.zero_grad()
    loss = schedule.step(x, target=y)   # x read on the first stage, y on the last
    optimizer.step()                    # loss: the batch loss on the last stage, else None

Semantics: each micro-batch loss is divided by ``m`` (``scale_loss=True``) and the
gradients accumulate in ``.grad`` over the micro-batches, so for a mean-reduced loss
and equal micro-batches one step equals one full-batch step of the unsplit model.

Shapes are exchanged automatically: before the first micro-batch of every step a
stage sends its successor a small int64 header describing the tensors it will send
(count, dtype, shape). Gradients have the shapes of the activations they belong to, so
they need no header. A stage may pass a tensor or a tuple of tensors; floating-point
tensors carry gradients back, others (e.g. integer masks) do not.

Schedules (``F(i)``/``B(i)``: forward/backward of micro-batch ``i`` on one stage):

* :class:`ScheduleGPipe`: all forwards, then all backwards. Activations of all ``m``
  micro-batches are live at once.
* :class:`Schedule1F1B`: stage ``s`` runs ``p-s-1`` warm-up forwards, then alternates
  one forward and one backward, then drains the backwards. At most ``p-s``
  micro-batches are live. Both have the bubble ``(p-1)/(m+p-1)`` of the step.

Sends are posted with ``isend`` and completed at the end of the step; receives block.
Since both schedules' dependency graphs are acyclic, this cannot deadlock regardless of
whether the backend's sends wait for the matching receive.

Balancing the stages: :func:`profile_layers` measures each layer's forward + backward
time (and a memory estimate); :func:`partition` splits the layers into contiguous
stages minimising the slowest stage (optionally under a per-stage memory limit and
with per-stage speed factors); :func:`equal_partition` is the equal-layer split;
:func:`split_layers` builds the stage modules::

    costs, mem = profile_layers(layers, sample_microbatch, return_memory=True)
    bounds = partition(costs, num_stages=4, memory=mem, memory_limit=8 << 30)
    stage = PipelineStage(split_layers(layers, bounds)[rank], group=pp_group)
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PipelineStage", "ScheduleGPipe", "Schedule1F1B", "split_microbatches", "partition", "equal_partition",
           "stage_costs", "profile_layers", "split_layers"]

Tensors = Tuple[torch.Tensor, ...]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_HEADER_LEN = 64


def _as_tuple(x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Tensors:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _encode_header(tensors: Tensors) -> torch.Tensor:
    """``[n, (dtype, ndim, *shape) * n]`` padded to a fixed length."""
    fields = [len(tensors)]
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise TypeError(f"pipeline: cannot send dtype {t.dtype} between stages")
        fields += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(fields) > _HEADER_LEN:
        raise ValueError(f"pipeline: activation description needs {len(fields)} fields, "
                         f"the header holds {_HEADER_LEN}")
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[: len(fields)] = torch.tensor(fields, dtype=torch.int64)
    return header


def _decode_header(header: torch.Tensor) -> List[Tuple[torch.dtype, Tuple[int, ...]]]:
    h = header.tolist()
    out, i = [], 1
    for _ in range(h[0]):
        dtype, ndim = _DTYPES[h[i]], h[i + 1]
        out.append((dtype, tuple(h[i + 2: i + 2 + ndim])))
        i += 2 + ndim
    return out


def split_microbatches(x, num_microbatches: int) -> List[Tensors]:
    """Splits a tensor or tuple of tensors into ``num_microbatches`` along dim 0."""
    if x is None:
        return [None] * num_microbatches
    parts = [t.chunk(num_microbatches, 0) for t in _as_tuple(x)]
    for p, t in zip(parts, _as_tuple(x)):
        if len(p) != num_microbatches or t.shape[0] % num_microbatches:
            raise ValueError(f"pipeline: batch of {t.shape[0]} does not split into "
                             f"{num_microbatches} equal micro-batches")
    return [tuple(p[i] for p in parts) for i in range(num_microbatches)]


class PipelineStage:
    """One stage of a pipeline: a module plus its place in the pipeline group.

    Args:
        module: this stage's piece of the model. Its ``forward`` takes the previous
            stage's output (a tensor or the tuple's elements as arguments) and returns
            a tensor or tuple of tensors; the first stage takes the micro-batch input.
        group: the pipeline group (default: world). Stage ``s`` is the rank with
            group rank ``s``; its neighbours are group ranks ``s-1`` and ``s+1``.

    Attributes ``forward_seconds`` / ``backward_seconds`` / ``comm_wait_seconds``
    accumulate the time this rank spent computing and blocked in receives (reset with
    :meth:`reset_stats`), which is what the bubble benchmark measures.
    """

    def __init__(self, module: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
        self.module = module
        self.group = group
        self.stage_index = dist.get_rank(group)
        self.num_stages = dist.get_world_size(group)
        self.is_first = self.stage_index == 0
        self.is_last = self.stage_index == self.num_stages - 1
        glob = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.prev_rank = None if self.is_first else glob(self.stage_index - 1)
        self.next_rank = None if self.is_last else glob(self.stage_index + 1)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.forward_seconds = 0.0
        self.backward_seconds = 0.0
        self.comm_wait_seconds = 0.0

    def parameters(self):
        return self.module.parameters()

    # -- point to point -------------------------------------------------------------

    def _recv(self, tensors: List[torch.Tensor], src: int) -> None:
        t0 = time.perf_counter()
        works = [dist.irecv(t, src=src, group=self.group) for t in tensors]
        for w in works:
            w.wait()
        self.comm_wait_seconds += time.perf_counter() - t0

    def _send(self, tensors: Sequence[torch.Tensor], dst: int, pending: list) -> None:
        for t in tensors:
            t = t.detach().contiguous()
            # Completed at the end of the step; keep the buffer alive until then.
            pending.append((dist.isend(t, dst=dst, group=self.group), t))


class _Schedule:
    """Shared machinery: the per-micro-batch forward/backward and the action loop."""

    def __init__(self, stage: PipelineStage, num_microbatches: int,
                 loss_fn: Optional[Callable] = None, scale_loss: bool = True) -> None:
        if num_microbatches < 1:
            raise ValueError("num_microbatches must be >= 1")
        if stage.is_last and loss_fn is None:
            raise ValueError("the last stage needs a loss_fn")
        self.stage = stage
        self.num_microbatches = num_microbatches
        self.loss_fn = loss_fn
        self.scale_loss = scale_loss
        self.max_live = 0  # most micro-batches whose activations were held at once (last step)

    def actions(self) -> List[Tuple[str, int]]:
        """This stage's ordered list of ``("F", i)`` / ``("B", i)``."""
        raise NotImplementedError

    def step(self, inputs=None, target=None) -> Optional[torch.Tensor]:
        """Runs forward and backward of every micro-batch; gradients accumulate.

        Args:
            inputs: the batch (tensor or tuple), read on the first stage only.
            target: the loss target for the batch, read on the last stage only.

        Returns the (detached) batch loss on the last stage, ``None`` elsewhere.
        """
        st, m = self.stage, self.num_microbatches
        if st.is_first and inputs is None:
            raise ValueError("the first stage needs inputs")
        if st.is_last and target is None:
            raise ValueError("the last stage needs a target")
        in_mbs = split_microbatches(inputs, m) if st.is_first else None
        tgt_mbs = split_microbatches(target, m) if st.is_last else None
        self._in_meta = None     # (dtype, shape) of what the previous stage sends
        self._header_sent = False
        pending: list = []       # outstanding sends
        saved: dict = {}         # micro-batch -> (inputs, outputs or loss)
        total_loss = None
        self.max_live = 0

        for kind, i in self.actions():
            if kind == "F":
                x = in_mbs[i] if st.is_first else self._recv_activation()
                t0 = time.perf_counter()
                out = _as_tuple(st.module(*x))
                if st.is_last:
                    y = out[0] if len(out) == 1 else out
                    t = tgt_mbs[i][0] if len(tgt_mbs[i]) == 1 else tgt_mbs[i]
                    loss = self.loss_fn(y, t)
                    if self.scale_loss:
                        loss = loss / m
                    total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
                    out = (loss,)
                st.forward_seconds += time.perf_counter() - t0
                if not st.is_last:
                    if not self._header_sent:
                        st._send([_encode_header(out)], st.next_rank, pending)
                        self._header_sent = True
                    st._send(out, st.next_rank, pending)
                saved[i] = (x, out)
                self.max_live = max(self.max_live, len(saved))
            else:
                x, out = saved.pop(i)
                if st.is_last:
                    grads = [None]
                else:
                    grads = [torch.empty_like(o) for o in out if o.is_floating_point()]
                    st._recv(grads, st.next_rank)
                t0 = time.perf_counter()
                self._backward(out, grads)
                st.backward_seconds += time.perf_counter() - t0
                if not st.is_first:
                    in_grads = [t.grad if t.grad is not None else torch.zeros_like(t)
                                for t in x if t.is_floating_point()]
                    st._send(in_grads, st.prev_rank, pending)

        # Every send must complete before its buffer is freed or the next step starts.
        for work, _ in pending:
            work.wait()
        return total_loss

    def _recv_activation(self) -> Tensors:
        st = self.stage
        if self._in_meta is None:
            header = torch.empty(_HEADER_LEN, dtype=torch.int64)
            st._recv([header], st.prev_rank)
            self._in_meta = _decode_header(header)
        xs = [torch.empty(shape, dtype=dtype) for dtype, shape in self._in_meta]
        st._recv(xs, st.prev_rank)
        return tuple(t.requires_grad_() if t.is_floating_point() else t for t in xs)

    @staticmethod
    def _backward(out: Tensors, grads: list) -> None:
        if grads == [None]:  # the loss
            out[0].backward()
            return
        floats = [o for o in out if o.is_floating_point()]
        pairs = [(o, g) for o, g in zip(floats, grads) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


class ScheduleGPipe(_Schedule):
    """GPipe: forward every micro-batch, then backward every micro-batch.

    Args:
        stage: this rank's :class:`PipelineStage`.
        num_microbatches: ``m``; the batch's dim 0 must divide by it.
        loss_fn: ``loss_fn(output, target)`` on the last stage (mean-reduced).
        scale_loss: divide each micro-batch loss by ``m`` (full-batch equivalence).
    """

    def actions(self):
        m = self.num_microbatches
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


class Schedule1F1B(_Schedule):
    """1F1B (PipeDream-flush): warm-up forwards, one-forward-one-backward, drain.

    Same arguments as :class:`ScheduleGPipe`. Stage ``s`` of ``p`` keeps at most
    ``min(p - s, m)`` micro-batches of activations alive, instead of ``m``.
    """

    def actions(self):
        m, p, s = self.num_microbatches, self.stage.num_stages, self.stage.stage_index
        warmup = min(p - s - 1, m)
        acts = [("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            acts += [("F", warmup + i), ("B", i)]
        acts += [("B", i) for i in range(m - warmup, m)]
        return acts


# ----------------------------------------------------------------------------- balancing


def equal_partition(num_layers: int, num_stages: int) -> List[Tuple[int, int]]:
    """The equal-layer split: ``num_stages`` contiguous ``(start, stop)`` ranges whose
    sizes differ by at most one (the first stages take the extra layers)."""
    if num_stages < 1 or num_layers < num_stages:
        raise ValueError(f"pipeline: cannot split {num_layers} layers into {num_stages} non-empty stages")
    q, r = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        stop = start + q + (1 if s < r else 0)
        out.append((start, stop))
        start = stop
    return out


def stage_costs(costs: Sequence[float], bounds: Sequence[Tuple[int, int]],
                speed: Optional[Sequence[float]] = None) -> List[float]:
    """Time of each stage: the sum of its layers' costs divided by its speed factor."""
    sp = list(speed) if speed is not None else [1.0] * len(bounds)
    return [sum(costs[a:b]) / sp[i] for i, (a, b) in enumerate(bounds)]


def partition(costs: Sequence[float], num_stages: int, memory: Optional[Sequence[float]] = None,
              memory_limit: Union[None, float, Sequence[float]] = None,
              speed: Optional[Sequence[float]] = None) -> List[Tuple[int, int]]:
    """Splits layers ``0..L-1`` into ``num_stages`` contiguous non-empty stages so that
    the slowest stage is as fast as possible (exact).

    Args:
        costs: per-layer time (e.g. forward + backward seconds from :func:`profile_layers`).
        num_stages: number of stages ``S`` (``1 <= S <= L``).
        memory: per-layer memory (any unit), needed with ``memory_limit``.
        memory_limit: the most memory a stage may hold: one number, or one per stage.
        speed: per-stage speed factors (stage ``s`` takes ``sum(costs) / speed[s]``),
            e.g. relative device throughput; default all 1.

    Returns ``[(start, stop), ...]``, stage ``s`` holding layers ``start..stop-1``.
    Minimises ``max_s sum(costs[start_s:stop_s]) / speed[s]`` by dynamic programming
    over split points (O(S L^2)); ties are broken deterministically. Raises ValueError
    when no split satisfies the memory limit.
    """
    L, S = len(costs), int(num_stages)
    if S < 1 or L < S:
        raise ValueError(f"pipeline.partition: cannot split {L} layers into {S} non-empty stages")
    if any(c < 0 for c in costs):
        raise ValueError("pipeline.partition: costs must be >= 0")
    sp = [1.0] * S if speed is None else [float(v) for v in speed]
    if len(sp) != S or any(not v > 0 for v in sp):
        raise ValueError("pipeline.partition: speed needs one positive factor per stage")
    if memory_limit is not None:
        if memory is None or len(memory) != L:
            raise ValueError("pipeline.partition: memory_limit needs memory, one value per layer")
        if any(m < 0 for m in memory):
            raise ValueError("pipeline.partition: memory must be >= 0")
        lim = [float(memory_limit)] * S if isinstance(memory_limit, (int, float)) else \
            [float(v) for v in memory_limit]
        if len(lim) != S:
            raise ValueError("pipeline.partition: memory_limit needs one value per stage")
    else:
        lim = None
    pc = [0.0]
    for c in costs:
        pc.append(pc[-1] + float(c))
    pm = [0.0]
    for m in (memory if memory is not None else [0.0] * L):
        pm.append(pm[-1] + float(m))
    inf = float("inf")
    # best[s][j]: the slowest stage when stages 0..s hold layers 0..j-1; arg[s][j]: where stage s starts.
    best = [[inf] * (L + 1) for _ in range(S)]
    arg = [[-1] * (L + 1) for _ in range(S)]
    for j in range(1, L - S + 2):
        if lim is None or pm[j] <= lim[0]:
            best[0][j] = pc[j] / sp[0]
            arg[0][j] = 0
    for s in range(1, S):
        for j in range(s + 1, L - (S - 1 - s) + 1):
            b, a = inf, -1
            for i in range(j - 1, s - 1, -1):  # stage s holds i..j-1
                if lim is not None and pm[j] - pm[i] > lim[s]:
                    break  # earlier starts only add memory
                prev = best[s - 1][i]
                if prev == inf:
                    continue
                v = max(prev, (pc[j] - pc[i]) / sp[s])
                if v < b:
                    b, a = v, i
            best[s][j], arg[s][j] = b, a
    if best[S - 1][L] == inf:
        raise ValueError(f"pipeline.partition: no split of {L} layers into {S} stages fits memory_limit")
    bounds, j = [], L
    for s in range(S - 1, -1, -1):
        i = arg[s][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def split_layers(layers: Sequence[nn.Module], bounds: Sequence[Tuple[int, int]]) -> List[nn.Sequential]:
    """One ``nn.Sequential`` per stage from ``(start, stop)`` bounds (shares the modules)."""
    return [nn.Sequential(*list(layers)[a:b]) for a, b in bounds]


def profile_layers(layers: Sequence[nn.Module], sample_input, warmup: int = 1, repeats: int = 3,
                   return_memory: bool = False):
    """Measures each layer's forward + backward time on ``sample_input`` (one
    micro-batch: a tensor or tuple, fed to the first layer; each layer gets the previous
    layer's output). Backward uses all-ones output gradients and accumulates into the
    layers' ``.grad`` (zero them afterwards). Returns per-layer seconds (median of
    ``repeats`` after ``warmup``); with ``return_memory=True`` also per-layer bytes:
    parameters + their gradients + the layer's output activation for one micro-batch
    (an estimate for :func:`partition`'s ``memory``). CUDA work is synchronised around
    each timing."""
    layers = list(layers)
    x = _as_tuple(sample_input)
    times: List[List[float]] = [[] for _ in layers]
    mem: List[int] = [0] * len(layers)
    cuda = any(t.is_cuda for t in x)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for rep in range(warmup + repeats):
        cur = x
        for li, layer in enumerate(layers):
            inp = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in cur)
            sync()
            t0 = time.perf_counter()
            out = _as_tuple(layer(*inp))
            outs = [o for o in out if o.is_floating_point() and o.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            sync()
            if rep >= warmup:
                times[li].append(time.perf_counter() - t0)
            if rep == 0:
                pbytes = sum(p.numel() * p.element_size() for p in layer.parameters())
                mem[li] = 2 * pbytes + sum(o.numel() * o.element_size() for o in out)
            cur = tuple(o.detach() for o in out)
    med = [sorted(ts)[len(ts) // 2] for ts in times]
    return (med, mem) if return_memory else med
