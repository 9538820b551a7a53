"""Gradient compression for all-reduce: fused C++/CUDA kernels with error feedback.

Every compressor averages (or sums) a tensor in place across a process group while
sending fewer bytes than a float32 ring all-reduce::

    import pycomm.compression as C
    comp = C.OneBit()
    comp.all_reduce(grad, key="layer1")              # in place, on any group
    fut = comp.all_reduce(grad, key=3, async_op=True)
    fut.then(lambda f: ...)                          # f.value() is grad

The collectives go through ``torch.distributed`` on whatever group is passed (Gloo,
NCCL, or pycomm's own backend): packed payloads travel as uint8/half/float tensors
through ``all_to_all_single`` (a compressed reduce-scatter) and ``all_gather_single``
(``all_gather_into_tensor`` on older torch). The shape of the exchange is the 1-bit
Adam one: each rank compresses ``gradient + worker error`` into ``world_size`` chunk
payloads and all-to-alls them; the owner of a chunk decodes the payloads in rank
order, sums them in float32, adds its *server error* and re-compresses; an all-gather
of the re-compressed chunks gives every rank the same bytes, which each decodes
identically — so every rank ends with bitwise-identical results.

=================  =======================================  ==========================
compressor         wire format                              bytes vs fp32 ring
=================  =======================================  ==========================
``FP16()``         fp16 chunks, fp32 sums, one rounding     1/2
``BF16()``         bf16 chunks, fp32 sums, one rounding     1/2
``OneBit()``       signs + one fp32 scale per chunk         ~1/32
``QSGD(bits=8)``   int8 levels + fp32 scale per 512         ~1/3.97 (bits=4: ~1/7.9)
``TopK(ratio)``    k values + k int32 indices, all-gather   ratio * world_size
``PowerSGD(r)``    P (m x r) and Q (n x r) fp32             r (m + n) / (m n)
=================  =======================================  ==========================

State (error residuals, PowerSGD's Q, the QSGD random-stream step) is kept per
``key`` on the tensor's device and round-trips through :meth:`Compressor.state_dict`.

The package: ``engine`` issues and schedules the collectives of a compressed all-reduce
and keeps the per-key state (the :class:`Compressor` interface); ``compressors`` is the
catalogue above; ``momentum`` wraps a compressor for momentum SGD
(:class:`MomentumCorrection`); ``optim`` compresses Adam's / SGD's momentum instead of the
gradients (:class:`OneBitAdam`, :class:`OneBitSGD`).
"""
from __future__ import annotations

import sys
import types

from pycomm.compression import engine
from pycomm.compression.compressors import BF16, FP16, QSGD, OneBit, PowerSGD, TopK
from pycomm.compression.engine import Compressor, compressed_all_reduce, ring_all_reduce_bytes
from pycomm.compression.momentum import (DEFAULT_WARMUP_STEPS, ONEBIT_WARMUP_STEPS, VARIANCE_REFRESH,
                                        MomentumCorrection, for_training)
from pycomm.compression.optim import OneBitAdam, OneBitSGD

__all__ = [
    "Compressor",
    "FP16",
    "BF16",
    "OneBit",
    "TopK",
    "QSGD",
    "PowerSGD",
    "compressed_all_reduce",
    "ring_all_reduce_bytes",
    "MomentumCorrection",
    "for_training",
    "OneBitAdam",
    "OneBitSGD",
]


class _Package(types.ModuleType):
    """``pycomm.compression.NATIVE`` reads and sets :data:`engine.NATIVE`, the switch the
    engine consults on every call (so ``pycomm.compression.NATIVE = False`` keeps working)."""

    @property
    def NATIVE(self) -> bool:  # noqa: N802 - the public name of the switch
        return engine.NATIVE

    @NATIVE.setter
    def NATIVE(self, value: bool) -> None:  # noqa: N802
        engine.NATIVE = bool(value)


sys.modules[__name__].__class__ = _Package
