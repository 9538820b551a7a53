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
   (or ``warmup_compression``, a near-lossless compressor) instead (DGC / 1-bit Adam /
   PowerSGD warm-up);
3. the tensor receives ``V - beta * V_prev`` -- the *gradient* whose momentum is ``V``.

Step 3 is what lets the user's optimizer stay unchanged: SGD with momentum ``beta``
(any dampening, Nesterov too) re-integrates the returned gradients into exactly ``V``,
the compressed velocity 1-bit SGD / DGC would apply. Without compression the filter and
its inverse cancel -- ``avg(beta * V_prev + g) - beta * V_prev = avg(g)`` -- so the
wrapper is the exact average whatever the optimizer (to float rounding; tested). With
``momentum="auto"`` (the default) ``beta`` is read from the torch optimizer that steps
the wrapped parameters (``torch.optim.SGD``: its ``momentum``; Adam-like optimizers,
below; anything else: 0, i.e. the bare compressor after the warm-up).

**Adam / AdamW** (``torch.optim.Adam``, ``AdamW`` or any optimizer with ``betas``, ``eps``
and ``exp_avg_sq`` state), learned by ``momentum="auto"``: the compression noise of the
returned gradient would enter Adam's second moment as ``g**2``, inflate it and shrink
every step (error feedback cannot undo a nonlinear function of the noise). So, as 1-bit
Adam does, the variance is **frozen** after the warm-up: at a key's first compressed call
its ``v_hat`` (read from the optimizer's state over the key's parameters, which
DataParallel and the DDP hook pass through :meth:`MomentumCorrection.set_layout`) becomes
``F``, and a step pre-hook on the optimizer sets ``exp_avg_sq`` before every step so that
after Adam's own update ``v_hat == F`` (coordinates whose root-variance is below 10 % of
their parameter's mean stay Adam's). ``F`` is refreshed after 256 compressed calls of
the key and at every doubling (``variance_refresh``): from the ranks' averaged local
second moments (each rank's ``beta2`` average of its own gradient squared; one exact
all-reduce per refresh), since a variance frozen after a few steps keeps their gradient
scale for the whole run. The first moment needs nothing: with OneBit
``beta = beta1`` and Adam's ``m = (1 - beta1) * sum beta1**k g'`` re-integrates the
returned gradients into ``(1 - beta1) * V``, the compressed momentum (1-bit Adam); with
TopK / PowerSGD ``beta = 0`` and Adam's momentum averages the error-fed gradient
(each measured better for its compressor, docs/COMPRESSION.md). This writes into the
optimizer's ``exp_avg_sq``; ``freeze_variance=False`` leaves it alone. Nothing is frozen
while nothing is compressed (warm-up, exact inner): the wrapper stays the exact average.

**Delta** (``delta``; OneBit with SGD-Nesterov by default): each rank sends its deviation
from the ranks' last common result ``G`` and ``G`` is added back, the inner compressor's
own error buffers zeroed first -- EF21's error feedback with one estimate shared by the
ranks, at the same bytes. On the character LM with SGD-Nesterov, OneBit's own error
feedback made the run fit sooner and over-fit (held-out loss +4.5 % after 64 epochs); with
the delta it ends at the uncompressed loss (docs/COMPRESSION.md).

Error feedback stays correct: its residual lives in velocity units before the exchange
and one call happens per synchronised step (``no_sync`` accumulation arrives as one
gradient); whatever clipping, a loss scaler or the optimizer do with the returned
gradient afterwards does not touch it. A call whose result is not finite (an fp16 loss
scaler's overflow step: identical on every rank) resets the key's velocity and the
inner compressor's state, and the non-finite result is handed on for the scaler to see.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Dict, Hashable, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from pycomm.compression.compressors import QSGD, OneBit, PowerSGD, TopK
from pycomm.compression.engine import _NONE, _completed, _divisor, _write_back

__all__ = ["MomentumCorrection", "for_training", "DEFAULT_WARMUP_STEPS", "ONEBIT_WARMUP_STEPS", "VARIANCE_REFRESH"]

#: Adam preconditioner floor, as a fraction of a parameter's mean sqrt(v_hat).
_FLOOR = 0.1

#: Exact (uncompressed) calls per key before compression starts.
DEFAULT_WARMUP_STEPS: int = 10

#: OneBit's warm-up under :func:`for_training` (through QSGD-8 with error feedback).
ONEBIT_WARMUP_STEPS: int = 5

#: Compressed calls per key before the frozen Adam variance is first refreshed (then at
#: every doubling of the count): see ``variance_refresh``.
VARIANCE_REFRESH: int = 256


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
        freeze_variance: with an Adam-like optimizer (learned by ``momentum="auto"`` or
            given to :meth:`set_optimizer`), keep its ``v_hat`` at the warm-up's value while
            compressing (module docstring). ``"auto"``/``True``: on; ``False``: off.
        variance_refresh: with the frozen variance, re-estimate it after this many
            compressed calls of a key and again at every doubling (256, 512, 1024, ...):
            each rank keeps ``s``, the optimizer's ``beta2`` average of its own local
            gradient squared (one pass per call, no bytes), and at a refresh ``s`` is
            averaged over the ranks (one exact float32 all-reduce of the bucket) and
            becomes the new F (bias-corrected, same floor). Frozen at the warm-up's end
            alone, F holds the first steps' gradient scale for the whole run (on the
            character LM, whose gradients grow after the first steps, Adam then took
            larger steps and over-fitted: docs/COMPRESSION.md). ``None``: never
            (1-bit Adam's single freeze). Only with ``op="avg"``.
        scale_by_variance: also compress ``u / (sqrt(F) + eps)`` (clamped to
            ``1 / sqrt(1 - beta2)``) and scale back after the exchange, as
            :class:`OneBitAdam` does: the error is then the size of an Adam step on every
            coordinate. Off by default (measured worse on the CNN, docs/COMPRESSION.md).
        warmup_compression: what the warm-up calls use instead of the exact float32
            all-reduce (e.g. ``QSGD(bits=4, error_feedback=True)``: ~8x fewer bytes in the
            warm-up; measured -2 points for Adam + OneBit; :func:`for_training` gives
            OneBit 5 steps of ``QSGD(bits=8, error_feedback=True)`` and TopK 10).
        exact: a predicate on a parameter (e.g. ``lambda p: p.dim() == 1``): the
            coordinates of the parameters it accepts (in the key's layout, from
            :meth:`set_layout`) travel through the exact float32 all-reduce while
            compressing, the rest (packed, with gaps) through the compressor, whose state
            and layout then cover only those. ``None`` (default): everything is compressed.
            (DGC / torch's PowerSGD hook keep small tensors exact; on the character LM it
            did not close the gap, docs/COMPRESSION.md.)
        exact_compression: what the ``exact`` parameters travel through instead of the
            exact float32 all-reduce (e.g. ``QSGD(bits=8, error_feedback=True)``: ~4x fewer
            bytes for them). ``None`` (default): float32.
        delta: compress each rank's deviation from the ranks' last common result ``G``
            and add ``G`` back (``G`` then becomes the new result), the inner compressors'
            own error buffers zeroed before each such call: the error feedback of EF21
            (Richtarik et al., 2021), with one estimate shared by the ranks instead of one
            per rank (no extra bytes). A call's error is then the compression error of
            what changed since the last result plus the ranks' spread, and it is not
            carried over. ``True``: always; ``"nesterov"``: only while the Nesterov step
            is communicated (``nesterov_step``) -- the error then lands on one step, where
            in the velocity form the momentum re-applies it (the LM with SGD momentum
            broke on one seed of three); ``False`` (default): the inner compressors'
            own error feedback. One float32 buffer per key; warm-up calls only set ``G``.
            :func:`for_training` gives OneBit ``"nesterov"`` (docs/COMPRESSION.md).

    Like every compressor it averages (``op="avg"``) or sums in place, asynchronously
    with ``async_op=True``, gives bitwise-identical results on every rank, and keeps its
    state per key (last result, step, velocity with ``local_velocity``, and the inner
    compressor's state), saved by :meth:`state_dict`. ``wire_bytes`` is the inner
    compressor's (compressed calls).
    """

    def __init__(self, compressor: Any, momentum: Union[float, str] = "auto",
                 warmup_steps: int = DEFAULT_WARMUP_STEPS, params: Optional[Iterable[torch.Tensor]] = None,
                 local_velocity: bool = False, masking: Optional[bool] = None,
                 freeze_variance: Union[bool, str] = "auto", scale_by_variance: bool = False,
                 warmup_compression: Any = None, exact: Any = None, exact_compression: Any = None,
                 nesterov_step: Union[bool, str] = False,
                 variance_refresh: Optional[int] = VARIANCE_REFRESH, delta: Union[bool, str] = False) -> None:
        if momentum != "auto" and not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"MomentumCorrection momentum must be 'auto' or in [0, 1), got {momentum!r}")
        if warmup_steps < 0:
            raise ValueError(f"MomentumCorrection warmup_steps must be >= 0, got {warmup_steps}")
        if variance_refresh is not None and (isinstance(variance_refresh, bool) or not isinstance(variance_refresh, int)
                                             or variance_refresh < 1):
            raise ValueError("MomentumCorrection variance_refresh must be None or an int >= 1, "
                             f"got {variance_refresh!r}")
        self.variance_refresh = variance_refresh
        if delta not in (True, False, "nesterov") or not isinstance(delta, (bool, str)):
            raise ValueError(f"MomentumCorrection delta must be True, False or 'nesterov', got {delta!r}")
        self.delta = delta
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
        # Communicate SGD-Nesterov's step instead of the velocity: True, or "auto" (when the
        # optimizer momentum="auto" learns is SGD with nesterov=True); needs the common
        # velocity (not local_velocity).
        if nesterov_step not in ("auto", True, False):
            raise ValueError(f"MomentumCorrection nesterov_step must be 'auto', True or False, got {nesterov_step!r}")
        if nesterov_step is not False and local_velocity:
            raise ValueError("MomentumCorrection: nesterov_step needs local_velocity=False")
        self.nesterov_step = nesterov_step
        self.nesterov = nesterov_step is True
        self._param_ids = None if params is None else frozenset(id(p) for p in params)
        self._states: Dict[Hashable, Dict[str, Any]] = {}
        if freeze_variance not in ("auto", True, False):
            raise ValueError(f"MomentumCorrection freeze_variance must be 'auto', True or False, got {freeze_variance!r}")
        self.freeze_variance = freeze_variance
        self.scale_by_variance = bool(scale_by_variance)
        # What the warm-up calls use: None = the exact float32 all-reduce; a near-lossless
        # compressor (QSGD with error feedback) makes the warm-up cheaper.
        self.warmup_compression = warmup_compression
        # Parameters that travel exactly (float32) instead of through the compressor:
        # a predicate on the parameter (None: none). Needs the key's layout (set_layout).
        self.exact = exact
        self.exact_compression = exact_compression
        self._split: Dict[Hashable, Optional[_Split]] = {}
        # Adam-like optimizer whose second moment preconditions the compressed values
        # (learned by momentum="auto" or given to set_optimizer), and each key's layout:
        # [(param, offset)] -- DataParallel passes its buckets (set_layout).
        self._adam: Optional["weakref.ReferenceType[torch.optim.Optimizer]"] = None
        self._layout: Dict[Hashable, List[Tuple[torch.Tensor, int]]] = {}
        self._bound: Optional[float] = None
        if self.auto:
            _watch(self)

    def __repr__(self) -> str:
        m = "auto" if self.auto and self.momentum is None else self.momentum
        return f"MomentumCorrection({self.compressor!r}, momentum={m}, warmup_steps={self.warmup_steps})"

    def _learn(self, optimizer: torch.optim.Optimizer) -> bool:
        """Takes beta from ``optimizer`` if it steps our parameters; True when it did."""
        for group in optimizer.param_groups:
            if self._param_ids is None or any(id(p) in self._param_ids for p in group["params"]):
                if isinstance(optimizer, torch.optim.SGD):
                    m = group.get("momentum", 0.0)
                    if self.nesterov_step == "auto":
                        self.nesterov = bool(group.get("nesterov", False))
                elif _adam_like(optimizer):
                    self.set_optimizer(optimizer)
                    # OneBit: compress Adam's momentum (1-bit Adam; a sign of the raw gradient
                    # is too coarse). TopK / PowerSGD: the gradient with error feedback, Adam's
                    # own momentum smooths it (measured better for both, docs/COMPRESSION.md).
                    sparse = isinstance(self.compressor, (TopK, PowerSGD))
                    m = 0.0 if sparse else group["betas"][0]
                else:
                    m = 0.0
                self.momentum = float(m) if 0.0 <= float(m) < 1.0 else 0.0
                return True
        return False

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The Adam-like optimizer (``exp_avg_sq`` state, ``betas``, ``eps``) stepping the
        wrapped parameters: its variance is frozen while compressing (``freeze_variance``).
        ``momentum="auto"`` calls this itself."""
        if self._adam is not None and self._adam() is optimizer:
            return
        self._adam = weakref.ref(optimizer)
        if self.freeze_variance is not False:
            ref = weakref.ref(self)
            optimizer.register_step_pre_hook(lambda opt, a, k: _freeze_variance(ref, opt))

    def set_layout(self, key: Hashable, params: Iterable[Tuple[torch.Tensor, int]]) -> None:
        """Which parameters make up ``key``'s flat tensor: ``(param, offset)`` pairs
        (DataParallel and the DDP hook pass their buckets). Used by the Adam path, and
        handed on to the inner compressors (PowerSGD factorises each parameter)."""
        self._layout[key] = [(p, int(off)) for p, off in params]
        self._split.pop(key, None)
        inner_layout = self._layout[key]
        if self.exact is not None:
            # The inner compressors see only the compressed parameters, packed in order.
            inner_layout, pos = [], 0
            for p, off in sorted(self._layout[key], key=lambda e: e[1]):
                if not self.exact(p):
                    inner_layout.append((p, pos))
                    pos += p.numel()
        for c in (self.compressor, self.warmup_compression):
            if c is not None and hasattr(c, "set_layout"):
                c.set_layout(key, inner_layout)

    def _split_of(self, key: Hashable, n: int, device: torch.device) -> Optional["_Split"]:
        """Where ``key``'s exact and compressed coordinates lie in its flat tensor, or None
        when nothing of it is exact (no predicate, no layout, or no parameter matches)."""
        if self.exact is None or key not in self._layout:
            return None
        sp = self._split.get(key, False)
        if sp is False or (sp is not None and sp.n != n):
            mask = torch.zeros(n, dtype=torch.bool)
            for p, off in self._layout[key]:
                if self.exact(p) and off + p.numel() <= n:
                    mask[off:off + p.numel()] = True
            sp = _Split.of(mask, device) if bool(mask.any()) else None
            self._split[key] = sp
        return sp

    def _frozen(self, key: Hashable, st: Dict[str, Any], n: int, device: torch.device) -> Optional[torch.Tensor]:
        """The key's preconditioner ``sqrt(F) + eps``, F = the optimizer's ``v_hat`` frozen at
        the key's first compressed call (1-bit Adam), or None (no Adam-like optimizer)."""
        if "F" not in st:
            mask = torch.zeros(n, dtype=torch.bool, device=device)
            d = self._preconditioner(key, n, device, mask)
            if d is None:
                return None
            st["F"], st["F_frozen"] = d, mask
        return st["F"]

    def _track_variance(self, st: Dict[str, Any], g: torch.Tensor) -> None:
        """``s = beta2 * s + (1 - beta2) * g**2`` of this rank's own gradient (no bytes)."""
        opt = self._adam() if self._adam is not None else None
        if opt is not None:
            b2 = max(grp["betas"][1] for grp in opt.param_groups)
        elif "s_beta2" in st:
            b2 = float(st["s_beta2"])
        else:
            return
        s = st.get("s")
        if s is None or s.numel() != g.numel() or s.device != g.device:
            s = st["s"] = torch.zeros(g.numel(), dtype=torch.float32, device=g.device)
            st["s_n"] = 0
        gf = g if g.dtype == torch.float32 else g.float()
        s.mul_(b2).addcmul_(gf, gf, value=1.0 - b2)
        st["s_n"] = int(st["s_n"]) + 1
        st["s_beta2"] = b2

    def _refresh_due(self, compressed_calls: int) -> bool:
        """At variance_refresh compressed calls and every doubling after."""
        r = self.variance_refresh
        if r is None or compressed_calls < r or compressed_calls % r:
            return False
        q = compressed_calls // r
        return q & (q - 1) == 0

    def _refresh_variance(self, key: Hashable, st: Dict[str, Any], group: Optional[dist.ProcessGroup]) -> None:
        """The ranks' averaged local second moments (one exact float32 all-reduce,
        identical on every rank), bias-corrected, left in ``F_pending``: the optimizer's
        step pre-hook turns them into F (same floor as the first freeze) before this
        step's update -- there, not here, because a wrapper restored from a checkpoint
        knows its optimizer again only from that step on."""
        if "s" not in st or int(st.get("s_n", 0)) < 1:
            return
        sbar = st["s"].clone()
        _NONE.all_reduce(sbar, group=group, key=(key, "variance"), op="avg", async_op=False)
        st["F_pending"] = sbar.div_(1.0 - float(st["s_beta2"]) ** int(st["s_n"]))

    def _apply_refresh(self, key: Hashable, st: Dict[str, Any]) -> None:
        """F from a refresh's ``F_pending`` (called by the step pre-hook)."""
        pending = st.pop("F_pending", None)
        if pending is None:
            return
        mask = torch.zeros(pending.numel(), dtype=torch.bool, device=pending.device)
        d = self._preconditioner(key, pending.numel(), pending.device, mask, source=pending)
        if d is not None:
            st["F"], st["F_frozen"] = d, mask
            st["refreshes"] = int(st.get("refreshes", 0)) + 1

    def _preconditioner(self, key: Hashable, n: int, device: torch.device,
                        frozen_mask: Optional[torch.Tensor] = None,
                        source: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``sqrt(v_hat) + eps`` of the Adam-like optimizer over ``key``'s layout (1 where a
        parameter has no state yet), or None when there is no Adam state to read;
        ``source`` (flat, bias-corrected) replaces ``v_hat`` (a refresh).
        Read before the optimizer's step: the same on every rank (every rank's optimizer saw
        the same averaged gradients)."""
        if self.freeze_variance is False or self._adam is None or key not in self._layout:
            return None
        opt = self._adam()
        if opt is None:
            return None
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        self._bound = 1.0 / (1.0 - max(g["betas"][1] for g in opt.param_groups)) ** 0.5
        d = torch.ones(n, dtype=torch.float32, device=device)
        found = False
        for p, off in self._layout[key]:
            st = opt.state.get(p)
            g = groups.get(id(p))
            if not st or g is None or "exp_avg_sq" not in st or off + p.numel() > n:
                continue
            seg = d[off:off + p.numel()]
            if source is not None:  # a second-moment estimate, bias-corrected (variance_refresh)
                seg.copy_(source[off:off + p.numel()]).sqrt_()
            else:
                step = float(st["step"]) if "step" in st else 1.0
                bc2 = 1.0 - g["betas"][1] ** max(step, 1.0)
                seg.copy_(st["exp_avg_sq"].detach().reshape(-1).to(torch.float32)).div_(bc2).sqrt_()
            # Coordinates with (almost) no gradient so far get a floor: a fraction of the
            # parameter's mean root-variance (else u / d explodes there the first time one
            # arrives); they are not frozen (_freeze_variance leaves them to Adam).
            floor = float(seg.mean()) * _FLOOR
            seg.clamp_(min=floor if floor > 0 else 1.0).add_(g["eps"])
            st_mask = frozen_mask[off:off + p.numel()] if frozen_mask is not None else None
            if st_mask is not None:
                st_mask.copy_(seg > floor + g["eps"]) if floor > 0 else st_mask.fill_(False)
            found = True
        return d if found else None

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
        world_size = dist.get_world_size(group)
        # The common V_prev enters every rank's contribution once for an average, 1/n for
        # a sum, so that the reduced value carries it exactly once.
        share = _divisor(op, world_size) / world_size  # validates op
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
        nest = self.nesterov and beta != 0.0 and not self.local_velocity
        prev = st["v"]
        g = tensor.detach().reshape(-1)
        # (A restored state tracks on before the optimizer is learned again at its next step.)
        track = (self.variance_refresh is not None and self.freeze_variance is not False and not self.local_velocity
                 and share == 1.0 and (self._adam is not None or "s_beta2" in st))
        if track:
            self._track_variance(st, g)
        # Beta known to be 0 (the bare compressor after the warm-up, e.g. plain SGD): the
        # inner compressor works in place on the tensor itself -- no copy in, none out; the
        # last result is not kept (nothing reads it with beta 0).
        # Exact parameters (``exact``) allow it when they sit at the tensor's end (two views).
        bare = (self.momentum == 0.0 and not self.local_velocity and not self.scale_by_variance
                and tensor.dtype == torch.float32 and tensor.is_contiguous()
                and (self.exact is None or getattr(self._split_of(key, n, tensor.device), "tail", 0) is not None))
        # Otherwise x, what the inner compressor sends (it works in place on it), lives in
        # the key's second velocity buffer -- it becomes the next call's prev (swapped in
        # finish), so a call allocates nothing and makes one pass here: x = beta * prev + g.
        if bare:
            x = g
        else:
            x = st.get("x")
            if x is None or x.numel() != n or x.device != prev.device:
                x = st["x"] = torch.empty_like(prev)
            if self.local_velocity:
                u = st["u"]
                u.mul_(beta).add_(g)
                x.copy_(u)
            elif nest:
                # SGD-Nesterov's step, D = (1 + beta) * g + beta**2 * V_prev: what the
                # optimizer applies, so the compression error lands on the step itself.
                torch.add(g, prev, alpha=share * beta * beta / (1.0 + beta), out=x).mul_(1.0 + beta)
            elif beta != 0.0:
                torch.add(g, prev, alpha=share * beta, out=x)
            else:
                x.copy_(g)
        compressing = step >= self.warmup_steps and self.compressor is not None
        inner = self.compressor if compressing else (
            self.warmup_compression if self.warmup_compression is not None and self.compressor is not None
            else _NONE)
        mask_after = compressing and self.masking
        # Exact parameters (``exact``): their coordinates go through the exact float32
        # all-reduce (or ``exact_compression``), the rest (packed) through the compressor.
        # Not while nothing is compressed (the warm-up's exact all-reduce already carries
        # them), nor in a warm-up when they have a compressor of their own (the warm-up
        # compressor then carries everything).
        split = (self._split_of(key, n, x.device)
                 if inner is not _NONE and (compressing or self.exact_compression is None) else None)
        # Adam-like optimizer: its variance is frozen at the key's first compressed call
        # (F, kept by the step pre-hook). With scale_by_variance the values are also
        # compressed in the units of its step, x / (sqrt(F) + eps), and scaled back after
        # the exchange (same d on every rank).
        d = self._frozen(key, st, n, x.device) if compressing and not self.local_velocity else None
        if track and compressing and d is not None and self._refresh_due(step - self.warmup_steps + 1):
            self._refresh_variance(key, st, group)  # F changes at the optimizer's step
        if d is not None and not self.scale_by_variance:
            d = None  # the variance is frozen (step pre-hook) but the values go unscaled
        if d is not None:
            x.div_(d)
            if self._bound is not None:
                # Adam's own bound on one step, |m_hat| / sqrt(v_hat) <= (1 - beta1) /
                # sqrt(1 - beta2), i.e. 1 / sqrt(1 - beta2) on the velocity m / (1 - beta1):
                # a coordinate whose v was ~0 in the warm-up cannot blow up its block.
                x.clamp_(-self._bound, self._bound)

        # delta (EF21): G, the ranks' last common result in the compressed units; only
        # compressed calls send x - G, every call leaves its result in G.
        G = None
        if self.delta is True or (self.delta == "nesterov" and nest):
            G = st.get("G")
            if G is None or G.numel() != n or G.device != x.device:
                G = st["G"] = torch.zeros(n, dtype=torch.float32, device=x.device)
        use_delta = G is not None and compressing

        def finish() -> torch.Tensor:
            if split is not None and split.tail is None:
                x.index_copy_(0, split.compressed, xc)
            if use_delta:
                x.add_(G)
            if not _result_finite(inner, key, x, split, use_delta):
                # Identical on every rank (bitwise-identical results): all reset together and
                # the overflow reaches the loss scaler, which skips the step.
                self._states.pop(key, None)
                for c in (self.compressor, self.warmup_compression):
                    if c is not None:
                        c._states.pop(key, None)
                if self.exact_compression is not None:
                    self.exact_compression._states.pop((key, "exact"), None)
                _write_back(tensor, x)
                return tensor
            if G is not None:
                G.copy_(x)
            if mask_after:
                # TopK's residual is zero exactly where this rank's entries were sent.
                sent = self.compressor._states[key]["residual"] == 0
                if split is not None and split.tail is not None:
                    st["u"].narrow(0, 0, split.tail).masked_fill_(sent, 0.0)
                elif split is not None:
                    st["u"].index_fill_(0, split.compressed[sent], 0.0)
                else:
                    st["u"].masked_fill_(sent, 0.0)
            if d is not None:
                x.mul_(d)
            if bare:  # the result is already in the tensor
                return tensor
            # The gradient handed back, g' = V - beta * V_prev, written straight into the
            # tensor when it is a contiguous float32 (one pass); x becomes the key's V_prev
            # and prev's storage the next call's x (no copy).
            flat = tensor.view(-1) if tensor.dtype == torch.float32 and tensor.is_contiguous() else None
            if nest:
                # The gradient whose Nesterov step from V_prev is D: g' = (D - beta**2 *
                # V_prev) / (1 + beta); the velocity V = beta * V_prev + g' is kept in prev.
                gp = torch.sub(x, prev, alpha=beta * beta, out=flat) if flat is not None \
                    else x.sub(prev, alpha=beta * beta)
                gp.div_(1.0 + beta)
                prev.mul_(beta).add_(gp)
                if flat is None:
                    _write_back(tensor, gp)
                return tensor
            if beta != 0.0:
                if flat is not None:
                    torch.sub(x, prev, alpha=beta, out=flat)
                else:
                    _write_back(tensor, x.sub(prev, alpha=beta))
            else:
                _write_back(tensor, x)
            st["v"], st["x"] = x, prev
            return tensor

        if use_delta:
            # What each rank sends: its deviation from the common estimate (G enters a sum
            # once, as V_prev does); the inner compressors carry no error of their own.
            x.sub_(G, alpha=share)
            for c, k in ((inner, key), (self.exact_compression if split is not None else None, (key, "exact"))):
                if hasattr(c, "reset_errors"):
                    c.reset_errors(k)
        xc = x
        if split is not None and split.tail is not None:
            # The exact parameters sit at the end (DataParallel orders its buckets so):
            # both parts are views of x, reduced in place, nothing copied.
            xc = x.narrow(0, 0, split.tail)
            xe = x.narrow(0, split.tail, n - split.tail)
            (self.exact_compression or _NONE).all_reduce(xe, group=group, key=(key, "exact"), op=op, async_op=False)
        elif split is not None:
            xe = x.index_select(0, split.exact)
            xc = x.index_select(0, split.compressed)
            (self.exact_compression or _NONE).all_reduce(xe, group=group, key=(key, "exact"), op=op, async_op=False)
            x.index_copy_(0, split.exact, xe)
        if async_op:
            fut = inner.all_reduce(xc, group=group, key=key, op=op, async_op=True)

            def done(f: torch.futures.Future) -> torch.Tensor:
                f.value()  # re-raises a communication error
                return finish()

            return fut.then(done)
        inner.all_reduce(xc, group=group, key=key, op=op, async_op=False)
        return finish()

    def state_dict(self) -> Dict[str, Any]:
        """Per key: last result, step (and velocity); beta; the inner compressor's state."""
        out = {k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()
                   if n != "x"}  # "x": scratch, not state
               for k, st in self._states.items()}
        inner = self.compressor.state_dict() if self.compressor is not None else None
        sd = {"type": type(self).__name__, "states": out, "momentum": self.momentum, "inner": inner,
              "nesterov": self.nesterov}
        if self.warmup_compression is not None:
            sd["warmup_inner"] = self.warmup_compression.state_dict()
        if self.exact_compression is not None:
            sd["exact_inner"] = self.exact_compression.state_dict()
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (a resumed run continues bit-exactly)."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state of {state.get('type')} given to {type(self).__name__}")
        self._states = {k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                        for k, st in state["states"].items()}
        if state.get("momentum") is not None:
            self.momentum = float(state["momentum"])
        if "nesterov" in state and self.nesterov_step is not False:
            self.nesterov = bool(state["nesterov"])
        if self.compressor is not None and state.get("inner") is not None:
            self.compressor.load_state_dict(state["inner"])
        if self.warmup_compression is not None and state.get("warmup_inner") is not None:
            self.warmup_compression.load_state_dict(state["warmup_inner"])
        if self.exact_compression is not None and state.get("exact_inner") is not None:
            self.exact_compression.load_state_dict(state["exact_inner"])


def _result_finite(inner: Any, key: Hashable, x: torch.Tensor, split: Optional["_Split"], use_delta: bool) -> bool:
    """True if ``x``, a call's result, holds only finite values. Where ``x`` is exactly
    what the inner compressor's native exchange decoded (no delta added back; exact
    parameters, if any, in a tail of their own), its flag, read off the payloads, says so
    at no cost and only the exact tail is looked at; otherwise one read pass over ``x``,
    nothing allocated (the max-norm is NaN or inf iff an entry is)."""
    known = None
    if not use_delta and inner is not _NONE and (split is None or split.tail is not None):
        probe = getattr(inner, "result_finite", None)
        known = probe(key) if probe is not None else None
    if known is None:
        return math.isfinite(float(torch.linalg.vector_norm(x, float("inf"))))
    if not known:
        return False
    if split is not None and split.tail < x.numel():
        return math.isfinite(float(torch.linalg.vector_norm(x.narrow(0, split.tail, x.numel() - split.tail),
                                                            float("inf"))))
    return True


class _Split:
    """A key's exact / compressed coordinates: index tensors (gathered into packed copies
    and scattered back), or, when every exact coordinate comes after every compressed
    one, ``tail`` = where the exact part starts (two views, no copy)."""

    __slots__ = ("n", "exact", "compressed", "tail")

    def __init__(self, n: int, exact: Optional[torch.Tensor], compressed: Optional[torch.Tensor],
                 tail: Optional[int]) -> None:
        self.n, self.exact, self.compressed, self.tail = n, exact, compressed, tail

    @staticmethod
    def of(mask: torch.Tensor, device: torch.device) -> "_Split":
        n = mask.numel()
        k = n - int(mask.sum())
        if not bool(mask[:k].any()):
            return _Split(n, None, None, k)
        ar = torch.arange(n)
        return _Split(n, ar[mask].to(device), ar[~mask].to(device), None)


def exact_last(compression: Any, params: List[torch.Tensor]) -> List[int]:
    """The order (indices into ``params``) that puts the parameters ``compression``'s
    ``exact`` predicate accepts after the others, each group keeping its order: a bucket
    laid out so hands MomentumCorrection its two parts as views (no gather / scatter
    pass). The identity for any other compressor."""
    pred = getattr(compression, "exact", None)
    if not callable(pred):
        return list(range(len(params)))
    flags = [bool(pred(p)) for p in params]
    return [i for i, f in enumerate(flags) if not f] + [i for i, f in enumerate(flags) if f]


def _is_vector(p: torch.Tensor) -> bool:
    """The parameters for_training gives OneBit's separate call: biases, norm weights."""
    return p.dim() <= 1


def _adam_like(optimizer: torch.optim.Optimizer) -> bool:
    """Adam, AdamW and optimizers shaped like them (``betas`` and ``eps`` in every group)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    return all("betas" in g and "eps" in g for g in optimizer.param_groups) and bool(optimizer.param_groups)


def _freeze_variance(ref: "weakref.ReferenceType[MomentumCorrection]", optimizer: torch.optim.Optimizer) -> None:
    """Step pre-hook of the Adam-like optimizer: on the parameters of every key that
    compresses, sets ``exp_avg_sq`` so that after this step's update with the gradient it
    is about to use, ``v_hat`` is the frozen value F (1-bit Adam's frozen variance: the
    sign / sparsification noise of the returned gradient never reaches the second moment,
    which would otherwise inflate it and shrink every step). Coordinates whose F is ~0 are
    left to Adam. Identical on every rank (same gradients, same state)."""
    mc = ref()
    if mc is None or mc.freeze_variance is False:
        return
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    with torch.no_grad():
        for key, st in mc._states.items():
            mc._apply_refresh(key, st)
            d = st.get("F")
            if d is None:
                continue
            for p, off in mc._layout.get(key, ()):
                g, ost = groups.get(id(p)), optimizer.state.get(p)
                if g is None or p.grad is None or not ost or "exp_avg_sq" not in ost:
                    continue
                b2 = g["betas"][1]
                eps = g["eps"]
                v = ost["exp_avg_sq"]
                step = float(ost["step"]) + 1.0
                grad = p.grad.detach()
                if g.get("weight_decay", 0.0) and not g.get("decoupled_weight_decay", False) \
                        and not isinstance(optimizer, torch.optim.AdamW):
                    grad = grad.add(p.detach(), alpha=g["weight_decay"])
                dseg = d[off:off + p.numel()].view_as(v).to(v.dtype)
                f_hat = (dseg - eps).clamp_(min=0.0).square_()
                target = f_hat.mul(1.0 - b2 ** step)  # exp_avg_sq after the update
                pre = target.sub(grad.square().mul_(1.0 - b2)).div_(b2)
                keep = st["F_frozen"][off:off + p.numel()].view_as(v)
                v.copy_(torch.where(keep, pre, v))
                if g.get("amsgrad", False) and "max_exp_avg_sq" in ost:
                    ost["max_exp_avg_sq"].copy_(torch.where(keep, torch.zeros_like(v), ost["max_exp_avg_sq"]))


# -- momentum="auto": one global optimizer step pre-hook serves every waiting wrapper ------

_waiting: "weakref.WeakSet[MomentumCorrection]" = weakref.WeakSet()
_hook_handle: Any = None


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for mc in list(_waiting):
        # Learned even when beta is already known (a restored state_dict): the Adam path
        # needs the optimizer itself.
        if mc._learn(optimizer):
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
    params=params)``: with torch's SGD they then communicate the
    momentum-corrected velocity (error feedback on raw gradients under momentum 0.9 lost
    up to 50 points here); with Adam / AdamW the optimizer's variance is frozen after
    the warm-up (and, except for TopK, refreshed after 256, 512, ... compressed steps)
    and OneBit compresses Adam's momentum (1-bit Adam through the user's Adam); with
    any other optimizer they run bare after the warm-up. OneBit's warm-up
    is 5 steps through ``QSGD(bits=8, error_feedback=True)`` (>= 25x fewer bytes than
    the fp32 ring even over a 165-step run), and the vectors of each bucket (biases,
    norm weights; from the layout DataParallel and the DDP hook pass) go through a OneBit
    of their own (``exact=``, ``exact_compression=OneBit()``), and with SGD-Nesterov it
    sends the Nesterov step (``nesterov_step="auto"``) as its deviation from the last
    common step (``delta="nesterov"``); TopK's 10 through ``QSGD(bits=8,
    error_feedback=True)``, PowerSGD's 10 through the exact float32 all-reduce.
    Returned unchanged: ``None``, a :class:`MomentumCorrection` (pass
    ``MomentumCorrection(c, momentum=0, warmup_steps=0)`` to run a compressor bare), and
    the near-lossless compressors (FP16, BF16, QSGD).
    """
    if compression is None or isinstance(compression, MomentumCorrection):
        return compression
    if type(compression) is TopK:
        # Its warm-up through 8-bit QSGD with error feedback: ~4x fewer warm-up bytes. Not
        # 4-bit: Adam's variance, frozen at the end of the warm-up, then carried 4-bit noise
        # (the LM with Adam, 64 epochs: +11 % held-out loss vs -2 % with 8 bits;
        # docs/COMPRESSION.md).
        # Its frozen variance is not refreshed: TopK's sparse error feedback holds back
        # each update for many steps, and the refreshed (larger) variance slowed it further
        # (the LM with Adam, 64 epochs, 3 seeds, one machine: +7.8 % held-out loss vs +1.3 %
        # frozen once; docs/COMPRESSION.md).
        return MomentumCorrection(compression, params=params,
                                  warmup_compression=QSGD(bits=8, error_feedback=True), variance_refresh=None)
    if type(compression) is OneBit:
        # A short warm-up through 8-bit QSGD with error feedback: 5 steps cost ~1.3 float32
        # steps, so OneBit sends >= 25x fewer bytes than the fp32 ring over a 165-step run
        # (10 float32 warm-up steps cost as much as ~300 OneBit steps); Adam's variance,
        # frozen at the end of it, carries 8-bit (not 4-bit) quantisation noise. The vectors
        # (norm weights, biases) go through a OneBit of their own: their signs then share
        # scale blocks only with each other, not with a matrix's much larger entries (the LM,
        # 64 epochs, seed 0: held-out loss with Adam 0.335 -> 0.304, uncompressed 0.297;
        # same bytes; docs/COMPRESSION.md).
        # With SGD-Nesterov it communicates the Nesterov step, not the velocity (the LM, 64
        # epochs, 3 seeds: held-out loss 0.322 -> 0.311, uncompressed 0.298;
        # docs/COMPRESSION.md).
        # With the Nesterov step, error feedback as EF21 (delta="nesterov"): the ranks send
        # the sign of their deviation from the last common step, OneBit keeps no error of
        # its own. With OneBit's own error feedback the run fitted sooner and over-fitted
        # (the LM, 64 epochs, 3 seeds: held-out loss 0.311 -> 0.297, uncompressed 0.298; same
        # bytes). Not in the velocity form: SGD momentum broke on one seed of three there
        # (the error enters the velocity, which re-applies it; docs/COMPRESSION.md).
        return MomentumCorrection(compression, params=params, warmup_steps=ONEBIT_WARMUP_STEPS,
                                  warmup_compression=QSGD(bits=8, error_feedback=True),
                                  exact=_is_vector, exact_compression=OneBit(scope=compression.scope),
                                  nesterov_step="auto", delta="nesterov")
    if type(compression) is PowerSGD:
        return MomentumCorrection(compression, params=params)
    return compression
