"""Compression on the cross-host hop only (algorithms/hier_compressed.cc): on emulated
2x2 and 2+1+1 layouts (PYCOMM_HOST_KEY), the in-host steps are exact float32 and the
cross-host step is the codec's compressed all-reduce of each host's partial shard.

References, computed here: the float64 average for the uncompressed codec (exact: the
inputs are quarter-integers, so every float32 sum is exact) and within fp16 rounding for
FP16; for OneBit the codec's own definition, i.e. the generic (torch.distributed)
exchange of pycomm.compression run here over one virtual rank per host whose input is
that host's float64 partial sum, chunk by chunk and shard by shard as the hierarchy cuts
the tensor: bitwise equal results and error-feedback state over three steps."""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import pycomm.compression as C
import reliability_cases as rc
import topology_cases as tc

pytestmark = pytest.mark.skipif(not any(b == "pycomm" for b in __import__("dist_util").BACKENDS),
                                reason="pycomm extension not built")

LENGTHS = [0, 1, 13, 2053, 40009]
STEPS = 3
CHUNK_BYTES = 65536    # PYCOMM_HIER_CHUNK_BYTES: 40009 elements -> 3 pipelined chunks
PIECE_BYTES = 8192     # PYCOMM_COMPRESS_PIECE_BYTES: several pieces per cross-host chunk
ENV = {"PYCOMM_HIER_CHUNK_BYTES": str(CHUNK_BYTES), "PYCOMM_COMPRESS_PIECE_BYTES": str(PIECE_BYTES)}
CODECS = {
    "none": lambda: None,
    "fp16_ef": lambda: C.FP16(error_feedback=True),
    "onebit": lambda: C.OneBit(),
    "qsgd8": lambda: C.QSGD(bits=8, seed=3),
}


def _input(rank: int, step: int, n: int) -> torch.Tensor:
    """Quarter-integers in [-2.75, 2.75]: float32 sums of a few of them are exact."""
    i = torch.arange(n, dtype=torch.float64)
    return ((i * (7 + rank) + 5 * step + 3 * rank) % 23 - 11) * 0.25


def _body(rank: int, ws: int, store, layout: List[int]) -> dict:
    import torch.distributed as dist

    import pycomm

    tc._join(rank, ws, store, layout)
    out: Dict = {"results": {}, "states": {}, "routes": {}, "tcp": {}, "wire": {}}
    for name, make in CODECS.items():
        comp = make()
        for n in LENGTHS:
            key = f"n{n}"
            out["routes"][(name, n)] = (comp or C.engine._NONE).route(numel=n)
            for step in range(STEPS):
                x = _input(rank, step, n).float()
                s0 = pycomm.stats()
                C.compressed_all_reduce(x, comp, key=key)
                s1 = pycomm.stats()
                out["results"][(name, n, step)] = x
                out["tcp"][(name, n, step)] = s1.get("bytes_sent_tcp", 0) - s0.get("bytes_sent_tcp", 0)
            out["wire"][(name, n)] = (comp or C.engine._NONE).wire_bytes_on(n)
            if comp is not None:
                st = comp.state_dict()["states"].get(key, {})
                out["states"][(name, n)] = {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
    # Async: the same bits as the sync path on fresh state.
    a, b = C.OneBit(), C.OneBit()
    y, z = _input(rank, 0, 40009).float(), _input(rank, 0, 40009).float()
    a.all_reduce(y, key="k")
    b.all_reduce(z, key="k", async_op=True).wait()
    out["async_equal"] = torch.equal(y, z)
    # A group all on one host: cross-host only compresses nothing (exact, no state); the
    # default compresses every hop there, as on any one-host group.
    host0 = [r for r in range(ws) if layout[r] == layout[0]]
    sub = dist.new_group(host0)
    if rank in host0:
        only = C.OneBit(scope="cross_host")
        v = _input(rank, 0, 2053).float()
        out["one_host_route"] = (only.route(sub), C.OneBit().route(sub))
        only.all_reduce(v, group=sub, key="k")
        out["one_host_result"] = v
        out["one_host_state"] = only.state_dict()["states"]
    # Explicit cross_host where it cannot apply: a clear error naming the rank.
    try:
        t = C.TopK(0.1)  # no native codec
        t.scope = "cross_host"
        t.all_reduce(torch.ones(100))
        out["topk_error"] = None
    except ValueError as e:
        out["topk_error"] = str(e)
    dist.barrier()
    dist.destroy_process_group()
    return _plain(out)


def _plain(x):
    """Tensors as numpy arrays (pickled by value: torch would share them through file
    descriptors that close when the rank exits)."""
    if isinstance(x, torch.Tensor):
        return x.numpy().copy()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _torch(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, dict):
        return {k: _torch(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_torch(v) for v in x)
    return x


def _cut(count: int, n: int, c: int) -> int:
    return count * c // n


def _simulate(comps, partials: List[torch.Tensor], divisor: int, key) -> List[torch.Tensor]:
    """The generic exchange of pycomm.compression among len(partials) virtual ranks, in
    this process (all_to_all and all_gather done by hand). Returns each rank's result."""
    h = len(partials)
    xs = [p.clone() for p in partials]
    gens = [comps[v]._reduce(xs[v], comps[v]._state(key), h, v, divisor) for v in range(h)]
    reqs = [next(g) for g in gens]
    while True:
        kind = reqs[0][0]
        if kind == "a2a":
            per = reqs[0][1].numel() // h
            res = [torch.cat([reqs[s][1][v * per:(v + 1) * per] for s in range(h)]) for v in range(h)]
        else:
            res = [torch.cat([reqs[s][1] for s in range(h)]) for _ in range(h)]
        nxt, finished = [], False
        for v in range(h):
            try:
                nxt.append(gens[v].send(res[v]))
            except StopIteration:
                finished = True
        if finished:
            return xs
        reqs = nxt


def _reference(name: str, layout: List[int], n: int):
    """Per step, the expected result (float32) and per rank its expected worker/server
    state, following the hierarchy's cuts."""
    ws = len(layout)
    hosts = sorted(set(layout))
    ranks_on = {h: [r for r in range(ws) if layout[r] == h] for h in hosts}
    shards = min(len(v) for v in ranks_on.values())
    chunks = max(1, -(-n * 4 // CHUNK_BYTES))
    comps = {(c, s): [CODECS[name]() for _ in hosts] for c in range(chunks) for s in range(shards)}
    expect = []
    for step in range(STEPS):
        partial = [sum(_input(r, step, n) for r in ranks_on[h]).float() for h in hosts]
        y = torch.empty(n, dtype=torch.float32)
        for c in range(chunks):
            lo, hi = _cut(n, chunks, c), _cut(n, chunks, c + 1)
            for s in range(shards):
                a, b = lo + _cut(hi - lo, shards, s), lo + _cut(hi - lo, shards, s + 1)
                if b == a:
                    continue
                outs = _simulate(comps[(c, s)], [p[a:b] for p in partial], ws, key="k")
                for o in outs[1:]:
                    assert torch.equal(o, outs[0])
                y[a:b] = outs[0]
        expect.append(y)
    states = {}
    for r in range(ws):
        h = layout[r]
        li = ranks_on[h].index(r)
        if li >= shards:
            states[r] = {}
            continue
        v = hosts.index(h)
        st = {}
        for nm in ("worker", "server"):
            parts = [comps[(c, li)][v]._states.get("k", {}).get(nm) for c in range(chunks)]
            parts = [p for p in parts if p is not None]
            if parts:
                st[nm] = torch.cat(parts)
        states[r] = st
    return expect, states


def _cross_bytes(layout: List[int], n: int, rank: int, payload) -> int:
    """Codec payload bytes `rank` sends across hosts for one call (the test's own count)."""
    hosts = sorted(set(layout))
    ranks_on = {h: [r for r in range(len(layout)) if layout[r] == h] for h in hosts}
    shards = min(len(v) for v in ranks_on.values())
    li = ranks_on[layout[rank]].index(rank)
    if li >= shards or n == 0:
        return 0
    chunks = max(1, -(-n * 4 // CHUNK_BYTES))
    piece = PIECE_BYTES // 4
    total = 0
    for c in range(chunks):
        cn = _cut(n, chunks, c + 1) - _cut(n, chunks, c)
        slen = _cut(cn, shards, li + 1) - _cut(cn, shards, li)
        if slen == 0:
            continue
        cc = max(32, -(-(-(-slen // len(hosts))) // 32) * 32)
        for at in range(0, cc, piece):
            total += 2 * (len(hosts) - 1) * payload(min(piece, cc - at))
    return total


@pytest.mark.parametrize("layout", [[0, 0, 1, 1], [0, 0, 1, 2]], ids=["2x2", "2+1+1"])
def test_cross_host_only_compression(layout):
    from pycomm import _C

    ws = len(layout)
    results = rc.launch(ws, _body, layout, init=False, env=ENV, timeout=300)
    for r in results:
        assert r["status"] == "ok", rc.describe(results)
    outs = [_torch(r["payload"]) for r in sorted(results, key=lambda r: r["rank"])]
    payload = {"onebit": _C.one_bit_payload_bytes, "fp16_ef": lambda e: 2 * e, "none": lambda e: 4 * e,
               "qsgd8": lambda e: _C.qsgd_payload_bytes(e, 8)}
    for name in CODECS:
        for n in LENGTHS:
            for o in outs:
                assert o["routes"][(name, n)] == "cross_host", (name, n, o["routes"][(name, n)])
            ref64 = [sum(_input(r, step, n) for r in range(ws)) / ws for step in range(STEPS)]
            if name in ("fp16_ef", "onebit"):
                expect, states = _reference(name, layout, n)
            for step in range(STEPS):
                got = [o["results"][(name, n, step)] for o in outs]
                for r, g in enumerate(got):  # every rank bitwise identical
                    assert torch.equal(g, got[0]), (name, n, step, r)
                g = got[0].double()
                if name == "none":  # exact in-host and cross-host sums: the float64 average itself
                    assert torch.equal(g, ref64[step]), (name, n, step)
                elif name == "fp16_ef":
                    torch.testing.assert_close(g, ref64[step], rtol=2e-3, atol=6e-3)
                if name in ("fp16_ef", "onebit"):
                    assert torch.equal(got[0], expect[step]), (name, n, step, (got[0] - expect[step]).abs().max())
                if name == "qsgd8" and n:  # unbiased 8-bit levels: close to the average
                    assert (g - ref64[step]).abs().max() <= 0.05 * ref64[step].abs().max() + 1e-3, (name, n, step)
                for r, o in enumerate(outs):  # bytes on the host links: the codec's payloads only
                    want = _cross_bytes(layout, n, r, payload[name])
                    sent = o["tcp"][(name, n, step)]
                    assert want <= sent <= want * 1.02 + 2048, (name, n, step, r, sent, want)
            for r, o in enumerate(outs):
                assert o["wire"][(name, n)] == {"cross_host": _cross_bytes(layout, n, r, payload[name]),
                                                "in_host": None}, (name, n, r, o["wire"][(name, n)])
            if name in ("fp16_ef", "onebit"):  # error feedback carried on each rank's shard
                for r, o in enumerate(outs):
                    got_st = o["states"][(name, n)]
                    want_st = states[r]
                    for nm, t in want_st.items():
                        assert torch.equal(got_st[nm], t), (name, n, r, nm)
                    for nm, t in got_st.items():
                        assert nm in want_st or t.numel() == 0, (name, n, r, nm, t.numel())
    for o in outs:
        assert o["async_equal"]
        assert o["topk_error"] is not None and "rank" in o["topk_error"] and "cross_host" in o["topk_error"]
    host0 = [r for r in range(ws) if layout[r] == layout[0]]
    ref = sum(_input(r, 0, 2053) for r in host0) / len(host0)
    for r in host0:
        o = outs[r]
        assert o["one_host_route"] == ("exact", "all"), o["one_host_route"]
        assert torch.equal(o["one_host_result"].double(), ref)
        assert o["one_host_state"] == {} or all(not v for v in o["one_host_state"].values())
