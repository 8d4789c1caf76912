"""`kscope run`'s live service map in a real terminal (tmux), over real traffic in a namespace.

One namespace holds the whole scene, so the agent can watch it alone (``--netns-inode``: other tests
run on this machine at the same time): nginx in a systemd-style service cgroup serving three ports,
curl loops calling each (8080 busy and healthy, 8081 answering 500, 8082 behind a netfilter
``statistic`` drop), dnsmasq answering dig with NOERROR and NXDOMAIN.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.e2e.agentproc import KSCOPE
from tests.e2e.netns import SRV_V4, PodCgroups, Topology, nginx
from tests.e2e.tmuxterm import Tmux

pytestmark = pytest.mark.bpf
OK, ERR, LOSSY = 8080, 8081, 8082


def scene(topo: Topology, tmp: Path, cgroups: PodCgroups) -> str:
    """Start the servers and the callers; returns nginx's unit name."""
    unit = f"kscope-web-{topo.tag}.service"
    server = (f"listen {SRV_V4}:{OK}; listen {SRV_V4}:{ERR}; listen {SRV_V4}:{LOSSY};\n"
              'location / { return 200 "ok\\n"; }\nlocation = /error { return 500; }')  # fmt: skip
    web = nginx(topo, tmp / "nginx", server, (OK, ERR, LOSSY))
    PodCgroups.move(cgroups.unit(unit), web.pid)
    # Loss on the way in (SYNs and requests): the callers' sockets retransmit.
    topo.srv.iptables("-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", str(LOSSY), "-m", "statistic",
                      "--mode", "random", "--probability", "0.3", "-j", "DROP")  # fmt: skip
    topo.spawn(topo.srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
               "--user=root", "--port=53", f"--listen-address={SRV_V4}", "--bind-interfaces", "--local=/test/",
               "--host-record=ok.test,198.18.0.9", f"--pid-file={tmp}/dnsmasq.pid",
               stderr=(tmp / "dnsmasq.stderr").open("w"))  # fmt: skip
    topo.wait_listening(topo.srv, 53, udp=True)
    loops = {
        f"http://{SRV_V4}:{OK}/": 0.02,  # the busiest edge, and a healthy one
        f"http://{SRV_V4}:{ERR}/error": 0.3,
        f"http://{SRV_V4}:{LOSSY}/": 0.3,
    }
    for url, pause in loops.items():
        topo.spawn(topo.srv, "sh", "-c", f"while :; do curl -s -o /dev/null --max-time 5 {url}; sleep {pause}; done")
    topo.spawn(topo.srv, "sh", "-c", f"while :; do dig +short +tries=1 +time=2 @{SRV_V4} ok.test; "
               f"dig +short +tries=1 +time=2 @{SRV_V4} missing.test; sleep 0.5; done")  # fmt: skip
    return unit


def rows(screen: str) -> list[str]:
    return [line for line in screen.splitlines() if " → " in line]


def row_index(screen: str, edge: str) -> int:
    for i, line in enumerate(rows(screen)):
        if edge in line:
            return i
    return -1


def open_edge(term: Tmux, edge: str) -> str:
    """Enter, and if another edge's drill-down shows, back to the map and one row towards ``edge``
    (up or down: rows move as their figures do, and the selection follows its edge), until it shows."""
    for _ in range(30):
        term.keys("Enter")
        screen = term.wait(lambda s: "slowest recent requests" in s, "a drill-down")
        if screen.splitlines()[0].startswith(edge):
            return screen
        opened = screen.splitlines()[0].split("  ")[0].strip()
        term.keys("Escape")
        back = term.wait(lambda s: "q quit" in s and "slowest recent" not in s, "the map again")
        term.keys("Up" if 0 <= row_index(back, edge) < row_index(back, opened) else "Down")
    raise AssertionError(f"no drill-down of {edge}")


def test_live_map_rows_order_drilldown_and_sizes(topo: Topology, tmp_path: Path, cgroups: PodCgroups) -> None:
    unit = scene(topo, tmp_path, cgroups)
    web = f"nginx@{unit}"
    ok, err, lossy = (f"curl@host → {web}:{p}" for p in (OK, ERR, LOSSY))
    term = Tmux(200, 50)
    rc = tmp_path / "rc"
    try:
        term.start([KSCOPE, "run", "--netns-inode", str(topo.srv.ino), "--interval", "1"], rc,
                   stderr=tmp_path / "stderr")  # fmt: skip

        def settled(s: str) -> bool:
            i = [row_index(s, e) for e in (ok, err, lossy)]
            return min(i) >= 0 and "dnsmasq@host:53" in s and "NXDOMAIN" in s and "NOERROR" in s

        screen = term.wait(settled, "the three nginx edges and DNS", timeout=90)
        # Problems first: the 5xx edge and the lossy one above the busiest, healthy one.
        screen = term.wait(lambda s: max(row_index(s, err), row_index(s, lossy)) < row_index(s, ok),
                           "5xx and lossy edges above the healthy one", timeout=30)  # fmt: skip
        by_edge = {e: rows(screen)[row_index(screen, e)] for e in (ok, err, lossy)}
        assert by_edge[err].startswith("!") and by_edge[lossy].startswith("!"), screen
        assert not by_edge[ok].startswith("!"), screen
        assert re.search(r"\b100\b", by_edge[err]), by_edge[err]  # every request to 8081 is a 500
        assert "dig@host → dnsmasq@host:53" in screen
        assert screen.splitlines()[0].startswith("kscope run") and "edges" in screen.splitlines()[0]

        (tmp_path / "map-200x50.txt").write_text(screen)
        detail = open_edge(term, err)
        (tmp_path / "edge-200x50.txt").write_text(detail)
        assert "problems: errors" in detail
        route = next(line for line in detail.splitlines() if "/error" in line and "GET" in line)
        assert "500×" in route, detail
        slow = detail.split("slowest recent requests", 1)[1]
        assert re.search(r"\bserver\b.*GET.*/error.*500", slow) and re.search(r"\bclient\b.*GET.*/error.*500", slow)
        term.keys("Escape")
        term.wait(lambda s: row_index(s, ok) >= 0, "back on the map")

        term.keys("p")  # paused: the screen stays (and says so) until p again
        term.wait(lambda s: "PAUSED" in s.splitlines()[0], "the paused header")
        term.keys("p")
        term.wait(lambda s: "PAUSED" not in s.splitlines()[0], "the map running again")

        detail = open_edge(term, lossy)
        assert re.search(r"problems: .*retrans", detail), detail
        term.keys("Escape")

        term.resize(80, 24)
        small = term.wait(lambda s: "curl → nginx:8081" in s and "q quit" in s.rstrip().splitlines()[-1],
                          "the map at 80x24", timeout=20)  # fmt: skip
        lines = small.rstrip().splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        (tmp_path / "map-80x24.txt").write_text(small)
        short = [line for line in lines if "curl → nginx:" in line]
        assert short[0].startswith("!") and any("nginx:8080" in line for line in short), small

        term.keys("q")
        deadline = time.monotonic() + 30
        while not rc.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rc.read_text().strip() == "0", (tmp_path / "stderr").read_text()
        assert "Traceback" not in (tmp_path / "stderr").read_text()
    finally:
        term.close()
