"""Train a small character-level transformer LM with tensor × data parallelism on CPU.

    python examples/train_tp_lm.py --tp 2 --dp 2            # spawns 4 local ranks
    torchrun --standalone --nproc-per-node 4 examples/train_tp_lm.py --tp 2 --dp 2

The text is generated (a tiny grammar of English-like sentences), so nothing needs
downloading. The model: vocab-parallel embedding, pre-LN transformer blocks whose
attention heads and MLP are split over the tensor-parallel group, a vocab-parallel
output layer and the vocab-parallel cross-entropy (the logits are never gathered for
the loss). Each data-parallel replica reads different batches and gradients are
averaged over the data group. Rank 0 prints the loss as it goes down and a greedy
sample at the end.

``--backend`` picks the torch.distributed backend (``gloo`` by default; ``pycomm``
when the extension is built and registers it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pycomm import parallel  # noqa: E402
from pycomm import tensor_parallel as tp  # noqa: E402


# ------------------------------------------------------------------------------- data

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


# ------------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, d: int, heads: int, group) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = tp.ParallelSelfAttention(d, heads, group=group, causal=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = tp.ParallelMLP(d, 4 * d, group=group)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TPLanguageModel(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int, group) -> None:
        super().__init__()
        self.group = group
        self.tok = tp.VocabParallelEmbedding(vocab, d, group=group)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)  # replicated
        self.blocks = nn.ModuleList([Block(d, heads, group) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = tp.ColumnParallelLinear(d, vocab, bias=False, group=group)

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))  # (batch, seq, vocab / tp): this rank's logits

    @torch.no_grad()
    def generate(self, ids, n: int):
        for _ in range(n):
            shard = self(ids[:, -self.pos.shape[0]:])[:, -1]
            full = tp.gather_from_region(shard, self.group)
            ids = torch.cat([ids, full.argmax(-1, keepdim=True)], 1)
        return ids


# ------------------------------------------------------------------------------- training

def train(args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = parallel.init_groups(dp=args.dp, tp=args.tp)
    text = make_text()
    chars = sorted(set(text))
    vocab = -(-len(chars) // args.tp) * args.tp  # pad to a multiple of tp
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)

    torch.manual_seed(0)  # same seed everywhere: tensor-parallel ranks slice one model
    model = TPLanguageModel(vocab, args.d_model, args.heads, args.layers, args.seq, g.tp_group)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Different batches per data-parallel replica, the same within a tensor group.
    gen = torch.Generator().manual_seed(1000 + g.dp_rank)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"world {world} = dp {g.dp} x tp {g.tp}, backend {dist.get_backend()}; "
              f"vocab {len(chars)} (padded {vocab}), {n} parameters per rank, "
              f"global batch {args.batch * g.dp}", flush=True)

    t0 = time.time()
    first = None
    for step in range(args.steps + 1):
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s: s + args.seq] for s in starts.tolist()])
        y = torch.stack([data[s + 1: s + 1 + args.seq] for s in starts.tolist()])
        opt.zero_grad()
        loss = tp.vocab_parallel_cross_entropy(model(x), y, g.tp_group).mean()
        loss.backward()
        parallel.average_gradients(model.parameters(), g.dp_group)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=g.dp_group)
        mean = mean.item() / g.dp
        first = mean if first is None else first
        if rank == 0 and step % args.log_every == 0:
            print(f"step {step:4d}  loss {mean:.4f}  ({time.time() - t0:.1f}s)", flush=True)

    prompt = torch.tensor([[stoi[c] for c in "the cat "]])
    out = model.generate(prompt, 40)
    if rank == 0:
        sample = "".join(chars[i] if i < len(chars) else "?" for i in out[0].tolist())
        print(f"loss {first:.3f} -> {mean:.3f}\nsample: {sample!r}", flush=True)


def _spawned(rank: int, world: int, port: int, args) -> None:
    torch.set_num_threads(1)
    if args.backend == "pycomm":
        import pycomm  # noqa: F401  (registers the backend)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(args.backend, store=store, rank=rank, world_size=world)
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16, help="per data-parallel replica")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args()

    if "RANK" in os.environ:  # under torchrun
        torch.set_num_threads(1)
        if args.backend == "pycomm":
            import pycomm  # noqa: F401
        dist.init_process_group(args.backend)
        try:
            train(args)
        finally:
            dist.destroy_process_group()
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = args.tp * args.dp
    torch.multiprocessing.spawn(_spawned, args=(world, port, args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
