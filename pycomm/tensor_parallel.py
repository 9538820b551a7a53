"""Megatron-style tensor parallelism over a torch.distributed process group.

A tensor-parallel (TP) group of ``t`` ranks holds one model whose large matrices are
split ``t`` ways. Every rank sees the same input and produces the same output; inside a
block the activations are split, and a handful of collectives stitch them back together.

Region mappings (autograd functions; ``fwd`` / ``bwd``):

==========================  ==============================  ==============================
function                    forward                         backward
==========================  ==============================  ==============================
copy_to_region              identity                        all-reduce (sum)
reduce_from_region          all-reduce (sum)                identity
scatter_to_region           split last dim, keep own chunk  all-gather last dim
gather_from_region          all-gather last dim             split last dim
scatter_to_sequence_region  split dim 0, keep own chunk     all-gather dim 0
gather_from_sequence_region all-gather dim 0                reduce-scatter dim 0 (sum)
reduce_scatter_to_sequence  reduce-scatter dim 0 (sum)      all-gather dim 0
==========================  ==============================  ==============================

Layers:

* :class:`ColumnParallelLinear` splits the *output* features: rank ``r`` owns rows
  ``[r*o/t, (r+1)*o/t)`` of the dense ``(out, in)`` weight.
* :class:`RowParallelLinear` splits the *input* features: rank ``r`` owns columns
  ``[r*i/t, (r+1)*i/t)``; the partial products are summed with one all-reduce.
* :class:`VocabParallelEmbedding` splits the vocabulary; ids owned by another rank
  give zero rows locally and the all-reduce fills them in.
* :func:`vocab_parallel_cross_entropy` computes the loss from vocabulary-split logits
  without ever gathering them (three small all-reduces).

Column followed by row (``gather_output=False``, ``input_is_parallel=True``) is the MLP
of Megatron-LM: one all-reduce in forward, one in backward.

Initialisation: each layer builds the *dense* ``nn.Linear`` / ``nn.Embedding`` with the
global RNG, exactly as the dense model would, and keeps its slice. So if every rank
seeds the RNG identically and builds layers in the same order as the dense model, the
tensor-parallel model holds exactly the dense model's weights (test-friendly; it costs
one dense weight's worth of memory, transiently, at construction).

Only ``torch.distributed`` calls on the given group are used, so any backend works
(``gloo``, ``pycomm``, ...). ``group=None`` means the default (world) group.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
    "scatter_to_sequence_region",
    "gather_from_sequence_region",
    "reduce_scatter_to_sequence_region",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "ParallelMLP",
    "ParallelSelfAttention",
    "comm_stats",
]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def _world(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group)


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(group)


def _divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {d}")
    return n // d


class _CommStats:
    """Wall time spent inside tensor-parallel collectives (for benchmarks).

    Disabled by default; ``comm_stats.enabled = True`` turns timing on. Timing waits for
    each collective, so it includes the time the collective blocks the caller.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0


comm_stats = _CommStats()


def _timed(fn):
    import time

    def wrapper(*args, **kwargs):
        if not comm_stats.enabled:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        comm_stats.seconds += time.perf_counter() - t0
        comm_stats.calls += 1
        return out

    return wrapper


@_timed
def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, op=op, group=group)
    return x


@_timed
def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenates every rank's ``x`` along ``dim`` (rank order)."""
    world = _world(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


@_timed
def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sums ``x`` over ranks and keeps this rank's chunk along ``dim``."""
    world = _world(group)
    if world == 1:
        return x
    _divide(x.shape[dim], world, f"size of dim {dim}")
    parts = [c.contiguous() for c in torch.chunk(x, world, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=group)
    return out


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (no communication)."""
    world = _world(group)
    if world == 1:
        return x
    _divide(x.shape[dim], world, f"size of dim {dim}")
    return torch.chunk(x, world, dim=dim)[_rank(group)].contiguous()


# ---------------------------------------------------------------------------------------
# Region mappings
# ---------------------------------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, -1), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, -1), None


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, 0), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group, 0), None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, 0), None


def copy_to_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Identity in forward; all-reduces (sums) the gradient over ``group`` in backward.

    Put it where a replicated activation enters a tensor-parallel region: each rank's
    branch contributes a partial gradient to it.
    """
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """All-reduces (sums) ``x`` over ``group`` in forward; identity in backward."""
    return _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Keeps this rank's chunk of the last dim; all-gathers the gradient in backward."""
    return _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """All-gathers along the last dim; keeps this rank's chunk of the gradient in backward."""
    return _GatherFromRegion.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Keeps this rank's chunk of dim 0 (the sequence); all-gathers the gradient."""
    return _ScatterToSequenceRegion.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """All-gathers along dim 0 in forward; reduce-scatters (sums) the gradient along dim 0."""
    return _GatherFromSequenceRegion.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor,
                                      group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Reduce-scatters (sums) along dim 0 in forward; all-gathers the gradient along dim 0."""
    return _ReduceScatterToSequenceRegion.apply(x, group)


# ---------------------------------------------------------------------------------------
# Linear with overlapped input-gradient all-reduce
# ---------------------------------------------------------------------------------------

class _ParallelLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` whose backward overlaps the input-gradient all-reduce.

    With ``allreduce_dgrad`` the input ``x`` is replicated over the group (the column
    layer), so its gradient is a sum of every rank's partial gradient. Backward starts
    that all-reduce with ``async_op=True``, computes the weight and bias gradients while
    it runs, and only then waits. This fuses ``copy_to_region`` into the linear.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, allreduce_dgrad):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.group = group
        ctx.allreduce_dgrad = allreduce_dgrad
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        handle = None
        if ctx.needs_input_grad[0]:
            grad_x = g.matmul(weight)
            if ctx.allreduce_dgrad and _world(ctx.group) > 1:
                grad_x = grad_x.contiguous()
                # Async: the weight gradient below does not depend on grad_x, so the
                # all-reduce runs (on the backend's thread) while we compute it.
                handle = _start_all_reduce(grad_x, ctx.group)
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        if handle is not None:
            _wait(handle)  # grad_x is returned to autograd: it must be complete
        return grad_x, grad_w, grad_b, None, None


@_timed
def _start_all_reduce(x, group):
    return dist.all_reduce(x, group=group, async_op=True)


@_timed
def _wait(handle):
    handle.wait()


def _dense_linear(in_features, out_features, bias, dtype, device) -> nn.Linear:
    # Built on the global RNG exactly as the dense model builds it.
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)


class ColumnParallelLinear(nn.Module):
    """``Y = X Aᵀ + b`` with ``A`` split along its output features (rows of ``weight``).

    Each rank holds ``weight`` of shape ``(out_features / t, in_features)`` and the
    matching slice of ``bias``. The input must be replicated on all ranks of ``group``;
    its gradient is all-reduced in backward (overlapped with the weight gradient).

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        gather_output: all-gather the output shards so every rank gets the full
            ``out_features`` (otherwise each rank returns its shard, ready for a
            :class:`RowParallelLinear` with ``input_is_parallel=True``).
        group: the tensor-parallel group (default: world).
        sequence_parallel: the input is split along dim 0 (sequence) over the group;
            it is all-gathered in forward and its gradient reduce-scattered in backward.
        dtype, device: as for ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, group: Optional[dist.ProcessGroup] = None,
                 sequence_parallel: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        self.group = group
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        world, rank = _world(group), _rank(group)
        self.out_per_rank = _divide(out_features, world, "out_features")
        dense = _dense_linear(in_features, out_features, bias, dtype, device)
        lo, hi = rank * self.out_per_rank, (rank + 1) * self.out_per_rank
        self.weight = nn.Parameter(dense.weight.detach()[lo:hi].clone())
        self.bias = nn.Parameter(dense.bias.detach()[lo:hi].clone()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            # The gather's backward (reduce-scatter) already sums the partial gradients.
            x = gather_from_sequence_region(x, self.group)
            y = _ParallelLinearFn.apply(x, self.weight, self.bias, self.group, False)
        else:
            y = _ParallelLinearFn.apply(x, self.weight, self.bias, self.group, True)
        if self.gather_output:
            y = gather_from_region(y, self.group)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_per_rank} per rank), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``Y = X Aᵀ + b`` with ``A`` split along its input features (columns of ``weight``).

    Each rank holds ``weight`` of shape ``(out_features, in_features / t)`` and the whole
    ``bias`` (added once, after the partial products are summed by an all-reduce).

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        input_is_parallel: the input is already split along its last dim (e.g. the
            output of a :class:`ColumnParallelLinear`); otherwise it is replicated and
            each rank takes its chunk.
        group: the tensor-parallel group (default: world).
        sequence_parallel: reduce-scatter the output along dim 0 instead of
            all-reducing it (the output is then split along the sequence).
        dtype, device: as for ``nn.Linear``.

    The input gradient needs no communication here (the output gradient is replicated),
    so there is no all-reduce to overlap in backward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, group: Optional[dist.ProcessGroup] = None,
                 sequence_parallel: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        self.group = group
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        world, rank = _world(group), _rank(group)
        self.in_per_rank = _divide(in_features, world, "in_features")
        dense = _dense_linear(in_features, out_features, bias, dtype, device)
        lo, hi = rank * self.in_per_rank, (rank + 1) * self.in_per_rank
        self.weight = nn.Parameter(dense.weight.detach()[:, lo:hi].clone())
        self.bias = nn.Parameter(dense.bias.detach().clone()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group)
        partial = _ParallelLinearFn.apply(x, self.weight, None, self.group, False)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(partial, self.group)
        else:
            y = reduce_from_region(partial, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_per_rank} per rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


# ---------------------------------------------------------------------------------------
# Vocabulary-parallel embedding and cross-entropy
# ---------------------------------------------------------------------------------------

def vocab_range(num_embeddings: int, group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """The ``[start, end)`` slice of the vocabulary this rank owns."""
    per = _divide(num_embeddings, _world(group), "num_embeddings")
    r = _rank(group)
    return r * per, (r + 1) * per


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with the vocabulary (rows of ``weight``) split over ``group``.

    Ids outside this rank's ``[start, end)`` look up row 0 and are zeroed; the output is
    then all-reduced, so every rank returns the full embedding of every id.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 group: Optional[dist.ProcessGroup] = None, dtype=None, device=None) -> None:
        super().__init__()
        self.group = group
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, group)
        dense = nn.Embedding(num_embeddings, embedding_dim, dtype=dtype, device=device)
        self.weight = nn.Parameter(dense.weight.detach()[self.vocab_start:self.vocab_end].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"vocab=[{self.vocab_start}, {self.vocab_end})")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        # logits: (..., V/t) this rank's vocabulary slice; target: (...) global ids.
        logits = logits.detach()
        logits_max = _all_reduce(logits.max(dim=-1)[0], group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)  # stable softmax: exp(<= 0)

        v_local = logits.shape[-1]
        start = _rank(group) * v_local
        outside = (target < start) | (target >= start + v_local)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        # Exactly one rank owns each target: the sum is that rank's logit.
        target_logit = _all_reduce(target_logit, group)

        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_target, outside = ctx.saved_tensors
        # d loss / d logit_j = softmax_j - [j == target]; only the owner subtracts 1.
        grad = softmax.clone()
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside.unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor,
                                 group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token cross-entropy from vocabulary-split logits (no reduction).

    Args:
        logits_shard: ``(..., V / t)``, this rank's slice ``[r*V/t, (r+1)*V/t)`` of the
            logits (e.g. the output of a ``ColumnParallelLinear(d, V)`` with
            ``gather_output=False``).
        target: ``(...)`` int64 class ids in ``[0, V)``.
        group: the tensor-parallel group.

    Returns the loss per token, identical on every rank; ``.mean()`` it to get
    ``F.cross_entropy(full_logits, target)``. Three all-reduces of ``(...)``-shaped
    tensors replace the all-gather of the ``(..., V)`` logits.
    """
    return _VocabParallelCrossEntropy.apply(logits_shard, target, group)


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

class ParallelMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with fc1 column-parallel and fc2 row-parallel.

    Holds the same weights as ``nn.Sequential(nn.Linear(d, h), act, nn.Linear(h, d))``
    built from the same RNG state. One all-reduce in forward and one in backward.
    """

    def __init__(self, d_model: int, d_hidden: int, group: Optional[dist.ProcessGroup] = None,
                 activation=F.gelu, bias: bool = True, dtype=None, device=None) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, d_hidden, bias=bias, gather_output=False,
                                        group=group, dtype=dtype, device=device)
        self.fc2 = RowParallelLinear(d_hidden, d_model, bias=bias, input_is_parallel=True,
                                     group=group, dtype=dtype, device=device)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class ParallelSelfAttention(nn.Module):
    """Multi-head self-attention with the heads split over ``group``.

    Same weights as a dense block with separate ``q``, ``k``, ``v`` and ``out``
    ``nn.Linear(d_model, d_model)`` layers built in that order from the same RNG state.
    Rank ``r`` owns heads ``[r*H/t, (r+1)*H/t)``: its q/k/v are column-parallel slices,
    attention runs locally on its heads, and ``out`` is row-parallel.

    Input ``(batch, seq, d_model)``; ``causal`` applies a causal mask.
    """

    def __init__(self, d_model: int, num_heads: int, group: Optional[dist.ProcessGroup] = None,
                 causal: bool = True, bias: bool = True, dtype=None, device=None) -> None:
        super().__init__()
        world = _world(group)
        self.num_heads = num_heads
        self.local_heads = _divide(num_heads, world, "num_heads")
        self.head_dim = _divide(d_model, num_heads, "d_model / num_heads")
        self.causal = causal
        kw = dict(bias=bias, group=group, dtype=dtype, device=device)
        self.q = ColumnParallelLinear(d_model, d_model, gather_output=False, **kw)
        self.k = ColumnParallelLinear(d_model, d_model, gather_output=False, **kw)
        self.v = ColumnParallelLinear(d_model, d_model, gather_output=False, **kw)
        self.out = RowParallelLinear(d_model, d_model, input_is_parallel=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q.matmul(k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if self.causal:
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        ctx = scores.softmax(-1).matmul(v)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        return self.out(ctx)
