"""The evaluation runner behind ``pycomm-bench train``: expands the matrix, launches the
ranks of every cell (local processes, or one per emulated host for a link), merges what
the ranks measured into the cell, and rewrites ``results.json`` after every cell, so an
interrupted run keeps every cell already measured. The report is rendered from
``results.json`` alone (:mod:`pycomm.evaluation.report`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from pycomm.bench.machine import cpu_model
from pycomm.evaluation.models import MODELS, param_count
from pycomm.evaluation.strategies import STRATEGIES, applicable, layout

SHM = "shm"  # ranks on one host (pycomm picks its shared-memory transport)

QUICK = {"models": ["mlp"], "strategies": ["single", "dp", "dp-onebit", "ddp-gloo", "localsgd", "tp", "pp-1f1b",
                                                "dp-tp"],
         "worlds": [1, 2, 4], "links": [SHM], "repeats": 1}
FULL = {"models": ["mlp", "cnn", "charlm", "large"], "strategies": list(STRATEGIES), "worlds": [1, 2, 4],
        "links": [SHM, "10gbit", "1gbit"], "repeats": 3}


@dataclass
class Plan:
    """What to run: the matrix and its settings."""

    models: List[str]
    strategies: List[str]
    worlds: List[int]
    links: List[str]
    repeats: int
    quick: bool
    epochs: Optional[int] = None
    cell_timeout: float = 600.0
    threads: int = 1


def link_problem(link: str) -> Optional[str]:
    """None when ``link`` can run here, else why not."""
    if link == SHM:
        return None
    from pycomm.bench import netem

    try:
        netem.parse_rate(link)
    except ValueError as e:
        return f"link {link!r}: {e}"
    if os.geteuid() != 0:
        return "emulated hosts (network namespaces) need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "emulated hosts need iproute2 (ip, tc)"
    return None


def expand(plan: Plan) -> List[Dict[str, Any]]:
    """The cells of the plan, in run order: per model, the one-rank baseline first, then
    per link and world every strategy; each with its ``status`` decided up front for the
    cells that cannot run (``not_applicable`` / ``skipped``) and a reason."""
    cells: List[Dict[str, Any]] = []
    for model in plan.models:
        spec = MODELS[model]
        epochs = plan.epochs or (spec.recipe.quick_epochs if plan.quick else spec.recipe.epochs)
        for link in plan.links:
            problem = link_problem(link)
            for world in plan.worlds:
                for strategy in plan.strategies:
                    if (strategy == "single") != (world == 1):
                        continue  # the baseline is the one-rank cell; others need >= 2 ranks
                    if world == 1 and link != plan.links[0]:
                        continue  # one rank sends nothing: its link does not matter
                    why = applicable(strategy, spec, world)
                    for r in range(plan.repeats):
                        cell = {"model": model, "strategy": strategy, "world": world,
                                "link": link if world > 1 else SHM, "repeat": r, "seed": r, "epochs": epochs,
                                "backend": STRATEGIES[strategy][0], "layout": layout(strategy, world),
                                "status": "pending", "reason": None}
                        if why:
                            cell.update(status="not_applicable", reason=why)
                        elif problem and world > 1:
                            cell.update(status="skipped", reason=problem)
                        cells.append(cell)
    return cells


# ------------------------------------------------------------------------------- merging

def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def merge(cell: Dict[str, Any], ranks: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Folds the ranks' records into the cell (fields in docs/EVALUATION.md)."""
    spec = MODELS[cell["model"]]
    out = dict(cell)
    errors = [r for r in ranks if "error" in r]
    if errors:
        out.update(status="failed", reason="; ".join(f"rank {r['rank']}: {r['error']}" for r in errors)[:2000],
                   log_tail=errors[0].get("traceback", "")[-4000:])
        return out
    steps = ranks[0]["steps"]
    if steps == 0:
        out.update(status="failed", reason="no training step ran (training set smaller than the global batch)")
        return out
    # A synchronous step ends when its slowest rank ends: the step time is the max over ranks.
    per_step = [max(r["step_times"][i] for r in ranks) for i in range(steps)]
    train = max(r["train_seconds"] for r in ranks)
    known = [r["losses"] for r in ranks if r["losses"] is not None]
    losses = [statistics.fmean(ls[i] for ls in known) for i in range(steps)] if known else []
    tail = losses[len(losses) // 2:]
    diffs = [b - a for a, b in zip(tail, tail[1:])]
    curve = []
    per_epoch = steps // max(1, ranks[0]["epochs"])
    for i, point in enumerate(ranks[0]["curve"]):
        epoch_losses = losses[i * per_epoch:(i + 1) * per_epoch]
        curve.append(dict(point, train_loss=statistics.fmean(epoch_losses) if epoch_losses else None))
    hit = next((p for p in curve if spec.reached(p["metric"])), None)
    mean_step = train / steps
    clocked = [r for r in ranks if r["comm_seconds"] is not None]
    comm = statistics.fmean(r["comm_seconds"] for r in clocked) / steps if clocked else None
    exposed = min(comm, statistics.fmean(r["exposed_seconds"] for r in clocked) / steps) if clocked else None
    sent = [r["bytes_sent"] for r in ranks if r.get("bytes_sent") is not None]
    link = [r["link_bytes"] for r in ranks if r.get("link_bytes") is not None]
    memory = {k: max(r["memory"][k] for r in ranks) for k in ranks[0]["memory"]}
    out.update(
        status="ok", reason=None, params=param_count(spec), global_batch=ranks[0]["global_batch"], steps=steps,
        samples=steps * ranks[0]["global_batch"], train_seconds=train,
        samples_per_s=steps * ranks[0]["global_batch"] / train,
        step_seconds={"p50": _pct(per_step, 0.5), "p99": _pct(per_step, 0.99), "mean": mean_step},
        metric=spec.metric, higher_is_better=spec.higher_is_better, target=spec.target,
        final_metric=curve[-1]["metric"] if curve else None,
        time_to_target_s=hit["wall_s"] if hit else None, epochs_to_target=hit["epoch"] if hit else None,
        curve=curve, loss_step_var=statistics.pvariance(diffs) if len(diffs) > 1 else None,
        comm_seconds_per_step=comm, exposed_comm_seconds_per_step=exposed,
        comm_share=min(1.0, comm / mean_step) if clocked else None,
        exposed_share=min(1.0, exposed / mean_step) if clocked else None,
        bytes_sent_per_step=statistics.fmean(sent) / steps if sent else None,
        link_bytes_per_step=statistics.fmean(link) / steps if link else None,
        memory=memory, param_digest=ranks[0]["param_digest"], log_tail=None)
    return out


# ------------------------------------------------------------------------------- launching

class _Hosts:
    """Where a cell's ranks run: this host (link ``shm``) or one emulated host per rank.
    One emulated cluster is up at a time (cells are ordered by link), torn down when the
    link changes and at the end of the run."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.current: Any = None
        self.made = 0
        stack.callback(self.close)

    def close(self) -> None:
        if self.current is not None:
            self.current.down()
            self.current = None

    def cluster(self, link: str, hosts: int) -> Any:
        c = self.current
        if c is None or c.link != link or c.hosts < hosts:
            self.close()
            from pycomm.bench import netem

            self.made += 1
            c = netem.Cluster(hosts=hosts, link=link, quiet=True, prefix=f"pcm{os.getpid()}c{self.made}")
            c.up()
            self.current = c
        return c


def run_cell(cell: Dict[str, Any], hosts: _Hosts, plan: Plan, workdir: str) -> Dict[str, Any]:
    """Launches the cell's ranks, waits (``plan.cell_timeout``), merges their records."""
    from pycomm.bench.launch import free_port, wait_all

    world = cell["world"]
    out_dir = tempfile.mkdtemp(prefix="cell-", dir=workdir)
    spec = dict(cell, out_dir=out_dir, timeout=min(120.0, plan.cell_timeout), threads=plan.threads)
    base = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base["PYTHONPATH"] = pkg_parent + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
    base.update({"PYCOMM_EVAL_CELL": json.dumps(spec), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
                 "PYTHONWARNINGS": "ignore"})
    argv = [sys.executable, "-m", "pycomm.evaluation.worker"]
    procs, logs = [], []
    t0 = time.monotonic()
    if cell["link"] == SHM or world == 1:
        base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_WORLD_SIZE": str(world)})
        for r in range(world):
            log = open(os.path.join(out_dir, f"rank{r}.log"), "w")
            logs.append(log)
            procs.append(subprocess.Popen(argv, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=log,
                                          stderr=subprocess.STDOUT))
    else:
        c = hosts.cluster(cell["link"], world)
        base.update({"MASTER_ADDR": c.addr(0), "MASTER_PORT": str(free_port()),
                     "PYCOMM_TRANSPORT": "tcp", "PYCOMM_SOCKET_IFNAME": c.ifname,
                     "GLOO_SOCKET_IFNAME": c.ifname, "PYCOMM_EVAL_IFNAME": c.ifname, "LOCAL_WORLD_SIZE": "1"})
        for r in range(world):
            log = open(os.path.join(out_dir, f"rank{r}.log"), "w")
            logs.append(log)
            procs.append(c.run(r, argv, env=dict(base, RANK=str(r), LOCAL_RANK="0"), stdout=log,
                               stderr=subprocess.STDOUT))
    rc = wait_all(procs, plan.cell_timeout)
    for log in logs:
        log.close()
    ranks, missing = [], []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
        else:
            missing.append(r)
    if missing:
        tail = ""
        for r in missing:
            with open(os.path.join(out_dir, f"rank{r}.log")) as f:
                tail += f"--- rank {r}\n" + f.read()[-1500:]
        why = (f"timed out after {plan.cell_timeout:.0f} s" if rc == 124 else f"exit code {rc}")
        out = dict(cell, status="failed", reason=f"ranks {missing} wrote no result ({why})", log_tail=tail)
    else:
        out = merge(cell, ranks)
    out["duration_s"] = time.monotonic() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------- the run

def meta(plan: Plan, command: str) -> Dict[str, Any]:
    import torch

    import pycomm

    return {
        "machine": f"{platform.node()} ({platform.system()} {platform.release()}, {platform.machine()})",
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "pycomm": pycomm.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()), "loadavg_end": None, "command": command, "quick": plan.quick,
        "complete": False, "settings": "default (no environment variables set by the runner beyond rank "
                                       "placement; one intra-op thread per rank)",
        "models": {m: {"params": param_count(MODELS[m]), "metric": MODELS[m].metric, "target": MODELS[m].target,
                       "description": MODELS[m].description, "recipe": vars(MODELS[m].recipe)}
                   for m in plan.models},
        "strategies": {s: STRATEGIES[s][1] for s in plan.strategies},
        "links": {lk: ("ranks on one host: pycomm over shared memory, Gloo over loopback TCP" if lk == SHM else
                       f"one emulated host per rank (network namespaces), {lk} per host link (tc tbf), TCP")
                  for lk in plan.links},
    }


def write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def run(plan: Plan, out_dir: str, command: str, progress: bool = True,
        extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Runs the plan into ``out_dir`` (results.json rewritten after every cell; the
    report rendered at the end, and also when interrupted). ``extra``: more top-level
    keys of results.json (``convergence``: the raw files of bench_convergence.py the
    report shows). Returns the results."""
    from tqdm import tqdm

    from pycomm.evaluation import report

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    results = {"meta": meta(plan, command),
               "matrix": {"models": plan.models, "strategies": plan.strategies, "worlds": plan.worlds,
                          "links": plan.links, "repeats": plan.repeats},
               "cells": []}
    results.update(extra or {})
    cells = expand(plan)
    todo = [c for c in cells if c["status"] == "pending"]
    results["cells"] = [c for c in cells if c["status"] != "pending"]
    write_json(path, results)
    workdir = tempfile.mkdtemp(prefix="pycomm-eval-")
    bar = tqdm(total=len(todo), disable=not progress, unit="cell", dynamic_ncols=True)
    try:
        with ExitStack() as stack:
            hosts = _Hosts(stack)
            for cell in todo:
                bar.set_description(f"{cell['model']} {cell['strategy']} x{cell['world']} {cell['link']} "
                                    f"#{cell['repeat']}")
                try:
                    done = run_cell(cell, hosts, plan, workdir)
                except Exception as e:  # noqa: BLE001  (the cell fails; the run goes on)
                    done = dict(cell, status="failed", reason=f"runner: {type(e).__name__}: {e}")
                results["cells"].append(done)
                write_json(path, results)
                bar.update(1)
                if done["status"] != "ok":
                    bar.write(f"  {cell['model']} {cell['strategy']} x{cell['world']} {cell['link']}: "
                              f"{done['status']}: {done['reason']}")
        results["meta"]["complete"] = True
    except KeyboardInterrupt:
        bar.write("interrupted: reporting the cells measured so far")
    finally:
        bar.close()
        shutil.rmtree(workdir, ignore_errors=True)
        results["meta"]["loadavg_end"] = list(os.getloadavg())
        write_json(path, results)
        report.write_report(results, out_dir)
    return results


def combine(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One results dict from several runs' (e.g. one run per model, each with its own
    matrix): the cells concatenated, the matrices united, every run's stamp kept under
    ``meta.parts`` and the top-level stamp saying it is a combination."""
    if len(parts) == 1:
        return parts[0]
    metas = [p["meta"] for p in parts]
    meta = dict(metas[0])
    meta.update(
        command=" ; ".join(m.get("command", "?") for m in metas),
        date=f"{min(m.get('date', '') for m in metas)} .. {max(m.get('date', '') for m in metas)}",
        loadavg_end=metas[-1].get("loadavg_end"), complete=all(m.get("complete") for m in metas),
        quick=all(m.get("quick") for m in metas), parts=metas)
    for key in ("models", "strategies", "links"):
        meta[key] = {k: v for m in metas for k, v in (m.get(key) or {}).items()}
    matrix: Dict[str, Any] = {}
    for p in parts:
        for k, v in p.get("matrix", {}).items():
            if isinstance(v, list):
                matrix[k] = matrix.get(k, []) + [x for x in v if x not in matrix.get(k, [])]
            else:
                matrix[k] = max(matrix.get(k, v), v)
    out = {"meta": meta, "matrix": matrix, "cells": [c for p in parts for c in p["cells"]]}
    docs = {(d.get("command"), d.get("date")): d for p in parts for d in p.get("convergence") or []}
    if docs:
        out["convergence"] = list(docs.values())
    return out


def command_line(argv: Sequence[str]) -> str:
    return "pycomm-bench train " + " ".join(shlex.quote(a) for a in argv)
