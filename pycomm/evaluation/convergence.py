"""The compression convergence matrix (``benchmarks/bench_convergence.py``) read for the
evaluation report: per (model, optimizer, compressor) the mean and spread over seeds of
the final accuracy and held-out loss, their change against the uncompressed cell, the
best held-out loss over the epochs, the bytes saved, and whether the cell meets issue
15's targets.

A raw file of the benchmark holds one dict per (model, optimizer, compressor, seed)
cell; :func:`load` checks one, :func:`aggregate` reduces its cells to rows, and
:func:`verdict` says of a row whether it meets its target. The benchmark's own ``.md``
summary is computed from the same rows.

Targets (issue 15), applied to a compressor's default cell (the name without a ``-``
variant suffix) with a stock torch optimizer (:data:`JUDGED_OPTIMIZERS`; not the
compressed optimizers ``1bit-adam`` / ``1bit-sgd``, whose exact warm-up is their own
setting) against the uncompressed cell of the same model and optimizer:

- a classifier's test accuracy within :data:`ACC_POINTS` points below uncompressed;
- a language model's (:data:`LOSS_MODELS`) held-out loss at most :data:`LOSS_PCT` % above;
- bytes: the fp32 ring's bytes / the bytes rank 0 sent at least :data:`MIN_RATIO`
  (OneBit 25x, TopK 10x) where the compressor has a bytes target;
- every seed finite (no NaN/inf) and every seed's ranks bitwise identical.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

ACC_POINTS = 1.0
LOSS_PCT = 2.0
LOSS_MODELS = ("charlm",)
MIN_RATIO = {"OneBit": 25.0, "TopK": 10.0}
JUDGED_OPTIMIZERS = ("sgd", "sgdm", "nesterov", "adam", "adamw")
BASE = "none"
CELL_KEYS = ("model", "optimizer", "compressor", "seed", "test_acc", "finite", "ranks_identical",
             "bytes_sent_rank0", "fp32_ring_bytes")
DOC_KEYS = ("cells", "command", "date", "machine", "torch", "ranks", "epochs", "batch", "backend")

Row = Dict[str, Any]


class ConvergenceFileError(ValueError):
    """A file that is not a ``bench_convergence.py`` raw result."""


def load(doc: Any, where: str = "convergence file") -> Dict[str, Any]:
    """``doc`` (a parsed ``bench_convergence.py`` ``.json``) checked: every key the report
    reads is present, or :class:`ConvergenceFileError` says which is missing where."""
    if not isinstance(doc, dict):
        raise ConvergenceFileError(f"{where}: not a JSON object (a bench_convergence.py result is one)")
    missing = [k for k in DOC_KEYS if k not in doc]
    if missing:
        raise ConvergenceFileError(f"{where}: no {', '.join(missing)} — not a bench_convergence.py result")
    if not isinstance(doc["cells"], list) or not doc["cells"]:
        raise ConvergenceFileError(f"{where}: 'cells' is empty or not a list")
    for i, c in enumerate(doc["cells"]):
        lost = [k for k in CELL_KEYS if not isinstance(c, dict) or k not in c]
        if lost:
            raise ConvergenceFileError(f"{where}: cell {i} has no {', '.join(lost)}")
    return doc


def _mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def _pct(x: float, base: Optional[float]) -> Optional[float]:
    return 100.0 * (x - base) / base if base else None


def base_name(compressor: str) -> str:
    """The compressor a cell name is a variant of (``OneBit-raw`` -> ``OneBit``)."""
    return compressor.partition("-")[0]


def is_default(compressor: str) -> bool:
    """A compressor's default cell (what ``DataParallel(compression=C())`` runs)."""
    return "-" not in compressor


def aggregate(cells: Sequence[Dict[str, Any]]) -> List[Row]:
    """One row per (model, optimizer, compressor), in the cells' order: ``seeds``,
    ``acc`` / ``acc_sd`` / ``acc_min`` / ``acc_max`` (test accuracy %), ``acc_delta``
    (points vs ``none``), ``loss`` / ``loss_sd`` / ``loss_pct`` (final held-out loss and its
    change vs ``none`` in %; None where a seed did not record it), ``best`` / ``best_sd`` /
    ``best_pct`` / ``best_epochs`` / ``overfit`` / ``train`` / ``train_pct`` (from the
    per-epoch curves, None without them), ``ratio`` (fp32 ring bytes / bytes rank 0 sent),
    ``finite``, ``identical``."""
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["model"], c["optimizer"], c["compressor"]), []).append(c)
    rows: List[Row] = []
    for (m, o, comp), cs in groups.items():
        accs = [float(c["test_acc"]) for c in cs]
        acc, acc_sd = _mean_sd(accs)
        row: Row = dict(model=m, optimizer=o, compressor=comp, seeds=len(cs), acc=acc, acc_sd=acc_sd,
                        acc_min=min(accs), acc_max=max(accs), finite=all(c["finite"] for c in cs),
                        identical=all(c["ranks_identical"] for c in cs), loss=None, loss_sd=None, best=None,
                        best_sd=None, best_epochs=None, overfit=None, train=None)
        sent = [c["bytes_sent_rank0"] for c in cs if c["bytes_sent_rank0"]]
        row["ratio"] = (statistics.mean(c["fp32_ring_bytes"] for c in cs) / statistics.mean(sent)) if sent else None
        if all(c.get("test_loss") is not None for c in cs):
            row["loss"], row["loss_sd"] = _mean_sd([c["test_loss"] for c in cs])
        if all(c.get("test_loss_curve") for c in cs):
            best = [min(c["test_loss_curve"]) for c in cs]
            row["best"], row["best_sd"] = _mean_sd(best)
            row["best_epochs"] = [1 + c["test_loss_curve"].index(b) for c, b in zip(cs, best)]
            row["overfit"] = statistics.mean(c["test_loss_curve"][-1] - b for c, b in zip(cs, best))
        if all(c.get("train_loss_curve") for c in cs):
            row["train"] = statistics.mean(c["train_loss_curve"][-1] for c in cs)
        rows.append(row)
    base = {(r["model"], r["optimizer"]): r for r in rows if r["compressor"] == BASE}
    for r in rows:
        b = base.get((r["model"], r["optimizer"]))
        r["acc_delta"] = r["acc"] - b["acc"] if b else None
        r["loss_pct"] = _pct(r["loss"], b["loss"]) if b and r["loss"] is not None and b["loss"] is not None else None
        r["best_pct"] = _pct(r["best"], b["best"]) if b and r["best"] is not None and b["best"] is not None else None
        r["train_pct"] = (_pct(r["train"], b["train"]) if b and r["train"] is not None and b["train"] is not None
                          else None)
    return rows


def verdict(row: Row) -> Optional[Tuple[bool, List[str]]]:
    """(met, reasons it is not) for a compressor's default cell with a stock optimizer,
    None for ``none``, a variant, a compressed optimizer or a cell without an
    uncompressed baseline (no target applies)."""
    comp = row["compressor"]
    if (comp == BASE or not is_default(comp) or row["optimizer"] not in JUDGED_OPTIMIZERS
            or row.get("acc_delta") is None):
        return None
    why: List[str] = []
    if row["model"] in LOSS_MODELS:
        if row.get("loss_pct") is None:
            why.append("no held-out loss recorded")
        elif row["loss_pct"] > LOSS_PCT:
            why.append(f"held-out loss {row['loss_pct']:+.1f} % vs none (target ≤ +{LOSS_PCT:g} %)")
    elif row["acc_delta"] < -ACC_POINTS:
        why.append(f"accuracy {row['acc_delta']:+.2f} points vs none (target ≥ -{ACC_POINTS:g})")
    need = MIN_RATIO.get(base_name(comp))
    if need is not None and (row["ratio"] is None or row["ratio"] < need):
        got = "n/a" if row["ratio"] is None else f"{row['ratio']:.1f}x"
        why.append(f"bytes {got} fewer than the fp32 ring (target ≥ {need:g}x)")
    if not row["finite"]:
        why.append("a seed diverged (NaN/inf)")
    if not row["identical"]:
        why.append("ranks not bitwise identical")
    return (not why, why)
