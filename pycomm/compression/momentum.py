"""Momentum-aware compression: DGC-style momentum correction that any optimizer can use.

    import pycomm.compression as C
    comp = C.MomentumCorrection(C.OneBit())          # momentum="auto", warmup_steps=10
    model = pycomm.DataParallel(net, compression=comp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # unchanged recipe

``DataParallel`` and the DDP hook apply this wrapper on their own to the sign and
sparse compressors (:func:`for_training`), so ``DataParallel(net, compression=OneBit())``
already runs it.

What one call does, per key (a DataParallel / DDP bucket), with ``beta = momentum``:

1. ``u = beta * V_prev + g`` -- the velocity this rank would have if it applied its own
   gradient to the last *common* velocity ``V_prev`` (the previous call's result,
   bitwise identical on every rank): 1-bit SGD / 1-bit Adam's form of momentum
   correction. (``local_velocity=True`` keeps DGC's private ``u = beta * u + g``
   instead, with momentum factor masking for TopK; it measured worse, see
   docs/COMPRESSION.md.)
2. ``V = all_reduce(u)`` with the inner compressor, whose error feedback now acts on the
   velocity; the first ``warmup_steps`` calls per key use the exact float32 all-reduce
   instead (DGC / 1-bit Adam / PowerSGD warm-up);
3. the tensor receives ``V - beta * V_prev`` -- the *gradient* whose momentum is ``V``.

Step 3 is what lets the user's optimizer stay unchanged: SGD with momentum ``beta``
(any dampening, Nesterov too) re-integrates the returned gradients into exactly ``V``,
the compressed velocity 1-bit SGD / DGC would apply. Without compression the filter and
its inverse cancel -- ``avg(beta * V_prev + g) - beta * V_prev = avg(g)`` -- so the
wrapper is the exact average whatever the optimizer (to float rounding; tested). With
``momentum="auto"`` (the default) ``beta`` is read from the torch optimizer that steps
the wrapped parameters (``torch.optim.SGD``: its ``momentum``; any other optimizer:
0, i.e. the bare compressor after the warm-up: Adam's variance term does not
re-integrate, use :class:`pycomm.compression.OneBitAdam` there).

Error feedback stays correct: its residual lives in velocity units before the exchange
and one call happens per synchronised step (``no_sync`` accumulation arrives as one
gradient); whatever clipping, a loss scaler or the optimizer do with the returned
gradient afterwards does not touch it. A call whose result is not finite (an fp16 loss
scaler's overflow step: identical on every rank) resets the key's velocity and the
inner compressor's state, and the non-finite result is handed on for the scaler to see.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Hashable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from pycomm.compression.compressors import OneBit, PowerSGD, TopK
from pycomm.compression.engine import _NONE, _completed, _divisor, _write_back

__all__ = ["MomentumCorrection", "for_training", "DEFAULT_WARMUP_STEPS"]

#: Exact (uncompressed) calls per key before compression starts.
DEFAULT_WARMUP_STEPS: int = 10


class MomentumCorrection:
    """Wraps a compressor so that it communicates velocities instead of raw gradients
    (momentum correction) and hands back the gradient whose momentum is the communicated
    velocity (see the module docstring).

    Args:
        compressor: the inner :class:`pycomm.compression.Compressor` (its error feedback
            then acts on the velocity). ``None`` gives the exact float32 all-reduce (the
            wrapper is then lossless: a reference).
        momentum: ``beta``, a float in [0, 1) -- best the optimizer's momentum -- or
            ``"auto"``: read from the torch optimizer that steps ``params`` (any optimizer
            when ``params`` is None) at its first step; 0 if none has stepped by the
            second call of a key. ``0`` with ``warmup_steps=0`` is the bare compressor.
        warmup_steps: calls per key that use the exact all-reduce before compression starts.
        params: the parameters whose gradients go through this wrapper (DataParallel
            passes them), used by ``momentum="auto"`` to find their optimizer.
        local_velocity: DGC's form: each rank keeps a private velocity ``u = beta * u + g``
            (instead of starting from the common ``V_prev``).
        masking: with ``local_velocity``, zero ``u`` where this rank sent an entry (DGC's
            momentum factor masking). ``None``: on for TopK, off otherwise.

    Like every compressor it averages (``op="avg"``) or sums in place, asynchronously
    with ``async_op=True``, gives bitwise-identical results on every rank, and keeps its
    state per key (last result, step, velocity with ``local_velocity``, and the inner
    compressor's state), saved by :meth:`state_dict`. ``wire_bytes`` is the inner
    compressor's (compressed calls).
    """

    def __init__(self, compressor: Any, momentum: Union[float, str] = "auto",
                 warmup_steps: int = DEFAULT_WARMUP_STEPS, params: Optional[Iterable[torch.Tensor]] = None,
                 local_velocity: bool = False, masking: Optional[bool] = None) -> None:
        if momentum != "auto" and not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"MomentumCorrection momentum must be 'auto' or in [0, 1), got {momentum!r}")
        if warmup_steps < 0:
            raise ValueError(f"MomentumCorrection warmup_steps must be >= 0, got {warmup_steps}")
        if isinstance(compressor, MomentumCorrection):
            raise ValueError("MomentumCorrection: the compressor is already wrapped")
        self.compressor = compressor
        self.warmup_steps = int(warmup_steps)
        self.local_velocity = bool(local_velocity)
        if masking is None:
            masking = self.local_velocity and isinstance(compressor, TopK)
        if masking and not (self.local_velocity and isinstance(compressor, TopK)):
            raise ValueError("MomentumCorrection: masking needs local_velocity=True and a TopK compressor")
        self.masking = bool(masking)
        self.auto = momentum == "auto"
        self.momentum: Optional[float] = None if self.auto else float(momentum)
        self._param_ids = None if params is None else frozenset(id(p) for p in params)
        self._states: Dict[Hashable, Dict[str, Any]] = {}
        if self.auto:
            _watch(self)

    def __repr__(self) -> str:
        m = "auto" if self.auto and self.momentum is None else self.momentum
        return f"MomentumCorrection({self.compressor!r}, momentum={m}, warmup_steps={self.warmup_steps})"

    def _learn(self, optimizer: torch.optim.Optimizer) -> bool:
        """Takes beta from ``optimizer`` if it steps our parameters; True when it did."""
        for group in optimizer.param_groups:
            if self._param_ids is None or any(id(p) in self._param_ids for p in group["params"]):
                m = group.get("momentum", 0.0) if isinstance(optimizer, torch.optim.SGD) else 0.0
                self.momentum = float(m) if 0.0 <= float(m) < 1.0 else 0.0
                return True
        return False

    # -- compressor interface ----------------------------------------------------------

    def wire_bytes(self, numel: int, world_size: int) -> int:
        """Bytes this rank sends per compressed call (the inner compressor's)."""
        inner = self.compressor if self.compressor is not None else _NONE
        return inner.wire_bytes(numel, world_size)

    def all_reduce(self, tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                   key: Optional[Hashable] = None, op: Any = "avg",
                   async_op: bool = False) -> Union[torch.Tensor, torch.futures.Future]:
        """As :meth:`pycomm.compression.Compressor.all_reduce`; the result is the gradient
        whose momentum-``beta`` accumulation is the communicated velocity."""
        _divisor(op, 1)  # validates op
        world_size = dist.get_world_size(group)
        if world_size == 1 or tensor.numel() == 0:
            return _completed(tensor) if async_op else tensor
        if key is None:
            key = "shape=" + "x".join(str(d) for d in tensor.shape)
        st = self._states.get(key)
        n = tensor.numel()
        if st is None or st["v"].numel() != n or st["v"].device != tensor.device:
            # New key, or DDP rebuilt its buckets: start from zero velocity (the exact
            # all-reduce of the warm-up makes the restart harmless).
            st = self._states[key] = {"step": 0}
            st["v"] = torch.zeros(n, dtype=torch.float32, device=tensor.device)
            if self.local_velocity:
                st["u"] = torch.zeros(n, dtype=torch.float32, device=tensor.device)
        step = int(st["step"])
        st["step"] = step + 1
        if self.momentum is None and step >= 1:
            self.momentum = 0.0  # no torch optimizer stepped our parameters: the bare compressor
        beta = self.momentum or 0.0
        prev = st["v"]
        g = tensor.detach().reshape(-1)
        if self.local_velocity:
            u = st["u"]
            u.mul_(beta).add_(g)
            x = u.clone()  # the inner compressor works in place on what it sends
        else:
            x = torch.mul(prev, beta) if beta != 0.0 else torch.zeros_like(prev)
            x.add_(g)
        compressing = step >= self.warmup_steps and self.compressor is not None
        inner = self.compressor if compressing else _NONE
        mask_after = compressing and self.masking

        def finish() -> torch.Tensor:
            if not bool(torch.isfinite(x).all()):
                # Identical on every rank (bitwise-identical results): all reset together and
                # the overflow reaches the loss scaler, which skips the step.
                self._states.pop(key, None)
                if self.compressor is not None:
                    self.compressor._states.pop(key, None)
                _write_back(tensor, x)
                return tensor
            if mask_after:
                # TopK's residual is zero exactly where this rank's entries were sent.
                st["u"].masked_fill_(self.compressor._states[key]["residual"] == 0, 0.0)
            out = x.sub(prev, alpha=beta) if beta != 0.0 else x
            prev.copy_(x)
            _write_back(tensor, out)
            return tensor

        if async_op:
            fut = inner.all_reduce(x, group=group, key=key, op=op, async_op=True)

            def done(f: torch.futures.Future) -> torch.Tensor:
                f.value()  # re-raises a communication error
                return finish()

            return fut.then(done)
        inner.all_reduce(x, group=group, key=key, op=op, async_op=False)
        return finish()

    def state_dict(self) -> Dict[str, Any]:
        """Per key: last result, step (and velocity); beta; the inner compressor's state."""
        out = {k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
               for k, st in self._states.items()}
        inner = self.compressor.state_dict() if self.compressor is not None else None
        return {"type": type(self).__name__, "states": out, "momentum": self.momentum, "inner": inner}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (a resumed run continues bit-exactly)."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state of {state.get('type')} given to {type(self).__name__}")
        self._states = {k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                        for k, st in state["states"].items()}
        if state.get("momentum") is not None:
            self.momentum = float(state["momentum"])
        if self.compressor is not None and state.get("inner") is not None:
            self.compressor.load_state_dict(state["inner"])


# -- momentum="auto": one global optimizer step pre-hook serves every waiting wrapper ------

_waiting: "weakref.WeakSet[MomentumCorrection]" = weakref.WeakSet()
_hook_handle: Any = None


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for mc in list(_waiting):
        if mc.momentum is not None or mc._learn(optimizer):
            _waiting.discard(mc)


def _watch(mc: MomentumCorrection) -> None:
    global _hook_handle
    _waiting.add(mc)
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook_handle = register_optimizer_step_pre_hook(_on_optimizer_step)


def for_training(compression: Any, params: Optional[Iterable[torch.Tensor]] = None) -> Any:
    """The compressor DataParallel and the DDP hook actually run for ``compression``.

    Sign, sparse and low-rank compressors (:class:`OneBit`, :class:`TopK`,
    :class:`PowerSGD`) are wrapped in ``MomentumCorrection(c, momentum="auto",
    warmup_steps=10, params=params)``: with torch's SGD they then communicate the
    momentum-corrected velocity (error feedback on raw gradients under momentum 0.9 lost
    up to 50 points here); with any other optimizer they run bare after 10 exact steps.
    Returned unchanged: ``None``, a :class:`MomentumCorrection` (pass
    ``MomentumCorrection(c, momentum=0, warmup_steps=0)`` to run a compressor bare), and
    the near-lossless compressors (FP16, BF16, QSGD).
    """
    if compression is None or isinstance(compression, MomentumCorrection):
        return compression
    if type(compression) in (OneBit, TopK, PowerSGD):
        return MomentumCorrection(compression, params=params)
    return compression
