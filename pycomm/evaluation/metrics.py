"""Figures derived from the raw cells of an evaluation run (pure functions, no I/O).

A *cell* is one training run: one model, strategy, world size, link and repeat, as the
runner writes it into ``results.json`` (its fields are listed in ``docs/EVALUATION.md``).
:func:`aggregate` folds the repeats of each (model, strategy, world, link) into one row
and derives, against the model's one-rank ``single`` baseline on the same data:

- ``speedup``: S(N) = T(1) / T(N) for a fixed number of samples, i.e. the ratio of the
  median throughputs; ``efficiency`` = S(N) / N (N = the ranks the cell used);
- ``speedup_ttt``: time-to-target(1) / time-to-target(N), with ``efficiency_ttt``;
  None when either side never reached the target in its median repeat.

:func:`recommend` picks, per model and link, the strategy that reached the target
first at the largest world size measured, and says why (communication, memory).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

Key = Tuple[str, str, int, str]
BASELINE = "single"


def _median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _spread(xs: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def key_of(cell: Dict[str, Any]) -> Key:
    return (cell["model"], cell["strategy"], int(cell["world"]), cell["link"])


def _time_to_target(cells: Sequence[Dict[str, Any]]) -> Tuple[Optional[Dict[str, float]], int]:
    """Median over repeats, a repeat that never reached the target counting as +inf
    (MLPerf's rule: a run that does not converge does not get a time). None if the
    median itself is a miss."""
    times = [c.get("time_to_target_s") for c in cells]
    reached = [t for t in times if t is not None]
    if not reached:
        return None, 0
    ordered = sorted(t if t is not None else float("inf") for t in times)
    n = len(ordered)
    med = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    if med == float("inf"):
        return None, len(reached)
    return {"median": med, "min": min(reached), "max": max(reached)}, len(reached)


def aggregate(cells: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (model, strategy, world, link), in first-seen order.

    A row's ``status`` is ``ok`` when at least one repeat ran; otherwise the status and
    reason of its last repeat (``failed``, ``skipped``, ``not_applicable``)."""
    groups: Dict[Key, List[Dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(key_of(c), []).append(c)
    rows: List[Dict[str, Any]] = []
    for key, cs in groups.items():
        ok = [c for c in cs if c.get("status") == "ok"]
        model, strategy, world, link = key
        row: Dict[str, Any] = {"model": model, "strategy": strategy, "world": world, "link": link,
                               "repeats": len(cs), "repeats_ok": len(ok)}
        if not ok:
            row["status"] = cs[-1].get("status", "failed")
            row["reason"] = cs[-1].get("reason")
            rows.append(row)
            continue
        first = ok[0]
        row["status"] = "ok"
        row["reason"] = None if len(ok) == len(cs) else f"{len(cs) - len(ok)} of {len(cs)} repeats failed"
        for f in ("metric", "higher_is_better", "target", "layout", "backend", "params", "global_batch"):
            row[f] = first.get(f)
        row["throughput"] = _spread([c.get("samples_per_s") for c in ok])
        row["step_p50"] = _median([(c.get("step_seconds") or {}).get("p50") for c in ok])
        row["step_p99"] = _median([(c.get("step_seconds") or {}).get("p99") for c in ok])
        row["final_metric"] = _spread([c.get("final_metric") for c in ok])
        ttt, reached = _time_to_target(ok)
        row["time_to_target"] = ttt
        row["reached_target"] = reached
        row["epochs_to_target"] = _median([c.get("epochs_to_target") for c in ok])
        row["loss_step_var"] = _median([c.get("loss_step_var") for c in ok])
        for f in ("comm_share", "exposed_share", "comm_seconds_per_step", "exposed_comm_seconds_per_step",
                  "bytes_sent_per_step", "link_bytes_per_step"):
            row[f] = _median([c.get(f) for c in ok])
        mem: Dict[str, int] = {}
        for c in ok:
            for k, v in (c.get("memory") or {}).items():
                if v is not None:
                    mem[k] = max(mem.get(k, 0), int(v))
        row["memory"] = mem
        rows.append(row)

    base: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in rows:
        if r["strategy"] == BASELINE and r["world"] == 1 and r["status"] == "ok":
            base.setdefault((r["model"], r["link"]), r)
            base.setdefault((r["model"], "*"), r)
    for r in rows:
        r["speedup"] = r["efficiency"] = r["speedup_ttt"] = r["efficiency_ttt"] = None
        b = base.get((r["model"], r["link"])) or base.get((r["model"], "*"))
        if r["status"] != "ok" or b is None:
            continue
        r["baseline"] = f"{b['strategy']} x{b['world']} ({b['link']})"
        if r["throughput"] and b["throughput"] and b["throughput"]["median"] > 0:
            r["speedup"] = r["throughput"]["median"] / b["throughput"]["median"]
            r["efficiency"] = r["speedup"] / r["world"]
        if r["time_to_target"] and b["time_to_target"] and r["time_to_target"]["median"] > 0:
            r["speedup_ttt"] = b["time_to_target"]["median"] / r["time_to_target"]["median"]
            r["efficiency_ttt"] = r["speedup_ttt"] / r["world"]
    return rows


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _exposed(row: Dict[str, Any]) -> str:
    share = row.get("exposed_share")
    return "exposed share n/a" if share is None else f"{share * 100:.0f}% exposed"


def recommend(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (model, link): among the rows at the largest world size with any successful
    run, the strategy with the shortest median time to target (ties and misses fall back
    to the highest throughput), the runner-up, the margin, the same figure of the one-rank
    ``single`` baseline (``single_value``: does parallelism pay at all?), and a reason."""
    by: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok" and r["world"] > 1:
            by.setdefault((r["model"], r["link"]), []).append(r)
    out: List[Dict[str, Any]] = []
    for (model, link), rs in by.items():
        world = max(r["world"] for r in rs)
        rs = [r for r in rs if r["world"] == world]
        reached = [r for r in rs if r["time_to_target"]]
        if reached:
            ranked = sorted(reached, key=lambda r: (r["time_to_target"]["median"],
                                                    -(r["throughput"] or {}).get("median", 0.0)))
            basis = "time to target"
            val = lambda r: r["time_to_target"]["median"]  # noqa: E731
        else:
            ranked = sorted(rs, key=lambda r: -(r["throughput"] or {}).get("median", 0.0))
            basis = "throughput (no strategy reached the target)"
            val = lambda r: (r["throughput"] or {}).get("median", 0.0)  # noqa: E731
        best = ranked[0]
        second = ranked[1] if len(ranked) > 1 else None
        if second is not None and val(best) > 0:
            margin = val(second) / val(best) if basis == "time to target" else val(best) / max(val(second), 1e-12)
        else:
            margin = None
        why = []
        if best.get("comm_share") is not None:
            why.append(f"communication {best['comm_share'] * 100:.0f}% of its step ({_exposed(best)})")
        if second is not None and second.get("comm_share") is not None:
            why.append(f"{second['strategy']}: {second['comm_share'] * 100:.0f}% ({_exposed(second)})")
        if best.get("bytes_sent_per_step") is not None:
            why.append(f"{_fmt_bytes(best['bytes_sent_per_step'])} sent per rank per step")
        peak = (best.get("memory") or {}).get("model_state")
        if peak:
            why.append(f"{_fmt_bytes(peak)} of parameters+gradients+optimizer state per rank")
        # Does parallelism pay at all? The same figure of the one-rank baseline.
        single = next((r for r in rows if r["model"] == model and r["strategy"] == BASELINE and r["world"] == 1
                       and r["status"] == "ok"), None)
        single_value = None
        if single is not None:
            if basis == "time to target":
                single_value = single["time_to_target"]["median"] if single["time_to_target"] else None
            else:
                single_value = (single["throughput"] or {}).get("median")
        out.append({"model": model, "link": link, "world": world, "basis": basis, "best": best["strategy"],
                    "runner_up": second["strategy"] if second else None, "margin": margin,
                    "best_value": val(best), "runner_up_value": val(second) if second else None,
                    "single_value": single_value, "why": "; ".join(why)})
    return out
