"""The nccl-tests arithmetic and columns: sizes, counts, algbw/busbw, the table rows.

Pure functions (unit-tested without processes); names and constants the other bench
modules and the CLI share.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")
_COLL_ALIASES = {c.replace("_", ""): c for c in COLLECTIVES}
_COLL_ALIASES.update({c + "_perf": c for c in COLLECTIVES})
_COLL_ALIASES.update({"alltoall": "all_to_all", "alltoall_perf": "all_to_all"})
REDUCING = ("all_reduce", "reduce_scatter", "reduce")

#: nccl-tests dtype names -> torch dtype attribute names.
DTYPES = {
    "float": "float32", "double": "float64", "half": "float16", "bfloat16": "bfloat16",
    "int32": "int32", "int64": "int64", "int8": "int8", "uint8": "uint8",
}
_DTYPE_ALIASES = {"float32": "float", "fp32": "float", "float64": "double", "fp64": "double",
                  "float16": "half", "fp16": "half", "bf16": "bfloat16", "int": "int32",
                  "long": "int64", "char": "int8", "byte": "uint8"}
OPS = ("sum", "avg", "prod", "min", "max")
COMPRESSORS = {"onebit": "OneBit", "fp16": "FP16", "bf16": "BF16", "topk": "TopK",
               "qsgd": "QSGD", "powersgd": "PowerSGD"}


# ----------------------------------------------------------------------------------------
# Pure helpers (unit-tested without processes)
# ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'8' -> 8, '1K' -> 1024, '64M' -> 67108864, '1G' -> 2**30 (K/M/G are powers of 1024;
    an optional trailing 'B' / 'iB' is accepted)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"bad size {text!r}: expected e.g. 8, 1K, 64M, 1G")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def sweep_sizes(begin: int, end: int, factor: int) -> List[int]:
    """nccl-tests -b/-e/-f: begin, begin*f, ... up to and including end."""
    if begin <= 0 or end < begin:
        raise ValueError(f"need 0 < -b <= -e, got -b {begin} -e {end}")
    if factor < 2:
        raise ValueError(f"-f must be >= 2, got {factor}")
    sizes, s = [], begin
    while s <= end:
        sizes.append(s)
        s *= factor
    return sizes


def bus_factor(collective: str, nranks: int) -> float:
    """busbw / algbw, from nccl-tests doc/PERFORMANCE.md."""
    n = nranks
    if collective == "all_reduce":
        return 2.0 * (n - 1) / n
    if collective in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) / n
    if collective in ("broadcast", "reduce"):
        return 1.0
    raise ValueError(f"unknown collective {collective!r}")


def bandwidths(collective: str, size_bytes: int, seconds: float, nranks: int) -> Tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes/s) for `size_bytes` (whole array) moved in `seconds`."""
    if seconds <= 0:
        return 0.0, 0.0
    algbw = size_bytes / 1e9 / seconds
    return algbw, algbw * bus_factor(collective, nranks)


def counts_for(collective: str, size_bytes: int, elem_size: int, nranks: int) -> Tuple[int, int]:
    """(count passed per rank, actual whole-array size in bytes) for a requested size."""
    total = size_bytes // elem_size
    if collective in ("reduce_scatter", "all_gather", "all_to_all"):
        count = total // nranks
        return count, count * nranks * elem_size
    return total, total * elem_size


def _fmt_time(us: float) -> str:
    if us >= 10000.0:
        return f"{us:7.0f}"
    if us >= 100.0:
        return f"{us:7.1f}"
    return f"{us:7.2f}"


def _fmt_mode(m: Optional[dict]) -> str:
    if m is None:
        return f"  {'N/A':>7}  {'N/A':>6}  {'N/A':>6}  {'N/A':>6}"
    wrong = "N/A" if m.get("wrong") is None else str(m["wrong"])
    return f"  {_fmt_time(m['time_us'])}  {m['algbw']:6.2f}  {m['busbw']:6.2f}  {wrong:>6}"


def header_lines(compare: Optional[str] = None) -> List[str]:
    """The nccl-tests column header (three lines), with the --compare columns appended,
    then the latency percentiles and the fraction of the machine's limit of each mode
    (out-of-place, in-place, then the compared backend's out-of-place)."""
    l1 = "#" + " " * 62 + "out-of-place" + " " * 23 + "in-place"
    l2 = (f"#{'size':>11}  {'count':>12}  {'type':>8}  {'redop':>6}  {'root':>6}"
          + f"  {'time':>7}  {'algbw':>6}  {'busbw':>6}  {'#wrong':>6}" * 2)
    l3 = (f"#{'(B)':>11}  {'(elements)':>12}  {'':>8}  {'':>6}  {'':>6}"
          + f"  {'(us)':>7}  {'(GB/s)':>6}  {'(GB/s)':>6}  {'':>6}" * 2)
    if compare:
        l1 += " " * 20 + f"{compare} out-of-place"
        l2 += f"  {'time':>7}  {'busbw':>6}  {'#wrong':>6}  {'ratio':>6}"
        l3 += f"  {'(us)':>7}  {'(GB/s)':>6}  {'':>6}  {'':>6}"
    l1 = l1.ljust(len(l2)) + "     out-of-place:           in-place:" + (f"            {compare}:" if compare else "")
    for _ in range(3 if compare else 2):
        l2 += f"  {'p50':>7}  {'p99':>7}  {'%lim':>5}"
        l3 += f"  {'(us)':>7}  {'(us)':>7}  {'':>5}"
    return [l1, l2, l3]


def _fmt_extra(m: Optional[dict]) -> str:
    """p50, p99 and the fraction of the limit of one mode ("N/A" where not measured)."""
    if m is None:
        return f"  {'N/A':>7}  {'N/A':>7}  {'N/A':>5}"
    p50 = _fmt_time(m["p50_us"]) if m.get("p50_us") is not None else f"{'N/A':>7}"
    p99 = _fmt_time(m["p99_us"]) if m.get("p99_us") is not None else f"{'N/A':>7}"
    frac = f"{100 * m['frac']:5.0f}" if m.get("frac") is not None else f"{'N/A':>5}"
    return f"  {p50}  {p99}  {frac}"


def format_row(row: dict) -> str:
    """One result line in nccl-tests layout (plus the --compare columns if present)."""
    s = (f"{row['size']:12d}  {row['count']:12d}  {row['type']:>8}  {row['redop']:>6}  {row['root']:6d}"
         + _fmt_mode(row.get("oop")) + _fmt_mode(row.get("ip")))
    if "cmp" in row:
        c = row["cmp"]
        wrong = "N/A" if c.get("wrong") is None else str(c["wrong"])
        ratio = "N/A" if row.get("ratio") is None else f"{row['ratio']:6.2f}"
        s += f"  {_fmt_time(c['time_us'])}  {c['busbw']:6.2f}  {wrong:>6}  {ratio:>6}"
    s += _fmt_extra(row.get("oop")) + _fmt_extra(row.get("ip"))
    if "cmp" in row:
        s += _fmt_extra(row["cmp"])
    return s


def avg_busbw(rows: Sequence[dict], key: str = "primary") -> float:
    """Mean busbw over every measured value (out-of-place and in-place), as nccl-tests."""
    vals = []
    for r in rows:
        if key == "primary":
            vals += [r[m]["busbw"] for m in ("oop", "ip") if r.get(m)]
        elif r.get("cmp"):
            vals.append(r["cmp"]["busbw"])
    return sum(vals) / len(vals) if vals else 0.0

