"""Registration of the ``pycomm`` torch.distributed backend and group helpers."""
from __future__ import annotations

import datetime
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from pycomm import _C

BACKEND_NAME = "pycomm"


def _create(opts: Any, backend_options: Any = None) -> Any:
    # torch's extended creator API: the group's name and global ranks name it in the
    # flight recorder (pycomm.flight_recorder); torch's default group has no rank list.
    ranks = list(opts.global_ranks_in_group) or list(range(opts.group_size))
    desc = "default_pg" if not opts.global_ranks_in_group else "undefined"
    _C._flight_recorder_next_group(str(opts.group_id), desc, ranks)
    backend = _C.create_backend(opts.store, opts.group_rank, opts.group_size, opts.timeout)
    _fit_torch_threads()
    return backend


_THREADS_BEFORE: Optional[int] = None


def _fit_torch_threads() -> None:
    """A rank pycomm bound to fewer CPUs than torch's intra-op threads (an oversubscribed
    host, core/affinity.h) runs that many threads: more would share its cores and wait on
    each other (torchrun sets OMP_NUM_THREADS=1 for several ranks per node alike)."""
    global _THREADS_BEFORE
    b = _C.binding()
    if b["bound"] and _THREADS_BEFORE is None and torch.get_num_threads() > len(b["cpus"]):
        _THREADS_BEFORE = torch.get_num_threads()
        torch.set_num_threads(len(b["cpus"]))


def binding() -> Dict[str, Any]:
    """How pycomm placed this process on the host's CPUs (``PYCOMM_BIND``).

    When a host runs more ranks than the CPUs they may use, the first pycomm group binds
    each local rank's process (all its threads) to one of those CPUs, round robin by its
    position among the host's ranks, and lowers torch's intra-op threads to match: the
    scheduler then stops moving ranks between cores while they wait for each other
    (docs/USER_GUIDE.md, "Ranks and cores"). ``PYCOMM_BIND=0`` leaves the placement to the
    OS; ``PYCOMM_BIND=1`` binds even when not oversubscribed (contiguous shares).

    Keys: ``decided`` (a group ran the policy), ``bound``, ``cpus`` (bound to), ``before``
    (the CPUs the process had), ``local_index``, ``local_size``, ``mode``, ``reason``, and
    ``torch_threads_before`` (None unless pycomm lowered ``torch.get_num_threads()``).
    """
    out = dict(_C.binding())
    out["torch_threads_before"] = _THREADS_BEFORE
    return out


def heap_policy() -> Dict[str, Any]:
    """How pycomm set this process's heap (``PYCOMM_HEAP``).

    The first pycomm group fixes glibc malloc's thresholds so that the buffers a training
    step frees stay in the heap for the next step instead of going back to the OS and
    being page-faulted and zeroed again (mmap only for blocks of 32 MiB and more, up to
    512 MiB kept free at the top of the heap; docs/USER_GUIDE.md, "The heap"). Left alone
    when the process chose its own malloc settings (``MALLOC_*_``, ``GLIBC_TUNABLES``,
    jemalloc/tcmalloc/mimalloc preloaded) unless ``PYCOMM_HEAP=1``; ``PYCOMM_HEAP=0``
    turns it off.

    Keys: ``decided`` (a group ran the policy), ``applied``, ``mmap_threshold`` and
    ``trim_threshold`` (bytes, when applied), ``mode``, ``reason``.
    """
    return dict(_C.heap_policy())


def register() -> None:
    """Registers ``"pycomm"`` with torch.distributed (idempotent)."""
    if hasattr(dist.Backend, "PYCOMM") or BACKEND_NAME in getattr(dist.Backend, "backend_list", []):
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=True, devices=["cpu", "cuda"])


def _pycomm_backend(group: Optional[dist.ProcessGroup]) -> Any:
    pg = group if group is not None else dist.group.WORLD
    if pg is None:
        raise RuntimeError("pycomm: the default process group is not initialised; call "
                           "pycomm.init_process_group() or torch.distributed.init_process_group('pycomm')")
    try:
        be = pg._get_backend(torch.device("cpu"))
    except RuntimeError as e:
        raise ValueError(f"pycomm: the group has no CPU backend ({e})") from None
    if not isinstance(be, _C.PycommBackend):
        raise ValueError(f"pycomm: the group's backend is {type(be).__name__}, not pycomm")
    return be


def is_pycomm_group(group: Optional[dist.ProcessGroup] = None) -> bool:
    """True if `group` (default: the world group) runs on the pycomm backend."""
    try:
        _pycomm_backend(group)
        return True
    except (ValueError, RuntimeError):
        return False


def stats(group: Any = None) -> Dict[str, int]:
    """Counters of a pycomm group on this rank (``group="all"``: every pycomm group
    this process has created, live or destroyed, summed — what compressors and
    DataParallel send on their side groups included).

    Keys: ``collectives`` (collectives completed), ``bytes_sent`` / ``bytes_recv``
    (payload bytes this rank put on / took off the transport, also under
    ``bytes_sent_<transport>``), ``messages_sent``, ``rank``, ``world_size``;
    ``algo_<collective>_<algorithm>``: calls run with each algorithm (e.g.
    ``algo_all_reduce_ring``, named as ``PYCOMM_ALGO`` names them); and
    ``transport`` is available through :func:`transport`.
    """
    if isinstance(group, str):
        if group != "all":
            raise ValueError(f"pycomm.stats: group must be a ProcessGroup, None or 'all', not {group!r}")
        return dict(_C.process_stats())
    return dict(_pycomm_backend(group).stats())


def transport(group: Optional[dist.ProcessGroup] = None) -> str:
    """The transport a pycomm group uses on this rank: ``"shm"``, ``"tcp"``, or ``"shm+tcp"`` (several
    hosts with co-located ranks: shared memory inside a host, TCP between hosts)."""
    return _pycomm_backend(group).transport()
