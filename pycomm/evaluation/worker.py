"""One rank of one evaluation cell: ``python -m pycomm.evaluation.worker``.

The runner starts ``world`` of these (locally, or one per emulated host) with the cell in
``PYCOMM_EVAL_CELL`` (JSON) and torch's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT``. Each rank trains with the model's recipe, evaluates after every epoch
(outside the timed steps), and writes what it measured to ``<out_dir>/rank<r>.json`` —
or the error, so the runner can say what failed and where. The runner merges the rank
files into the cell (:func:`pycomm.evaluation.runner.merge`).
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class ActivationMeter:
    """Peak bytes of tensors autograd saved for backward (activations), counted through
    ``saved_tensors_hooks``: a saved tensor counts from pack until autograd frees it,
    each storage once, parameters not at all."""

    def __init__(self, params: List[torch.Tensor]) -> None:
        self._param_ptrs = {_local(p).untyped_storage().data_ptr() for p in params}
        self._live: Dict[int, List[int]] = {}  # storage ptr -> [refs, bytes]
        self.bytes = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self._live[ptr]

    def pack(self, t: torch.Tensor) -> Any:
        storage = _local(t).untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._param_ptrs or storage.nbytes() == 0:
            return t
        entry = self._live.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        return _Held(t, self, ptr)

    @staticmethod
    def unpack(h: Any) -> torch.Tensor:
        return h.t if isinstance(h, _Held) else h

    def hooks(self) -> "torch.autograd.graph.saved_tensors_hooks":
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("t", "meter", "ptr")

    def __init__(self, t: torch.Tensor, meter: ActivationMeter, ptr: int) -> None:
        self.t, self.meter, self.ptr = t, meter, ptr

    def __del__(self) -> None:
        self.meter._release(self.ptr)


def _tensor_bytes(ts) -> int:
    return sum(_local(t).numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(s.values()) for s in opt.state.values())


def _tx_bytes(ifname: Optional[str]) -> Optional[int]:
    if not ifname:
        return None
    try:
        with open(f"/sys/class/net/{ifname}/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None


def _pycomm_sent(backend: str) -> Optional[int]:
    if backend != "pycomm" or not dist.is_initialized():
        return None
    import pycomm

    return int(pycomm.stats("all")["bytes_sent"])


def run(cell: Dict[str, Any], rank: int, world: int) -> Dict[str, Any]:
    """Trains this rank's part of the cell and returns its measurements."""
    from pycomm.evaluation.models import MODELS
    from pycomm.evaluation.strategies import STRATEGIES, make_trainer

    torch.set_num_threads(int(cell.get("threads", 1)))
    spec = MODELS[cell["model"]]
    strategy = cell["strategy"]
    backend = STRATEGIES[strategy][0]
    if world > 1 or strategy != "single":
        if backend == "pycomm":
            import pycomm  # noqa: F401  (registers the backend)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(cell.get("timeout", 120))))
    seed = int(cell["seed"])
    torch.manual_seed(seed)
    trainer = make_trainer(strategy, spec)
    xtr, ytr, xte, yte = spec.data()
    recipe = spec.recipe
    epochs = int(cell["epochs"])
    batch = recipe.global_batch
    steps_per_epoch = len(xtr) // batch
    ifname = os.environ.get("PYCOMM_EVAL_IFNAME")
    meter = ActivationMeter([p for m in trainer.modules for p in m.parameters()])

    step_times: List[float] = []
    losses: List[Optional[float]] = []
    curve: List[Dict[str, float]] = []
    sent: Optional[int] = None  # pycomm.stats() bytes sent during the timed steps
    link: Optional[int] = None  # the host interface's tx bytes (emulated hosts only)
    train_seconds = 0.0
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        s0, l0 = _pycomm_sent(backend), _tx_bytes(ifname)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = xtr[idx], ytr[idx]
            measure = epoch == 0 and i == 1
            t0 = time.perf_counter()
            if measure:
                with meter.hooks():
                    loss = trainer.step(xb, yb)
            else:
                loss = trainer.step(xb, yb)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            train_seconds += dt
            losses.append(loss)
        t0 = time.perf_counter()
        trainer.end_epoch()  # e.g. LocalSGD's last round: training time, bytes on the wire
        train_seconds += time.perf_counter() - t0
        s1, l1 = _pycomm_sent(backend), _tx_bytes(ifname)
        if s0 is not None and s1 is not None:
            sent = (sent or 0) + s1 - s0
        if l0 is not None and l1 is not None:
            link = (link or 0) + l1 - l0
        value = trainer.evaluate(xte, yte)
        curve.append({"epoch": epoch + 1, "wall_s": train_seconds, "metric": value})
    comm, exposed = trainer.comm()
    params = [p for m in trainer.modules for p in m.parameters()]
    mem = {
        "params": _tensor_bytes(params),
        "grads": _tensor_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer": sum(_optimizer_bytes(o) for o in trainer.optimizers),
        "activations": meter.peak,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    mem["model_state"] = mem["params"] + mem["grads"] + mem["optimizer"]
    # A fingerprint of this rank's final parameters (float64 sum and sum of squares per
    # tensor, in order): replicas of exact strategies must agree with each other and with
    # the single-rank run up to rounding (tests/python/test_evaluation.py).
    digest = [[float(_local(p.detach()).double().sum()), float(_local(p.detach()).double().pow(2).sum())]
              for p in params]
    steps = len(step_times)
    rec = {
        "rank": rank, "steps": steps, "epochs": epochs, "global_batch": batch, "train_seconds": train_seconds,
        "step_times": step_times, "losses": losses if trainer.losses_known else None, "curve": curve,
        "comm_seconds": comm, "exposed_seconds": exposed, "memory": mem, "backend": backend,
        "bytes_sent": sent, "link_bytes": link, "param_digest": digest,
    }
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return rec


def main() -> int:
    cell = json.loads(os.environ["PYCOMM_EVAL_CELL"])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    path = os.path.join(cell["out_dir"], f"rank{rank}.json")
    try:
        rec = run(cell, rank, world)
        code = 0
    except BaseException as e:  # noqa: BLE001  (reported to the runner, which says which rank)
        rec = {"rank": rank, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        code = 1
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)
    return code


if __name__ == "__main__":
    sys.exit(main())
