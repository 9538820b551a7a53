"""The report of ``pycomm-bench train`` (pycomm.evaluation.report), from a synthetic
results.json: the numbers it prints follow from the raw cells, nothing that did not run is
dropped, the HTML is self-contained, and every plot really renders in a browser.

How "every plot renders" is checked (:func:`assert_plots_render`), robustly and without
any script in the report itself:

1. each ``<img class="plot">`` has a ``data:image/png;base64,`` source that decodes, with
   strict base64, to a PNG that Pillow decodes completely;
2. Debian's headless Chromium loads a copy of the page with a probe script appended; on
   the ``load`` event (which waits for every image) the probe writes, per plot, whether
   the image is complete, its natural size and its box on the page into the DOM, which
   ``--dump-dom`` returns: each plot must have decoded (natural size = the PNG's) and be
   laid out with a non-empty box;
3. Chromium then screenshots the whole page at the same width, and the pixels inside each
   plot's box must match the PNG (mean absolute difference per channel below
   ``PIXEL_TOLERANCE``): the browser painted the whole image where the layout put it,
   which a partially decoded, hidden or covered image fails.

test_a_broken_or_hidden_plot_fails_the_browser_check proves the check can fail: a
corrupted base64 image fails step 1 and a plot hidden by CSS fails step 3.
"""
from __future__ import annotations

import base64
import binascii
import html
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

import numpy as np
import pytest

from pycomm.evaluation.report import main, write_report

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is absent (Debian's chromium; .ci/setup installs it)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]
WIDTH = 1400
MAX_HEIGHT = 16000   # taller pages are screenshot down to here; plots below are checked by steps 1-2
PIXEL_TOLERANCE = 8.0

# ---------------------------------------------------------------------------------------------
# A realistic results.json: two models, single/dp/tp/ddp-gloo at 1, 2, 4 ranks over shm,
# two repeats each with learning curves; ddp-gloo x4 of charlm fails once, tp x4 of mlp is
# not applicable. mlp reaches its accuracy target at epoch 4, charlm never reaches its loss.

SAMPLES_PER_EPOCH = 6400
EPOCHS = 5
MODELS = {
    "mlp": {"params": 200_000, "metric": "accuracy", "target": 0.9, "higher": True, "base": 1000.0,
            "curve": [0.6, 0.8, 0.88, 0.91, 0.93], "description": "2-layer MLP on synthetic blobs"},
    "charlm": {"params": 1_000_000, "metric": "loss", "target": 1.5, "higher": False, "base": 300.0,
               "curve": [3.0, 2.2, 1.8, 1.6, 1.55], "description": "character LSTM language model"},
}
SCALING = {"single": 1.0, "dp": 0.9, "tp": 0.6, "ddp-gloo": 0.8}  # efficiency of each strategy
FAILED_REASON = "rank 1: RuntimeError: gloo connectFullMesh: connection reset by peer"
NA_REASON = "tp: 4 ranks do not divide the 6 attention heads"


def _cell(model: str, strategy: str, world: int, repeat: int) -> Dict[str, Any]:
    m = MODELS[model]
    thr = m["base"] * world * SCALING[strategy] * (1.0 + 0.03 * repeat - 0.011 * world)
    epoch_s = SAMPLES_PER_EPOCH / thr
    curve = [{"epoch": e + 1, "wall_s": epoch_s * (e + 1), "metric": v + (0.002 * repeat if m["higher"] else 0),
              "train_loss": 1.0 / (e + 1)} for e, v in enumerate(m["curve"])]
    hit = [p for p in curve if (p["metric"] >= m["target"]) == m["higher"] or p["metric"] == m["target"]]
    p = m["params"]
    comm = None if world == 1 else 0.3 - 0.1 * SCALING[strategy]
    return {
        "model": model, "strategy": strategy, "world": world, "link": "shm", "repeat": repeat, "seed": repeat,
        "status": "ok", "reason": None, "backend": "gloo" if strategy == "ddp-gloo" else "pycomm",
        "layout": f"{strategy.split('-')[0]}={world}", "params": p, "global_batch": 64, "epochs": EPOCHS,
        "steps": EPOCHS * 100, "samples": EPOCHS * SAMPLES_PER_EPOCH, "train_seconds": EPOCHS * epoch_s,
        "samples_per_s": thr, "step_seconds": {"p50": 64 / thr, "p99": 1.5 * 64 / thr, "mean": 1.1 * 64 / thr},
        "metric": m["metric"], "higher_is_better": m["higher"], "target": m["target"],
        "final_metric": curve[-1]["metric"], "time_to_target_s": hit[0]["wall_s"] if hit else None,
        "epochs_to_target": float(hit[0]["epoch"]) if hit else None, "curve": curve,
        "loss_step_var": 1e-3 / world, "comm_seconds_per_step": None if comm is None else comm * 64 / thr,
        "exposed_comm_seconds_per_step": None if comm is None else comm * 0.4 * 64 / thr,
        "comm_share": comm, "exposed_share": None if comm is None else comm * 0.4,
        "bytes_sent_per_step": None if world == 1 or strategy == "ddp-gloo" else 2.0 * (world - 1) / world * 4 * p,
        "link_bytes_per_step": None,
        "memory": {"params": 4 * p // (world if strategy == "tp" else 1), "grads": 4 * p, "optimizer": 8 * p,
                   "model_state": 16 * p, "activations": 3 << 20, "peak_rss": 400 << 20},
        "duration_s": EPOCHS * epoch_s + 2.0, "log_tail": None,
    }


def _not_run(model: str, strategy: str, world: int, repeat: int, status: str, reason: str) -> Dict[str, Any]:
    return {"model": model, "strategy": strategy, "world": world, "link": "shm", "repeat": repeat,
            "seed": repeat, "status": status, "reason": reason, "log_tail": None}


def synthetic_results() -> Dict[str, Any]:
    cells = []
    for model in MODELS:
        for world in (1, 2, 4):
            for strategy in SCALING:
                if (strategy == "single") != (world == 1):
                    continue
                for repeat in (0, 1):
                    if (model, strategy, world) == ("mlp", "tp", 4):
                        cells.append(_not_run(model, strategy, world, repeat, "not_applicable", NA_REASON))
                    elif (model, strategy, world, repeat) == ("charlm", "ddp-gloo", 4, 1):
                        cells.append(_not_run(model, strategy, world, repeat, "failed", FAILED_REASON))
                    else:
                        cells.append(_cell(model, strategy, world, repeat))
    meta = {"machine": "testhost", "cpu": "Synthetic CPU @ 3 GHz", "cores": 8, "torch": "2.14.1",
            "pycomm": "0.1.0", "date": "2026-01-02T03:04:05Z", "loadavg_start": [0.5, 0.4, 0.3],
            "loadavg_end": [1.5, 1.0, 0.6], "command": "pycomm-bench train --models mlp,charlm --repeats 2",
            "quick": False, "complete": True,
            "models": {k: {"params": v["params"], "metric": v["metric"], "target": v["target"],
                           "description": v["description"]} for k, v in MODELS.items()},
            "links": {"shm": "ranks on one host (shared memory)"}}
    matrix = {"models": list(MODELS), "strategies": list(SCALING), "worlds": [1, 2, 4], "links": ["shm"],
              "repeats": 2}
    return {"meta": meta, "matrix": matrix, "cells": cells}


# ---------------------------------------------------------------------------------------------
# Reading the rendered documents back

def _section(md: str, title: str) -> str:
    """The markdown from the ``## title`` heading to the next ``## `` heading."""
    start = md.index(f"\n## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def _table(section: str) -> List[Dict[str, str]]:
    """The first markdown table of a section as dicts keyed by its header."""
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split(" | ")]  # noqa: E731
    header = split(lines[0])
    return [dict(zip(header, split(ln))) for ln in lines[2:]]


def _plots(page: str) -> Dict[str, str]:
    """id -> src of every ``<img class="plot">`` of a page."""
    out = {}
    for tag in re.findall(r"<img\b[^>]*>", page):
        if re.search(r'\bclass="plot"', tag):
            out[html.unescape(re.search(r'\bid="([^"]*)"', tag).group(1))] = \
                html.unescape(re.search(r'\bsrc="([^"]*)"', tag).group(1))
    return out


def _render(tmp_path, results: Dict[str, Any]) -> Dict[str, str]:
    paths = write_report(results, str(tmp_path))
    return {k: open(paths[k], encoding="utf-8").read() for k in ("md", "html")}


# ---------------------------------------------------------------------------------------------
# The browser check (also used by test_evaluation.py on a real run's report)

PROBE = """<script>
window.addEventListener("load", () => {
  const plots = Array.from(document.querySelectorAll("img.plot")).map(img => {
    const r = img.getBoundingClientRect();
    return {id: img.id, complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
            box: [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]};
  });
  const pre = document.createElement("pre");
  pre.id = "probe-result";
  pre.textContent = JSON.stringify({plots: plots, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def _chromium(args: List[str], timeout: float = 25.0) -> str:
    profile = tempfile.mkdtemp(prefix="pycomm-chromium-")
    try:
        p = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                           capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert p.returncode == 0, f"chromium {' '.join(args)} -> {p.returncode}\n{p.stderr[-2000:]}"
    return p.stdout


def _decode_png(plot_id: str, src: str):
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), f"{plot_id}: not an inline PNG: {src[:60]!r}"
    try:
        data = base64.b64decode(src[len(prefix):], validate=True)
        img = Image.open(io.BytesIO(data))
        img.load()
    except (binascii.Error, OSError, ValueError) as e:
        raise AssertionError(f"{plot_id}: the inline PNG does not decode: {e}") from e
    return img.convert("RGB")


def assert_plots_render(html_path: str) -> List[Dict[str, Any]]:
    """Asserts that every ``<img class="plot">`` of the page at ``html_path`` (at least
    one) decodes and is painted by Chromium (see the module docstring); returns what the
    probe measured per plot."""
    from PIL import Image

    page = open(html_path, encoding="utf-8").read()
    plots = _plots(page)
    assert plots, f"{html_path} has no <img class=\"plot\">"
    pngs = {pid: _decode_png(pid, src) for pid, src in plots.items()}

    work = tempfile.mkdtemp(prefix="pycomm-report-probe-")
    try:
        probe = os.path.join(work, "probe.html")
        with open(probe, "w", encoding="utf-8") as f:
            f.write(page.replace("</body>", PROBE + "</body>") if "</body>" in page else page + PROBE)
        url = "file://" + probe
        dom = _chromium([f"--window-size={WIDTH},1000", "--dump-dom", url])
        m = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
        assert m, "the probe did not report (no load event?)"
        seen = json.loads(html.unescape(m.group(1)))
        measured = {p["id"]: p for p in seen["plots"]}
        assert measured.keys() == pngs.keys(), (sorted(measured), sorted(pngs))
        for pid, p in measured.items():
            assert p["complete"] and p["natural"] == list(pngs[pid].size), f"{pid} did not decode in Chromium: {p}"
            assert p["box"][2] > 0 and p["box"][3] > 0, f"{pid} has an empty box: {p}"

        height = min(int(seen["height"]), MAX_HEIGHT)
        shot = os.path.join(work, "shot.png")
        _chromium([f"--window-size={WIDTH},{height}", f"--screenshot={shot}", url])
        screen = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert screen.shape[:2] == (height, WIDTH), screen.shape
    for pid, p in measured.items():
        x, y, w, h = (int(round(v)) for v in p["box"])
        if y + h > height:
            continue  # below the screenshot (pages taller than MAX_HEIGHT)
        want = np.asarray(pngs[pid].resize((w, h)) if pngs[pid].size != (w, h) else pngs[pid], dtype=np.float32)
        got = screen[y:y + h, x:x + w]
        diff = float(np.abs(got - want).mean())
        assert diff < PIXEL_TOLERANCE, f"{pid}: Chromium painted something else in its box (mean |diff| {diff:.1f})"
        assert got.std() > 10, f"{pid}: a blank region"
    return list(measured.values())


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = synthetic_results()
    doc = _render(out, results)
    assert results == synthetic_results()  # rendering leaves its input untouched
    return out, results, doc


def test_recommendation_comes_first_and_says_who_by_how_much_and_why(report):
    _, results, doc = report
    md = doc["md"]
    assert md.index("## Recommendation") < md.index("## Model mlp") < md.index("## What did not run")
    rec = _section(md, "Recommendation")
    # mlp at 4 ranks: dp reaches 90 % first; the runner-up is ddp-gloo (tp x4 did not run).
    ttt = {s: statistics.median(c["time_to_target_s"] for c in results["cells"]
                                if (c["model"], c["strategy"], c["world"], c["status"]) == ("mlp", s, 4, "ok"))
           for s in ("dp", "ddp-gloo")}
    line = next(ln for ln in rec.splitlines() if "mlp over shm" in ln)
    assert "4 ranks: dp** reached the target (accuracy ≥ 0.9) first" in line
    assert f"{ttt['ddp-gloo'] / ttt['dp']:.2f}× sooner than the runner-up ddp-gloo" in line
    assert "Why: communication 21% of its step (8% exposed)" in line
    # charlm never reaches its loss target: said plainly, then the fastest by throughput.
    line = next(ln for ln in rec.splitlines() if "charlm over shm" in ln)
    assert "no strategy reached the target** (loss ≤ 1.5)" in line
    assert "Highest throughput: **dp**" in line


def test_headline_numbers_follow_from_the_raw_cells(report):
    _, results, doc = report
    rows = {(r["strategy"], r["ranks"]): r for r in _table(_section(doc["md"], "Model mlp"))}
    thr = lambda s, n: [c["samples_per_s"] for c in results["cells"]  # noqa: E731
                        if (c["model"], c["strategy"], c["world"], c["status"]) == ("mlp", s, n, "ok")]
    speedup = statistics.median(thr("dp", 4)) / statistics.median(thr("single", 1))
    dp4 = rows[("dp", "4")]
    assert dp4["efficiency"] == f"{speedup / 4:.2f}"
    assert dp4["speedup"] == f"{speedup:.2f}×"
    lo, hi = min(thr("dp", 4)), max(thr("dp", 4))
    assert dp4["throughput samples/s median [min–max]"] == \
        f"{statistics.median(thr('dp', 4)):.1f} [{lo:.1f}–{hi:.1f}]"
    assert dp4["runs ok"] == "2/2"
    assert dp4["time to target median (reached k/n)"].endswith("(2/2)")
    assert dp4["comm / exposed share"] == "21.0% / 8.4%"
    assert dp4["model state MiB"] == f"{16 * 200_000 / 2**20:.1f}" and dp4["peak RSS MiB"] == "400.0"
    assert rows[("single", "1")]["speedup"] == "1.00×"
    assert rows[("single", "1")]["comm / exposed share"] == "n/a / n/a"
    assert rows[("ddp-gloo", "2")]["bytes sent /rank/step (link)"] == "n/a"
    assert rows[("tp", "4")]["runs ok"] == "0/2 (not_applicable)"
    charlm = {(r["strategy"], r["ranks"]): r for r in _table(_section(doc["md"], "Model charlm"))}
    assert charlm[("ddp-gloo", "4")]["runs ok"] == "1/2"
    assert charlm[("dp", "4")]["time to target median (reached k/n)"] == "not reached (0/2)"
    assert "final loss mean ± std" in charlm[("dp", "4")]


def test_what_did_not_run_lists_every_cell_with_its_reason(report):
    _, results, doc = report
    listed = _table(_section(doc["md"], "What did not run"))
    want = [(c["model"], c["strategy"], str(c["world"]), str(c["repeat"]), c["status"], c["reason"])
            for c in results["cells"] if c["status"] != "ok"]
    assert len(want) == 3
    assert [(r["model"], r["strategy"], r["ranks"], r["repeat"], r["status"], r["reason"]) for r in listed] == want
    for reason in (FAILED_REASON, NA_REASON):
        assert html.escape(reason) in doc["html"]


def test_stamp_definitions_and_plots_are_in_both_documents(report):
    out, results, doc = report
    for text in ("testhost", "Synthetic CPU @ 3 GHz", "2.14.1", "2026-01-02T03:04:05Z", "0.50 / 0.40 / 0.30",
                 "1.50 / 1.00 / 0.60", results["meta"]["command"], "loss step variance"):
        assert text in doc["md"] and html.escape(text) in doc["html"], text
    assert "Incomplete run" not in doc["md"]
    kinds = ("throughput", "efficiency", "curve", "comm", "memory")
    ids = {f"plot-{m}-{k}" for m in MODELS for k in kinds}
    assert set(_plots(doc["html"])) == ids
    for pid in ids:
        assert os.path.getsize(os.path.join(out, "plots", f"{pid}.png")) > 1000
        assert f"(plots/{pid}.png)" in doc["md"]
    assert re.findall(r'<img class="plot" id="plot-mlp-curve" alt="([^"]+)"', doc["html"])[0].startswith("mlp: ")


def test_html_is_self_contained(report):
    _, _, doc = report
    page = doc["html"]
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page, re.I)
    for attr in re.findall(r'\b(?:src|href)="([^"]*)"', page):
        assert attr.startswith("data:image/png;base64,"), attr[:80]


def test_an_interrupted_run_says_so(tmp_path):
    results = synthetic_results()
    results["meta"]["complete"] = False
    results["meta"]["loadavg_end"] = None
    results["cells"] = results["cells"][:5]
    doc = _render(tmp_path, results)
    assert "**Incomplete run**" in doc["md"] and "only the 5 cells measured so far" in doc["md"]
    assert '<p class="warning">' in doc["html"] and "Incomplete run" in doc["html"]
    assert "- **load average at end**: n/a" in doc["md"]


def test_no_ok_cell_still_renders(tmp_path):
    results = synthetic_results()
    results["cells"] = [_not_run(c["model"], c["strategy"], c["world"], c["repeat"], "failed", f"boom {i}")
                        for i, c in enumerate(results["cells"])]
    doc = _render(tmp_path, results)
    assert "no recommendation — no run with more than one rank succeeded" in _section(doc["md"], "Recommendation")
    assert len(_table(_section(doc["md"], "What did not run"))) == len(results["cells"])
    assert "Throughput vs ranks: no plot — no run measured a throughput." in doc["md"]
    assert not _plots(doc["html"])
    assert not os.path.exists(os.path.join(tmp_path, "plots"))


def test_empty_and_null_fields_say_na(tmp_path):
    results = synthetic_results()
    results["meta"] = {"complete": True}
    results["matrix"] = {}
    optional = ("step_seconds", "final_metric", "time_to_target_s", "epochs_to_target", "loss_step_var",
                "comm_seconds_per_step", "exposed_comm_seconds_per_step", "comm_share", "exposed_share",
                "bytes_sent_per_step", "link_bytes_per_step", "samples_per_s", "target")
    for c in results["cells"]:
        if c["model"] == "mlp" and c["status"] == "ok":
            c.update({k: None for k in optional}, curve=None, memory=None)
    doc = _render(tmp_path, results)
    row = _table(_section(doc["md"], "Model mlp"))[0]
    assert row["strategy"] == "single" and row["throughput samples/s median [min–max]"] == "n/a"
    assert row["final accuracy mean ± std"] == "n/a" and row["model state MiB"] == "n/a"
    assert "- **machine**: n/a" in doc["md"]
    assert "mlp over shm, 4 ranks: no strategy reached the target** (target n/a)" in doc["md"]
    for kind in ("Throughput vs ranks", "Efficiency vs ranks", "Learning curves", "Communication share",
                 "Memory per rank"):
        assert f"{kind}: no plot" in _section(doc["md"], "Model mlp"), kind
    assert set(_plots(doc["html"])) == {f"plot-charlm-{k}" for k in
                                        ("throughput", "efficiency", "curve", "comm", "memory")}
    assert write_report({}, str(tmp_path / "empty"))  # not even cells: still a report


def test_main_rerenders_from_results_json(tmp_path, capsys):
    results = synthetic_results()
    results["cells"] = [c for c in results["cells"] if c["status"] != "ok"]  # no plots: quick
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert main([str(path), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").stat().st_size > 0
    assert main([str(path)]) == 0
    assert NA_REASON in (tmp_path / "report.md").read_text()
    assert "report.html" in capsys.readouterr().out


@needs_chromium
def test_every_plot_renders_in_chromium(report):
    out, _, doc = report
    measured = assert_plots_render(os.path.join(out, "report.html"))
    assert len(measured) == len(_plots(doc["html"])) == 10


@needs_chromium
def test_a_broken_or_hidden_plot_fails_the_browser_check(report, tmp_path, monkeypatch):
    out, _, doc = report
    page = doc["html"]
    plots = _plots(page)
    src = plots["plot-mlp-comm"]
    cut = len(src) // 2
    # Characters that are not base64: step 1 refuses the source.
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(src, src[:cut] + "!!" + src[cut + 2:]), encoding="utf-8")
    with pytest.raises(AssertionError, match="plot-mlp-comm: the inline PNG does not decode"):
        assert_plots_render(str(broken))
    # Valid base64 over corrupted pixel data, which Chromium decodes only in part (its
    # natural size comes from the intact header); with step 1 told the intact PNG, the
    # browser steps alone must catch it.
    corrupted = tmp_path / "corrupted.html"
    corrupted.write_text(page.replace(src, src[:cut] + "A" * 40 + src[cut + 40:]), encoding="utf-8")
    decode = _decode_png
    monkeypatch.setattr(sys.modules[__name__], "_decode_png", lambda pid, _src: decode(pid, plots[pid]))
    with pytest.raises(AssertionError, match="plot-mlp-comm: Chromium painted something else"):
        assert_plots_render(str(corrupted))
    # An intact image that is not shown.
    hidden = tmp_path / "hidden.html"
    hidden.write_text(page.replace("</style>", "#plot-charlm-memory { visibility: hidden; }</style>"),
                      encoding="utf-8")
    with pytest.raises(AssertionError, match="plot-charlm-memory: Chromium painted something else"):
        assert_plots_render(str(hidden))
