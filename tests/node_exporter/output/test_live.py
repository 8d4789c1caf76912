"""The terminal view renders what the agent saw (rendered to text, as a terminal would show it)."""

from __future__ import annotations

from rich.console import Console

from node_exporter.bpf.abi import ConnectStatus, L4Reason, Role
from node_exporter.l4.records import Counters, L4Record
from node_exporter.l7.pipeline import ConnInfo, L7Event
from node_exporter.output.live import LiveView
from node_exporter.protocols import DbRecord, HttpRecord
from node_exporter.protocols import Role as PRole


def _rec(cookie: int, reason: L4Reason, status: ConnectStatus = ConnectStatus.KSCOPE_CONNECT_OK) -> L4Record:
    return L4Record(
        reason=reason, role=Role.KSCOPE_ROLE_CLIENT, connect_status=status, connect_errno=0, netns_ino=1,
        sock_cookie=cookie, cgroup_id=0, start_ns=0, ts_ns=0, connect_latency_ns=0, total=Counters(bytes_sent=2048),
        delta=Counters(bytes_sent=2048), local_ip="198.18.0.1", local_port=40000 + cookie, remote_ip="198.18.0.2",
        remote_port=80, family=2, tgid=7, pid=7, srtt_us=150, segs_out=1, segs_in=1, last_drop_reason=0,
        ack_backlog=0, max_ack_backlog=0, sk_drops=0, rttvar_us=0, tcp_state=1, comm="curl",
    )  # fmt: skip


MS = 1_000_000


def _text(view: LiveView) -> str:
    console = Console(width=200, record=True)
    console.print(view.render(1.0))
    return console.export_text()


def test_open_closed_and_failed_connections() -> None:
    view = LiveView()
    view.update([_rec(1, L4Reason.KSCOPE_L4_PERIODIC), _rec(2, L4Reason.KSCOPE_L4_PERIODIC)])
    view.update([_rec(2, L4Reason.KSCOPE_L4_CLOSE), _rec(3, L4Reason.KSCOPE_L4_CLOSE,
                                                            ConnectStatus.KSCOPE_CONNECT_REFUSED)])  # fmt: skip
    text = _text(view)
    assert "1 open TCP sockets, 2 closed, 1 failed connects" in text
    assert "refused" in text and "198.18.0.1:40002" in text and "2.0 KiB" in text


def test_requests_grouped_by_process_and_route() -> None:
    info = ConnInfo(sock_cookie=1, netns_ino=1, side=PRole.SERVER, protocol="http1", tls=False,
                    local_ip="198.18.0.2", local_port=80, remote_ip="198.18.0.1", remote_port=40000, family=2,
                    tgid=9, comm="nginx")  # fmt: skip
    events = [
        L7Event(info, HttpRecord("GET", f"/u/{i}", "/users/{id}", 500 if i == 3 else 200, 80, 150, 0, ms * MS, "", ""))
        for i, ms in enumerate((1, 2, 3, 4))
    ]
    view = LiveView()
    view.update([], events)
    text = _text(view)
    row = next(line for line in text.splitlines() if "GET /users/{id}" in line)  # grouped by route, not path
    assert "nginx" in row and "server" in row and "4.0" in row and " 1 " in row  # 4 req/s, 1 error
    assert "3.00" in row and "4.00" in row  # p50 and max in ms


def test_db_operations_grouped_by_operation_with_their_errors() -> None:
    info = ConnInfo(sock_cookie=1, netns_ino=1, side=PRole.CLIENT, protocol="redis", tls=False,
                    local_ip="198.18.0.1", local_port=40000, remote_ip="198.18.0.2", remote_port=6379, family=2,
                    tgid=9, comm="app")  # fmt: skip
    events = [
        L7Event(info, DbRecord("redis", "GET", 30, 9, 0, ms * MS, query_summary="GET", error_type=err))
        for ms, err in ((1, ""), (2, "WRONGTYPE"), (3, ""))
    ]
    view = LiveView()
    view.update([], events)
    row = next(line for line in _text(view).splitlines() if " GET " in line)
    assert "app" in row and "redis" in row and "3.0" in row and " 1 " in row and "2.00" in row


def test_open_connections_kept_are_bounded() -> None:
    view = LiveView(max_connections=50)
    view.update([_rec(i, L4Reason.KSCOPE_L4_PERIODIC) for i in range(500)])
    assert "50 open TCP sockets" in _text(view)  # the oldest were forgotten, not kept without bound
