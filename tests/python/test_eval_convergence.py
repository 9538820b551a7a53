"""The compression convergence matrix in the evaluation report (issue 15): the rows
follow from the raw cells of bench_convergence.py, each default compressor cell is judged
against its target with the reason it misses, the report shows the matrix (and the best
epoch where curves exist) with the file's own stamp, and its plots render in a browser."""
from __future__ import annotations

import copy
import json
import os
import statistics

import pytest

from pycomm.evaluation import convergence as conv
from pycomm.evaluation.cli import main as cli_main
from pycomm.evaluation.report import write_report
from pycomm.evaluation.runner import combine
from test_eval_report import _section, assert_plots_render, needs_chromium, synthetic_results

# (model, optimizer, compressor) -> per seed (accuracy %, final held-out loss, bytes sent)
ACC = {
    ("mlp", "sgdm", "none"): [95.0, 96.0, 97.0],
    ("mlp", "sgdm", "OneBit"): [94.5, 95.5, 96.4],      # -0.53: met
    ("mlp", "sgdm", "TopK"): [93.0, 94.5, 95.0],        # -1.83: missed
    ("mlp", "adam", "none"): [91.0, 91.0, 91.3],
    ("mlp", "adam", "OneBit"): [93.0, 93.5, 93.8],      # +2.33, but 20x: bytes missed
    ("mlp", "adam", "OneBit-raw"): [80.0, 81.0, 82.0],  # a variant: no target
}
RING = 3100


def _sent(comp: str) -> int:
    return {"none": RING, "OneBit": 100, "TopK": 200, "OneBit-raw": 100}[comp]


def _curve(final: float, best: float, at: int, epochs: int = 6):
    return [best + 0.1 * (at - e) if e < at else best + (final - best) * (e - at) / (epochs - 1 - at)
            for e in range(epochs)]


def synthetic_doc():
    cells = []
    for (m, o, comp), accs in ACC.items():
        for seed, acc in enumerate(accs):
            sent = _sent(comp) if (o, comp) != ("adam", "OneBit") else RING // 20
            cells.append({"model": m, "optimizer": o, "compressor": comp, "seed": seed, "test_acc": acc,
                          "finite": True, "ranks_identical": True, "bytes_sent_rank0": sent,
                          "fp32_ring_bytes": RING})
    # The LM: loss is its criterion; OneBit ends 3 % above none but its best is below none's.
    lm = {"none": [(0.300, 0.290, 3), (0.302, 0.292, 4)], "OneBit": [(0.309, 0.287, 2), (0.311, 0.289, 2)],
          "PowerSGD": [(0.295, 0.285, 4), (0.297, 0.287, 4)]}
    for comp, seeds in lm.items():
        for seed, (final, best, at) in enumerate(seeds):
            curve = _curve(final, best, at)
            cells.append({"model": "charlm", "optimizer": "adam", "compressor": comp, "seed": seed,
                          "test_acc": 86.0 - 10 * (final - 0.3), "test_loss": final, "test_loss_curve": curve,
                          "train_loss_curve": [c - 0.05 for c in curve], "finite": comp != "PowerSGD" or seed == 0,
                          "ranks_identical": True, "bytes_sent_rank0": _sent(comp) if comp != "PowerSGD" else 400,
                          "fp32_ring_bytes": RING})
    return {"ranks": 4, "epochs": 6, "batch": 32, "backend": "pycomm", "date": "2026-01-02T00:00:00",
            "command": "python benchmarks/bench_convergence.py --synthetic", "torch": "2.14.1",
            "machine": {"host": "h", "cpu": "Synthetic CPU", "cores": 2, "platform": "Linux-test"},
            "loadavg_start": [0.5, 0.4, 0.3], "loadavg_now": [2.0, 1.5, 1.0], "cells": cells,
            "merged": [{"date": "2026-01-03T00:00:00", "command": "python benchmarks/bench_convergence.py --merge",
                        "cells": ["mlp adam OneBit"]}]}


def _rows():
    return {(r["model"], r["optimizer"], r["compressor"]): r for r in conv.aggregate(synthetic_doc()["cells"])}


def test_rows_follow_from_the_cells():
    rows = _rows()
    r = rows[("mlp", "sgdm", "TopK")]
    assert r["seeds"] == 3
    assert r["acc"] == pytest.approx(statistics.mean(ACC[("mlp", "sgdm", "TopK")]))
    assert r["acc_sd"] == pytest.approx(statistics.pstdev(ACC[("mlp", "sgdm", "TopK")]))
    assert r["acc_delta"] == pytest.approx(statistics.mean(ACC[("mlp", "sgdm", "TopK")]) - 96.0)
    assert r["ratio"] == pytest.approx(RING / 200)
    assert r["loss"] is None and r["best"] is None and r["loss_pct"] is None
    lm = rows[("charlm", "adam", "OneBit")]
    assert lm["loss"] == pytest.approx(0.310) and lm["loss_pct"] == pytest.approx(100 * (0.310 - 0.301) / 0.301)
    assert lm["best"] == pytest.approx(0.288) and lm["best_pct"] == pytest.approx(100 * (0.288 - 0.291) / 0.291)
    assert lm["best_epochs"] == [3, 3]
    assert lm["overfit"] == pytest.approx(0.022)
    assert lm["train"] == pytest.approx(0.260) and lm["train_pct"] == pytest.approx(100 * (0.260 - 0.251) / 0.251)
    assert rows[("charlm", "adam", "none")]["loss_pct"] == pytest.approx(0.0)


def test_each_default_cell_is_judged_with_the_reason_it_misses():
    rows = _rows()
    assert conv.verdict(rows[("mlp", "sgdm", "none")]) is None
    assert conv.verdict(rows[("mlp", "adam", "OneBit-raw")]) is None      # a variant
    assert conv.verdict(dict(rows[("mlp", "sgdm", "TopK")], optimizer="1bit-sgd")) is None  # compressed optimizer
    assert conv.verdict(rows[("mlp", "sgdm", "OneBit")]) == (True, [])
    met, why = conv.verdict(rows[("mlp", "sgdm", "TopK")])
    assert not met and len(why) == 1 and "accuracy -1.83 points" in why[0]
    met, why = conv.verdict(rows[("mlp", "adam", "OneBit")])
    assert not met and why == ["bytes 20.0x fewer than the fp32 ring (target ≥ 25x)"]
    met, why = conv.verdict(rows[("charlm", "adam", "OneBit")])             # the LM: loss, not accuracy
    assert not met and len(why) == 1 and "held-out loss +3.0 %" in why[0]
    met, why = conv.verdict(rows[("charlm", "adam", "PowerSGD")])           # better loss, one seed NaN
    assert not met and why == ["a seed diverged (NaN/inf)"]
    rows[("mlp", "sgdm", "OneBit")]["identical"] = False
    assert conv.verdict(rows[("mlp", "sgdm", "OneBit")]) == (False, ["ranks not bitwise identical"])


def test_load_refuses_what_is_not_a_result():
    assert conv.load(synthetic_doc()) is not None
    with pytest.raises(conv.ConvergenceFileError, match="x.json: not a JSON object"):
        conv.load([], "x.json")
    doc = synthetic_doc()
    del doc["epochs"]
    with pytest.raises(conv.ConvergenceFileError, match="no epochs"):
        conv.load(doc)
    doc = synthetic_doc()
    del doc["cells"][4]["bytes_sent_rank0"]
    with pytest.raises(conv.ConvergenceFileError, match="cell 4 has no bytes_sent_rank0"):
        conv.load(doc)


def test_the_report_shows_the_matrix_with_its_own_stamp(tmp_path):
    results = synthetic_results()
    results["convergence"] = [synthetic_doc()]
    before = copy.deepcopy(results)
    paths = write_report(results, str(tmp_path))
    assert results == before
    md = open(paths["md"], encoding="utf-8").read()
    page = open(paths["html"], encoding="utf-8").read()
    sec = _section(md, "Compression convergence: mlp, charlm")
    assert "**not in this run**" in sec and "Synthetic CPU, 2 cores, Linux-test" in sec
    assert "python benchmarks/bench_convergence.py --synthetic" in sec
    assert "python benchmarks/bench_convergence.py --merge" in sec          # the merge run is listed
    # mlp: rows optimizer, columns compressor, the change in points and ✓ / ✗
    assert "| sgdm | 96.00 ± 0.82 | 95.47 ± 0.78 (-0.53) ✓ | 94.17 ± 0.85 (-1.83) ✗ |  |" in sec
    assert "| fp32 ring bytes / sent | 1.0× | 20.0–31.0× | 15.5× | 31.0× |" in sec
    assert "**Targets: met by 1 of 3** default compressor cells:" in sec
    assert "- sgdm + TopK: accuracy -1.83 points vs none (target ≥ -1)" in sec
    assert "- adam + OneBit: bytes 20.0x fewer than the fp32 ring (target ≥ 25x)" in sec
    # the LM: held-out loss and its change, then the best-epoch matrix
    assert "| adam | 0.301 ± 0.001, 86.0 % | 0.310 ± 0.001 (+3.0 %), 85.9 % ✗ |" in sec
    assert "**Targets: met by 0 of 2**" in sec
    assert "| adam | 0.291 ± 0.001, epoch 4, 5 | 0.288 ± 0.001 (-1.0 %), epoch 3, 3 |" in sec
    assert "![mlp: change against the uncompressed run" in sec and "plots/plot-conv0-charlm.png" in sec
    assert md.index("## Compression convergence") < md.index("## What did not run")
    assert "Compression convergence: mlp, charlm" in page and "0.310 ± 0.001 (+3.0 %), 85.9 % ✗" in page
    assert 'id="plot-conv0-mlp"' in page and 'id="plot-conv0-charlm"' in page
    assert os.path.getsize(tmp_path / "plots" / "plot-conv0-mlp.png") > 1000


def test_cli_adds_the_files_to_results_json_and_refuses_a_wrong_one(tmp_path, capsys):
    results = synthetic_results()
    results["cells"] = [c for c in results["cells"] if c["status"] != "ok"]  # no plots of the run: quick
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    good = tmp_path / "conv.json"
    good.write_text(json.dumps(synthetic_doc()))
    assert cli_main(["--render", str(path), "--convergence", str(good)]) == 0
    stored = json.loads(path.read_text())
    assert stored["convergence"] == [synthetic_doc()]      # the report is rendered from results.json alone
    assert "## Compression convergence: mlp, charlm" in (tmp_path / "report.md").read_text()
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(results))                   # a results.json, not a convergence file
    with pytest.raises(SystemExit):
        cli_main(["--render", str(path), "--convergence", str(wrong)])
    assert f"--convergence: cannot read {wrong}: {wrong}: no command" in capsys.readouterr().err
    # combining runs keeps the files once
    both = combine([stored, stored])
    assert both["convergence"] == [synthetic_doc()]


def test_a_broken_entry_is_a_warning_not_a_crash(tmp_path):
    results = synthetic_results()
    results["cells"] = [c for c in results["cells"] if c["status"] != "ok"]
    results["convergence"] = [{"cells": []}, synthetic_doc()]
    md = open(write_report(results, str(tmp_path))["md"], encoding="utf-8").read()
    assert "> **⚠** **Compression convergence not shown**: results.json convergence[0]: no command" in md
    assert "## Compression convergence: mlp, charlm" in md


@needs_chromium
def test_the_convergence_plots_render_in_chromium(tmp_path):
    results = synthetic_results()
    results["cells"] = [c for c in results["cells"] if c["status"] != "ok"]
    results["convergence"] = [synthetic_doc()]
    paths = write_report(results, str(tmp_path))
    measured = assert_plots_render(paths["html"])
    assert sorted(p["id"] for p in measured) == ["plot-conv0-charlm", "plot-conv0-mlp"]
