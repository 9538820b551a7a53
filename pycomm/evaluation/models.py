"""The models and data an evaluation trains: everything installs with packages, nothing
is downloaded at run time.

Every model is an ``nn.Sequential`` of four *blocks*, so a pipeline of 2 or 4 stages
takes contiguous blocks, and most have a Megatron-style tensor-parallel twin whose
shards are slices of the same seeded initialisation (tensor parallelism computes the
same function as the unsplit model). Each :class:`ModelSpec` carries the training
recipe chosen once for the one-rank run and reused unchanged by every strategy.

- ``mlp``: 64-128-128-128-10 MLP on scikit-learn's digits (accuracy).
- ``cnn``: two 3x3 convolutions + pooling + two linear layers on digits (accuracy).
- ``charlm``: the character-level pre-LN transformer of ``examples/train_tp_lm.py`` on
  generated English-like text (held-out cross-entropy, nats per character).
- ``large``: 64-4096-4096-2048-10 MLP on digits, 25.5M parameters: large enough that
  an all-reduce of its gradients costs more than its step's compute on a slow link.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


# ------------------------------------------------------------------------------- data

def digits() -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits: (x_train, y_train, x_test, y_test), a fixed 360-image
    test split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[360:], y[360:], x[:360], y[:360]


def make_text(n_sentences: int = 3000, seed: int = 0) -> str:
    """English-like sentences from a small grammar (deterministic)."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the bird", "a child"]
    verbs = ["sees", "likes", "follows", "paints", "finds", "carries"]
    objects = ["the red ball", "a small house", "the river", "an apple", "the moon", "a green hat"]
    places = ["in the park", "at home", "by the sea", "under the tree", "every day"]
    out = []
    for _ in range(n_sentences):
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(places)}"
        out.append(s + ". ")
    return "".join(out)


CHARLM_SEQ = 32


def char_windows(n_train: int = 2048, n_test: int = 256) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Fixed windows of the generated text: (x_train, y_train, x_test, y_test, vocab),
    ``y`` the next character of each position; the test windows come from text the
    training windows never see."""
    text = make_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    g = torch.Generator().manual_seed(0)

    def windows(lo: int, hi: int, n: int) -> Tuple[Tensor, Tensor]:
        starts = torch.randint(lo, hi - CHARLM_SEQ - 1, (n,), generator=g)
        idx = starts[:, None] + torch.arange(CHARLM_SEQ + 1)[None, :]
        w = ids[idx]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    xtr, ytr = windows(0, cut, n_train)
    xte, yte = windows(cut, len(ids), n_test)
    return xtr, ytr, xte, yte, len(chars)


# ------------------------------------------------------------------------------- models

def _mlp(widths: List[int]) -> nn.Sequential:
    blocks: List[nn.Module] = []
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        blocks.append(nn.Sequential(lin, nn.ReLU()) if i < len(widths) - 2 else lin)
    return nn.Sequential(*blocks)


class _TPMLP(nn.Module):
    """Column/row-parallel pairs over ``group``: Col-ReLU-Row-ReLU-Col-ReLU-Row. Built in
    the same order as :func:`_mlp`, so the shards slice the same initial weights."""

    def __init__(self, widths: List[int], group) -> None:
        super().__init__()
        from pycomm import tensor_parallel as tp

        if len(widths) != 5:
            raise ValueError("the tensor-parallel MLP has four linear layers")
        self.l1 = tp.ColumnParallelLinear(widths[0], widths[1], group=group)
        self.l2 = tp.RowParallelLinear(widths[1], widths[2], group=group)
        self.l3 = tp.ColumnParallelLinear(widths[2], widths[3], group=group)
        self.l4 = tp.RowParallelLinear(widths[3], widths[4], group=group)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.l2(F.relu(self.l1(x))))
        return self.l4(F.relu(self.l3(x)))


class _Flat(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _Flat()),
        nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU()),
        nn.Linear(64, 10),
    )


class _Embed(nn.Module):
    def __init__(self, vocab: int, d: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.tok(ids) + self.pos[: ids.shape[1]]


class _Block(nn.Module):
    """Pre-LN transformer block with causal self-attention (dense)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class _Head(nn.Module):
    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ln(x))


class _TPBlock(nn.Module):
    def __init__(self, d: int, heads: int, group) -> None:
        super().__init__()
        from pycomm import tensor_parallel as tp

        self.ln1 = nn.LayerNorm(d)
        self.attn = tp.ParallelSelfAttention(d, heads, group=group, causal=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = tp.ParallelMLP(d, 4 * d, group=group)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _TPCharLM(nn.Module):
    """The tensor-parallel LM of examples/train_tp_lm.py: vocab-parallel embedding and
    output layer, attention heads and MLP split over ``group``; returns this rank's
    logit shard (the loss is :func:`pycomm.tensor_parallel.vocab_parallel_cross_entropy`)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int, group) -> None:
        super().__init__()
        from pycomm import tensor_parallel as tp

        self.tok = tp.VocabParallelEmbedding(vocab, d, group=group)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList([_TPBlock(d, heads, group) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = tp.ColumnParallelLinear(d, vocab, bias=False, group=group)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


# ------------------------------------------------------------------------------- specs

@dataclass
class Recipe:
    """The training recipe, chosen once for the one-rank run and reused by every
    strategy: optimizer, global batch (split over data-parallel replicas), epochs."""

    optimizer: str
    lr: float
    momentum: float
    global_batch: int
    epochs: int
    quick_epochs: int
    microbatches: int = 4  # pipeline micro-batches per step

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        raise ValueError(f"unknown optimizer {self.optimizer!r}")


@dataclass
class ModelSpec:
    """One model of the evaluation: its data, builders and recipe.

    ``build()`` returns the whole model as a 4-block ``nn.Sequential`` (same weights for
    the same torch seed); ``build_tp(group)`` the tensor-parallel twin or None when
    tensor parallelism does not apply (the reason is ``tp_reason``).
    """

    name: str
    description: str
    metric: str                      # "accuracy" (higher is better) or "loss" (lower)
    target: float
    recipe: Recipe
    data: Callable[[], Tuple[Tensor, Tensor, Tensor, Tensor]]
    build: Callable[[], nn.Sequential]
    build_tp: Optional[Callable[[object], nn.Module]] = None
    tp_reason: str = ""
    token_level: bool = False        # outputs (batch, seq, vocab): loss over every position
    tp_divides: List[int] = field(default_factory=list)  # widths the TP size must divide

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.token_level:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    def tp_loss(self, shard: Tensor, y: Tensor, group) -> Tensor:
        """Loss of the tensor-parallel model's output (a logit shard for the LM)."""
        if self.token_level:
            from pycomm import tensor_parallel as tp

            return tp.vocab_parallel_cross_entropy(shard, y, group).mean()
        return F.cross_entropy(shard, y)

    def score(self, out: Tensor, y: Tensor) -> float:
        """The model's metric on full outputs: accuracy, or mean cross-entropy."""
        if self.metric == "accuracy":
            return (out.argmax(-1) == y).float().mean().item()
        return self.loss(out, y).item()

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


def _charlm_data():
    xtr, ytr, xte, yte, _ = char_windows()
    return xtr, ytr, xte, yte


_VOCAB = 32  # the characters of make_text(), padded to a multiple of 4 tensor-parallel ranks


def charlm_vocab() -> int:
    return char_windows(8, 8)[4]


def _charlm(d: int = 64, heads: int = 4) -> nn.Sequential:
    return nn.Sequential(_Embed(_VOCAB, d, CHARLM_SEQ), _Block(d, heads), _Block(d, heads), _Head(d, _VOCAB))


MLP_WIDTHS = [64, 128, 128, 128, 10]
LARGE_WIDTHS = [64, 4096, 4096, 2048, 10]

MODELS: Dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "mlp", "64-128-128-128-10 MLP, scikit-learn digits (1437 train / 360 test images)", "accuracy", 0.95,
        Recipe("sgd", 0.1, 0.9, 64, epochs=20, quick_epochs=10), digits, lambda: _mlp(MLP_WIDTHS),
        build_tp=lambda g: _TPMLP(MLP_WIDTHS, g), tp_divides=MLP_WIDTHS[1:4]),
    "cnn": ModelSpec(
        "cnn", "2 conv (16, 32 channels) + pool + 2 linear, scikit-learn digits", "accuracy", 0.97,
        Recipe("sgd", 0.05, 0.9, 64, epochs=15, quick_epochs=8), digits, _cnn,
        tp_reason="pycomm.tensor_parallel has no convolution layers (Megatron-style TP splits linear layers)"),
    "charlm": ModelSpec(
        "charlm", "character-level pre-LN transformer (2 blocks, d=64, 4 heads, seq 32), generated text",
        "loss", 0.40, Recipe("adamw", 3e-3, 0.0, 64, epochs=8, quick_epochs=5), _charlm_data, _charlm,
        build_tp=lambda g: _TPCharLM(_VOCAB, 64, 4, 2, CHARLM_SEQ, g), token_level=True,
        tp_divides=[4, 64, _VOCAB]),
    "large": ModelSpec(
        "large", "64-4096-4096-2048-10 MLP (25.5M parameters), scikit-learn digits", "accuracy", 0.85,
        Recipe("sgd", 0.02, 0.9, 64, epochs=2, quick_epochs=1), digits, lambda: _mlp(LARGE_WIDTHS),
        build_tp=lambda g: _TPMLP(LARGE_WIDTHS, g), tp_divides=LARGE_WIDTHS[1:4]),
}


def param_count(spec: ModelSpec) -> int:
    torch.manual_seed(0)
    return sum(p.numel() for p in spec.build().parameters())


def pieces(model: nn.Sequential, stages: int) -> List[nn.Module]:
    """The model's 4 blocks cut into ``stages`` contiguous pieces of equal block count."""
    n = len(model)
    if n % stages:
        raise ValueError(f"{n} blocks do not split into {stages} pipeline stages")
    k = n // stages
    return [nn.Sequential(*list(model)[s * k:(s + 1) * k]) for s in range(stages)]


def tp_applies(spec: ModelSpec, tp: int) -> Optional[str]:
    """None when the model can run tensor-parallel over ``tp`` ranks, else why not."""
    if spec.build_tp is None:
        return spec.tp_reason
    bad = [w for w in spec.tp_divides if w % tp]
    if bad:
        return f"tensor parallelism over {tp} ranks needs {bad} divisible by {tp}"
    return None


__all__ = ["MODELS", "ModelSpec", "Recipe", "digits", "char_windows", "make_text", "pieces", "tp_applies",
           "param_count", "charlm_vocab"]
