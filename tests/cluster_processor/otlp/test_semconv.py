"""Endpoint attribute rules of ``semconv`` and the bounds of the caches behind them."""

from __future__ import annotations

from cluster_processor.otlp import encode, semconv
from cluster_processor.otlp.model import Side

from .factories import cart, edge, frontend


def test_identity_drops_role_keys_and_keeps_the_pairs() -> None:
    own = frontend()
    ident = semconv.identity(own)
    assert [k for k, _ in ident] == [k for k, _ in own if not k.startswith(("client.", "server."))]
    assert all(any(p is q for q in own) for p in ident)  # the endpoint's own pairs, not copies


def test_peer_attributes_prefix_identity_and_keep_role_keys() -> None:
    peer = dict(semconv.peer_attributes(cart()))
    # The conventions' service.peer.* for the peer's service (equal to its resource's), peer.* for the rest.
    assert (peer["service.peer.name"], peer["service.peer.namespace"]) == ("cart", "shop")
    assert peer["peer.k8s.deployment.name"] == "cart"
    assert peer["server.port"] == 8080
    assert "service.name" not in peer and "peer.server.port" not in peer and "peer.service.name" not in peer


def test_record_and_metric_attributes_of_each_side() -> None:
    e = edge()
    client = dict(semconv.record_attributes(e, Side.CLIENT))
    assert client["client.port"] == 51234 and client["peer.k8s.deployment.name"] == "cart"
    assert "k8s.pod.name" not in client  # the observing side's identity is the record's resource
    server = dict(semconv.metric_attributes(e, Side.SERVER))
    assert server["server.port"] == 8080 and server["service.peer.name"] == "frontend"
    # The observing side's identity is the series' resource, not a data-point attribute.
    assert "k8s.pod.name" not in server and "k8s.deployment.name" not in server
    assert dict(semconv.workload_resource(e.server, "node-x"))["k8s.deployment.name"] == "cart"
    # A client keeps no client.* key of its own: an ephemeral port would make a series per connection.
    assert "client.port" not in dict(semconv.metric_attributes(e, Side.CLIENT))


def test_peer_key_cache_is_bounded_and_stays_right_past_its_limit() -> None:
    semconv._peer_key.cache_clear()
    limit = semconv._peer_key.cache_parameters()["maxsize"]
    for i in range(limit + 100):
        assert semconv._peer_key(f"k8s.label.{i}") == f"peer.k8s.label.{i}"
    assert semconv._peer_key.cache_info().currsize == limit
    assert semconv._peer_key("server.port") == "server.port"


def test_metric_base_cache_is_bounded_and_stays_right_past_its_limit() -> None:
    semconv._metric_base.cache_clear()
    limit = semconv._metric_base.cache_parameters()["maxsize"]
    for i in range(limit + 10):
        e = edge(pod=f"cart-{i}")
        assert semconv._metric_base(e, Side.CLIENT) == tuple(semconv.metric_attributes(e, Side.CLIENT))
    assert semconv._metric_base.cache_info().currsize == limit


def test_edge_resource_cache_is_bounded_and_stays_right_past_its_limit() -> None:
    semconv._edge_resource.cache_clear()
    limit = semconv._edge_resource.cache_parameters()["maxsize"]
    for i in range(limit + 10):
        e = edge(pod=f"cart-{i}")
        assert semconv._edge_resource(e, Side.SERVER, "n") == semconv.workload_resource(e.server, "n")
    assert semconv._edge_resource.cache_info().currsize == limit


def test_instance_resource_cache_is_bounded_and_stays_right_past_its_limit() -> None:
    encode._with_instance.cache_clear()
    limit = encode._with_instance.cache_parameters()["maxsize"]
    reporter = encode.Reporter("r", "n")
    for i in range(limit + 10):
        res = reporter.workload_resource((("service.name", f"w{i}"),), "node-1")
        assert res == (("service.instance.id", "r/node-1"), ("service.name", f"w{i}"))
    assert encode._with_instance.cache_info().currsize == limit


def test_how_a_peer_was_named_is_neither_identity_nor_prefixed() -> None:
    """A kscope.peer.* key (how the resolver named the peer) stays out of the workload's resource
    and reaches the other side's attributes as it is, not as peer.kscope.peer.*."""
    named = (*cart(), ("kscope.peer.resolved_by", "service"))
    assert "kscope.peer.resolved_by" not in dict(semconv.workload_resource(named, "n"))
    assert dict(semconv.peer_attributes(named))["kscope.peer.resolved_by"] == "service"
