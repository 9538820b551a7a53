"""pycomm-bench: arithmetic, output format, files, --compare, pycomm variants, emulated cluster,
packaging."""
import ast
import csv
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from dist_util import ROOT, subprocess_env
from pycomm import bench

PY = sys.executable

ROW_RE = re.compile(r"^\s+\d+\s+\d+\s+\S+\s+\S+\s+-?\d+\s")


def run_bench(*argv, timeout=90, env=None):
    e = subprocess_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([PY, "-m", "pycomm.bench", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=e)


def rows_of(stdout):
    """Data rows as lists of fields (13 standard columns, +4 with --compare, then p50/p99/%lim
    per mode: +6, +9 with --compare)."""
    return [line.split() for line in stdout.splitlines() if ROW_RE.match(line)]


def avg_busbw(stdout):
    m = re.search(r"^# Avg bus bandwidth\s*: ([0-9.eE+-]+)", stdout, re.M)
    assert m, stdout
    return float(m.group(1))


def _pycomm_backend_problem():
    code = ("import pycomm, torch.distributed as dist; "
            "assert 'pycomm' in dist.Backend.backend_list, 'not registered'")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    return "" if p.returncode == 0 else (p.stderr.strip().splitlines() or ["import failed"])[-1]


_PYCOMM_WHY = _pycomm_backend_problem()
needs_pycomm = pytest.mark.skipif(bool(_PYCOMM_WHY),
                                  reason=f"pycomm backend not registered by `import pycomm`: {_PYCOMM_WHY}")


# ---- arithmetic and formatting (no processes) ---------------------------------------

def test_parse_size_and_sweep():
    assert bench.parse_size("8") == 8
    assert bench.parse_size("1K") == 1024
    assert bench.parse_size("64M") == 64 << 20
    assert bench.parse_size("1G") == 1 << 30
    assert bench.parse_size("2KB") == 2048
    with pytest.raises(ValueError):
        bench.parse_size("lots")
    assert bench.sweep_sizes(8, 128, 2) == [8, 16, 32, 64, 128]
    assert bench.sweep_sizes(1024, 64 << 20, 4)[-1] == 64 << 20
    assert bench.sweep_sizes(8, 100, 4) == [8, 32]
    with pytest.raises(ValueError):
        bench.sweep_sizes(8, 100, 1)


def test_busbw_factors():
    assert bench.bus_factor("all_reduce", 4) == pytest.approx(1.5)
    assert bench.bus_factor("all_reduce", 2) == pytest.approx(1.0)
    for c in ("reduce_scatter", "all_gather", "all_to_all"):
        assert bench.bus_factor(c, 4) == pytest.approx(0.75)
        assert bench.bus_factor(c, 8) == pytest.approx(0.875)
    assert bench.bus_factor("broadcast", 8) == 1.0
    assert bench.bus_factor("reduce", 8) == 1.0
    assert bench.bus_factor("all_reduce", 1) == 0.0


def test_bandwidth_arithmetic():
    # 1 GB in 0.5 s: algbw 2 GB/s; all_reduce over 4 ranks moves 2(n-1)/n = 1.5x that per rank.
    algbw, busbw = bench.bandwidths("all_reduce", 10**9, 0.5, 4)
    assert algbw == pytest.approx(2.0) and busbw == pytest.approx(3.0)
    algbw, busbw = bench.bandwidths("all_gather", 64 << 20, 1e-3, 8)
    assert algbw == pytest.approx((64 << 20) / 1e9 / 1e-3)
    assert busbw == pytest.approx(algbw * 7 / 8)
    assert bench.bandwidths("broadcast", 1000, 1e-6, 3) == pytest.approx((1.0, 1.0))


def test_counts_whole_array():
    # size is the whole array: per-rank blocks for reduce_scatter/all_gather/all_to_all.
    assert bench.counts_for("all_reduce", 1024, 4, 4) == (256, 1024)
    assert bench.counts_for("all_gather", 1024, 4, 4) == (64, 1024)
    assert bench.counts_for("reduce_scatter", 1000, 4, 3) == (83, 996)
    assert bench.counts_for("all_to_all", 8, 4, 4) == (0, 0)


def test_format_row_columns():
    m = {"time_us": 12.345, "algbw": 1.234, "busbw": 2.345, "wrong": 0, "p50_us": 11.0, "p99_us": 150.25,
         "frac": 0.456}
    row = {"size": 1024, "count": 256, "type": "float", "redop": "sum", "root": -1, "oop": m, "ip": None}
    f = bench.format_row(row).split()
    assert f == ["1024", "256", "float", "sum", "-1", "12.35", "1.23", "2.35", "0", "N/A", "N/A", "N/A", "N/A",
                 "11.00", "150.2", "46", "N/A", "N/A", "N/A"]
    row.update(cmp={"time_us": 24.0, "busbw": 1.0, "wrong": 0, "p50_us": 20.0, "p99_us": 30.0}, ratio=2.345)
    f = bench.format_row(row).split()
    assert f[13:17] == ["24.00", "1.00", "0", "2.35"]
    assert f[-3:] == ["20.00", "30.00", "N/A"] and len(f) == 26
    hdr = bench.header_lines()
    assert "out-of-place" in hdr[0] and "in-place" in hdr[0]
    assert hdr[1].split() == (["#", "size", "count", "type", "redop", "root"] + ["time", "algbw", "busbw", "#wrong"] * 2
                              + ["p50", "p99", "%lim"] * 2)
    assert bench.header_lines("gloo")[1].split()[-13:] == ["time", "busbw", "#wrong", "ratio"] + ["p50", "p99", "%lim"] * 3


def test_percentiles_nearest_rank():
    from pycomm.bench.timing import percentile

    vals = sorted(float(i) for i in range(1, 101))
    assert percentile(vals, 50) == 50.0 and percentile(vals, 99) == 99.0 and percentile(vals, 100) == 100.0
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) == 0.0
    assert percentile([1.0] * 19 + [9.0], 99) == 9.0  # p99 of 20 calls is the slowest one


def _fake_limits(mem=10.0, mem1=6.0, cma=4.0, cma1=2.5, rt=40.0):
    bw = lambda g, huge=True: {"best_gbps": g, "median_gbps": g, "error": None, "huge_pages": huge,  # noqa: E731
                               "huge_backed": huge}
    return {"cpus": 2, "threads_all": 2, "probe_bytes": 64 << 20, "reps": 5,
            "memcpy_1": bw(mem1), "memcpy_all": bw(mem), "cma_huge_1": bw(cma1), "cma_huge_all": bw(cma),
            "cma_4k_1": bw(cma1 / 2, False), "cma_4k_all": bw(cma / 2, False),
            "futex_rt": {"p50_us": rt, "p99_us": 2 * rt, "error": None}}


def test_limits_probe_runs():
    """The C++ probes (pycomm._C.probe_*) return positive figures, and the bench's header
    carries them."""
    from pycomm.bench import limits as L

    pytest.importorskip("pycomm._C")
    lim = L.probe(2, nbytes=4 << 20, reps=2, futex_iters=100)
    for k in ("memcpy_1", "memcpy_all", "cma_4k_1", "cma_huge_all"):
        assert lim[k]["error"] is None and lim[k]["best_gbps"] > 0, (k, lim[k])
    assert lim["cma_4k_1"]["huge_backed"] is False
    assert 0 < lim["futex_rt"]["p50_us"] <= lim["futex_rt"]["p99_us"]
    assert lim["threads_all"] == 2 and lim["cpus"] >= 1
    assert L.bound_seconds("all_reduce", 64 << 20, 2, True, lim) > 0


def test_limit_bounds_arithmetic():
    from pycomm.bench import limits as L

    lim = _fake_limits()
    s, n = 64 << 20, 4
    # single-copy all_reduce: 2(n-1) S over the host at the all-core process_vm_readv rate
    assert L.bound_seconds("all_reduce", s, n, True, lim) == pytest.approx(2 * 3 * s / 4e9)
    # out of place: the same bytes (pycomm's own out-of-place call copies nothing more)
    assert L.bound_seconds("all_reduce", s, n, False, lim) == pytest.approx(2 * 3 * s / 4e9)
    # reduce out of place adds the bench's copy (torch's reduce is in place): n S at memcpy rate
    assert L.bound_seconds("reduce", s, n, False, lim) == pytest.approx(3 * s / 2.5e9 + 4 * s / 10e9)
    # 4 KiB pages: half the rate here, twice the bound
    assert L.bound_seconds("all_reduce", s, n, True, lim, pages="cma_4k") == pytest.approx(2 * 3 * s / 2e9)
    # reduce: the root reads alone, at the one-core rate
    assert L.bound_seconds("reduce", s, n, True, lim) == pytest.approx(3 * s / 2.5e9)
    assert L.bound_seconds("all_gather", s, n, True, lim) == pytest.approx(3 * s / 4e9)
    # small messages: never below one wake-up (half the futex round trip)
    assert L.bound_seconds("all_reduce", 8, n, True, lim) == pytest.approx(20e-6)
    # no bound without probes, over TCP, or on one rank
    assert L.bound_seconds("all_reduce", s, n, True, None) is None
    assert L.bound_seconds("all_reduce", s, n, True, lim, transport="tcp") is None
    assert L.bound_seconds("all_reduce", s, 1, True, lim) is None
    lines = L.header_lines(lim)
    assert "process_vm_readv 4 KiB pages 1 thread 1.25" in lines[0] and "huge pages 1 thread 2.50" in lines[0]
    assert "p50 40.0 us" in lines[1]


@pytest.mark.parametrize("coll", bench.COLLECTIVES)
@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", "avg"])
def test_reference_matches_simulation(coll, op):
    # The reference the check uses agrees with a direct simulation of the collective.
    n, count = 3, 7
    dn = "float"
    total = count * n if coll in ("reduce_scatter", "all_gather", "all_to_all") else count
    inp_len = count if coll in ("all_reduce", "reduce", "broadcast", "all_gather") else total
    inputs = [bench.rank_values(r, n, 0, inp_len, dn, op) for r in range(n)]
    stack = torch.stack(inputs)
    red = {"sum": stack.sum(0), "avg": stack.sum(0) / n, "prod": stack.prod(0),
           "min": stack.min(0).values, "max": stack.max(0).values}[op]
    for r in range(n):
        if coll == "all_reduce":
            want = red
        elif coll == "reduce":
            if r != 1:
                continue  # only the root's result is defined (and checked)
            want = red
        elif coll == "reduce_scatter":
            want = red[r * count:(r + 1) * count]
        elif coll == "all_gather":
            want = torch.cat(inputs)
        elif coll == "broadcast":
            want = inputs[1]
        else:
            want = torch.cat([inputs[j][r * count:(r + 1) * count] for j in range(n)])
        got = bench.reference(coll, op, dn, r, n, count, 0, want.numel(), root=1)
        assert torch.equal(got, want), (coll, op, r)
        # Chunked reference (what count_wrong does for big buffers) agrees too.
        parts = [bench.reference(coll, op, dn, r, n, count, s, min(5, want.numel() - s), root=1)
                 for s in range(0, want.numel(), 5)]
        assert torch.equal(torch.cat(parts), want)


@pytest.mark.parametrize("dtype", list(bench.DTYPES))
def test_inputs_exact_in_dtype(dtype):
    dt = getattr(torch, bench.DTYPES[dtype])
    for op in bench.OPS:
        for n in (2, 8):
            ref = bench.reference("all_reduce", op, dtype, 0, n, 1000, 0, 1000)
            v = bench.rank_values(1, n, 0, 1000, dtype, op)
            assert torch.equal(v.to(dt).to(torch.float64), v)
            if op != "avg":  # reduction results are exact too
                assert torch.equal(ref.to(dt).to(torch.float64), ref), (dtype, op, n)


def test_count_wrong_detects_errors():
    n, count = 2, 100
    good = bench.reference("all_reduce", "sum", "float", 0, n, count, 0, count).to(torch.float32)
    assert bench.count_wrong(good, "all_reduce", "sum", "float", 0, n, count) == 0
    bad = good.clone()
    bad[3] += 1
    bad[50] = float("nan")
    assert bench.count_wrong(bad, "all_reduce", "sum", "float", 0, n, count) == 2


def test_plot_and_missing_matplotlib(tmp_path, monkeypatch, capsys):
    m = {"time_us": 10.0, "algbw": 1.0, "busbw": 1.5, "wrong": 0}
    rows = [{"backend": "pycomm", "compression": None, "size": s, "oop": m, "ip": m,
             "cmp_backend": "gloo", "cmp": m, "ratio": 1.0} for s in (1024, 4096)]
    meta = {"collective": "all_reduce", "dtype": "float", "op": "sum", "nranks": 2, "torch": "x",
            "date": "d", "machine": "m"}
    import matplotlib.image

    assert bench.write_plot(str(tmp_path / "a.png"), rows, meta)
    png = (tmp_path / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (840, 540)  # 7 x 4.5 in at 120 dpi
    img = matplotlib.image.imread(str(tmp_path / "a.png"))[..., :3]
    # the two series are drawn: pixels of matplotlib's first two line colours (C0, C1)
    for rgb in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
        near = (abs(img - torch.tensor(rgb).numpy() / 255.0).max(axis=-1) < 0.05).sum()
        assert near > 50, (rgb, near)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.write_plot(str(tmp_path / "b.png"), rows, meta) is False
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_bad_flags_rejected():
    p = run_bench("all_reduce", "--backend", "gloo", "-d", "complex")
    assert p.returncode == 2 and "unknown dtype" in p.stderr
    p = run_bench("all_gather", "--backend", "gloo", "--compression", "onebit")
    assert p.returncode == 2 and "all_reduce only" in p.stderr


# ---- real runs with Gloo ----------------------------------------------------------------

def test_gloo_sweep_checked_with_files(tmp_path):
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    p = run_bench("all_reduce", "--backend", "gloo", "--ranks", "2", "-b", "8", "-e", "64K", "-f", "8",
                  "-n", "3", "-w", "1", "-c", "1", "--csv", str(csv_path), "--json", str(json_path))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert re.search(r"#\s+size\s+count\s+type\s+redop\s+root\s+time\s+algbw\s+busbw\s+#wrong"
                     r"\s+time\s+algbw\s+busbw\s+#wrong", out), out
    rows = rows_of(out)
    assert [int(r[0]) for r in rows] == [8, 64, 512, 4096, 32768]
    for r in rows:
        assert len(r) == 19
        assert int(r[1]) * 4 == int(r[0]) and r[2] == "float" and r[3] == "sum" and r[4] == "-1"
        assert r[8] == "0" and r[12] == "0"  # #wrong out-of-place and in-place
        t, algbw, busbw = float(r[5]), float(r[6]), float(r[7])
        assert t > 0 and busbw == pytest.approx(algbw, abs=0.011)  # 2 ranks: factor 1
    assert "# Out of bounds values : 0 OK" in out
    with open(csv_path) as f:
        crow = list(csv.DictReader(f))
    assert len(crow) == 5 and crow[0]["collective"] == "all_reduce" and crow[-1]["size"] == "32768"
    assert crow[-1]["oop_wrong"] == "0"
    doc = json.loads(json_path.read_text())
    assert doc["meta"]["nranks"] == 2 and doc["meta"]["backend"] == "gloo" and doc["meta"]["torch"]
    assert len(doc["rows"]) == 5 and doc["summary"]["wrong_total"] == 0
    # The bandwidths follow from size and time (2 ranks: busbw = algbw), the files agree with
    # each other, and the summary line is their mean.
    vals = []
    for row, c in zip(doc["rows"], crow):
        for m in ("oop", "ip"):
            r = row[m]
            assert r["algbw"] == pytest.approx(row["size"] / (r["time_us"] * 1e3), rel=1e-9)
            assert r["busbw"] == pytest.approx(r["algbw"], rel=1e-9)
            assert float(c[f"{m}_busbw"]) == pytest.approx(r["busbw"], rel=1e-9)
            vals.append(r["busbw"])
    assert avg_busbw(out) == pytest.approx(sum(vals) / len(vals), rel=1e-5)
    # A floor that a hung or serialised run would miss: 32 KiB in well under 1/3 s.
    assert doc["rows"][-1]["oop"]["busbw"] > 1e-4, doc["rows"][-1]


@pytest.mark.parametrize("coll,extra", [
    ("reduce_scatter", ["-o", "max", "-d", "half"]),
    ("all_gather", ["-d", "int8"]),
    ("broadcast", ["-r", "1", "-d", "bfloat16"]),
    ("all_to_all", ["-d", "int64"]),
])
def test_gloo_other_collectives_checked(coll, extra):
    p = run_bench(coll, "--backend", "gloo", "--ranks", "3", "-b", "96", "-e", "6K", "-f", "8",
                  "-n", "2", "-w", "1", *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = rows_of(p.stdout)
    assert rows, p.stdout
    for r in rows:
        assert r[8] == "0", p.stdout
        assert r[12] in ("0", "N/A"), p.stdout
        assert (r[12] == "N/A") == (coll == "all_to_all")  # no in-place all_to_all
    if coll == "broadcast":
        assert rows[0][4] == "1"


def test_gloo_int_avg_and_progress():
    # Gloo refuses integer AVG: the bench measures SUM + divide, says so, and still checks.
    p = run_bench("all_reduce", "--backend", "gloo", "--ranks", "2", "-b", "8", "-e", "1K", "-f", "4",
                  "-n", "2", "-w", "0", "-o", "avg", "-d", "int32", "--progress")
    assert p.returncode == 0, p.stdout + p.stderr
    assert all(r[8] == "0" and r[12] == "0" for r in rows_of(p.stdout))
    assert "refused AVG" in p.stdout
    assert re.search(r"\| *\d+/\d+ \[", p.stderr), p.stderr  # tqdm's "| 2/3 [00:01<..."


def test_compare_gloo_prints_ratio(tmp_path):
    p = run_bench("all_reduce", "--backend", "gloo", "--compare", "gloo", "--ranks", "2", "-b", "1K",
                  "-e", "64K", "-f", "8", "-n", "2", "-w", "1", "--json", str(tmp_path / "c.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ratio" in p.stdout
    rows = rows_of(p.stdout)
    assert len(rows) == 3
    for r in rows:
        assert len(r) == 26 and r[15] == "0"
    # The ratio column is primary busbw / compared busbw, and the summary is their geomean.
    doc = json.loads((tmp_path / "c.json").read_text())
    ratios = []
    for row in doc["rows"]:
        assert row["ratio"] == pytest.approx(row["oop"]["busbw"] / row["cmp"]["busbw"], rel=1e-9)
        ratios.append(row["ratio"])
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    m = re.search(r"# busbw ratio gloo/gloo \(out-of-place\): geomean ([0-9.]+)x", p.stdout)
    assert m and float(m.group(1)) == pytest.approx(geo, abs=0.006), p.stdout
    assert doc["summary"]["avg_busbw_compare"] == pytest.approx(
        sum(r["cmp"]["busbw"] for r in doc["rows"]) / len(doc["rows"]), rel=1e-9)


def test_runs_as_torchrun_rank():
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(bench.free_port()), "-m", "pycomm.bench", "all_gather", "--backend", "gloo",
                        "-b", "1K", "-e", "1K", "-n", "2", "-w", "0"],
                       capture_output=True, text=True, timeout=90, cwd=ROOT,
                       env=subprocess_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = rows_of(p.stdout)
    assert len(rows) == 1 and rows[0][8] == "0"  # printed once (rank 0), checked


def test_compression_skips_or_runs():
    backend = "gloo" if _PYCOMM_WHY else "pycomm"
    p = run_bench("all_reduce", "--backend", backend, "--compression", "fp16", "--ranks", "2", "-b", "4K",
                  "-e", "4K", "-n", "2", "-w", "1", "--json", os.devnull)
    assert p.returncode == 0, p.stdout + p.stderr
    if "# skipped" in p.stdout:
        assert "pycomm.compression" in p.stdout
        return
    rows = rows_of(p.stdout)
    assert len(rows) == 1 and rows[0][3] == "avg" and rows[0][8] == "N/A"


# ---- the pycomm backend --------------------------------------------------------------------

def test_pycomm_backend_unavailable_is_clear():
    if not _PYCOMM_WHY:
        pytest.skip("pycomm backend is registered here; nothing to report")
    p = run_bench("all_reduce", "--ranks", "2", "-b", "8", "-e", "8")
    assert p.returncode == 3 and "backend 'pycomm' unavailable" in p.stderr


@needs_pycomm
@pytest.mark.parametrize("coll", bench.COLLECTIVES)
def test_pycomm_backend_checked(coll):
    p = run_bench(coll, "--backend", "pycomm", "--ranks", "3", "-b", "96", "-e", "96K", "-f", "32",
                  "-n", "2", "-w", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = rows_of(p.stdout)
    assert rows and all(r[8] == "0" and r[12] in ("0", "N/A") for r in rows), p.stdout


@needs_pycomm
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_pycomm_compare_gloo(transport):
    p = run_bench("all_reduce", "--backend", "pycomm", "--compare", "gloo", "--transport", transport,
                  "--ranks", "2", "-b", "4K", "-e", "256K", "-f", "8", "-n", "3", "-w", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = rows_of(p.stdout)
    assert rows and all(len(r) == 26 and r[8] == "0" and r[15] == "0" for r in rows), p.stdout
    assert "transport " + transport in p.stdout
    assert "# busbw ratio pycomm/gloo" in p.stdout


# ---- emulated cluster -----------------------------------------------------------------------

def _netns_ok():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return "needs root and iproute2"
    probe = f"pcm{os.getpid()}c998h0"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode:
        return "cannot create network namespaces: " + p.stderr.strip()
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


_NETNS_WHY = _netns_ok()


@pytest.mark.skipif(bool(_NETNS_WHY), reason=_NETNS_WHY or "ok")
@pytest.mark.parametrize("backend", ["gloo", pytest.param("pycomm", marks=needs_pycomm)])
def test_bench_on_emulated_cluster(backend, tmp_path):
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    jp = tmp_path / "c.json"
    p = run_bench("all_reduce", "--backend", backend, "--hosts", "2", "--ranks", "2", "--link", "1gbit",
                  "--latency", "100us", "-b", "1K", "-e", "1M", "-f", "32", "-n", "3", "-w", "1",
                  "--json", str(jp), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "# emulated cluster: 2 hosts, link 1gbit" in p.stdout
    rows = rows_of(p.stdout)
    assert len(rows) == 3 and all(r[8] == "0" and r[12] == "0" for r in rows), p.stdout
    # One 1 Gbit/s link per host: a 1 MiB all_reduce between two hosts can't beat 125 MB/s busbw
    # by much (each rank sends and receives half the array twice over its own link), and on
    # a working link it does not fall below a tenth of it.
    assert 0.0125 < float(rows[-1][7]) < 0.2, p.stdout
    meta = json.loads(jp.read_text())["meta"]
    assert meta["hosts"] == 2 and meta["netem"]["addrs"]
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert after <= before | set(), f"namespaces left behind: {after - before}"


# ---- packaging: an installed pycomm-bench needs nothing from the source tree -------------

_CLI_IMPORTS = r"""
import argparse, json, os, sys
root = sys.argv[1]
# Only the package: neither the source tree's benchmarks/ nor its scripts are importable.
sys.path[:] = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(root, "benchmarks"))]
import pycomm.bench
from pycomm.bench import launch
from pycomm.evaluation import cli, runner
# --hosts loads the emulated cluster (then refuses: fewer ranks than hosts) ...
args = argparse.Namespace(hosts=2, ranks=1, link="1gbit", latency="0", transport=None, thp=1, launch_timeout=None)
try:
    launch.launch_cluster(args, [])
except SystemExit as e:
    assert "every host needs a rank" in str(e), e
# ... and so does the evaluation's link check.
runner.link_problem("1gbit")
files = {m: os.path.abspath(getattr(mod, "__file__", None) or "") for m, mod in list(sys.modules.items())}
# The source tree's own modules (a virtual environment may live inside the tree: CI's does).
venv = os.path.abspath(sys.prefix) + os.sep
print(json.dumps({m: f for m, f in files.items() if f.startswith(root + os.sep) and not f.startswith(venv)}))
"""


def test_cli_imports_only_modules_inside_the_package(tmp_path):
    """Everything pycomm-bench (also --hosts and train) imports from this tree lies inside
    the packages setup.py installs, so a non-editable install runs outside the tree."""
    p = subprocess.run([PY, "-c", _CLI_IMPORTS, ROOT], capture_output=True, text=True, cwd=tmp_path,
                       env=subprocess_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert "pycomm.bench.netem" in loaded and "pycomm.evaluation.runner" in loaded
    # setup.py's packages, with its own include patterns.
    from setuptools import find_packages

    m = re.search(r"packages=find_packages\(include=(\[[^\]]*\])\)", open(os.path.join(ROOT, "setup.py")).read())
    assert m, "setup.py no longer says packages=find_packages(include=[...])"
    packages = set(find_packages(where=ROOT, include=ast.literal_eval(m.group(1))))
    assert {"pycomm", "pycomm.bench", "pycomm.compression", "pycomm.evaluation"} <= packages
    pkg_root = os.path.join(ROOT, "pycomm") + os.sep
    for name, path in loaded.items():
        assert path.startswith(pkg_root), f"{name} is loaded from {path}, outside the installed package"
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        assert package in packages, f"{name}: its package {package} is not installed by setup.py"


@pytest.mark.skipif(bool(_NETNS_WHY), reason=_NETNS_WHY or "ok")
@needs_pycomm
def test_bench_ranks_per_host_compares_hierarchical_flat_and_gloo(tmp_path):
    jp = tmp_path / "t.json"
    p = run_bench("all_reduce", "--hosts", "2", "--ranks-per-host", "2", "--link", "1gbit", "-b", "4M", "-e", "4M",
                  "-n", "2", "-w", "1", "--json", str(jp), timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["variant"]: r for r in json.loads(jp.read_text())["rows"]}
    assert set(rows) == {"pycomm", "pycomm-flat", "gloo"}, rows
    assert all(r["wrong"] == 0 for r in rows.values()), rows
    assert set(rows["pycomm"]["algos"]) == {"hier"} and set(rows["pycomm-flat"]["algos"]) == {"ring"}, rows
    size = rows["pycomm"]["size"]
    limit = 2 * (2 - 1) / 2 * size
    # TCP payload each host sent: the hierarchical limit exactly (plus frame headers),
    # where the flat ring's 2(n-1)/n * S crosses a host link 1.5 times that.
    for pay in rows["pycomm"]["payload_per_host"]:
        assert limit <= pay < 1.01 * limit, rows["pycomm"]
    for pay in rows["pycomm-flat"]["payload_per_host"]:
        assert pay > 1.4 * limit, rows["pycomm-flat"]
    # The interface counters see the same (headers and ACKs add a few percent).
    assert max(rows["pycomm"]["tx_per_host"]) < 1.1 * limit < 1.1 * max(rows["pycomm-flat"]["tx_per_host"]), rows
    # The shaper charges every wire packet's headers: its bytes exceed the payload by
    # ~4.6 % (66 header bytes per 1448-byte segment, plus ACKs), and the time they need at
    # the link rate bounds every variant's call from below.
    for r in rows.values():
        pay = max(rows["pycomm"]["payload_per_host"]) * (1.5 if r["variant"] != "pycomm" else 1.0)
        assert r["shaped_per_host"] and 1.02 * pay < min(r["shaped_per_host"]) <= max(r["shaped_per_host"]) < 1.08 * pay, r
        # (less the shaper's burst, 1 ms of traffic: the bucket is full when the timed
        # calls start, so their first millisecond of frames goes at once.)
        assert max(r["shaped_per_host"]) * 8 / 1e9 - 1e-3 < r["time_s"], r
    assert "frames ms" in p.stdout and "speed-up of pycomm if every variant ran at that limit" in p.stdout, p.stdout


@pytest.mark.skipif(bool(_NETNS_WHY), reason=_NETNS_WHY or "ok")
@needs_pycomm
@pytest.mark.parametrize("coll", ["reduce_scatter", "all_gather"])
def test_bench_uneven_hosts_reduce_scatter_all_gather(tmp_path, coll):
    """Hosts of 3 and 2 ranks: the hierarchical form sends (n - L)/n * S over each host's
    link (reduce_scatter: exactly; all_gather: at most (n - L_min)/n * S), the flat ring
    (n - 1)/n * S over the busiest."""
    jp = tmp_path / "u.json"
    p = run_bench(coll, "--hosts", "2", "--ranks-per-host", "3,2", "--link", "1gbit", "-b", "2M", "-e", "2M",
                  "-n", "2", "-w", "1", "--json", str(jp), timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(jp.read_text())
    assert data["meta"]["ranks_per_host"] == [3, 2] and data["meta"]["nranks"] == 5
    rows = {r["variant"]: r for r in data["rows"]}
    assert all(r["wrong"] == 0 for r in rows.values()), rows
    assert set(rows["pycomm"]["algos"]) == {"hier"} and set(rows["pycomm-flat"]["algos"]) == {"ring"}, rows
    size = rows["pycomm"]["size"]
    hier, flat = rows["pycomm"]["payload_per_host"], rows["pycomm-flat"]["payload_per_host"]
    if coll == "reduce_scatter":
        assert hier == pytest.approx([2 / 5 * size, 3 / 5 * size], rel=1e-6), hier
    assert max(hier) == pytest.approx(3 / 5 * size, rel=1e-6), hier
    assert max(flat) == pytest.approx(4 / 5 * size, rel=1e-6), flat
    assert "limit = (n-L_min)/n * S" in p.stdout


def test_bench_ranks_per_host_layout_checked():
    p = run_bench("reduce_scatter", "--hosts", "3", "--ranks-per-host", "3,2", timeout=60)
    assert p.returncode == 2 and "names 2 hosts, --hosts is 3" in p.stderr, p.stderr
    p = run_bench("reduce_scatter", "--hosts", "2", "--ranks-per-host", "3,x", timeout=60)
    assert p.returncode == 2 and "ranks per host" in p.stderr, p.stderr
    p = run_bench("reduce_scatter", "--hosts", "2", "--ranks-per-host", "3,0", timeout=60)
    assert p.returncode == 2 and "must be >= 1" in p.stderr, p.stderr


@pytest.mark.skipif(bool(_NETNS_WHY), reason=_NETNS_WHY or "ok")
@needs_pycomm
@pytest.mark.parametrize("coll,fast,flat,root_sends", [("broadcast", "tree", "chain", (2, 1)),
                                                     ("all_gather", "bruck", "ring", (0.75, 0.75))])
def test_bench_isolated_small_collectives_log_rounds_vs_flat(tmp_path, coll, fast, flat, root_sends):
    """4 hosts x 1 rank, --isolated: a small broadcast runs the binomial tree on the
    default group and the chain with PYCOMM_ALGO=ring (the tree's root sends log2(4) = 2
    copies, the chain's 1); a small all_gather runs Bruck's rounds against the ring (each
    rank sends the other 3/4 of the 4 KiB result either way); all correct, and the metadata
    says calls were isolated."""
    jp = tmp_path / "t.json"
    p = run_bench(coll, "--hosts", "4", "--ranks-per-host", "1", "--link", "1gbit", "-b", "4K", "-e", "4K",
                  "-n", "3", "-w", "1", "--isolated", "--json", str(jp), timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(jp.read_text())
    assert data["meta"]["isolated"] is True, data["meta"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert all(r["wrong"] == 0 for r in rows.values()), rows
    assert rows["pycomm"]["algos"] == {fast: 5} and rows["pycomm-flat"]["algos"] == {flat: 5}, rows
    for label, k in zip(("pycomm", "pycomm-flat"), root_sends):
        assert k * 4096 <= max(rows[label]["payload_per_host"]) < k * 4096 + 1024, rows[label]
    assert "--isolated" in p.stdout


@pytest.mark.skipif(bool(_NETNS_WHY), reason=_NETNS_WHY or "ok")
@needs_pycomm
def test_bench_ranks_per_host_cross_host_onebit(tmp_path):
    """--compression onebit adds the cross-host-only variant: its host links carry the
    codec payload pycomm planned (about 1/32 of the hierarchical limit), and its result
    is finite with a bounded error."""
    jp = tmp_path / "t.json"
    p = run_bench("all_reduce", "--hosts", "2", "--ranks-per-host", "2", "--link", "1gbit", "-b", "4M", "-e", "4M",
                  "-n", "2", "-w", "1", "--compression", "onebit", "--json", str(jp), timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["variant"]: r for r in json.loads(jp.read_text())["rows"]}
    assert set(rows) == {"pycomm", "pycomm-onebit", "pycomm-flat", "gloo"}, rows
    r = rows["pycomm-onebit"]
    assert r["wrong"] == 0 and 0 < r["rel_err"] < 1.0, r
    size = r["size"]
    for pay, lim in zip(r["payload_per_host"], r["limit_per_host"]):
        assert lim <= pay < 1.02 * lim + 4096, r
        assert lim < size / 25, r  # ~1/32 of the 2(H-1)/H * S = S uncompressed limit
    assert max(r["tx_per_host"]) < 0.1 * size, r
    assert "pycomm-onebit (cross-host only)" in p.stdout


def test_bench_ranks_per_host_rejects_codecs_without_cross_host_path():
    p = run_bench("all_reduce", "--hosts", "2", "--ranks-per-host", "2", "--compression", "topk", timeout=60)
    assert p.returncode == 2 and "onebit, fp16, bf16 or qsgd" in p.stderr, p.stdout + p.stderr


# ---- benchmarks/bench_data_parallel.py flags (no ranks started) -------------------------


def _dp_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_data_parallel",
                                                  os.path.join(ROOT, "benchmarks", "bench_data_parallel.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, message", [
    (["--ranks-per-host", "2"], "--ranks-per-host needs --hosts"),
    (["--hosts", "2", "--ranks-per-host", "0"], "--ranks-per-host must be >= 1 (got 0)"),
    (["--hosts", "2", "--ranks-per-host", "2", "--ranks", "3"],
     "--ranks 3 contradicts --hosts 2 x --ranks-per-host 2 = 4"),
    (["--hosts", "4", "--ranks", "2"], "--ranks 2 < --hosts 4"),
    (["--hosts", "-1"], "--hosts must be >= 0"),
    (["--ranks", "0"], "--ranks must be >= 1"),
    (["--modes", "dp,dp_bogus"], "unknown mode(s) dp_bogus"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_dp_bench_rejects_bad_flags(argv, message, capsys):
    mod = _dp_bench()
    with pytest.raises(SystemExit) as e:
        mod.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_dp_bench_ranks_per_host_layout():
    mod = _dp_bench()
    a = mod.parse_args(["--hosts", "2", "--ranks-per-host", "3", "--modes", "dp,dp_flat"])
    assert (a.ranks, a.hosts, a.ranks_per_host) == (6, 2, 3)
    assert mod.parse_args(["--hosts", "2", "--ranks-per-host", "2", "--ranks", "4"]).ranks == 4
    assert mod.parse_args([]).ranks == 4 and mod.parse_args(["--hosts", "4"]).ranks == 4
    # dp_flat runs DataParallel on a group built with the flat ring forced.
    assert mod.MODE_ENV["dp_flat"] == {"PYCOMM_ALGO": "ring"} and "dp_flat" in mod.ALL_MODES
