#!/usr/bin/env python3
"""Per-parameter error of a compressed data-parallel run (issue 15 diagnosis): the
character LM (``bench_convergence``'s charlm cell, 4 ranks, 8 epochs, batch 32, seed 0
data order ``epoch * 1000 + rank``) through ``pycomm.DataParallel(compression=C)``, and at
every call of the MomentumCorrection wrapper, per parameter of the bucket:

- ``err``: |V - V_exact| / |V_exact|, V the velocity the compressor delivered, V_exact the
  exact average of the same momentum-corrected input (one extra exact all-reduce);
- ``res``: |inner compressor's (worker) error-feedback residual| / |V_exact|;
- ``norm``: |V_exact|.

    python benchmarks/diag_ef_per_layer.py TopK sgdm benchmarks/results/ef_per_layer_charlm_topk.json

Writes {"loss": held-out loss, "log": [{"step": s, param: [err, res, norm]}, ...]} (rank 0).
A diagnostic, not a benchmark: the extra all-reduce changes nothing in the run but time.
"""
import sys, os, datetime, socket, json
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE)); sys.path.insert(0, HERE)
import torch, torch.multiprocessing as mp

def worker(rank, world, port, comp_name, opt_name, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    import pycomm, pycomm.compression as C
    from pycomm.compression.momentum import MomentumCorrection
    import bench_convergence as B
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("pycomm", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    from pycomm.evaluation.models import _charlm_data
    xtr, ytr, xte, yte = _charlm_data()
    xtr, ytr = xtr[rank::world], ytr[rank::world]
    torch.manual_seed(0)
    net = B.make_model("charlm")
    names = {id(p): n for n, p in net.named_parameters()}
    comp = B.make_compressor(comp_name)
    log = []
    orig = MomentumCorrection.all_reduce
    def patched(self, tensor, group=None, key=None, op="avg", async_op=False):
        st = self._states.get(key)
        beta = self.momentum or 0.0
        u = tensor.detach().reshape(-1).float().clone()
        if st is not None and beta:
            u.add_(st["v"], alpha=beta)
        ref = u.clone(); dist.all_reduce(ref); ref /= world
        orig(self, tensor, group=group, key=key, op=op, async_op=False)
        st = self._states[key]
        V = st["v"]
        inner = self.compressor._states.get(key, {})
        res = inner.get("residual", inner.get("worker"))
        row = {"step": st["step"]}
        for p, off in self._layout.get(key, []):
            sl = slice(off, off + p.numel())
            e = (V[sl] - ref[sl]).norm().item(); r = ref[sl].norm().item()
            row[names[id(p)]] = (e / (r + 1e-30), (res[sl].norm().item() / (r + 1e-30)) if res is not None and res.numel() == V.numel() else float("nan"), r)
        log.append(row)
        if async_op:
            f = torch.futures.Future(); f.set_result(tensor); return f
        return tensor
    MomentumCorrection.all_reduce = patched
    model = pycomm.DataParallel(net, compression=comp)
    opt = B.make_optimizer(opt_name, model.parameters(), None)
    for epoch in range(8):
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(epoch * 1000 + rank))
        for s in range(len(ytr) // 32):
            idx = perm[s * 32:(s + 1) * 32]
            opt.zero_grad()
            o = model(xtr[idx])
            loss = torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), ytr[idx].reshape(-1))
            loss.backward(); opt.step()
    with torch.no_grad():
        o = net(xte); tl = torch.nn.functional.cross_entropy(o.reshape(-1, o.shape[-1]), yte.reshape(-1)).item()
    if rank == 0:
        from pycomm.bench.machine import machine

        stamp = {"machine": machine(), "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "loadavg_now": list(os.getloadavg()), "command": " ".join(["python", "benchmarks/diag_ef_per_layer.py"] + sys.argv[1:])}
        with open(out, "w") as f:
            json.dump(dict(stamp, loss=tl, log=log), f)
    dist.barrier(); dist.destroy_process_group()

if __name__ == "__main__":
    comp, opt, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(worker, args=(4, port, comp, opt, out), nprocs=4)
