"""Strangers on the TCP transport's port (issue 3): while a real job sets up, the test
reads the ranks' listening addresses from the c10d store and throws random bytes,
half-open connections, connect-then-close and a wrong-secret handshake at them. The
job must form, run correct collectives, and refuse the stranger. Nothing may listen
on every interface by default.

Wire-level checks with impossible lengths live in the C++ tests (tests/cpp/test_tcp.cc:
SizeMismatchNeverOverflows, BadMagicIsInvalidFrame, HugeAbortReasonIsInvalidFrameNotAnAllocation,
WrongSecretAndReplayedProofAreRejected).
"""
import datetime
import os
import random
import socket
import struct
import time

import reliability_cases as rc

# Wire constants of csrc/transport/tcp.h (tcp_wire).
HELLO_MAGIC = 0x31484350
CHALLENGE_MAGIC = 0x31434350
VERSION = 1
HELLO = struct.Struct("<IHHiii32s")      # 52 bytes
CHALLENGE = struct.Struct("<IHHi32s")    # 44 bytes
MAC_SIZE = 32

WORLD = 3
LATE_RANK = 2        # joins late, so ranks 0 and 1 keep listening while the strangers come
LATE_BY = 4.0

# Keys as the ranks see them: torch's prefixes for the default group created with an
# explicit store (group "0", device "cpu"; init_method="env://" would add
# "default_pg/"), then pycomm's (first group instance "g1", collective transport "c",
# tcp "t"): see Group::Group and TcpTransport::addressKey.
ADDR_KEY = "0//cpu//g1/c/t/addr/{}"


def late_tcp_job(rank, ws, store, late_rank, late_by):
    import torch
    import torch.distributed as dist

    import pycomm

    if rank == late_rank:
        time.sleep(late_by)
    init_started = time.time()
    start = time.monotonic()
    dist.init_process_group("pycomm", store=store, rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=30))
    init_s = time.monotonic() - start
    assert pycomm.transport() == "tcp"
    ok = True
    for n in (1, 1000, 1 << 20):
        t = torch.full((n,), float(rank + 1))
        dist.all_reduce(t)
        ok = ok and bool((t == ws * (ws + 1) / 2).all())
    b = torch.arange(5000, dtype=torch.float32) if rank == 0 else torch.zeros(5000)
    dist.broadcast(b, src=0)
    ok = ok and bool((b == torch.arange(5000, dtype=torch.float32)).all())
    dist.barrier()
    dist.destroy_process_group()
    return {"ok": ok, "init_s": init_s, "init_started": init_started}


def _connect(host, port, timeout=3.0):
    s = socket.create_connection((host, port), timeout=timeout)
    return s


def _refused(s, timeout=3.0):
    """True once the peer closes (or resets) without ever sending a byte."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return data == b""


def _wrong_secret_handshake(host, port, to_rank, from_rank):
    """Speaks the handshake correctly but cannot prove the secret: returns what happened."""
    s = _connect(host, port)
    try:
        s.sendall(HELLO.pack(HELLO_MAGIC, VERSION, 0, from_rank, to_rank, WORLD, os.urandom(32)))
        s.settimeout(3.0)
        buf = b""
        while len(buf) < CHALLENGE.size:
            chunk = s.recv(CHALLENGE.size - len(buf))
            if not chunk:
                return {"challenge": False, "refused": True}
            buf += chunk
        magic, version, _, who, _nonce = CHALLENGE.unpack(buf)
        got_challenge = magic == CHALLENGE_MAGIC and version == VERSION and who == to_rank
        s.sendall(os.urandom(MAC_SIZE))  # a proof made without the secret
        return {"challenge": got_challenge, "refused": _refused(s)}
    finally:
        s.close()


def _attack(store, pids, report):
    keys = [ADDR_KEY.format(r) for r in range(LATE_RANK)]
    store.wait(keys, datetime.timedelta(seconds=30))
    addrs = []
    for k in keys:
        host, port = store.get(k).decode().rsplit(":", 1)
        addrs.append((host, int(port)))
    report["addrs"] = addrs
    # What the ranks listen on, seen from outside, while they wait for the late rank.
    report["listeners"] = [s for pid in pids for s in rc.listening_sockets(pid)]
    held = []
    rng = random.Random(1234)
    for to_rank, (host, port) in enumerate(addrs):
        for _ in range(5):                       # garbage of every length
            s = _connect(host, port)
            s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))))
            s.close()
        for _ in range(5):                       # connect, then close
            _connect(host, port).close()
        for _ in range(3):                       # half a hello, then silence
            s = _connect(host, port)
            s.sendall(HELLO.pack(HELLO_MAGIC, VERSION, 0, 2, to_rank, WORLD, b"\0" * 32)[:10])
            held.append(s)
        held.append(_connect(host, port))        # silent
        bad = HELLO.pack(0xDEADBEEF, VERSION, 0, 2, to_rank, WORLD, b"\0" * 32)
        s = _connect(host, port)                 # wrong magic
        s.sendall(bad)
        report.setdefault("bad_magic_refused", []).append(_refused(s))
        s.close()
        s = _connect(host, port)                 # right magic, claims to be a rank that does not exist
        s.sendall(HELLO.pack(HELLO_MAGIC, VERSION, 0, 7, to_rank, WORLD, b"\0" * 32))
        report.setdefault("bad_rank_refused", []).append(_refused(s))
        s.close()
        report.setdefault("wrong_secret", []).append(_wrong_secret_handshake(host, port, to_rank, LATE_RANK))
    report["attack_done_at"] = time.time()
    time.sleep(LATE_BY + 2)
    for s in held:
        s.close()


def test_strangers_during_setup_do_not_disturb_the_job():
    report = {}
    start = time.monotonic()
    results = rc.launch(WORLD, late_tcp_job, LATE_RANK, LATE_BY, init=False, env={"PYCOMM_TRANSPORT": "tcp"},
                        timeout=120, on_started=lambda store, pids: _attack(store, pids, report))
    elapsed = time.monotonic() - start
    assert all(r["status"] == "ok" for r in results), rc.describe(results)
    assert all(r["payload"]["ok"] for r in results), results
    assert "attack_done_at" in report, report
    # ... all of it while the mesh was still forming.
    assert report["attack_done_at"] < results[LATE_RANK]["payload"]["init_started"], report
    # The strangers were turned away, each at the first thing it got wrong.
    assert report["bad_magic_refused"] == [True, True], report
    assert report["bad_rank_refused"] == [True, True], report
    for w in report["wrong_secret"]:
        assert w["challenge"] and w["refused"], report
    # The job was not held up beyond the late rank's own delay.
    for r in results:
        if r["rank"] != LATE_RANK:
            assert r["payload"]["init_s"] < LATE_BY + 8, results
    assert elapsed < 90
    # Listening: on the advertised address only, never on every interface.
    for host, port in report["addrs"]:
        assert host not in ("0.0.0.0", ""), report
    assert report["listeners"], "the ranks were expected to be listening during setup"
    for s in report["listeners"]:
        assert s["addr"] not in ("0.0.0.0", "00000000000000000000000000000000"), report


def idle_tcp_job(rank, ws):
    import torch
    import torch.distributed as dist

    t = torch.ones(10)
    dist.all_reduce(t)
    return {"listeners": rc.listening_sockets(), "ok": bool((t == ws).all())}


def test_no_listening_socket_once_the_mesh_is_up():
    results = rc.launch(3, idle_tcp_job, env={"PYCOMM_TRANSPORT": "tcp"}, timeout=90)
    assert all(r["status"] == "ok" for r in results), rc.describe(results)
    for r in results:
        assert r["payload"]["ok"]
        assert r["payload"]["listeners"] == [], r
