"""Chrome-trace / Perfetto timeline of data-parallel training, one file per rank.

Set ``PYCOMM_TIMELINE=trace.json`` and every rank running :class:`pycomm.DataParallel`
or :func:`pycomm.ddp_comm_hook` writes ``trace.rank0.json``, ``trace.rank1.json``, ...
(the rank is inserted before the extension). Open a file in ``chrome://tracing`` or
https://ui.perfetto.dev (see docs/DATA_PARALLEL.md for what the rows mean).

The file is the Trace Event "JSON array" format, written incrementally and flushed at
the end of every iteration, so a run that crashes still leaves a readable trace (the
closing ``]`` is optional in that format; :func:`load` accepts both). Timestamps come
from ``time.perf_counter_ns`` (CLOCK_MONOTONIC on Linux, shared by the processes of one
host), so the traces of the ranks of one host line up when loaded together.

Rows (``tid``): ``compute`` (forward, backward, waiting for the buckets), and one row
per bucket (``bucket 3``: ready, compress+issue, communicate, write-back).
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Timeline", "from_env", "rank_path", "load", "now_ns", "TID_COMPUTE", "bucket_tid"]

TID_COMPUTE = 1
"""Row of forward / backward / wait spans."""

_BUCKET_TID0 = 100


def bucket_tid(index: int) -> int:
    """Row (thread id) of bucket ``index``'s events."""
    return _BUCKET_TID0 + int(index)


def now_ns() -> int:
    """The timeline's clock: ``time.perf_counter_ns()``."""
    return time.perf_counter_ns()


def rank_path(path: str, rank: int) -> str:
    """``trace.json`` -> ``trace.rank3.json`` (``trace`` -> ``trace.rank3``)."""
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext}"


class Timeline:
    """Appends Chrome-trace events to ``path`` (thread-safe; events may come from the
    autograd thread and from communication callbacks alike).

    Args:
        path: the file to write (truncated).
        rank: used as the trace's process id and in its name.
    """

    def __init__(self, path: str, rank: int) -> None:
        self.path = path
        self.rank = int(rank)
        self._lock = threading.Lock()
        self._named_tids: Dict[int, str] = {}
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self._file = open(path, "w", encoding="utf-8")
        self._first = True
        self._closed = False
        self._emit({"name": "process_name", "ph": "M", "pid": self.rank, "tid": 0,
                    "args": {"name": f"rank {self.rank}"}})
        self._emit({"name": "process_sort_index", "ph": "M", "pid": self.rank, "tid": 0,
                    "args": {"sort_index": self.rank}})
        self._name_tid(TID_COMPUTE, "compute (forward / backward / wait)", 0)

    # -- writing ----------------------------------------------------------------------

    def _emit(self, event: Dict[str, Any]) -> None:
        # Caller holds the lock (or is the constructor).
        if self._closed:
            return
        self._file.write(("[\n" if self._first else ",\n") + json.dumps(event, separators=(",", ":")))
        self._first = False

    def _name_tid(self, tid: int, name: str, sort_index: int) -> None:
        if tid in self._named_tids:
            return
        self._named_tids[tid] = name
        self._emit({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": name}})
        self._emit({"name": "thread_sort_index", "ph": "M", "pid": self.rank, "tid": tid,
                    "args": {"sort_index": sort_index}})

    def _tid(self, tid: int) -> int:
        if tid >= _BUCKET_TID0 and tid not in self._named_tids:
            self._name_tid(tid, f"bucket {tid - _BUCKET_TID0}", tid)
        return tid

    def span(self, name: str, start_ns: int, end_ns: int, tid: int = TID_COMPUTE, cat: str = "pycomm",
             args: Optional[Dict[str, Any]] = None) -> None:
        """A complete event ("X") from ``start_ns`` to ``end_ns`` (perf_counter_ns)."""
        ev = {"name": name, "cat": cat, "ph": "X", "ts": start_ns / 1000.0,
              "dur": max(0, end_ns - start_ns) / 1000.0, "pid": self.rank}
        if args:
            ev["args"] = args
        with self._lock:
            ev["tid"] = self._tid(tid)
            self._emit(ev)

    def instant(self, name: str, ts_ns: int, tid: int = TID_COMPUTE, cat: str = "pycomm",
                args: Optional[Dict[str, Any]] = None) -> None:
        """An instant event ("i", thread scope) at ``ts_ns``."""
        ev = {"name": name, "cat": cat, "ph": "i", "s": "t", "ts": ts_ns / 1000.0, "pid": self.rank}
        if args:
            ev["args"] = args
        with self._lock:
            ev["tid"] = self._tid(tid)
            self._emit(ev)

    def flush(self) -> None:
        """Pushes what was written so far to the file (it stays a loadable trace)."""
        with self._lock:
            if not self._closed:
                self._file.flush()

    def close(self) -> None:
        """Terminates the JSON array and closes the file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            if self._first:
                self._file.write("[")
            self._file.write("\n]\n")
            self._file.close()
            self._closed = True


_timelines: Dict[Tuple[str, int], Timeline] = {}
_timelines_lock = threading.Lock()


def from_env(rank: int) -> Optional[Timeline]:
    """The process's timeline for ``rank`` if ``PYCOMM_TIMELINE`` is set, else None.

    One file per (path, rank) per process: DataParallel instances and DDP hook states
    of the same process share it. It is closed at interpreter exit; it is also flushed
    at the end of every iteration, so processes that skip ``atexit`` (multiprocessing
    children) still leave a complete-enough trace.
    """
    base = os.environ.get("PYCOMM_TIMELINE", "").strip()
    if not base:
        return None
    path = rank_path(base, rank)
    with _timelines_lock:
        tl = _timelines.get((path, rank))
        if tl is None:
            tl = _timelines[(path, rank)] = Timeline(path, rank)
        return tl


@atexit.register
def _close_all() -> None:
    with _timelines_lock:
        for tl in _timelines.values():
            tl.close()


def load(path: str) -> List[Dict[str, Any]]:
    """Reads a trace written by :class:`Timeline` (closed or not) as a list of events."""
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        return []
    if not text.endswith("]"):
        text = text.rstrip(",") + "\n]"
    data = json.loads(text)
    return data["traceEvents"] if isinstance(data, dict) else data
