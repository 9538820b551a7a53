"""An emulated cluster on one machine: network namespaces, a bridge and ``tc`` limits.

    from pycomm.bench.netem import Cluster
    with Cluster(hosts=2, link="1gbit", latency="100us") as c:
        p = c.run(0, ["python", "server.py"], env={"FOO": "1"})   # runs inside host 0
        print(c.addr(0), c.ifname)                                  # 10.x.y.1, "eth0"

Layout (every name starts with a per-run prefix, ``pcm<pid>`` by default)::

    <prefix>br  (namespace)   br0 bridge ── p0 ── p1 ── ... (veth ends, tc rate limit)
                                            │     │
    <prefix>h0  (namespace)   eth0 10.a.b.1 ┘     │   (tc rate limit + delay)
    <prefix>h1  (namespace)   eth0 10.a.b.2 ──────┘

Every host namespace has its loopback up and one veth ``eth0`` on a private /24 that
is checked to be unused on this machine. Both ends of each veth are shaped, so each
host's link is limited in both directions. The veth pairs are created directly inside
the namespaces: nothing is added to the root namespace, and deleting the namespaces
removes every link this module created.

Shaping: ``netem rate R delay D`` on the host side when the kernel has sch_netem;
otherwise ``tbf rate R`` and the latency is *not* applied (``Cluster.latency_applied``
says which; a warning is printed). ``tbf`` on the bridge side either way.

Teardown (``down()``) runs on leaving the ``with`` block, on exceptions inside it, on
SIGINT/SIGTERM (handlers installed while the cluster is up, previous handlers restored
afterwards) and at interpreter exit. ``python -m pycomm.bench.netem down`` removes
leftovers of runs that died hard (SIGKILL).

CLI (``python -m pycomm.bench.netem ...``)::

    up   --hosts 2 --link 1gbit --latency 100us [--prefix P]   # leave it up
    down [--prefix P | --all]                                   # remove leftovers
    list                                                        # our namespaces
    measure --hosts 2 --link 100mbit                            # measure bw / RTT
    run  --hosts 2 --link 1gbit -- CMD ARGS...                  # CMD on every host

Needs root, iproute2 (``ip``, ``tc``) and a kernel with veth, bridge and tbf.
"""
from __future__ import annotations

import argparse
import atexit
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = [
    "Cluster",
    "parse_rate",
    "parse_time",
    "measure_bandwidth",
    "measure_rtt",
    "list_namespaces",
    "cleanup",
]

#: Namespace names this module creates: <prefix>h<i> for hosts, <prefix>br for the bridge.
NAME_RE = re.compile(r"^(pcm(\d+)(?:c\d+)?)(?:h\d+|br)$")
_counter = itertools.count()

_RATE_UNITS = {
    # tc's own spelling: "bit" units are bits per second, "bps" units are *bytes* per second.
    "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12,
}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6, "ns": 1e-9}


def _quantity(text: str, units: dict, default_unit: str, what: str, example: str,
              unit_help: str) -> float:
    """``'<number><unit>'`` -> number * units[unit]; a bare number is in ``default_unit``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m:
        raise ValueError(f"bad {what} {text!r}: expected e.g. {example}")
    unit = m.group(2).lower() or default_unit
    if unit not in units:
        raise ValueError(f"bad {what} unit {m.group(2)!r} in {text!r}: use one of {unit_help}")
    return float(m.group(1)) * units[unit]


def parse_rate(text: str) -> int:
    """'1gbit' -> 1_000_000_000 (bits per second). Units as in tc: bit/kbit/mbit/gbit, or
    bps/kbps/mbps/gbps meaning *bytes* per second. A bare number is bits per second."""
    bits = int(_quantity(text, _RATE_UNITS, "bit", "rate", "1gbit, 100mbit, 10gbit", str(sorted(_RATE_UNITS))))
    if bits <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return bits


def parse_time(text: str) -> float:
    """'100us' -> 1e-4 (seconds). Units s, ms, us, ns; a bare number is microseconds (as in tc)."""
    return _quantity(text, _TIME_UNITS, "us", "time", "100us, 1ms", "s, ms, us, ns")


def _sh(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(argv)}\n{p.stderr.strip()}")
    return p


def list_namespaces() -> List[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = _sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_processes(ns: str) -> None:
    # Only processes inside a namespace this module created (i.e. ones we started there).
    pids = _sh(["ip", "netns", "pids", ns], check=False).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(int(pid), sig)
                alive.append(pid)
            except (ProcessLookupError, ValueError):
                pass
        if not alive:
            return
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_pid_alive(int(p)) for p in alive):
            time.sleep(0.05)
        pids = [p for p in alive if _pid_alive(int(p))]


def cleanup(prefix: Optional[str] = None, include_live: bool = False) -> List[str]:
    """Deletes namespaces left behind by this module; returns the names deleted.

    With ``prefix``: every namespace ``<prefix>h<i>`` / ``<prefix>br``. Without: every
    namespace matching this module's naming scheme (``pcm<pid>...``) whose creating
    process is dead, or all of them with ``include_live``.
    """
    removed = []
    for ns in list_namespaces():
        m = NAME_RE.match(ns)
        if not m:
            continue
        if prefix is not None:
            if m.group(1) != prefix:
                continue
        elif not include_live and _pid_alive(int(m.group(2))):
            continue
        _kill_ns_processes(ns)
        _sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    return removed


def _subnet_in_use(net: ipaddress.IPv4Network) -> bool:
    out = _sh(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    out += _sh(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    for tok in re.findall(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", out):
        try:
            other = ipaddress.ip_network(tok, strict=False)
        except ValueError:
            continue
        if other.prefixlen == 0:  # a default route overlaps everything; it is not a use
            continue
        if net.overlaps(other):
            return True
    return False


def _pick_subnet() -> ipaddress.IPv4Network:
    start = os.getpid() % 4096
    for k in range(4096):
        n = (start + k) % 4096
        net = ipaddress.IPv4Network(f"10.{200 + n // 256 % 50}.{n % 256}.0/24")
        if not _subnet_in_use(net):
            return net
    raise RuntimeError("no unused private /24 found under 10.200.0.0/10")


class Cluster:
    """H emulated hosts joined by a shaped bridge; see the module docstring.

    Args:
        hosts: number of host namespaces (>= 1).
        link: per-host link rate in tc syntax ("1gbit", "100mbit", "10gbit").
        latency: one-way delay added on each host's egress ("100us", "1ms", "0").
        prefix: namespace name prefix; default ``pcm<pid>`` (``pcm<pid>c<k>`` for the
            k-th cluster of this process). Must match ``pcm<digits>[c<digits>]``.
        subnet: a /24 to use (e.g. "10.250.3.0/24"); default: the first unused one.
        quiet: suppress the warning printed when the latency cannot be applied.
    """

    ifname = "eth0"  #: the interface name inside every host namespace

    def __init__(self, hosts: int = 2, link: str = "1gbit", latency: str = "100us",
                 prefix: Optional[str] = None, subnet: Optional[str] = None, quiet: bool = False):
        if hosts < 1 or hosts > 250:
            raise ValueError(f"hosts must be in 1..250, got {hosts}")
        self.hosts = int(hosts)
        self.link = link
        self.latency = latency
        self.rate_bits = parse_rate(link)
        self.delay_s = parse_time(latency)
        k = next(_counter)
        self.prefix = prefix or (f"pcm{os.getpid()}" if k == 0 else f"pcm{os.getpid()}c{k}")
        if not re.fullmatch(r"pcm\d+(c\d+)?", self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must look like pcm<digits>[c<digits>]")
        self._subnet_arg = subnet
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self.quiet = quiet
        self.shaping = ""  #: "netem" or "tbf", once up
        self.latency_applied = False
        self._created: List[str] = []
        self._procs: List[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._up = False
        self._old_handlers: Dict[int, object] = {}

    # ---- names -------------------------------------------------------------------
    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    def ns(self, i: int) -> str:
        """Name of host i's network namespace."""
        if not 0 <= i < self.hosts:
            raise IndexError(f"host {i} out of range 0..{self.hosts - 1}")
        return f"{self.prefix}h{i}"

    def addr(self, i: int) -> str:
        """Host i's IPv4 address."""
        if self.subnet is None:
            raise RuntimeError("cluster is not up")
        self.ns(i)
        return str(self.subnet.network_address + 1 + i)

    @property
    def namespaces(self) -> List[str]:
        return [self.bridge_ns] + [self.ns(i) for i in range(self.hosts)]

    # ---- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        self._install_signal_handlers()
        try:
            self.up()
        except BaseException:
            self.down()
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            self._restore_signal_handlers()

    def _add_ns(self, name: str) -> None:
        if name in list_namespaces():
            raise RuntimeError(f"namespace {name} already exists (leftover? run: python -m pycomm.bench.netem down --prefix {self.prefix})")
        _sh(["ip", "netns", "add", name])
        self._created.append(name)
        _sh(["ip", "-n", name, "link", "set", "lo", "up"])

    def up(self) -> "Cluster":
        """Creates namespaces, bridge, veths, addresses and tc limits."""
        if os.geteuid() != 0:
            raise PermissionError("netem.Cluster needs root (network namespaces, tc)")
        with self._lock:
            if self._up:
                return self
            atexit.register(self.down)
            self.subnet = ipaddress.IPv4Network(self._subnet_arg) if self._subnet_arg else _pick_subnet()
            if self.subnet.prefixlen != 24 or not self.subnet.is_private:
                raise ValueError(f"subnet must be a private /24, got {self.subnet}")
            if self._subnet_arg and _subnet_in_use(self.subnet):
                raise RuntimeError(f"subnet {self.subnet} is already in use on this machine")
            self._up = True  # from here on, down() has something to undo
            br = self.bridge_ns
            self._add_ns(br)
            _sh(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
            _sh(["ip", "-n", br, "link", "set", "br0", "up"])
            for i in range(self.hosts):
                h = self.ns(i)
                self._add_ns(h)
                # Both ends are created inside namespaces: nothing appears in the root one.
                _sh(["ip", "-n", br, "link", "add", f"p{i}", "type", "veth",
                     "peer", "name", self.ifname, "netns", h])
                _sh(["ip", "-n", br, "link", "set", f"p{i}", "master", "br0"])
                _sh(["ip", "-n", br, "link", "set", f"p{i}", "up"])
                _sh(["ip", "-n", h, "addr", "add", f"{self.addr(i)}/24", "dev", self.ifname])
                _sh(["ip", "-n", h, "link", "set", self.ifname, "up"])
                self._shape(h, self.ifname, delay=True)
                self._shape(br, f"p{i}", delay=False)
            if self.delay_s > 0 and not self.latency_applied and not self.quiet:
                print(f"netem: warning: this kernel has no sch_netem; link rate {self.link} is "
                      f"enforced with tbf but latency {self.latency} is NOT applied", file=sys.stderr)
            self._wait_reachable()
        return self

    def _tbf_args(self) -> List[str]:
        rate_bytes = self.rate_bits / 8
        # The bucket must hold a few full-size (GSO) packets and ~1 ms of traffic.
        burst = int(max(64 * 1024, rate_bytes * 1e-3))
        limit = int(max(2 * burst, rate_bytes * 5e-3))
        return ["tbf", "rate", f"{self.rate_bits}bit", "burst", str(burst), "limit", str(limit)]

    def _shape(self, ns: str, dev: str, delay: bool) -> None:
        if delay and self.delay_s > 0 and self.shaping != "tbf":
            # netem: rate and delay in one qdisc; limit in packets, enough for a BDP plus slack.
            limit = max(1000, int(self.rate_bits / 8 * (self.delay_s + 0.01) / 1500))
            p = _sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem",
                     "rate", f"{self.rate_bits}bit", "delay", f"{int(round(self.delay_s * 1e6))}us",
                     "limit", str(limit)], check=False)
            if p.returncode == 0:
                self.shaping, self.latency_applied = "netem", True
                return
            if "unknown" not in p.stderr.lower() and "no such file" not in p.stderr.lower():
                raise RuntimeError(f"tc netem failed on {ns}/{dev}: {p.stderr.strip()}")
            self.shaping = "tbf"
        _sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root"] + self._tbf_args())
        if not self.shaping:
            self.shaping = "tbf"

    def _wait_reachable(self, timeout: float = 5.0) -> None:
        # The bridge forwards only once its ports leave the listening state; probe with TCP.
        if self.hosts < 2:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                measure_rtt(self, 1, 0, rounds=1, timeout=2.0)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def down(self) -> None:
        """Kills processes started in the cluster and deletes its namespaces (idempotent)."""
        with self._lock:
            for p in self._procs:
                if p.poll() is None:
                    p.terminate()
            for p in self._procs:
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self._procs.clear()
            existing = set(list_namespaces()) if self._created else set()
            for ns in reversed(self._created):
                if ns in existing:
                    _kill_ns_processes(ns)
                    _sh(["ip", "netns", "del", ns], check=False)
            self._created.clear()
            self._up = False
            try:
                atexit.unregister(self.down)
            except Exception:
                pass

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            self._old_handlers[sig] = prev

            def handler(signum, frame, _prev=prev):
                self.down()
                signal.signal(signum, _prev if _prev is not None else signal.SIG_DFL)
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)

            signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, prev in self._old_handlers.items():
            try:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()

    # ---- running things ----------------------------------------------------------
    def command(self, host_index: int, argv: Sequence[str]) -> List[str]:
        """argv prefixed with ``ip netns exec <host ns>``."""
        return ["ip", "netns", "exec", self.ns(host_index)] + [str(a) for a in argv]

    def run(self, host_index: int, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
            **popen_kwargs) -> subprocess.Popen:
        """Starts argv inside host ``host_index``; returns the Popen.

        ``env`` holds variables *added* to this process's environment. The process is
        killed by ``down()`` if it is still running then.
        """
        if not self._up:
            raise RuntimeError("cluster is not up")
        full_env = dict(os.environ)
        full_env.update({k: str(v) for k, v in (env or {}).items()})
        p = subprocess.Popen(self.command(host_index, argv), env=full_env, **popen_kwargs)
        self._procs.append(p)
        return p

    def describe(self) -> dict:
        return {
            "prefix": self.prefix, "hosts": self.hosts, "link": self.link, "latency": self.latency,
            "rate_bits": self.rate_bits, "delay_s": self.delay_s, "shaping": self.shaping,
            "latency_applied": self.latency_applied, "ifname": self.ifname,
            "subnet": str(self.subnet), "namespaces": self.namespaces,
            "addrs": [self.addr(i) for i in range(self.hosts)] if self.subnet else [],
        }


_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
s.settimeout(float(sys.argv[3]))
c, _ = s.accept(); c.settimeout(float(sys.argv[3]))
mode = sys.argv[4]
if mode == "bw":
    n = 0; t0 = None
    while True:
        b = c.recv(1 << 20)
        if t0 is None: t0 = time.perf_counter()
        if not b: break
        n += len(b)
    t1 = time.perf_counter(); c.sendall(b"k")
    print(n, t1 - (t0 or t1), flush=True)
else:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(1)
        if not b: break
        c.sendall(b)
"""

_CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
mode = sys.argv[4]
if mode == "bw":
    n = int(sys.argv[5]); chunk = b"x" * (1 << 20)
    while n > 0:
        c.sendall(chunk[:min(n, len(chunk))]); n -= len(chunk)
    c.shutdown(socket.SHUT_WR); c.recv(1)
else:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(int(sys.argv[5])):
        t0 = time.perf_counter(); c.sendall(b"p"); c.recv(1); rtts.append(time.perf_counter() - t0)
    rtts.sort(); print(rtts[len(rtts) // 2], flush=True)
c.close()
"""


def _pair(cluster: Cluster, src: int, dst: int, mode: str, arg: int, timeout: float, port: int) -> str:
    server = cluster.run(dst, [sys.executable, "-c", _SERVER, cluster.addr(dst), str(port), str(timeout), mode],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"measurement server on host {dst} did not start")
        client = cluster.run(src, [sys.executable, "-c", _CLIENT, cluster.addr(dst), str(port), str(timeout),
                                   mode, str(arg)], stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=timeout + 5)
        if client.returncode != 0:
            raise RuntimeError(f"measurement client on host {src} failed ({client.returncode})")
        sout, _ = server.communicate(timeout=timeout + 5)
        return out if mode == "rtt" else sout
    finally:
        for p in (server,):
            if p.poll() is None:
                p.kill()
                p.wait()


def measure_bandwidth(cluster: Cluster, src: int = 0, dst: int = 1, nbytes: int = 8 << 20,
                      timeout: float = 30.0, port: int = 5201) -> float:
    """Sends ``nbytes`` over one TCP connection from host src to host dst; returns the
    receiver's measured throughput in bytes per second."""
    out = _pair(cluster, src, dst, "bw", nbytes, timeout, port)
    n, secs = out.split()
    n, secs = int(n), float(secs)
    if n != nbytes:
        raise RuntimeError(f"received {n} of {nbytes} bytes")
    return n / max(secs, 1e-9)


def measure_rtt(cluster: Cluster, src: int = 0, dst: int = 1, rounds: int = 20,
                timeout: float = 10.0, port: int = 5202) -> float:
    """Median TCP round-trip time (seconds) of 1-byte ping-pongs from src to dst."""
    return float(_pair(cluster, src, dst, "rtt", rounds, timeout, port).strip())


# ---- CLI -----------------------------------------------------------------------------

def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--link", default="1gbit", help="per-host link rate, tc syntax (default 1gbit)")
    p.add_argument("--latency", default="100us", help="one-way delay per host link (default 100us)")
    p.add_argument("--prefix", default=None, help="namespace prefix, pcm<digits> (default pcm<pid>)")
    p.add_argument("--subnet", default=None, help="private /24 to use (default: first unused 10.2xx.y.0/24)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pycomm.bench.netem", description="Emulated cluster: namespaces + bridge + tc.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="create a cluster and leave it up (remove with: down --prefix P)")
    _cluster_args(p_up)
    p_down = sub.add_parser("down", help="remove leftovers")
    p_down.add_argument("--prefix", default=None, help="remove this cluster (default: those of dead processes)")
    p_down.add_argument("--all", action="store_true", help="remove every pcm<pid>* namespace, even live ones")
    sub.add_parser("list", help="list this module's namespaces")
    p_meas = sub.add_parser("measure", help="bring a cluster up, measure bandwidth and RTT, tear down")
    _cluster_args(p_meas)
    p_meas.add_argument("--bytes", type=int, default=8 << 20)
    p_run = sub.add_parser("run", help="run a command on every host (or --on I), then tear down")
    _cluster_args(p_run)
    p_run.add_argument("--on", type=int, action="append", default=None, help="host index (repeatable)")
    p_run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    a = ap.parse_args(argv)

    if a.cmd == "down":
        removed = cleanup(prefix=a.prefix, include_live=a.all)
        print("removed: " + (" ".join(removed) if removed else "nothing"))
        return 0
    if a.cmd == "list":
        for ns in list_namespaces():
            m = NAME_RE.match(ns)
            if m:
                print(ns, "(creator alive)" if _pid_alive(int(m.group(2))) else "(leftover)")
        return 0
    c = Cluster(a.hosts, a.link, a.latency, prefix=a.prefix, subnet=a.subnet)
    if a.cmd == "up":
        c.up()
        atexit.unregister(c.down)  # leave it up on purpose
        print(json.dumps(c.describe(), indent=2))
        print(f"# remove with: {sys.executable} -m pycomm.bench.netem down --prefix {c.prefix}")
        return 0
    with c:
        if a.cmd == "measure":
            if a.hosts < 2:
                ap.error("measure needs --hosts >= 2")
            bw = measure_bandwidth(c, 0, 1, a.bytes)
            rtt = measure_rtt(c, 0, 1)
            print(json.dumps({**c.describe(), "measured_MBps": bw / 1e6, "measured_Mbitps": bw * 8 / 1e6,
                              "measured_rtt_us": rtt * 1e6}, indent=2))
            return 0
        cmd = list(a.argv)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            ap.error("run needs a command after --")
        targets = a.on if a.on else list(range(a.hosts))
        addrs = ",".join(c.addr(i) for i in range(a.hosts))
        procs = [c.run(i, cmd, env={"NETEM_HOST_INDEX": str(i), "NETEM_HOSTS": str(a.hosts),
                                    "NETEM_HOST_ADDRS": addrs, "NETEM_IFNAME": c.ifname}) for i in targets]
        rc = 0
        for p in procs:
            rc = p.wait() or rc
        return rc


if __name__ == "__main__":
    sys.exit(main())
