"""Output of a sweep besides the table: progress bar, CSV, plot, the machine's description."""
from __future__ import annotations

import csv
import os
import platform
import sys
from typing import Dict, List, Sequence, Tuple

from tqdm import tqdm


def progress_bar(total: int, enabled: bool) -> tqdm:
    """The sweep's progress bar on stderr (a no-op when not ``enabled``). Print table rows
    with ``tqdm.write`` while it is up so the bar does not tear them."""
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="case", dynamic_ncols=True, leave=False)


def human(n: int) -> str:
    """1024 -> "1K", 3 << 20 -> "3M"; other sizes in bytes."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


CSV_FIELDS = ["collective", "backend", "compression", "nranks", "size", "count", "type", "redop", "root",
              "oop_time_us", "oop_algbw", "oop_busbw", "oop_wrong", "ip_time_us", "ip_algbw", "ip_busbw",
              "ip_wrong", "cmp_backend", "cmp_time_us", "cmp_busbw", "cmp_wrong", "ratio", "relerr",
              "wire_bytes", "oop_p50_us", "oop_p99_us", "oop_bound_us", "oop_frac", "ip_p50_us", "ip_p99_us",
              "ip_bound_us", "ip_frac", "cmp_p50_us", "cmp_p99_us", "cmp_frac"]


def _flat(row: dict) -> dict:
    d = {k: row.get(k) for k in ("collective", "backend", "compression", "nranks", "size", "count", "type",
                                 "redop", "root", "ratio")}
    for m in ("oop", "ip"):
        v = row.get(m) or {}
        for k in ("time_us", "algbw", "busbw", "wrong", "p50_us", "p99_us", "bound_us", "frac"):
            d[f"{m}_{k}"] = v.get(k)
    c = row.get("cmp") or {}
    d["cmp_backend"] = row.get("cmp_backend")
    for k in ("time_us", "busbw", "wrong", "p50_us", "p99_us", "frac"):
        d[f"cmp_{k}"] = c.get(k)
    d["relerr"] = (row.get("oop") or {}).get("relerr")
    d["wire_bytes"] = (row.get("oop") or {}).get("wire_bytes")
    return d


def write_csv(path: str, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in _flat(r).items()})


def write_plot(path: str, rows: Sequence[dict], meta: dict) -> bool:
    """busbw (out-of-place) vs size, one line per backend / compressor. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pycomm-bench: --plot needs matplotlib (pip install matplotlib); plot skipped", file=sys.stderr)
        return False
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        label = r["backend"] + (f"+{r['compression']}" if r.get("compression") else "")
        if r.get("oop"):
            series.setdefault(label, []).append((r["size"], r["oop"]["busbw"]))
        if r.get("cmp"):
            series.setdefault(r["cmp_backend"], []).append((r["size"], r["cmp"]["busbw"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (B)")
    ax.set_ylabel("busbw (GB/s), out-of-place")
    net = f", {meta['hosts']} hosts @ {meta['link']}" if meta.get("hosts") else ""
    ax.set_title(f"{meta['collective']} {meta['dtype']} {meta['op']}, {meta['nranks']} ranks{net}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, f"torch {meta['torch']} · {meta['date']} · {meta['machine']}", fontsize=6, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"

