"""DDP communication hooks: pycomm's compressors inside torch's DistributedDataParallel.

    import pycomm
    from pycomm.compression import OneBit
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=pg)
    ddp.register_comm_hook(pycomm.DDPHookState(compression=OneBit(), group=pg), pycomm.ddp_comm_hook)

The hook averages each DDP bucket with ``compression.all_reduce(bucket.buffer(), group=
state.group, key=bucket.index(), op="avg", async_op=True)`` and returns its future,
whose value is the averaged buffer (DDP does not pre-divide buckets by the world size;
the compressor averages). It works on any backend the compressor works on -- Gloo,
pycomm, NCCL. ``compression=None`` gives an exact all-reduce (AVG on pycomm / NCCL,
divide + SUM elsewhere), i.e. DDP's default behaviour, with timeline events.

Register the hook before the first backward, and pass the same group as DDP's
``process_group`` (None = the world). DDP rebuilds its buckets after the first
iteration, so bucket indices (the compressor keys) change once: error-feedback state
keyed by an old index is re-created at the new size.
"""
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from pycomm import compression as _compression
from pycomm import timeline as _tl

__all__ = ["DDPHookState", "ddp_comm_hook"]


class DDPHookState:
    """State of :func:`ddp_comm_hook`.

    Args:
        compression: a :mod:`pycomm.compression` compressor (its error-feedback state
            lives in it, keyed by DDP bucket index); None for an exact all-reduce. Its
            ``scope`` says where it compresses on a pycomm group spanning several hosts
            (default: the cross-host hop only where that applies, see
            :meth:`pycomm.compression.Compressor.route`).
        group: the process group DDP runs on (None = the world).
        params: the DDP model's parameters; lets ``momentum="auto"`` pick the optimizer
            that steps them (default: the first torch optimizer that steps).

    OneBit, TopK and PowerSGD are wrapped in :class:`pycomm.compression.MomentumCorrection`
    (:func:`pycomm.compression.for_training`): with ``torch.optim.SGD`` they communicate the
    momentum-corrected velocity, with other optimizers they run bare after the warm-up.
    Pass a ``MomentumCorrection`` yourself to choose.

    Attributes:
        calls: hook invocations so far (one per bucket per iteration).
    """

    def __init__(self, compression: Any = None, group: Optional[dist.ProcessGroup] = None,
                 params: Optional[Iterable[torch.Tensor]] = None) -> None:
        # Sign / sparse / low-rank compressors get momentum correction + warm-up (issue 15).
        self.compression = _compression.for_training(compression, params)
        self.group = group
        self.calls = 0
        self._timeline: Optional[_tl.Timeline] = None
        self._timeline_checked = False

    def timeline(self) -> Optional[_tl.Timeline]:
        """The rank's ``PYCOMM_TIMELINE`` trace, if enabled."""
        if not self._timeline_checked:
            self._timeline = _tl.from_env(dist.get_rank())
            self._timeline_checked = True
        return self._timeline

    def state_dict(self) -> dict:
        """The compressor's state (for checkpoints) and the call count. With momentum
        correction, ``compression`` is still the compressor's own state and the
        wrapper's (velocities, steps) is under ``momentum_correction``."""
        comp = self.compression
        out = {"calls": self.calls, "compression": None}
        if isinstance(comp, _compression.MomentumCorrection):
            mc = comp.state_dict()
            out["compression"] = mc.pop("inner")
            out["momentum_correction"] = mc
        elif comp is not None:
            out["compression"] = comp.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`."""
        self.calls = int(state.get("calls", 0))
        comp = self.compression
        if isinstance(comp, _compression.MomentumCorrection):
            if state.get("momentum_correction") is not None:
                comp.load_state_dict(dict(state["momentum_correction"], inner=state.get("compression")))
            elif comp.compressor is not None and state.get("compression") is not None:
                comp.compressor.load_state_dict(state["compression"])
        elif comp is not None and state.get("compression") is not None:
            comp.load_state_dict(state["compression"])

    def __repr__(self) -> str:
        return f"DDPHookState(compression={self.compression!r})"


def _native_avg(group: Optional[dist.ProcessGroup]) -> bool:
    try:
        return dist.get_backend(group) in ("pycomm", "nccl")
    except Exception:  # noqa: BLE001
        return False


# Real (not string) annotations: DDP's register_comm_hook checks them.
def ddp_comm_hook(state: DDPHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: averages ``bucket.buffer()`` across ``state.group`` with
    ``state.compression`` and returns a Future of the averaged buffer."""
    buf = bucket.buffer()
    index = bucket.index()
    state.calls += 1
    tl = state.timeline()
    t0 = _tl.now_ns()
    group = state.group
    world = dist.get_world_size(group)
    if world == 1:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buf)
        return fut
    if state.compression is not None:
        if hasattr(state.compression, "set_layout"):
            # PowerSGD (per-parameter factorisation) and the Adam path of MomentumCorrection
            # need the bucket's parameters (issue 15);
            # DDP's buffer holds their gradients back to back in parameters() order.
            offs, off = [], 0
            for p in bucket.parameters():
                offs.append((p, off))
                off += p.numel()
            state.compression.set_layout(index, offs)
        fut = state.compression.all_reduce(buf, group=group, key=index, op="avg", async_op=True)
    elif _native_avg(group):
        fut = dist.all_reduce(buf, op=dist.ReduceOp.AVG, group=group, async_op=True).get_future()
    else:
        buf.div_(world)
        fut = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True).get_future()
    t1 = _tl.now_ns()
    last = bucket.is_last()

    def done(f: torch.futures.Future) -> torch.Tensor:
        t2 = _tl.now_ns()
        f.value()  # re-raises a communication error
        if tl is not None:
            tid = _tl.bucket_tid(index)
            nbytes = buf.numel() * buf.element_size()
            tl.span("compress+issue" if state.compression is not None else "issue", t0, t1, tid,
                    args={"bytes": nbytes, "ddp": True})
            tl.span("communicate", t1, t2, tid, args={"bytes": nbytes, "ddp": True})
            if last:
                tl.flush()
        return buf

    return fut.then(done)
