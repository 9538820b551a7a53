"""Side-run helper, not part of pycomm: sign compression with one mean-|x| scale per
`block` elements, two stages (worker + server error feedback, as OneBit), data path in
torch ops. Used by nesterov_onebit_attention_blocksign_{64,2048}.{json,md}, which were taken
(as /tmp/exp/rowsign.py) before MomentumCorrection had `delta`; to rerun them with today's
code, from the repository root:

    PYTHONPATH=benchmarks/results/convergence_charlm_side python benchmarks/bench_convergence.py \
      --models charlm --optimizers nesterov --seeds 0,1,2 --epochs 64 --out /tmp/x --compressors \
      "OneBit-kw:delta=False;exact=p.dim()<=1 or p.shape[0]==192 or tuple(p.shape)==(64|64);\
exact_compression=__import__('block_sign_emulation').BlockSign(64)"
"""
import torch
import torch.distributed as dist


class BlockSign:
    def __init__(self, block=64):
        self.block = block
        self._states = {}

    def _q(self, x):
        b = self.block
        pad = (-x.numel()) % b
        xp = torch.nn.functional.pad(x, (0, pad)).view(-1, b)
        out = torch.sign(xp) * xp.abs().mean(1, keepdim=True)
        return out.reshape(-1)[: x.numel()]

    def all_reduce(self, tensor, group=None, key=None, op="avg", async_op=False):
        ws = dist.get_world_size(group)
        st = self._states.setdefault(key, {})
        x = tensor.reshape(-1).float()
        if "w" not in st or st["w"].numel() != x.numel():
            st["w"] = torch.zeros_like(x)
            st["s"] = torch.zeros_like(x)
        x = x + st["w"]
        c = self._q(x)
        st["w"] = x - c
        dist.all_reduce(c, group=group)
        if op == "avg" or op == dist.ReduceOp.AVG:
            c /= ws
        y = c + st["s"]
        r = self._q(y)
        st["s"] = y - r
        tensor.copy_(r.view_as(tensor))
        return tensor
