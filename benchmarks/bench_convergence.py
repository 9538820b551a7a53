#!/usr/bin/env python3
"""Convergence matrix of gradient compression (issue 15): optimizers x models x compressors
x seeds, the recipe fixed once for the uncompressed run and reused unchanged, test
accuracy (mean, spread) next to the bytes each rank put on the wire.

    python benchmarks/bench_convergence.py                         # the default (reduced) matrix
    python benchmarks/bench_convergence.py --optimizers sgdm,adam --compressors none,OneBit \\
        --seeds 0,1,2 --ranks 4 --epochs 15 --out benchmarks/results/convergence_digits

Every cell trains through ``pycomm.DataParallel(model, compression=C)`` exactly as a user
would write it (so the compressor runs with DataParallel's defaults, i.e. sign and sparse
compressors under :func:`pycomm.compression.for_training`), with a stock torch optimizer.
Extra cells:

- ``<C>-raw``: the compressor bare, ``MomentumCorrection(C, momentum=0, warmup_steps=0)``
  (what DataParallel did before issue 15: error feedback on raw gradients, no warm-up);
  ``<C>-mcN``: ``MomentumCorrection(C, warmup_steps=N)``; ``<C>-nofreeze``: the default
  wrapping without the Adam path's frozen variance (``freeze_variance=False``);
  ``<C>-kw:name=value;...``: the default wrapping (its warm-up, ``exact``,
  ``exact_compression``, ``nesterov_step``, ``variance_refresh``) with these ``MomentumCorrection`` arguments
  changed (before 2026-12-05 only the warm-up was kept; values are Python expressions, ``C`` = ``pycomm.compression``, ``|`` for a
  comma; ``exact=<expression of p>``; ``inner.name=value`` sets the compressor's
  attribute), e.g. ``TopK-kw:warmup_steps=40``, ``OneBit-kw:exact=p.dim()<=1`` (side runs);
- optimizer ``1bit-adam`` / ``1bit-sgd``: :class:`pycomm.compression.OneBitAdam` /
  ``OneBitSGD`` on an unwrapped model, the compressor column naming the momentum's
  compressor (``none`` = exact all-reduce throughout).

Recipe (fixed, from the uncompressed run): batch 32 per rank, ``--epochs`` epochs, no
schedule; SGD lr 0.1, momentum 0.9 (Nesterov too for ``nesterov``); Adam / AdamW lr 1e-3
(AdamW weight decay 1e-2). Models: ``mlp`` 64-64-10 and ``cnn`` (two 3x3 convolutions,
pooling, two linear layers) on scikit-learn's digits (80/20 split, no download); ``charlm``
the 2-block character-level transformer of ``pycomm.evaluation.models`` on its generated
text (2048 training windows of 32 characters; "accuracy" = next-character accuracy on the
256 held-out windows, ``test_loss`` its cross-entropy).

Wire bytes: ``pycomm.stats("all")["bytes_sent"]`` of rank 0 over the cell's training
(pycomm backend; warm-up steps included), next to what an fp32 ring all-reduce of every
step's gradients would send. Each cell also checks that every rank ends with bitwise
identical parameters and that no value is NaN/inf.

Raw results are written as they come to ``<out>.json`` (stamped with machine, torch,
date, load average and the command); the summary table goes to ``<out>.md`` at the end.
``--merge`` re-runs only the given cells into an existing ``<out>.json`` (same ranks,
epochs, batch and backend): its cells of the same (model, optimizer, compressor) are
replaced in place, the others kept, and the merge run's stamp and command are listed in
the file next to the original one (e.g. after a change to one compressor).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LR = {"sgd": 0.1, "sgdm": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 1e-3, "1bit-adam": 1e-3, "1bit-sgd": 0.1}


def make_compressor(name: str) -> Any:
    import pycomm.compression as C

    base, _, variant = name.partition("-")
    raw, mc = variant == "raw", variant.startswith("mc")
    comp = {
        "none": lambda: None,
        "FP16": C.FP16,
        "OneBit": C.OneBit,
        "TopK": lambda: C.TopK(0.01),
        "QSGD": lambda: C.QSGD(bits=8),
        "PowerSGD": lambda: C.PowerSGD(rank=4),
    }[base]()
    if raw and comp is not None:
        comp = C.MomentumCorrection(comp, momentum=0.0, warmup_steps=0)
    if variant == "nofreeze" and comp is not None:
        comp = C.for_training(comp)  # the default wrapping ...
        comp.freeze_variance = False  # ... without the Adam path's frozen variance
    if variant in ("wq4", "wq8") and comp is not None:
        comp = C.MomentumCorrection(comp, warmup_compression=C.QSGD(bits=int(variant[2]), error_feedback=True))
    if variant.startswith("kw:") and comp is not None:
        # <C>-kw:name=value;...: the default wrapping (for_training) built with these
        # MomentumCorrection arguments (side runs, e.g. warmup_steps=30); inner.name=value
        # sets an attribute of the compressor; exact=<expression of p> is a predicate.
        kwargs: Dict[str, Any] = {}
        for item in variant[3:].split(";"):
            k, _, v = item.partition("=")
            v = v.replace("|", ",")  # "," separates the cells of --compressors
            val = eval("lambda p: " + v if k == "exact" else v, {"C": C})  # noqa: S307 (CLI: C.QSGD(...) too)
            if k.startswith("inner."):
                setattr(comp, k[6:], val)
            else:
                kwargs[k] = val
        base = C.for_training(comp)
        for name in ("warmup_compression", "warmup_steps", "exact", "exact_compression", "nesterov_step",
                     "variance_refresh", "delta"):
            kwargs.setdefault(name, getattr(base, name))
        comp = C.MomentumCorrection(base.compressor if isinstance(base, C.MomentumCorrection) else comp, **kwargs)
    if mc and comp is not None:
        comp = C.MomentumCorrection(comp, warmup_steps=int(variant[2:]) if variant[2:] else C.DEFAULT_WARMUP_STEPS)
    return comp


def make_model(name: str) -> Any:
    import torch
    from torch import nn

    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if name == "charlm":
        from pycomm.evaluation.models import _charlm  # 2-block pre-LN transformer, d=64

        return _charlm()
    if name == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    raise ValueError(name)  # pragma: no cover


def make_optimizer(name: str, params: Any, comp: Any) -> Any:
    import torch
    import pycomm.compression as C

    lr = LR[name]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    if name == "1bit-adam":
        return C.OneBitAdam(params, lr=lr, warmup_steps=50, compression=comp)
    if name == "1bit-sgd":
        return C.OneBitSGD(params, lr=lr, momentum=0.9, warmup_steps=10, compression=comp)
    raise ValueError(name)  # pragma: no cover


def digits():
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(y))
    return x[:split], y[:split], x[split:], y[split:]


def train_cell(rank: int, world: int, model_name: str, opt_name: str, comp_name: str, seed: int,
               epochs: int, batch: int) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist
    import pycomm
    import pycomm.compression as C

    if model_name == "charlm":
        from pycomm.evaluation.models import _charlm_data  # generated text, 32-char windows

        xtr, ytr, xte, yte = _charlm_data()
    else:
        xtr, ytr, xte, yte = digits()
    xtr, ytr = xtr[rank::world], ytr[rank::world]
    torch.manual_seed(seed)
    net = make_model(model_name)
    comp = make_compressor(comp_name)
    numel = sum(p.numel() for p in net.parameters())
    if opt_name.startswith("1bit"):
        model = net
        opt = make_optimizer(opt_name, net.parameters(), comp)
        if comp_name == "none":
            opt.warmup_steps = 10 ** 9  # exact all-reduce throughout: the optimizer's own baseline
    else:
        model = pycomm.DataParallel(net, compression=comp)
        opt = make_optimizer(opt_name, model.parameters(), None)
    steps = len(ytr) // batch
    dist.barrier()
    before = pycomm.stats("all")["bytes_sent"] if dist.get_backend() == "pycomm" else 0
    t0 = time.perf_counter()
    finite = True
    loss_v = float("nan")
    # Held-out loss after every epoch and this rank's training-shard loss every 4th (the
    # LM's end point is past its best: a faster method over-fits more by then); their
    # time is left out of ``seconds``.
    curve: List[float] = []
    train_curve: List[float] = []
    eval_s = 0.0

    def evaluate(x: Any, y: Any) -> float:
        with torch.no_grad():
            out = net(x)
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).item()

    for epoch in range(epochs):
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed * 100003 + epoch * 1000 + rank))
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            opt.zero_grad()
            out = model(xtr[idx])
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ytr[idx].reshape(-1))
            loss.backward()
            opt.step()
            loss_v = loss.item()
        finite = finite and all(bool(torch.isfinite(p).all()) for p in net.parameters())
        te = time.perf_counter()
        curve.append(evaluate(xte, yte))
        if (epoch + 1) % 4 == 0 or epoch + 1 == epochs:
            train_curve.append(evaluate(xtr, ytr))
        eval_s += time.perf_counter() - te
    elapsed = time.perf_counter() - t0 - eval_s
    sent = (pycomm.stats("all")["bytes_sent"] - before) if dist.get_backend() == "pycomm" else None
    with torch.no_grad():
        out = net(xte)
        acc = (out.argmax(-1) == yte).float().mean().item() * 100  # charlm: next-character accuracy
        test_loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yte.reshape(-1)).item()
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    digest = torch.tensor([float(flat.double().sum()), float((flat.double() ** 2).sum())], dtype=torch.float64)
    digests = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(digests, digest)
    identical = all(torch.equal(d, digests[0]) for d in digests)
    ring = C.ring_all_reduce_bytes(numel, world) * steps * epochs
    return {"model": model_name, "optimizer": opt_name, "compressor": comp_name, "seed": seed,
            "test_acc": acc, "test_loss": test_loss, "final_train_loss": loss_v, "test_loss_curve": curve,
            "train_loss_curve": train_curve, "finite": finite, "ranks_identical": identical,
            "bytes_sent_rank0": sent, "fp32_ring_bytes": ring, "params": numel, "steps": steps * epochs,
            "seconds": elapsed}


def _stamp(argv: List[str]) -> Dict[str, Any]:
    import torch

    from pycomm.bench.machine import machine

    return {"machine": machine(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg()),
            "command": " ".join(["python", "benchmarks/bench_convergence.py"] + argv)}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, header: Dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import pycomm  # noqa: F401

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group(args.backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    cells: List[Dict[str, Any]] = []
    for model_name in args.models:
        for opt_name in args.optimizers:
            for comp_name in args.compressors:
                if opt_name.startswith("1bit") and comp_name not in ("none", "OneBit"):
                    continue
                for seed in args.seeds:
                    cell = train_cell(rank, world, model_name, opt_name, comp_name, seed, args.epochs, args.batch)
                    if rank == 0:
                        cells.append(cell)
                        print(f"{model_name:4} {opt_name:9} {comp_name:13} seed {seed}: acc {cell['test_acc']:6.2f}  "
                              f"bytes {cell['bytes_sent_rank0']}  {cell['seconds']:.1f}s", flush=True)
                        doc = dict(header, loadavg_now=list(os.getloadavg()), cells=cells)
                        tmp = args.run_out + ".json.tmp"
                        with open(tmp, "w") as f:
                            json.dump(doc, f, indent=1)
                        os.replace(tmp, args.run_out + ".json")
    dist.barrier()
    dist.destroy_process_group()


def _cell_key(c: Dict[str, Any]) -> tuple:
    return (c["model"], c["optimizer"], c["compressor"])


def merge(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """``old`` with the cells of ``new`` replacing old's cells of the same (model,
    optimizer, compressor), in old's order (new combinations go last); new's stamp is
    appended to ``merged``."""
    for k in ("ranks", "epochs", "batch", "backend"):
        if old.get(k) != new.get(k):
            raise SystemExit(f"--merge: {k} differs ({old.get(k)} in the file, {new.get(k)} in this run)")
    ran = {_cell_key(c) for c in new["cells"]}
    run = len(old.get("merged", []))
    fresh = [dict(c, merge_run=run) for c in new["cells"]]
    cells: List[Dict[str, Any]] = []
    emitted = set()
    for c in old["cells"]:
        k = _cell_key(c)
        if k not in ran:
            cells.append(c)
        elif k not in emitted:
            emitted.add(k)
            cells.extend(f for f in fresh if _cell_key(f) == k)
    cells.extend(f for f in fresh if _cell_key(f) not in emitted)
    stamp = {k: new[k] for k in ("command", "date", "machine", "torch", "loadavg_start", "loadavg_now") if k in new}
    stamp["cells"] = sorted(" ".join(k) for k in ran)
    return dict(old, cells=cells, merged=old.get("merged", []) + [stamp])


def summarize(doc: Dict[str, Any]) -> str:
    """The ``.md`` summary of a raw file: one line per (model, optimizer, compressor)
    from :func:`pycomm.evaluation.convergence.aggregate` (the evaluation report reads
    the same rows), and the best-epoch table where every cell has its curves."""
    from pycomm.evaluation.convergence import aggregate

    rows = aggregate(doc["cells"])
    lines = [f"# Convergence matrix ({doc['date']})", "",
             f"`{doc['command']}`", "",
             f"Machine: {doc['machine']['cpu']} ({doc['machine']['cores']} cores), torch {doc['torch']}, "
             f"load average at start {doc['loadavg_start'][0]:.2f}, at end {doc.get('loadavg_now', [0])[0]:.2f}. "
             f"{doc['ranks']} ranks ({doc['backend']}), {doc['epochs']} epochs, batch {doc['batch']} per rank, "
             "no schedule. Accuracy: mean over seeds, +- population std, min..max. Test loss: held-out "
             "cross-entropy, mean +- std, and its change vs none in % (n/a: cells from before it was recorded). "
             "Wire: bytes rank 0 sent (pycomm.stats, warm-up included) vs an fp32 ring all-reduce of every step.",
             ""]
    for i, m in enumerate(doc.get("merged", [])):
        lines += [f"Merge run {i} ({m['date']}, load average at start {m['loadavg_start'][0]:.2f}) re-ran the cells "
                  f"{', '.join(m['cells'])}: `{m['command']}`", ""]
    lines += [
             "| model | optimizer | compression | seeds | test acc % | delta vs none | min..max | test loss | "
             "loss vs none | fp32 ring / sent | NaN/inf | ranks identical |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "n/a" if r["acc_delta"] is None else f"{r['acc_delta']:+.2f}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        loss = "n/a" if r["loss"] is None else f"{r['loss']:.3f} +- {r['loss_sd']:.3f}"
        dloss = "n/a" if r["loss_pct"] is None else f"{r['loss_pct']:+.1f} %"
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['compressor']} | {r['seeds']} | "
                     f"{r['acc']:.2f} +- {r['acc_sd']:.2f} | {delta} | {r['acc_min']:.2f}..{r['acc_max']:.2f} | "
                     f"{loss} | {dloss} | {ratio} | {'none' if r['finite'] else 'YES'} | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines + _best_table(rows)) + "\n"


def _best_table(rows: List[Dict[str, Any]]) -> List[str]:
    """The held-out loss at its best epoch (cells with a per-epoch curve): a method that
    converges faster reaches its best earlier and over-fits more by the last epoch, which
    the final loss alone reads as a loss. Also the training-shard loss at the end."""
    # Only files whose every cell has a curve (older files have them on re-run cells only,
    # which could not be compared with their baseline).
    if not rows or any(r["best"] is None for r in rows):
        return []
    out = ["", "Held-out loss at its best epoch (evaluated after every epoch): mean +- std over seeds, change vs "
           "none's best; the epoch of the best per seed; the final held-out loss minus the best (mean: how much "
           "the run over-fits after its best); rank 0's training-shard loss at the end vs none's.", "",
           "| model | optimizer | compression | best test loss | best vs none | epoch of best | final - best | "
           "train loss at end | train vs none |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tr = "n/a" if r["train"] is None else f"{r['train']:.3f}"
        dtr = "n/a" if r["train_pct"] is None else f"{r['train_pct']:+.1f} %"
        best = "n/a" if r["best_pct"] is None else f"{r['best_pct']:+.1f} %"
        out.append(f"| {r['model']} | {r['optimizer']} | {r['compressor']} | {r['best']:.3f} +- {r['best_sd']:.3f} | "
                   f"{best} | {', '.join(map(str, r['best_epochs']))} | {r['overfit']:+.3f} | {tr} | {dtr} |")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--optimizers", default="sgd,sgdm,nesterov,adam,adamw,1bit-sgd,1bit-adam")
    ap.add_argument("--compressors", default="none,OneBit,TopK,PowerSGD,OneBit-raw,TopK-raw,PowerSGD-raw")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backend", default="pycomm")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "convergence_digits"))
    ap.add_argument("--merge", action="store_true",
                    help="re-run these cells into the existing <out>.json (module docstring)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="run nothing: rewrite <out>.md from the existing <out>.json")
    args = ap.parse_args(argv)
    if args.summarize_only:
        with open(args.out + ".json") as f:
            table = summarize(json.load(f))
        with open(args.out + ".md", "w") as f:
            f.write(table)
        print(table)
        return 0
    if args.merge and not os.path.exists(args.out + ".json"):
        ap.error(f"--merge: {args.out}.json does not exist")
    args.run_out = args.out + ".merge" if args.merge else args.out
    args.models = args.models.split(",")
    args.optimizers = args.optimizers.split(",")
    args.compressors = args.compressors.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    sys.path.insert(0, ROOT)
    header = _stamp(argv)
    header.update(ranks=args.ranks, backend=args.backend, epochs=args.epochs, batch=args.batch, lr=LR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, args.ranks, port, args, header)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        print("a rank failed", [p.exitcode for p in procs], file=sys.stderr)
        return 1
    with open(args.run_out + ".json") as f:
        doc = json.load(f)
    doc["loadavg_now"] = list(os.getloadavg())
    if args.merge:
        with open(args.out + ".json") as f:
            doc = merge(json.load(f), doc)
        os.remove(args.run_out + ".json")
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    table = summarize(doc)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
