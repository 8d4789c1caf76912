"""The DNS failure rule: NXDOMAIN is an answer, not a failure of the DNS edge; SERVFAIL, REFUSED,
FORMERR, NOTIMP and timeouts are. Every signal (RED, service graph, spans, logs) follows it, and the
response code stays on RED series and spans."""

from __future__ import annotations

from typing import Any

import pytest

from cluster_processor.aggregate import Aggregator
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import semconv
from cluster_processor.otlp.model import EVENT_DNS_ERROR, Protocol, Side, attr
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor import test_aggregate as base

index = base.index  # the same cluster: a-1 (node-1) calls b through its VIP
DNS_IP = "10.96.0.10"
# (rcode, timed out) -> error.type; "" is a success
RULE = {
    ("NOERROR", False): "",
    ("NXDOMAIN", False): "",
    ("SERVFAIL", False): "servfail",
    ("REFUSED", False): "refused",
    ("FORMERR", False): "formerr",
    ("NOTIMP", False): "notimp",
    ("", True): "timeout",
}


def dns(rcode: str, timed_out: bool = False, cookie: int = 7, **kw: Any) -> pb.L7Request:
    info = pb.DnsInfo(id=1, question_name="ext.example.", question_type="A", rcode=rcode, timed_out=timed_out)
    fields: dict[str, Any] = {"protocol": "dns", "remote_ip": DNS_IP, "remote_port": 53, "socket_cookie": cookie,
                              "dns": info}  # fmt: skip
    return base.l7(**(fields | kw))


@pytest.mark.parametrize(("rcode", "timed_out"), list(RULE))
def test_dns_error_type_rule(rcode: str, timed_out: bool) -> None:
    assert semconv.dns_error_type(rcode, timed_out) == RULE[rcode, timed_out]


def test_nxdomain_is_not_a_failure_on_any_signal(index: KubeIndex) -> None:
    agg = Aggregator(index)
    # Three of each outcome, as a search path makes them: the counts tell the outcomes apart.
    records = [dns(rcode, timed_out, cookie=i) for i, (rcode, timed_out) in enumerate(RULE) for _ in range(3)]
    agg.add(base.batch("node-1", (), records))
    (rep,) = agg.flush(base.T0 + 1)
    red = {(attr(p.attributes, semconv.DNS_RESPONSE_CODE), p.error_type): p.duration.count for p in rep.interval.red}
    # One series per response code, each with its error.type; a timeout has no response code.
    assert red == {
        ("NOERROR", ""): 3, ("NXDOMAIN", ""): 3, ("SERVFAIL", "servfail"): 3, ("REFUSED", "refused"): 3,
        ("FORMERR", "formerr"): 3, ("NOTIMP", "notimp"): 3, (None, "timeout"): 3}  # fmt: skip
    for p in rep.interval.red:
        sample_attrs = dict(semconv._red_sample(p, "node-1").attributes)
        assert sample_attrs.get("error.type", "") == p.error_type
        assert sample_attrs.get(semconv.DNS_RESPONSE_CODE) == attr(p.attributes, semconv.DNS_RESPONSE_CODE)
    # The service graph (the DNS server is not observed: counted from the client) fails 5 outcomes of 7.
    (g,) = rep.interval.service_graph
    assert (g.requests, g.failed) == (21, 15)
    failed_spans = {attr(s.attributes, semconv.DNS_RESPONSE_CODE) for s in rep.spans if semconv.span_failed(s)}
    assert failed_spans == {"SERVFAIL", "REFUSED", "FORMERR", "NOTIMP", None}
    ok_spans = [s for s in rep.spans if not semconv.span_failed(s)]
    assert len(ok_spans) == 6 and all("error.type" not in dict(semconv.span_attributes(s)) for s in ok_spans)
    # Logs: failures only.
    assert all(e.name == EVENT_DNS_ERROR for e in rep.logs)
    assert "NXDOMAIN" not in " ".join(e.body for e in rep.logs) and "NOERROR" not in " ".join(e.body for e in rep.logs)


def test_server_side_follows_the_same_rule(index: KubeIndex) -> None:
    """b-1 serving DNS to a-1: the server's series and the service graph (counted by the observed
    server) fail SERVFAIL, not NXDOMAIN."""
    agg = Aggregator(index)
    served = {"side": pb.ROLE_SERVER, "local_ip": base.B_IP, "local_port": 53, "remote_ip": base.A_IP,
              "remote_port": 40000, "process": pb.ProcessIdentity(pod_uid="uid-b1")}  # fmt: skip
    agg.add(base.batch("node-2", (), [dns("NXDOMAIN", cookie=9, **served), dns("SERVFAIL", cookie=9, **served)]))
    (rep,) = agg.flush(base.T0 + 1)
    assert {p.side for p in rep.interval.red} == {Side.SERVER}
    assert all(p.protocol is Protocol.DNS for p in rep.interval.red)
    assert sorted(p.error_type for p in rep.interval.red) == ["", "servfail"]
    (g,) = rep.interval.service_graph
    assert (g.client, g.server, g.requests, g.failed) == ("a", "b", 2, 1)
