"""pycomm.bench.netem: the emulated cluster sets up, shapes, and tears down cleanly."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from dist_util import subprocess_env
from pycomm.bench import netem

NETEM_CLI = [sys.executable, "-m", "pycomm.bench.netem"]
ENV = subprocess_env()  # children import this tree's pycomm, as the tests do


def _can_netns() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    probe = f"pcm{os.getpid()}c999h0"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create network namespaces: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


_why = _can_netns()
needs_netns = pytest.mark.skipif(bool(_why), reason=_why or "ok")


def _ours(prefix):
    return [ns for ns in netem.list_namespaces() if ns.startswith(prefix)]


def _root_links():
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


# ---- pure helpers -------------------------------------------------------------------

def test_parse_rate_and_time():
    assert netem.parse_rate("1gbit") == 10**9
    assert netem.parse_rate("100mbit") == 10**8
    assert netem.parse_rate("10Gbit") == 10**10
    assert netem.parse_rate("1mbps") == 8 * 10**6  # tc: bps = bytes per second
    assert netem.parse_time("100us") == pytest.approx(1e-4)
    assert netem.parse_time("1.5ms") == pytest.approx(1.5e-3)
    assert netem.parse_time("0") == 0.0
    with pytest.raises(ValueError):
        netem.parse_rate("fast")
    with pytest.raises(ValueError):
        netem.parse_time("1 fortnight")


def test_prefix_must_match_scheme():
    with pytest.raises(ValueError):
        netem.Cluster(hosts=2, prefix="eth")  # never anything that isn't ours


# ---- real namespaces ------------------------------------------------------------------

@needs_netns
def test_up_down_leaves_nothing():
    links_before = _root_links()
    with netem.Cluster(hosts=3, link="1gbit", latency="100us", quiet=True) as c:
        names = _ours(c.prefix)
        assert sorted(names) == sorted(c.namespaces) and len(names) == 4
        # Each host has lo up and eth0 with its address; nothing new in the root namespace.
        for i in range(3):
            out = subprocess.run(["ip", "-n", c.ns(i), "-o", "addr"], capture_output=True, text=True).stdout
            assert c.addr(i) in out and "127.0.0.1" in out
        assert _root_links() == links_before
        qd = subprocess.run(["tc", "-n", c.ns(0), "qdisc", "show", "dev", c.ifname],
                            capture_output=True, text=True).stdout
        assert ("tbf" in qd) or ("netem" in qd)
        prefix = c.prefix
    assert _ours(prefix) == []
    assert _root_links() == links_before


@needs_netns
def test_teardown_on_exception():
    prefix = None
    with pytest.raises(RuntimeError, match="boom"):
        with netem.Cluster(hosts=2, quiet=True) as c:
            prefix = c.prefix
            p = c.run(0, ["sleep", "60"])
            assert _ours(prefix)
            raise RuntimeError("boom")
    assert prefix and _ours(prefix) == []
    assert p.poll() is not None  # the process started inside was killed


@needs_netns
def test_teardown_on_sigterm(tmp_path):
    # A separate process holding a cluster is SIGTERMed: its handler tears everything down.
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\n"
        "from pycomm.bench import netem\n"
        "with netem.Cluster(hosts=2, quiet=True) as c:\n"
        "    print(c.prefix, flush=True)\n"
        "    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=ENV)
    prefix = p.stdout.readline().strip()
    assert prefix.startswith("pcm") and _ours(prefix)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) != 0
    assert _ours(prefix) == []


@needs_netns
def test_down_removes_leftovers():
    # `up` leaves a cluster behind on purpose; `down --prefix` removes exactly that one.
    prefix = f"pcm{os.getpid()}c77"
    subprocess.run(NETEM_CLI + ["up", "--hosts", "2", "--prefix", prefix], env=ENV,
                   check=True, capture_output=True, timeout=30)
    try:
        assert len(_ours(prefix)) == 3
    finally:
        out = subprocess.run(NETEM_CLI + ["down", "--prefix", prefix], env=ENV,
                             check=True, capture_output=True, text=True, timeout=30).stdout
    assert prefix in out
    assert _ours(prefix) == []


@needs_netns
def test_two_hosts_talk_tcp():
    with netem.Cluster(hosts=2, link="1gbit", latency="0", quiet=True) as c:
        rtt = netem.measure_rtt(c, 0, 1, rounds=5)
        assert 0 < rtt < 0.5
        # And the reverse direction, through a real server process.
        srv = c.run(0, [sys.executable, "-c",
                        "import socket;s=socket.socket();s.bind(('%s',7000));s.listen(1);"
                        "print('up',flush=True);c,_=s.accept();c.sendall(c.recv(5)[::-1])" % c.addr(0)],
                    stdout=subprocess.PIPE, text=True)
        assert srv.stdout.readline().strip() == "up"
        cli = c.run(1, [sys.executable, "-c",
                        "import socket;c=socket.create_connection(('%s',7000),timeout=5);"
                        "c.sendall(b'hello');print(c.recv(5).decode())" % c.addr(0)],
                    stdout=subprocess.PIPE, text=True)
        out, _ = cli.communicate(timeout=15)
        assert out.strip() == "olleh"


@needs_netns
def test_bandwidth_limit_in_effect():
    with netem.Cluster(hosts=2, link="100mbit", latency="0", quiet=True) as c:
        bw = netem.measure_bandwidth(c, 0, 1, nbytes=4 << 20)
    # 100 Mbit/s = 12.5 MB/s; unshaped veth on this machine moves > 500 MB/s.
    assert bw < 15e6, f"measured {bw / 1e6:.1f} MB/s over a 100mbit link"
    assert bw > 5e6, f"measured {bw / 1e6:.1f} MB/s: far below the 100mbit limit"


@needs_netns
def test_latency_applied_or_reported():
    with netem.Cluster(hosts=2, link="1gbit", latency="5ms", quiet=True) as c:
        rtt = netem.measure_rtt(c, 0, 1, rounds=5)
        if c.latency_applied:
            assert rtt > 0.008  # 5 ms each way
        else:
            assert c.shaping == "tbf"  # kernel without sch_netem: rate only, and it says so
