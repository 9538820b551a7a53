"""The report of a ``pycomm-bench train`` run, rendered from ``results.json`` alone.

:func:`write_report` writes ``report.md`` (its plots as PNG files under ``plots/``) and
``report.html`` (self-contained: inline CSS, plots as inline base64 PNG, no script and no
external URL). Rendering measures nothing, so an old or interrupted run re-renders with::

    python -m pycomm.evaluation.report results.json [--out DIR]

Both documents are rendered from one list of blocks (headings, paragraphs, tables,
plots) and say the same thing, in this order: the stamp of the machine and command (with
a warning when the run did not complete), the recommendation per model and link, per
model a headline table and its plots, every cell that did not run and why, and the
definitions of the metrics. The figures come from :mod:`pycomm.evaluation.metrics`; a
figure that was not measured reads ``n/a``, and a plot without data is replaced by a note.
"""
from __future__ import annotations

import argparse
import base64
import glob
import html
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pycomm.evaluation import convergence as conv
from pycomm.evaluation.metrics import BASELINE, _fmt_bytes, aggregate, recommend

Cell = Dict[str, Any]
Row = Dict[str, Any]

NA = "n/a"
MIB = float(1 << 20)
MEMORY_PARTS = ("params", "grads", "optimizer", "activations")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

DEFINITIONS = (
    "**throughput**: training samples per second of wall time (all ranks together), the median "
    "over the repeats that ran, with [min–max].",
    "**speedup** S(N) = T(1) / T(N) for a fixed number of samples, i.e. the ratio of the median "
    f"throughput to that of the model's one-rank `{BASELINE}` baseline (same link when measured there).",
    "**efficiency** = S(N) / N, N = the ranks the cell used; 1.00 is linear scaling.",
    "**time to target**: wall seconds of training until the evaluation metric first reached the "
    "model's target, the median over repeats, a repeat that never reached it counting as infinite "
    "(n/a when the median repeat missed); *reached k/n*: repeats that reached it. "
    "**speedup (ttt)** = time to target of the baseline / time to target at N ranks.",
    "**final metric**: the evaluation metric after the last epoch, mean ± standard deviation over repeats.",
    "**loss step variance**: the variance of the successive differences of the per-step global "
    "training loss over the second half of training (how noisy the optimisation is).",
    "**comm share**: seconds spent in communication per step / the median step time; "
    "**exposed share**: the communication not overlapped with compute (the part the step "
    "waits for) / the median step time.",
    "**bytes sent per rank per step**: pycomm.stats() transport counters of one rank divided by the "
    "steps, not a formula (n/a when the backend is not pycomm); **link bytes**: the emulated host "
    "interface's tx counter, payload plus TCP/IP framing.",
    "**memory per rank** (MiB, the largest rank): model state = parameters + gradients + optimizer "
    "state, activations = saved for backward at the peak, peak RSS = the process's peak resident set.",
)


# --- blocks: what both documents say -----------------------------------------------------------

@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """Text with ``**bold**`` markup; ``kind`` is "" (plain), "warning" or "note"."""

    text: str
    kind: str = ""


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]  # each with ``**bold**`` markup


@dataclass(frozen=True)
class Fields:
    """Key/value pairs shown literally; ``code`` values in a monospace font."""

    items: Sequence[Tuple[str, str, bool]]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]  # literal text


@dataclass(frozen=True)
class Plot:
    """One PNG (None when there was nothing to plot) and a note said under it."""

    id: str
    title: str
    alt: str
    png: Optional[bytes]
    note: str = ""


Block = Union[Heading, Para, Bullets, Fields, Table, Plot]


# --- formatting ----------------------------------------------------------------------------------

def _fixed(x: Optional[float], spec: str) -> str:
    return NA if x is None else format(x, spec)


def _mib(n: Optional[float]) -> str:
    return NA if n is None else f"{n / MIB:.1f}"


def _pct(x: Optional[float]) -> str:
    return NA if x is None else f"{x * 100:.1f}%"


def _secs(x: Optional[float]) -> str:
    if x is None:
        return NA
    return f"{x:.0f} s" if abs(x) >= 100 else f"{x:.3g} s"


def _loadavg(v: Any) -> str:
    if not v:
        return NA
    return " / ".join(f"{x:.2f}" for x in v) + " (1, 5, 15 min)"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-") or "x"


def _ordered(seen: Sequence[Any], preferred: Sequence[Any]) -> List[Any]:
    """The distinct values of ``seen``, those named in ``preferred`` first and in its order."""
    rest = [v for v in dict.fromkeys(seen) if v not in preferred]
    return [v for v in preferred if v in seen] + rest


# --- the run -------------------------------------------------------------------------------------

class _Run:
    """results.json with the derived rows, the order of models/strategies/links and
    the per-model metric description, tolerant of missing fields."""

    def __init__(self, results: Dict[str, Any]) -> None:
        self.meta: Dict[str, Any] = results.get("meta") or {}
        matrix: Dict[str, Any] = results.get("matrix") or {}
        self.cells: List[Cell] = [c for c in results.get("cells") or [] if isinstance(c, dict)]
        self.models = _ordered([c["model"] for c in self.cells], matrix.get("models") or [])
        self.strategies = _ordered([c["strategy"] for c in self.cells], matrix.get("strategies") or [])
        self.links = _ordered([c["link"] for c in self.cells], matrix.get("links") or [])
        s_idx = {s: i for i, s in enumerate(self.strategies)}
        l_idx = {s: i for i, s in enumerate(self.links)}
        self.rows: List[Row] = sorted(aggregate(self.cells),
                                      key=lambda r: (l_idx[r["link"]], s_idx[r["strategy"]], r["world"]))
        self.recs: Dict[Tuple[str, str], Dict[str, Any]] = {(r["model"], r["link"]): r
                                                             for r in recommend(self.rows)}

    def model_rows(self, model: str, ok_only: bool = False) -> List[Row]:
        return [r for r in self.rows if r["model"] == model and (r["status"] == "ok" or not ok_only)]

    def model_links(self, model: str) -> List[str]:
        return [lk for lk in self.links if any(c["model"] == model and c["link"] == lk for c in self.cells)]

    def model_info(self, model: str) -> Dict[str, Any]:
        """metric, higher_is_better, target (None when unknown), params, description."""
        spec = dict((self.meta.get("models") or {}).get(model) or {})
        first = next((c for c in self.cells if c["model"] == model and c.get("status") == "ok"), {})
        for k in ("metric", "target", "params", "higher_is_better"):
            if spec.get(k) is None:
                spec[k] = first.get(k)
        if spec["higher_is_better"] is None:
            spec["higher_is_better"] = spec["metric"] != "loss"
        return spec

    def target_text(self, model: str) -> str:
        info = self.model_info(model)
        if info.get("target") is None:
            return "target n/a"
        return f"{info.get('metric') or 'metric'} {'≥' if info['higher_is_better'] else '≤'} {info['target']:g}"


# --- sections ------------------------------------------------------------------------------------

def _stamp(run: _Run) -> List[Block]:
    m = run.meta
    blocks: List[Block] = [Heading(1, "pycomm evaluation report")]
    if m.get("complete") is not True:
        blocks.append(Para(f"**Incomplete run**: meta.complete is {str(m.get('complete')).lower()} — the run was "
                           f"interrupted (or is still running). This report shows only the {len(run.cells)} "
                           f"cells measured so far.", "warning"))

    def val(key: str) -> str:
        v = m.get(key)
        return NA if v is None or v == "" else str(v)

    blocks.append(Fields([
        ("machine", val("machine"), False), ("cpu", val("cpu"), False), ("cores", val("cores"), False),
        ("torch", val("torch"), False), ("pycomm", val("pycomm"), False), ("date", val("date"), False),
        ("load average at start", _loadavg(m.get("loadavg_start")), False),
        ("load average at end", _loadavg(m.get("loadavg_end")), False),
        ("command", val("command"), True), ("quick", val("quick").lower(), False),
        ("complete", val("complete").lower(), False)]))
    return blocks


def _recommendation_text(run: _Run, rec: Dict[str, Any]) -> str:
    """One recommendation of :func:`metrics.recommend` in words."""
    where, ru, margin = f"{rec['model']} over {rec['link']}, {rec['world']} ranks", rec["runner_up"], rec["margin"]
    if rec["basis"] == "time to target":
        text = (f"**{where}: {rec['best']}** reached the target ({run.target_text(rec['model'])}) first, in "
                f"{_secs(rec['best_value'])} (median)")
        if ru is None:
            text += f"; no other strategy reached it at {rec['world']} ranks"
        else:
            text += (f", {_fixed(margin, '.2f')}× sooner than the runner-up {ru} "
                     f"({_secs(rec['runner_up_value'])})")
    else:
        text = (f"**{where}: no strategy reached the target** ({run.target_text(rec['model'])}). "
                f"Highest throughput: **{rec['best']}**, {rec['best_value']:.1f} samples/s")
        if ru is not None:
            text += (f", {_fixed(margin, '.2f')}× the throughput of the runner-up {ru} "
                     f"({rec['runner_up_value']:.1f} samples/s)")
    text = f"{text}. Why: {rec['why'] or 'no communication or memory figures were recorded'}."
    one = rec.get("single_value")
    if one and rec["best_value"]:
        if rec["basis"] == "time to target":
            ratio, pays = one / rec["best_value"], rec["best_value"] < one
            figure = f"{_secs(one)} to the target"
        else:
            ratio, pays = rec["best_value"] / one, rec["best_value"] > one
            figure = f"{one:.1f} samples/s"
        text += (f" One rank alone ({BASELINE}): {figure}, so {rec['best']} is {_fixed(ratio, '.2f')}× as fast as "
                 + ("one rank: parallelism pays here." if pays else
                    "one rank: **no strategy beats one rank for this model on this link**."))
    return text


def _recommendation(run: _Run) -> List[Block]:
    blocks: List[Block] = [Heading(2, "Recommendation")]
    items: List[str] = []
    for model in run.models:
        for link in run.model_links(model):
            rec = run.recs.get((model, link))
            if rec is None:
                items.append(f"**{model} over {link}**: no recommendation — no run with more than one rank succeeded "
                             f"(see What did not run).")
                continue
            items.append(_recommendation_text(run, rec))
    blocks.append(Bullets(items) if items else Para("No cells were recorded: nothing to recommend."))
    return blocks


def _headline(run: _Run, model: str) -> Table:
    metric = run.model_info(model).get("metric") or "metric"
    header = ["strategy", "ranks", "link", "runs ok", "throughput samples/s median [min–max]", "speedup",
              "efficiency", "time to target median (reached k/n)", "speedup (ttt)", f"final {metric} mean ± std",
              "loss step variance", "comm / exposed share", "bytes sent /rank/step (link)",
              "model state MiB", "activations MiB", "peak RSS MiB"]
    rows: List[List[str]] = []
    for r in run.model_rows(model):
        head = [r["strategy"], str(r["world"]), r["link"], f"{r['repeats_ok']}/{r['repeats']}"]
        if r["status"] != "ok":
            rows.append(head[:3] + [f"0/{r['repeats']} ({r['status']})"] + [NA] * (len(header) - 4))
            continue
        thr, fin, ttt, mem = r.get("throughput"), r.get("final_metric"), r.get("time_to_target"), r["memory"]
        reached = f"({r['reached_target']}/{r['repeats_ok']})"
        sent = _fmt_bytes(r.get("bytes_sent_per_step"))
        if r.get("link_bytes_per_step") is not None:
            sent += f" ({_fmt_bytes(r['link_bytes_per_step'])})"
        rows.append(head + [
            f"{thr['median']:.1f} [{thr['min']:.1f}–{thr['max']:.1f}]" if thr else NA,
            _fixed(r.get("speedup"), ".2f") + ("×" if r.get("speedup") is not None else ""),
            _fixed(r.get("efficiency"), ".2f"),
            f"{_secs(ttt['median'])} {reached}" if ttt else f"not reached {reached}",
            _fixed(r.get("speedup_ttt"), ".2f") + ("×" if r.get("speedup_ttt") is not None else ""),
            f"{fin['mean']:.4g} ± {fin['std']:.2g}" if fin else NA,
            _fixed(r.get("loss_step_var"), ".3g"),
            f"{_pct(r.get('comm_share'))} / {_pct(r.get('exposed_share'))}",
            sent,
            _mib(mem.get("model_state")), _mib(mem.get("activations")), _mib(mem.get("peak_rss"))])
    return Table(header, rows)


def _not_run(run: _Run) -> List[Block]:
    blocks: List[Block] = [Heading(2, "What did not run")]
    bad = [c for c in run.cells if c.get("status") != "ok"]
    if not bad:
        blocks.append(Para(f"Every cell ran ({len(run.cells)} of {len(run.cells)})."))
        return blocks
    counts: Dict[str, int] = {}
    for c in bad:
        counts[str(c.get("status"))] = counts.get(str(c.get("status")), 0) + 1
    blocks.append(Para(f"{len(bad)} of {len(run.cells)} cells did not run: "
                       + ", ".join(f"{n} {s}" for s, n in counts.items()) + "."))
    blocks.append(Table(["model", "strategy", "ranks", "link", "repeat", "status", "reason"],
                        [[c["model"], c["strategy"], str(c["world"]), c["link"], str(c.get("repeat", NA)),
                          str(c.get("status")), c.get("reason") or "(no reason recorded)"] for c in bad]))
    return blocks


# --- plots ---------------------------------------------------------------------------------------

def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(title: str, xlabel: str, ylabel: str) -> Tuple[Figure, Axes]:
    fig = Figure(figsize=(8, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


class _Style:
    """One colour and marker per strategy and one line style per link, the same in every
    plot of a model; labels name the link only when the model ran over several."""

    def __init__(self, run: _Run, model: str) -> None:
        self.strategies = {s: i for i, s in enumerate(run.strategies)}
        self.links = {lk: i for i, lk in enumerate(run.model_links(model))}

    def kw(self, strategy: str, link: str) -> Dict[str, Any]:
        i = self.strategies[strategy]
        return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[self.links[link] % len(LINESTYLES)]}

    def label(self, strategy: str, link: str, world: Optional[int] = None) -> str:
        s = strategy if world is None else f"{strategy} ×{world}"
        return f"{s} ({link})" if len(self.links) > 1 else s


def _series(rows: Sequence[Row]) -> Dict[Tuple[str, str], List[Row]]:
    out: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        out.setdefault((r["strategy"], r["link"]), []).append(r)
    return out


def _largest_world(rows: Sequence[Row]) -> Optional[int]:
    worlds = [r["world"] for r in rows if r["world"] > 1]
    return max(worlds) if worlds else None


def _plot_throughput(run: _Run, model: str, style: _Style) -> Tuple[Optional[bytes], str]:
    rows = [r for r in run.model_rows(model, ok_only=True) if r.get("throughput")]
    if not rows:
        return None, "no run measured a throughput"
    fig, ax = _figure(f"{model}: throughput vs ranks", "ranks", "samples/s (median, bars min–max)")
    for (strategy, link), rs in _series(rows).items():
        ax.errorbar([r["world"] for r in rs], [r["throughput"]["median"] for r in rs],
                    yerr=[[r["throughput"]["median"] - r["throughput"]["min"] for r in rs],
                          [r["throughput"]["max"] - r["throughput"]["median"] for r in rs]],
                    capsize=3, label=style.label(strategy, link), **style.kw(strategy, link))
    worlds = sorted({r["world"] for r in rows})
    notes = []
    # One rank sends nothing, so the runner measures the baseline once (on this host) and
    # it serves every link; a baseline measured on a link of its own is drawn for that link.
    bases = [r for r in rows if r["strategy"] == BASELINE and r["world"] == 1]
    if not bases:
        notes.append(f"no {BASELINE} ×1 baseline: no ideal line")
    for base in bases:
        tag = f" ({base['link']})" if len(bases) > 1 else ""
        ax.plot([1, worlds[-1]], [base["throughput"]["median"], base["throughput"]["median"] * worlds[-1]],
                color="grey", linestyle=LINESTYLES[style.links.get(base["link"], 0) % len(LINESTYLES)],
                linewidth=1, label=f"ideal linear from {BASELINE}{tag}")
    ax.set_xticks(worlds)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncol=2)
    return _png(fig), "; ".join(notes)


def _plot_efficiency(run: _Run, model: str, style: _Style) -> Tuple[Optional[bytes], str]:
    rows = [r for r in run.model_rows(model, ok_only=True) if r.get("efficiency") is not None]
    if not rows:
        return None, f"no efficiency: no run with a {BASELINE} ×1 baseline throughput"
    fig, ax = _figure(f"{model}: parallel efficiency vs ranks", "ranks", "efficiency S(N)/N")
    for (strategy, link), rs in _series(rows).items():
        ax.plot([r["world"] for r in rs], [r["efficiency"] for r in rs],
                label=style.label(strategy, link), **style.kw(strategy, link))
    ax.axhline(1.0, color="grey", linewidth=1, label="linear scaling")
    ax.set_xticks(sorted({r["world"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncol=2)
    return _png(fig), ""


def _plot_curves(run: _Run, model: str, style: _Style) -> Tuple[Optional[bytes], str]:
    def points(c: Cell) -> List[Tuple[float, float]]:
        return [(p["wall_s"], p["metric"]) for p in c.get("curve") or []
                if isinstance(p, dict) and p.get("wall_s") is not None and p.get("metric") is not None]

    cells = [c for c in run.cells if c["model"] == model and c.get("status") == "ok" and points(c)]
    worlds = [c["world"] for c in cells if c["world"] > 1]
    world = max(worlds) if worlds else 1
    cells = [c for c in cells if c["world"] == world or (c["strategy"] == BASELINE and c["world"] == 1)]
    if not cells:
        return None, "no run recorded a learning curve"
    info = run.model_info(model)
    metric = info.get("metric") or "metric"
    at = f"{world} ranks; {BASELINE}: 1 rank" if world > 1 else "1 rank"
    fig, ax = _figure(f"{model}: {metric} vs wall time ({at})", "wall time (s)", metric)
    labelled = set()
    for c in sorted(cells, key=lambda c: (style.strategies[c["strategy"]], style.links[c["link"]],
                                          c.get("repeat") or 0)):
        key = (c["strategy"], c["link"])
        xs, ys = zip(*points(c))
        ax.plot(xs, ys, alpha=0.25 if key in labelled else 1.0, markersize=3,
                label=None if key in labelled else style.label(c["strategy"], c["link"], c["world"]),
                **style.kw(*key))
        labelled.add(key)
    if info.get("target") is not None:
        ax.axhline(info["target"], color="black", linestyle="--", linewidth=1, label=f"target {info['target']:g}")
    ax.legend(fontsize=8, ncol=2)
    return _png(fig), "the first repeat solid, further repeats faint"


def _bar_labels(rows: Sequence[Row], style: _Style) -> List[str]:
    return [style.label(r["strategy"], r["link"], r["world"]) for r in rows]


def _plot_comm(run: _Run, model: str, style: _Style) -> Tuple[Optional[bytes], str]:
    rows = run.model_rows(model, ok_only=True)
    world = _largest_world(rows)
    if world is None:
        return None, "no run with more than one rank"
    rows = [r for r in rows if r["world"] == world]
    timed = [r.get("comm_share") is not None and r.get("exposed_share") is not None for r in rows]
    have = [r for r, t in zip(rows, timed) if t]
    missing = _bar_labels([r for r, t in zip(rows, timed) if not t], style)
    note = f"n/a (communication not timed) for: {', '.join(missing)}" if missing else ""
    if not have:
        return None, note
    fig, ax = _figure(f"{model}: communication share of the median step at {world} ranks", "",
                      "% of the median step")
    x = list(range(len(have)))
    exposed = [r["exposed_share"] * 100 for r in have]
    overlapped = [max(r["comm_share"] - r["exposed_share"], 0.0) * 100 for r in have]
    ax.bar(x, exposed, color="tab:red", label="exposed (step waits)")
    ax.bar(x, overlapped, bottom=exposed, color="tab:blue", alpha=0.5, label="overlapped with compute")
    ax.set_xticks(x, _bar_labels(have, style), rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    return _png(fig), note


def _plot_memory(run: _Run, model: str, style: _Style) -> Tuple[Optional[bytes], str]:
    rows = run.model_rows(model, ok_only=True)
    world = _largest_world(rows)
    rows = [r for r in rows if r["world"] == world or (r["strategy"] == BASELINE and r["world"] == 1)]
    recorded = [any(r["memory"].get(k) is not None for k in MEMORY_PARTS) for r in rows]
    have = [r for r, m in zip(rows, recorded) if m]
    missing = _bar_labels([r for r, m in zip(rows, recorded) if not m], style)
    note = f"n/a (memory not recorded) for: {', '.join(missing)}" if missing else ""
    if not have:
        return None, note or "no run recorded its memory"
    at = f"{BASELINE} ×1 and {world} ranks" if world else f"{BASELINE} ×1"
    fig, ax = _figure(f"{model}: memory per rank ({at})", "", "MiB (largest rank)")
    x = list(range(len(have)))
    bottom = [0.0] * len(have)
    for i, part in enumerate(MEMORY_PARTS):
        vals = [(r["memory"].get(part) or 0) / MIB for r in have]
        ax.bar(x, vals, bottom=bottom, color=f"C{i}", label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(x, _bar_labels(have, style), rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    return _png(fig), note


PLOTS = (
    ("throughput", "Throughput vs ranks", "throughput in samples per second against the number of ranks, "
     "one line per strategy, with the ideal linear line from the one-rank baseline", _plot_throughput),
    ("efficiency", "Efficiency vs ranks", "parallel efficiency S(N)/N against the number of ranks, one line "
     "per strategy", _plot_efficiency),
    ("curve", "Learning curves", "evaluation metric against wall-clock training time per strategy, with "
     "the target as a horizontal line", _plot_curves),
    ("comm", "Communication share", "stacked bars per strategy at the largest world: communication exposed "
     "to the step and communication overlapped with compute, in % of the median step", _plot_comm),
    ("memory", "Memory per rank", "stacked bars per strategy: parameters, gradients, optimizer state and "
     "activations per rank in MiB", _plot_memory),
)


# --- the compression convergence matrix (results["convergence"]) -----------------------------------

def _conv_cell(r: Row) -> str:
    """One matrix cell: the model's criterion, mean ± std, change vs none, ✓/✗ against
    the target where one applies."""
    v = conv.verdict(r)
    mark = "" if v is None else (" ✓" if v[0] else " ✗")
    if r["model"] in conv.LOSS_MODELS and r["loss"] is not None:
        change = "" if r["loss_pct"] is None or r["compressor"] == conv.BASE else f" ({r['loss_pct']:+.1f} %)"
        return f"{r['loss']:.3f} ± {r['loss_sd']:.3f}{change}, {r['acc']:.1f} %{mark}"
    change = "" if r["acc_delta"] is None or r["compressor"] == conv.BASE else f" ({r['acc_delta']:+.2f})"
    return f"{r['acc']:.2f} ± {r['acc_sd']:.2f}{change}{mark}"


def _conv_best_cell(r: Row) -> str:
    change = "" if r["best_pct"] is None or r["compressor"] == conv.BASE else f" ({r['best_pct']:+.1f} %)"
    return f"{r['best']:.3f} ± {r['best_sd']:.3f}{change}, epoch {', '.join(map(str, r['best_epochs']))}"


def _conv_ratio(rows: Sequence[Row]) -> str:
    ratios = sorted(r["ratio"] for r in rows if r["ratio"] is not None)
    if not ratios:
        return NA
    lo, hi = ratios[0], ratios[-1]
    return f"{lo:.1f}×" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}×"


def _conv_plot(model: str, rows: Sequence[Row]) -> Tuple[Optional[bytes], str]:
    """Change against uncompressed vs bytes saved, one point per default cell."""
    pts = [r for r in rows if conv.is_default(r["compressor"]) and r["ratio"] is not None]
    lm = model in conv.LOSS_MODELS
    key = "loss_pct" if lm else "acc_delta"
    pts = [r for r in pts if r[key] is not None]
    if not pts:
        return None, "no cell with both bytes and an uncompressed baseline"
    fig, ax = _figure(f"{model}: change vs uncompressed against bytes saved",
                      "fp32 ring bytes / bytes sent (log)",
                      "held-out loss vs none (%, lower is better)" if lm else "test accuracy vs none (points)")
    opts = _ordered([r["optimizer"] for r in pts], [])
    comps = _ordered([r["compressor"] for r in pts], [conv.BASE])
    for r in pts:
        i, j = opts.index(r["optimizer"]), comps.index(r["compressor"])
        ax.plot([r["ratio"]], [r[key]], linestyle="", color=f"C{i % 10}", marker=MARKERS[j % len(MARKERS)],
                markersize=7)
    for i, o in enumerate(opts):
        ax.plot([], [], linestyle="", color=f"C{i % 10}", marker="o", label=o)
    for j, c in enumerate(comps):
        ax.plot([], [], linestyle="", color="grey", marker=MARKERS[j % len(MARKERS)], label=c)
    bound = conv.LOSS_PCT if lm else -conv.ACC_POINTS
    ax.axhline(bound, color="black", linestyle="--", linewidth=1,
               label=f"target {'≤ +' if lm else '≥ '}{bound:g}{' %' if lm else ' points'}")
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set_xscale("log")
    ax.legend(fontsize=8, ncol=2)
    return _png(fig), "colour: optimizer, marker: compressor; every compressor at its defaults"


def _convergence_section(doc: Dict[str, Any], index: int) -> List[Block]:
    """One raw file of ``benchmarks/bench_convergence.py``: its stamp, per model the
    optimizer × compressor matrix with the bytes saved, the targets met and missed, the
    best-epoch matrix where the per-epoch curves were recorded, and a plot."""
    rows = conv.aggregate(doc["cells"])
    models = _ordered([r["model"] for r in rows], [])
    mach = doc.get("machine") or {}
    seeds = sorted({c["seed"] for c in doc["cells"]})
    what = []
    if set(models) & set(conv.LOSS_MODELS):
        what.append("LM: held-out loss (change vs none), next-character accuracy")
    if set(models) - set(conv.LOSS_MODELS):
        what.append("classifiers: test accuracy % (points vs none)")
    targets = ", ".join(f"{k} ≥ {v:g}× fewer bytes" for k, v in conv.MIN_RATIO.items())
    blocks: List[Block] = [
        Heading(2, f"Compression convergence: {', '.join(models)}"),
        Para(f"Measured by `benchmarks/bench_convergence.py`, **not in this run** (its own stamp below): "
             f"{doc['ranks']} ranks ({doc['backend']}), {doc['epochs']} epochs, batch {doc['batch']} per rank, "
             f"no schedule, seeds {', '.join(map(str, seeds))}; every cell trains "
             f"`pycomm.DataParallel(model, compression=C)` with a stock torch optimizer and the recipe chosen for "
             f"the uncompressed run, reused unchanged. Cells: mean ± std over seeds ({'; '.join(what)}); "
             f"✓ / ✗: the compressor's default cell meets / misses the target (classifiers within "
             f"{conv.ACC_POINTS:g} point of none, the LM's held-out loss at most {conv.LOSS_PCT:g} % above, "
             f"{targets}, no NaN/inf, ranks bitwise identical; judged with the stock optimizers "
             f"{', '.join(conv.JUDGED_OPTIMIZERS)} — a `1bit-adam` / `1bit-sgd` row is the compressed optimizer, "
             f"the column naming its momentum's compressor, whose exact warm-up is its own setting)."),
        Fields([("machine", f"{mach.get('cpu', NA)}, {mach.get('cores', NA)} cores, {mach.get('platform', NA)}",
                 False),
                ("torch", str(doc.get("torch", NA)), False), ("date", str(doc.get("date", NA)), False),
                ("load average at start", _loadavg(doc.get("loadavg_start")), False),
                ("load average at end", _loadavg(doc.get("loadavg_now")), False),
                ("command", str(doc.get("command", NA)), True)])]
    merged = doc.get("merged") or []
    if merged:
        blocks.append(Para(f"{len(merged)} later run(s) re-ran some cells into this file (each replaced its cells):"))
        blocks.append(Bullets([f"{m.get('date', NA)}: `{m.get('command', NA)}`" for m in merged]))
    for model in models:
        mrows = [r for r in rows if r["model"] == model]
        comps = _ordered([r["compressor"] for r in mrows], [conv.BASE])
        opts = _ordered([r["optimizer"] for r in mrows], [])
        at = {(r["optimizer"], r["compressor"]): r for r in mrows}
        table = [[o] + [_conv_cell(at[(o, c)]) if (o, c) in at else "" for c in comps] for o in opts]
        table.append(["fp32 ring bytes / sent"] + [_conv_ratio([r for r in mrows if r["compressor"] == c])
                                                   for c in comps])
        blocks += [Heading(3, f"{model}: final {'held-out loss' if model in conv.LOSS_MODELS else 'test accuracy'}"),
                   Table(["optimizer"] + comps, table)]
        judged = [(r, conv.verdict(r)) for r in mrows]
        judged = [(r, v) for r, v in judged if v is not None]
        missed = [(r, v[1]) for r, v in judged if not v[0]]
        if judged:
            blocks.append(Para(f"**Targets: met by {len(judged) - len(missed)} of {len(judged)}** default "
                               f"compressor cells" + (":" if missed else ".")))
        if missed:
            blocks.append(Bullets([f"{r['optimizer']} + {r['compressor']}: {'; '.join(why)}" for r, why in missed]))
        if all(r["best"] is not None for r in mrows):
            best = [[o] + [_conv_best_cell(at[(o, c)]) if (o, c) in at else "" for c in comps] for o in opts]
            blocks += [Para(f"{model}: the held-out loss at its best epoch (evaluated after every epoch; mean ± std "
                            "of the seeds' minima, change vs none's, the epoch of each seed's best). A method that "
                            "fits faster reaches its best sooner and over-fits more by the last epoch."),
                       Table(["optimizer"] + comps, best)]
        png, note = _conv_plot(model, mrows)
        blocks.append(Plot(f"plot-conv{index}-{_slug(model)}", f"{model}: accuracy against bytes",
                           f"{model}: change against the uncompressed run vs bytes saved, per optimizer and "
                           f"compressor", png, note if png is not None else f"no plot — {note}."))
    return blocks


def _model_section(run: _Run, model: str) -> List[Block]:
    info = run.model_info(model)
    params = f"{info['params']:,} parameters" if info.get("params") else "parameters n/a"
    target = "target n/a" if info.get("target") is None else f"target {run.target_text(model)}"
    blocks: List[Block] = [Heading(2, f"Model {model}"),
                           Para("; ".join(x for x in (info.get("description"), params, target) if x) + "."),
                           _headline(run, model)]
    style = _Style(run, model)
    for kind, title, alt, draw in PLOTS:
        png, note = draw(run, model, style)
        if png is None:
            note = f"{title}: no plot — {note}."
        blocks.append(Plot(f"plot-{_slug(model)}-{kind}", title, f"{model}: {alt}", png, note))
    return blocks


def build(results: Dict[str, Any]) -> List[Block]:
    """The blocks of the report of ``results`` (a parsed results.json)."""
    run = _Run(results)
    blocks = _stamp(run) + _recommendation(run)
    for model in run.models:
        blocks += _model_section(run, model)
    if not run.models:
        blocks.append(Para("No cells were recorded.", "warning"))
    for i, doc in enumerate(results.get("convergence") or []):
        try:
            doc = conv.load(doc, f"results.json convergence[{i}]")
        except conv.ConvergenceFileError as e:
            blocks.append(Para(f"**Compression convergence not shown**: {e}.", "warning"))
            continue
        blocks += _convergence_section(doc, i)
    blocks += _not_run(run)
    blocks += [Heading(2, "Definitions"), Bullets(DEFINITIONS)]
    return blocks


# --- rendering -----------------------------------------------------------------------------------

def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def render_md(blocks: Sequence[Block], plot_dir: str) -> str:
    """Markdown of the blocks; plots are linked as ``<plot_dir>/<id>.png``."""
    out: List[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(f"> **⚠** {b.text}" if b.kind == "warning" else f"_{b.text}_" if b.kind == "note" else b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Fields):
            out.append("\n".join(f"- **{k}**: " + (f"`` {v} ``" if code else v) for k, v, code in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif b.png is not None:
            out.append(f"![{b.alt}]({plot_dir}/{b.id}.png)" + (f"\n\n_{b.note}_" if b.note else ""))
        else:
            out.append(f"_{b.note}_")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; max-width: 1600px; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .85em; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
td { white-space: nowrap; } td:last-child { white-space: pre-wrap; } .scroll { overflow-x: auto; }
table.fields th { width: 13em; }
.warning { background: #fdecea; border: 2px solid #d93025; padding: .6em 1em; font-weight: 500; }
.note { color: #666; font-style: italic; }
figure { margin: 1em 0; } img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; }
code { background: #f4f4f4; padding: .1em .3em; }
"""


def _inline(text: str) -> str:
    """Escaped HTML of ``text`` with its ``**bold**`` and ```code``` markup."""
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def render_html(blocks: Sequence[Block]) -> str:
    """A self-contained HTML page of the blocks (inline CSS and base64 PNGs, no script)."""
    out: List[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = f' class="{b.kind}"' if b.kind else ""
            out.append(f"<p{cls}>{'⚠ ' if b.kind == 'warning' else ''}{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Fields):
            out.append('<table class="fields">' + "".join(
                f"<tr><th>{html.escape(k)}</th><td>{f'<code>{html.escape(v)}</code>' if code else html.escape(v)}"
                f"</td></tr>" for k, v, code in b.items) + "</table>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>')
        elif b.png is not None:
            src = "data:image/png;base64," + base64.b64encode(b.png).decode("ascii")
            note = f'<br><span class="note">{html.escape(b.note)}</span>' if b.note else ""
            out.append(f'<figure><img class="plot" id="{b.id}" alt="{html.escape(b.alt)}" src="{src}">'
                       f"<figcaption>{html.escape(b.title)}{note}</figcaption></figure>")
        else:
            out.append(f'<p class="note" id="{b.id}">{html.escape(b.note)}</p>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>pycomm evaluation report</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(out) + "\n</body></html>\n")


def write_report(results: Dict[str, Any], outdir: str) -> Dict[str, str]:
    """Writes ``report.md`` (plots under ``plots/``) and ``report.html`` of ``results``
    (a parsed results.json) into ``outdir``; returns their paths (keys md, html, plots)."""
    os.makedirs(outdir, exist_ok=True)
    blocks = build(results)
    plot_dir = os.path.join(outdir, "plots")
    for stale in glob.glob(os.path.join(plot_dir, "plot-*.png")):
        os.remove(stale)
    for b in blocks:
        if isinstance(b, Plot) and b.png is not None:
            os.makedirs(plot_dir, exist_ok=True)
            with open(os.path.join(plot_dir, f"{b.id}.png"), "wb") as f:
                f.write(b.png)
    paths = {"md": os.path.join(outdir, "report.md"), "html": os.path.join(outdir, "report.html"),
             "plots": plot_dir}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(render_md(blocks, "plots"))
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(render_html(blocks))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pycomm.evaluation.report results.json [--out DIR]``: re-render a report."""
    ap = argparse.ArgumentParser(prog="python -m pycomm.evaluation.report",
                                 description="Render report.md and report.html from a results.json "
                                             "(measures nothing).")
    ap.add_argument("results", help="results.json of a pycomm-bench train run")
    ap.add_argument("--out", default=None, help="report folder (default: the folder of results.json)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        ap.error(f"cannot read {args.results}: {e}")
    if not isinstance(results, dict):
        ap.error(f"{args.results} is not a results.json (not a JSON object)")
    paths = write_report(results, args.out or os.path.dirname(os.path.abspath(args.results)))
    print(f"report: {paths['md']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
