"""This machine's limits, measured in the same run as the collectives, and the bound each
collective's algorithm allows from them.

The probes are C++ (``pycomm._C.probe_*``, csrc/transport/probe.cc): memcpy bandwidth on
one core and on every core the ranks can use, ``process_vm_readv`` (cross-memory attach,
what the shm transport copies with) bandwidth with 4 KiB pages and with huge pages, and
the futex wake-up round trip between two processes.

The bound of a collective on the shm transport is the time its single-copy algorithm
needs to move its bytes at those bandwidths (docs/BENCHMARKING.md, "Limits"):

* all_reduce (direct, > 64 KiB): every rank reads its block from each peer and then every
  peer's finished block: 2(n-1)/n x S per rank, 2(n-1) x S over the host, spread over
  the ranks at the huge-page ``process_vm_readv`` rate of as many threads;
* all_reduce (one-shot, <= 64 KiB): n x S into shared memory plus n(n-1) x S out of it at
  the memcpy rate;
* reduce_scatter, all_gather, all_to_all: (n-1) x S over the host; broadcast: (n-1) x S
  over n-1 readers; reduce: (n-1) x S read by the root alone;
* out of place all_reduce: as in place (pycomm's own out-of-place call reads the input and
  writes the output with no copy between them; other backends' copy + in-place call is
  measured against the same bound); out of place reduce: the bench's copy into the
  output (torch's reduce is in place), n x S at memcpy rate;
* never below one futex wake-up (half the round trip): when ranks outnumber cores, a
  rank that waits must sleep and be woken.

``fraction = bound / measured time``: 1.0 means the collective ran at the machine's limit.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

PROBE_BYTES = 64 << 20
ONESHOT_BYTES = 64 << 10  # AlgoConfig::smallBytes (csrc/algorithms/collectives.h)


def probe(ranks_on_host: int, nbytes: int = PROBE_BYTES, reps: int = 5, futex_iters: int = 2000) -> Dict:
    """Runs every probe (about a second); a dict for the JSON file and :func:`bound_seconds`."""
    from pycomm import _C

    cpus = int(_C.available_cpus())
    # As many copying threads as ranks: on a machine others use too, n threads get the
    # share of the cores that n ranks get (and no more than the cores when it is idle).
    par = max(1, ranks_on_host)
    t0 = time.perf_counter()
    out = {
        "cpus": cpus, "threads_all": par, "probe_bytes": nbytes, "reps": reps,
        "huge_pages_available": bool(_C.huge_pages_available()),
        "memcpy_1": _C.probe_memcpy(nbytes, 1, reps, True),
        "memcpy_all": _C.probe_memcpy(nbytes, par, reps, True),
        "cma_4k_1": _C.probe_cross_memory(nbytes, 1, reps, False),
        "cma_huge_1": _C.probe_cross_memory(nbytes, 1, reps, True),
        "cma_4k_all": _C.probe_cross_memory(nbytes, par, reps, False),
        "cma_huge_all": _C.probe_cross_memory(nbytes, par, reps, True),
        "futex_rt": _C.probe_futex_round_trip(futex_iters),
    }
    out["seconds"] = time.perf_counter() - t0
    return out


def _bw(limits: Dict, kind: str, parallel: int) -> Optional[float]:
    """Bytes/s of `kind` ("memcpy", "cma_huge", "cma_4k") with `parallel` ranks copying."""
    one, allc = limits.get(f"{kind}_1"), limits.get(f"{kind}_all")
    if not one or one.get("error") or not allc or allc.get("error"):
        return None
    b1, ball = one["best_gbps"] * 1e9, allc["best_gbps"] * 1e9
    if parallel >= limits["threads_all"]:
        return ball
    return min(ball, b1 * max(1, parallel))


def bound_seconds(collective: str, size: int, nranks: int, inplace: bool, limits: Optional[Dict],
                  transport: Optional[str] = "shm", pages: str = "cma_huge") -> Optional[float]:
    """Least time this machine allows for the collective on `nranks` ranks of one host
    (module docstring), or None when there is no bound (no probes, not the shm transport)."""
    if not limits or (transport or "shm") != "shm" or nranks < 2:
        return None
    n, s = nranks, float(size)
    mem = _bw(limits, "memcpy", n)
    cma = _bw(limits, pages, n)
    if mem is None or cma is None:
        return None
    if collective == "all_reduce":
        t = (n * s + n * (n - 1) * s) / mem if size <= ONESHOT_BYTES else 2 * (n - 1) * s / cma
    elif collective in ("reduce_scatter", "all_gather", "all_to_all"):
        t = (n - 1) * s / cma
    elif collective == "broadcast":
        t = (n - 1) * s / _bw(limits, pages, n - 1)
    elif collective == "reduce":
        t = (n - 1) * s / _bw(limits, pages, 1)
    else:
        return None
    if not inplace and collective == "reduce":
        t += n * s / mem  # torch's reduce is in place: the bench copies first
    rt = limits.get("futex_rt") or {}
    if not rt.get("error") and rt.get("p50_us"):
        t = max(t, rt["p50_us"] * 1e-6 / 2)
    return t


def header_lines(limits: Dict) -> List[str]:
    """The '# limits' lines of the bench's header."""
    def bw(k):
        p = limits.get(k) or {}
        if p.get("error"):
            return f"n/a ({p['error']})"
        return f"{p.get('best_gbps', 0):.2f}" + ("" if not p.get("huge_pages") or p.get("huge_backed")
                                                  else " (huge pages NOT granted)")

    rt = limits.get("futex_rt") or {}
    rts = (f"n/a ({rt['error']})" if rt.get("error")
           else f"p50 {rt.get('p50_us', 0):.1f} us, p99 {rt.get('p99_us', 0):.1f} us")
    k = limits["threads_all"]
    return [
        f"# limits of this machine, measured now ({limits['cpus']} cpus usable; best of {limits['reps']} x "
        f"{limits['probe_bytes'] >> 20} MiB; GB/s): memcpy 1 thread {bw('memcpy_1')}, {k} threads {bw('memcpy_all')}; "
        f"process_vm_readv 4 KiB pages 1 thread {bw('cma_4k_1')}, {k} threads {bw('cma_4k_all')}; "
        f"huge pages 1 thread {bw('cma_huge_1')}, {k} threads {bw('cma_huge_all')}",
        f"# futex wake-up round trip between two processes: {rts}",
        "# %lim = bound / time: the single-copy algorithm's bytes at the huge-page process_vm_readv and memcpy "
        "rates above, never below half a futex round trip (docs/BENCHMARKING.md, Limits)",
    ]


def main() -> int:
    """``python -m pycomm.bench.limits [ranks]``: print the probes."""
    import json
    import sys

    ranks = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    lim = probe(ranks)
    for line in header_lines(lim):
        print(line)
    print(json.dumps(lim, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
