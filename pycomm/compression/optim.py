"""Optimizers whose communication is the compressed momentum (1-bit Adam / 1-bit SGD).

    import pycomm.compression as C
    opt = C.OneBitAdam(model.parameters(), lr=1e-3, warmup_steps=100)   # model NOT wrapped
    loss.backward(); opt.step()          # the optimizer averages across the group itself

1-bit Adam (Tang et al. 2021) and 0/1 Adam keep Adam's convergence under 1-bit
compression where compressing Adam's *gradients* does not: the variance term divides
each coordinate by the root of a running mean of squared gradients, so the sign noise a
1-bit compressor adds to every gradient inflates the variance and shrinks the steps,
and error feedback cannot undo a nonlinear function of the noise. 1-bit Adam instead

1. runs ``warmup_steps`` steps of ordinary Adam on exactly averaged gradients (a float32
   all-reduce) -- the variance settles;
2. freezes the variance (with its bias correction) and from then on communicates only
   the *momentum*: each rank forms ``m = beta1 * m + (1 - beta1) * g_local`` from the
   last common ``m`` and its local gradient, and ``m`` is averaged with the compressor
   (OneBit by default: its error feedback, worker and server side, acts on the momentum);
   the averaged ``m`` -- bitwise identical on every rank -- replaces the local one.

The update is ``p -= lr * (m / (1 - beta1^t)) / (sqrt(v_hat) + eps)`` (plus decoupled
weight decay, AdamW style), with ``v_hat`` frozen after the warm-up.
:class:`OneBitSGD` is the momentum-SGD counterpart (``m = mu * m + g``, ``p -= lr * m``).

Use them on an *unwrapped* model: they all-reduce the gradients (warm-up) or the momentum
themselves, one flat buffer per parameter group (a parameter without a gradient counts
as zeros, so every rank sends the same layout). The parameters are broadcast from the
group's first rank when the optimizer is built. ``state_dict`` holds the moments, the
frozen variance, the step and the compressor's error-feedback state; a resumed run
continues exactly.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from pycomm.compression.compressors import OneBit
from pycomm.compression.engine import compressed_all_reduce
from pycomm.compression.momentum import MomentumCorrection

__all__ = ["OneBitAdam", "OneBitSGD"]


class _CompressedMomentum(torch.optim.Optimizer):
    """Shared machinery: warm-up on exact averaged gradients, then compressed momentum."""

    def __init__(self, params: Iterable[Any], defaults: Dict[str, Any], warmup_steps: int,
                 compression: Any, group: Optional[dist.ProcessGroup]) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        super().__init__(params, defaults)
        if isinstance(compression, MomentumCorrection):
            raise ValueError(f"{type(self).__name__} communicates the momentum itself: pass the bare compressor")
        self.compression = compression if compression is not None else OneBit()
        self.warmup_steps = int(warmup_steps)
        self.process_group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        if self.world_size > 1:
            src = dist.get_global_rank(group, 0) if group is not None else 0
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        dist.broadcast(p.data, src=src, group=group)

    # -- flat buffers -------------------------------------------------------------------

    @staticmethod
    def _flat_grad(params: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat([(p.grad.detach().float() if p.grad is not None else
                           torch.zeros(p.numel(), dtype=torch.float32, device=p.device)).reshape(-1)
                          for p in params])

    @staticmethod
    def _split(flat: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
        out, off = [], 0
        for p in params:
            out.append(flat[off:off + p.numel()].view(p.shape))
            off += p.numel()
        return out

    def _average(self, flat: torch.Tensor, key: Any, compressed: bool) -> torch.Tensor:
        comp = self.compression if compressed else None
        return compressed_all_reduce(flat, comp, op="avg", group=self.process_group, key=key)

    def _state_of(self, p: torch.Tensor) -> Dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self._init_extra(p, st)
        return st

    def _init_extra(self, p: torch.Tensor, st: Dict[str, Any]) -> None:
        pass

    # -- step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            states = [self._state_of(p) for p in params]
            step = states[0]["step"] + 1
            for st in states:
                st["step"] = step
            grad = self._local_grad(params, self._flat_grad(params), group)
            moments = torch.cat([st["exp_avg"].reshape(-1) for st in states])
            if step <= self.warmup_steps:
                grad = self._average(grad, ("grad", gi), compressed=False)
                self._momentum(moments, grad, group)
                self._warmup_update(params, states, self._split(grad, params), group, step)
            else:
                self._momentum(moments, grad, group)
                scale = self._comm_scale(states, group)
                if scale is not None:
                    moments.div_(scale)
                    bound = self._comm_bound(group)
                    if bound is not None:
                        moments.clamp_(-bound, bound)
                moments = self._average(moments, ("momentum", gi), compressed=True)
                if scale is not None:
                    moments.mul_(scale)
            for st, m in zip(states, self._split(moments, params)):
                st["exp_avg"].copy_(m)
            self._apply(params, states, group, step)
        return loss

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """torch's optimizer state plus the compressor's (error feedback) state."""
        sd = super().state_dict()
        sd["compression"] = self.compression.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (moments, frozen variance, steps, error feedback)."""
        sd = dict(state_dict)
        comp = sd.pop("compression", None)
        super().load_state_dict(sd)
        if comp is not None:
            self.compression.load_state_dict(comp)

    # -- for subclasses -------------------------------------------------------------------

    def _local_grad(self, params: List[torch.Tensor], grad: torch.Tensor, group: Dict[str, Any]) -> torch.Tensor:
        return grad

    def _momentum(self, moments: torch.Tensor, grad: torch.Tensor, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _warmup_update(self, params, states, grads, group, step) -> None:
        pass

    def _comm_scale(self, states, group) -> Optional[torch.Tensor]:
        """A per-coordinate divisor, identical on every rank and fixed after the warm-up,
        applied before compression and undone after it (None: none)."""
        return None

    def _comm_bound(self, group) -> Optional[float]:
        return None

    def _apply(self, params, states, group, step) -> None:
        raise NotImplementedError


class OneBitAdam(_CompressedMomentum):
    """Adam whose communication is the compressed momentum after an exact warm-up
    (1-bit Adam; see the module docstring).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.Adam``.
        lr, betas, eps: as Adam.
        weight_decay: decoupled weight decay (AdamW's ``p *= 1 - lr * wd``).
        warmup_steps: steps of exact Adam (averaged gradients, variance updated) before
            the variance freezes and the momentum is compressed. 1-bit Adam used 15-25 %
            of training; the default suits runs of a few hundred steps or more.
        compression: the momentum's compressor (default ``OneBit()``); its state is keyed
            by ``("momentum", group index)``.
        group: the process group (default: the world).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 100, compression: Any = None,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("OneBitAdam: invalid lr, betas, eps or weight_decay")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         warmup_steps, compression, group)

    def _init_extra(self, p, st):
        st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _momentum(self, moments, grad, group):
        b1 = group["betas"][0]
        moments.mul_(b1).add_(grad, alpha=1.0 - b1)

    def _warmup_update(self, params, states, grads, group, step):
        b2 = group["betas"][1]
        for st, g in zip(states, grads):
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1.0 - b2)

    def _denom(self, st, group):
        b2, eps = group["betas"][1], group["eps"]
        bc2 = 1.0 - b2 ** self.warmup_steps if self.warmup_steps > 0 else 1.0
        return (st["exp_avg_sq"] / bc2).sqrt_().add_(eps)

    def _comm_scale(self, states, group):
        # The momentum is compressed in the frozen preconditioner's coordinates, m / (sqrt(v) + eps):
        # the sign compressor's error then has the size of an Adam step on every coordinate, instead
        # of the size of the largest momenta divided by the smallest variances.
        return torch.cat([self._denom(st, group).reshape(-1) for st in states])

    def _comm_bound(self, group):
        # With the variance frozen, a coordinate whose gradient was ~0 throughout the warm-up
        # (v ~ 0) and is not later would take unbounded steps; Adam's own bound on one step,
        # |m_hat / sqrt(v_hat)| <= (1 - beta1) / sqrt(1 - beta2), caps the preconditioned
        # momentum (in units of lr) before it is compressed.
        b1, b2 = group["betas"]
        return max(1.0, (1.0 - b1) / (1.0 - b2) ** 0.5)

    def _apply(self, params, states, group, step):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** min(step, self.warmup_steps) if self.warmup_steps > 0 else 1.0
        for p, st in zip(params, states):
            if wd != 0.0:
                p.mul_(1.0 - lr * wd)
            denom = (st["exp_avg_sq"] / bc2).sqrt_().add_(eps)
            p.addcdiv_((st["exp_avg"] / bc1).to(p.dtype), denom.to(p.dtype), value=-lr)


class OneBitSGD(_CompressedMomentum):
    """Momentum SGD whose communication is the compressed momentum after an exact
    warm-up (the SGD counterpart of :class:`OneBitAdam`): ``m = mu * m + g`` from the last
    common ``m`` and the local gradient, ``m`` averaged with the compressor, ``p -= lr * m``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: ``mu`` (> 0: without momentum there is nothing to compress but gradients).
        weight_decay: L2 term added to the gradient (as ``torch.optim.SGD``).
        warmup_steps: exact steps (averaged gradients) before the momentum is compressed.
        compression: the momentum's compressor (default ``OneBit()``).
        group: the process group (default: the world).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_steps: int = 10, compression: Any = None,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        if not 0.0 < momentum < 1.0 or lr < 0 or weight_decay < 0:
            raise ValueError("OneBitSGD: invalid lr, momentum or weight_decay")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), warmup_steps,
                         compression, group)

    def _local_grad(self, params, grad, group):
        # L2 weight decay joins the gradient before the momentum (torch.optim.SGD's rule);
        # the parameters are identical on every rank, so adding it locally is exact.
        wd = group["weight_decay"]
        if wd != 0.0:
            grad.add_(torch.cat([p.detach().float().reshape(-1) for p in params]), alpha=wd)
        return grad

    def _momentum(self, moments, grad, group):
        moments.mul_(group["momentum"]).add_(grad)

    def _apply(self, params, states, group, step):
        lr = group["lr"]
        for p, st in zip(params, states):
            p.sub_(st["exp_avg"].to(p.dtype), alpha=lr)
