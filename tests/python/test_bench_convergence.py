"""benchmarks/bench_convergence.py --merge: re-run cells replace the file's cells of the
same (model, optimizer, compressor) in place, the rest is kept, the run is recorded."""
from __future__ import annotations

import importlib.util
import os

import pytest

from dist_util import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_convergence",
                                                  os.path.join(ROOT, "benchmarks", "bench_convergence.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(opt, comp, seed, acc):
    return {"model": "mlp", "optimizer": opt, "compressor": comp, "seed": seed, "test_acc": acc, "finite": True,
            "ranks_identical": True, "bytes_sent_rank0": 10, "fp32_ring_bytes": 100}


def _doc(cells, **kw):
    d = {"ranks": 4, "epochs": 15, "batch": 32, "backend": "pycomm", "command": "python full", "date": "d0",
         "machine": {"cpu": "x", "cores": 2}, "torch": "t", "loadavg_start": [1.0], "loadavg_now": [1.0],
         "cells": cells}
    d.update(kw)
    return d


def test_merge_replaces_in_place_and_records_the_run():
    b = _bench()
    old = _doc([_cell("sgd", "none", 0, 90.0), _cell("sgd", "PowerSGD", 0, 50.0), _cell("sgd", "PowerSGD", 1, 51.0),
                _cell("adam", "none", 0, 91.0), _cell("adam", "PowerSGD", 0, 40.0)])
    new = _doc([_cell("sgd", "PowerSGD", 0, 89.0), _cell("sgd", "PowerSGD", 1, 88.0),
                _cell("adam", "PowerSGD", 0, 92.0), _cell("adam", "TopK", 0, 90.5)],
               command="python merge", date="d1")
    m = b.merge(old, new)
    assert [(c["optimizer"], c["compressor"], c["test_acc"]) for c in m["cells"]] == [
        ("sgd", "none", 90.0), ("sgd", "PowerSGD", 89.0), ("sgd", "PowerSGD", 88.0), ("adam", "none", 91.0),
        ("adam", "PowerSGD", 92.0), ("adam", "TopK", 90.5)]
    assert m["command"] == "python full" and m["merged"][0]["command"] == "python merge"
    assert all(c.get("merge_run") == 0 for c in m["cells"] if c["test_acc"] in (89.0, 88.0, 92.0, 90.5))
    table = b.summarize(m)
    assert "python merge" in table and "| mlp | sgd | PowerSGD | 2 | 88.50" in table
    with pytest.raises(SystemExit, match="epochs"):
        b.merge(old, _doc([], epochs=8))


def test_summary_reports_loss_next_to_accuracy():
    b = _bench()
    cells = [dict(_cell("sgdm", "none", s, 70.0 + s), test_loss=0.8 + 0.1 * s) for s in (0, 1)]
    cells += [dict(_cell("sgdm", "TopK", s, 60.0), test_loss=1.0 + 0.1 * s) for s in (0, 1)]
    cells += [_cell("sgdm", "OneBit", 0, 65.0)]  # recorded before test_loss existed
    table = b.summarize(_doc(cells))
    # mean 1.05 vs 0.85: +23.5 %
    assert "| mlp | sgdm | TopK | 2 | 60.00 +- 0.00 | -10.50 | 60.00..60.00 | 1.050 +- 0.050 | +23.5 % |" in table
    assert "| mlp | sgdm | none | 2 | 70.50 +- 0.50 | +0.00 | 70.00..71.00 | 0.850 +- 0.050 | +0.0 % |" in table
    assert "| mlp | sgdm | OneBit | 1 | 65.00 +- 0.00 | -5.50 | 65.00..65.00 | n/a | n/a |" in table


def test_kw_variant_builds_the_wrapping_with_those_arguments():
    import pycomm.compression as C

    b = _bench()
    c = b.make_compressor("OneBit-kw:warmup_steps=7;exact=p.dim() == 1;warmup_compression=C.QSGD(bits=4|error_feedback=True)")
    assert isinstance(c, C.MomentumCorrection) and c.warmup_steps == 7
    assert isinstance(c.warmup_compression, C.QSGD) and c.warmup_compression.bits == 4
    import torch

    assert c.exact(torch.zeros(3)) and not c.exact(torch.zeros(3, 3))
    assert b.make_compressor("OneBit-kw:exact=p.dim() == 1").warmup_steps == C.ONEBIT_WARMUP_STEPS  # its default
    d = b.make_compressor("TopK-kw:inner.ratio=0.1")
    assert d.compressor.ratio == 0.1 and isinstance(d.warmup_compression, C.QSGD)  # TopK's default warm-up kept
    assert d.variance_refresh is None and c.variance_refresh == C.VARIANCE_REFRESH  # each one's default refresh


def test_summary_reports_the_best_epoch_next_to_the_final_loss():
    b = _bench()
    # none: best 0.30 at epoch 3 of 4 for both seeds; OneBit: best 0.27 / 0.29 at epoch 2,
    # then over-fits to 0.33 / 0.31 by the end.
    cells = [dict(_cell("adam", "none", s, 80.0), test_loss=0.31, test_loss_curve=[0.5, 0.4, 0.30, 0.31],
                  train_loss_curve=[0.28]) for s in (0, 1)]
    cells += [dict(_cell("adam", "OneBit", 0, 80.0), test_loss=0.33, test_loss_curve=[0.4, 0.27, 0.30, 0.33],
                   train_loss_curve=[0.252]),
              dict(_cell("adam", "OneBit", 1, 80.0), test_loss=0.31, test_loss_curve=[0.4, 0.29, 0.30, 0.31],
                   train_loss_curve=[0.252])]
    table = b.summarize(_doc(cells))
    assert "| mlp | adam | OneBit | 0.280 +- 0.010 | -6.7 % | 2, 2 | +0.040 | 0.252 | -10.0 % |" in table
    assert "| mlp | adam | none | 0.300 +- 0.000 | +0.0 % | 3, 3 | +0.010 | 0.280 | +0.0 % |" in table
    # A file where some cells have no curve (re-run cells of an older file): no second table.
    assert b.summarize(_doc(cells + [_cell("adam", "TopK", 0, 80.0)])).count("best") == 0
    assert b.summarize(_doc([_cell("adam", "none", 0, 80.0)])).count("best") == 0  # no curves: no second table
