"""The flight recorder: the last collectives of every pycomm group on this rank.

Each process keeps a ring buffer of its last ``PYCOMM_FLIGHT_RECORDER_ENTRIES``
(default 2000; 0 turns it off) collectives and point-to-point operations: group,
sequence number, collective, element counts, dtype, state (scheduled / started /
completed) and timestamps. It is written, in the dump format of torch's own flight
recorder, to ``TORCH_FR_DUMP_TEMP_FILE`` + global rank (default
``/tmp/pycomm_trace_rank_<rank>``):

* by every rank whose group fails (a timeout, a dead peer, a mismatch, an abort),
  once per group, unless ``PYCOMM_FLIGHT_RECORDER_DUMP_ON_ERROR=0``;
* on demand: :func:`dump`, or the signal ``SIGUSR1`` (a rank stuck outside pycomm,
  e.g. the one that never called the collective, dumps when signalled);

and torch's analyser reads the dumps of all ranks::

    python -m torch.distributed.flight_recorder.fr_trace DIR

which reports the collective where the ranks diverged and the ranks that did not join
it. See docs/RELIABILITY.md.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from typing import Any, Dict, Optional

from pycomm import _C

__all__ = ["dump", "snapshot", "capacity", "install_signal_handler"]


def capacity() -> int:
    """Entries the recorder keeps (0: recording is off)."""
    return int(_C.flight_recorder_capacity())


def dump(path: Optional[str] = None, reason: str = "on demand") -> str:
    """Writes this rank's dump (torch's flight-recorder format) to ``path`` (default:
    ``TORCH_FR_DUMP_TEMP_FILE`` + global rank) and returns the file written, or ``""``
    when recording is off."""
    return str(_C.flight_recorder_dump(path or "", reason))


def snapshot() -> Dict[str, Any]:
    """The dump as a dict (what :func:`dump` writes): ``version``, ``pg_config``,
    ``pg_status`` and ``entries``, oldest first."""
    return pickle.loads(_C.flight_recorder_dump_bytes("snapshot"))


def _on_signal(signum: int, frame: Any) -> None:
    try:
        f = dump(reason=f"signal {signal.Signals(signum).name}")
        if f:
            print(f"pycomm: flight recorder dumped to {f}", file=sys.stderr, flush=True)
    except Exception as e:  # a dump must never kill the process it inspects
        print(f"pycomm: flight recorder dump failed: {e}", file=sys.stderr, flush=True)


def install_signal_handler(signum: int = signal.SIGUSR1) -> bool:
    """Dumps on ``signum`` (in the main thread, between Python bytecodes: also while it
    sleeps or waits in Python). Returns False if called off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signum, _on_signal)
    return True


def _install_default() -> None:
    # On import: SIGUSR1 dumps, unless PYCOMM_FLIGHT_RECORDER_SIGNAL=0 or the program
    # already handles SIGUSR1 (its default action would only have killed the process).
    if os.environ.get("PYCOMM_FLIGHT_RECORDER_SIGNAL", "1") == "0" or capacity() == 0:
        return
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            install_signal_handler(signal.SIGUSR1)
    except (ValueError, OSError):
        pass
