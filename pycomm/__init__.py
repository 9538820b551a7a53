"""pycomm: collective communication for PyTorch.

``import pycomm`` registers the ``"pycomm"`` backend of torch.distributed::

    import pycomm, torch.distributed as dist
    dist.init_process_group("pycomm")          # under torchrun, or with a store
    dist.all_reduce(t)                         # runs in pycomm's C++ ring / shm code
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import torch  # noqa: F401  (loads libtorch before the extension)
import torch.distributed as dist

from pycomm import _C  # noqa: F401
from pycomm._backend import binding, heap_policy, is_pycomm_group, register, stats, transport
from pycomm.collectives import (all_gather, all_reduce, all_to_all, as_tensor, barrier, broadcast, recv, reduce,
                                reduce_scatter, send)

__version__ = "0.1.0"

register()

from pycomm import compression  # noqa: E402
from pycomm.data_parallel import DataParallel  # noqa: E402
from pycomm.ddp_hooks import DDPHookState, ddp_comm_hook  # noqa: E402
from pycomm.local_sgd import AsyncLocalSGD, LocalSGD  # noqa: E402
from pycomm import balance  # noqa: E402
from pycomm.balance import SpeedBalancer  # noqa: E402
from pycomm import flight_recorder  # noqa: E402

flight_recorder._install_default()


def init_process_group(backend: str = "pycomm", timeout: Optional[datetime.timedelta] = None, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` with pycomm as the default backend.

    Under torchrun the environment supplies rank, world size and the store address;
    ``rank``/``world_size``/``store``/``init_method`` pass through as in torch.
    ``timeout`` defaults to ``PYCOMM_TIMEOUT`` seconds if set, else torch's default.
    """
    if timeout is None and os.environ.get("PYCOMM_TIMEOUT"):
        timeout = datetime.timedelta(seconds=float(os.environ["PYCOMM_TIMEOUT"]))
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(backend, **kwargs)


def dump_flight_recorder(path: Optional[str] = None) -> str:
    """Writes this rank's flight recorder (its last collectives, in torch's
    flight-recorder dump format) and returns the file; see :mod:`pycomm.flight_recorder`."""
    return flight_recorder.dump(path)


def compressed_all_reduce(tensor: Any, compression: Any, op: str = "avg", group: Any = None, key: Any = None,
                          async_op: bool = False) -> Any:
    """All-reduce through a :mod:`pycomm.compression` compressor (see its docs)."""
    return compression.all_reduce(as_tensor(tensor), group=group, key=key, op=op, async_op=async_op)


__all__ = [
    "init_process_group", "all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "all_to_all",
    "send", "recv", "barrier", "stats", "transport", "is_pycomm_group", "compressed_all_reduce", "as_tensor",
    "compression", "DataParallel", "DDPHookState", "ddp_comm_hook",
    "LocalSGD", "AsyncLocalSGD", "balance", "SpeedBalancer", "flight_recorder", "dump_flight_recorder",
]
