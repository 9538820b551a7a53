"""``pycomm-bench train``: the strategy evaluation (docs/EVALUATION.md).

    pycomm-bench train --quick                       # < 3 minutes on 2 cores: the demo's matrix
    pycomm-bench train                               # the full matrix (hours on 2 cores)
    pycomm-bench train --models mlp,large --links shm,1gbit --worlds 1,2,4 --repeats 3
    pycomm-bench train --render results.json         # re-render a report, measure nothing
    pycomm-bench train --quick --convergence benchmarks/results/convergence_*.json
                                                     # and show the compression matrix measured apart
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from pycomm.evaluation.models import MODELS
from pycomm.evaluation.runner import FULL, QUICK, SHM, Plan, command_line, run
from pycomm.evaluation.strategies import STRATEGIES


def _names(known: Sequence[str], what: str):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)} (known: {', '.join(known)})")
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given")
        return items
    return parse


def _worlds(text: str) -> List[int]:
    try:
        ws = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"world sizes must be integers, got {text!r}") from None
    if not ws or ws[0] < 1:
        raise argparse.ArgumentTypeError("world sizes must be >= 1")
    return ws


def _links(text: str) -> List[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("no link given")
    return items


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pycomm-bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"the small matrix ({', '.join(QUICK['strategies'])} on mlp, worlds 1,2,4, shm, 1 repeat, "
                         "few epochs)")
    ap.add_argument("--models", type=_names(list(MODELS), "model"), default=None,
                    help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--strategies", type=_names(list(STRATEGIES), "strategy"), default=None,
                    help=f"comma-separated, of: {', '.join(STRATEGIES)} (the 1-rank 'single' baseline is added)")
    ap.add_argument("--worlds", type=_worlds, default=None, help="rank counts, e.g. 1,2,4")
    ap.add_argument("--links", type=_links, default=None,
                    help=f"'{SHM}' (ranks on this host) and/or tc rates ('10gbit', '1gbit'): one emulated host "
                         "per rank over network namespaces (needs root)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per cell (seeds 0..n-1); median reported")
    ap.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    ap.add_argument("--out", default=None, help="report folder (default ./pycomm-eval-<date>)")
    ap.add_argument("--cell-timeout", type=float, default=None,
                    help="seconds before a cell's ranks are killed (default 180 quick, 1800 full)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--render", metavar="RESULTS_JSON", nargs="+", default=None,
                    help="only re-render the report of existing results.json files (several: one report of "
                         "all their cells, with every run's stamp; into --out, default the first's folder)")
    ap.add_argument("--convergence", metavar="JSON", nargs="+", default=None,
                    help="raw files of benchmarks/bench_convergence.py (the compression x optimizer matrix) to "
                         "show in the report, stamped as measured apart from this run")
    return ap


def _convergence(ap: argparse.ArgumentParser, paths: Sequence[str]) -> List[Dict[str, Any]]:
    from pycomm.evaluation.convergence import ConvergenceFileError, load

    docs = []
    for path in paths:
        try:
            with open(path) as f:
                docs.append(load(json.load(f), path))
        except (OSError, ValueError) as e:  # ConvergenceFileError is a ValueError
            ap.error(f"--convergence: cannot read {path}: {e}")
    return docs


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    convergence = _convergence(ap, args.convergence) if args.convergence else None
    if args.render:
        from pycomm.evaluation import report
        from pycomm.evaluation.runner import combine, write_json

        parts = []
        for path in args.render:
            try:
                with open(path) as f:
                    parts.append(json.load(f))
            except (OSError, ValueError) as e:
                ap.error(f"cannot read {path}: {e}")
        results = combine(parts)
        out = args.out or os.path.dirname(os.path.abspath(args.render[0]))
        if convergence is not None:
            results["convergence"] = convergence
        if len(parts) > 1 or convergence is not None:
            os.makedirs(out, exist_ok=True)
            write_json(os.path.join(out, "results.json"), results)
        paths = report.write_report(results, out)
        print(f"report: {paths['html']}")
        return 0
    base = QUICK if args.quick else FULL
    strategies = args.strategies or list(base["strategies"])
    if "single" not in strategies:
        strategies = ["single"] + strategies
    worlds = args.worlds or list(base["worlds"])
    if 1 not in worlds:
        worlds = [1] + worlds  # the baseline of speedup and efficiency
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be >= 1")
    links = args.links or list(base["links"])
    plan = Plan(models=args.models or list(base["models"]), strategies=strategies, worlds=worlds, links=links,
                repeats=args.repeats or base["repeats"], quick=args.quick, epochs=args.epochs,
                cell_timeout=args.cell_timeout or (180.0 if args.quick else 1800.0), threads=args.threads)
    import datetime

    out = args.out or f"pycomm-eval-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    results = run(plan, out, command_line(argv), progress=not args.no_progress,
                  extra={"convergence": convergence} if convergence else None)
    cells = results["cells"]
    ok = sum(c["status"] == "ok" for c in cells)
    print(f"{ok} of {len(cells)} cells measured; report: {os.path.abspath(os.path.join(out, 'report.md'))} "
          f"(+ report.html, results.json)")
    return 0 if results["meta"]["complete"] else 130


if __name__ == "__main__":
    sys.exit(main())
