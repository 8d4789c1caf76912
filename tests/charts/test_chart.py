"""The Helm chart, rendered and linted by the real Helm engine, checked against Kubernetes' schemas.

Helm is Helm v4's Go SDK through ``helm-python-sdk`` (``helm_python``, a ctypes binding over
``libhelm_c``, no ``helm`` binary): ``Chart.render`` is ``helm template`` (values coalesced, then
checked against ``values.schema.json``, then the templates run), ``lint`` is ``helm lint``. Every
rendered object is validated with ``kubernetes-validate`` against the OpenAPI-derived schemas of
the oldest Kubernetes the chart allows and of the newest the package ships, in strict mode, so a
misspelt field fails too. No cluster is involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kscope"
RELEASE = "kscope"
NAMESPACE = "observability"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.27.0", "1.30.0", kubernetes_validate.latest_version()]

AGENT_CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYS_ADMIN"}
READ_VERBS = {"get", "list", "watch"}

TLS_VALUES: dict[str, Any] = {
    "tls": {"enabled": True, "secretName": "kscope-mtls"},
    "otlp": {
        "endpoint": "https://collector.example.internal:4317",
        "insecure": False,
        "headers": {"authorization": "Bearer s3cr3t+token", "x-tenant": "team-a"},
    },
}

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[Manifest]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def only(docs: list[Manifest], kind: str) -> Manifest:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(workload: Manifest) -> Manifest:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Manifest = containers[0]
    return result


@pytest.fixture(scope="module")
def default_docs(chart: helm.Chart) -> list[Manifest]:
    return render(chart)


@pytest.fixture(scope="module")
def tls_docs(chart: helm.Chart) -> list[Manifest]:
    return render(chart, TLS_VALUES)


# --- Helm engine: lint and render --------------------------------------------------------------


def test_engine_is_helm_v4() -> None:
    assert helm.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("values", [None, TLS_VALUES], ids=["defaults", "tls-otlp"])
def test_lint_passes_strict(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    # Severity 1 is "info" (only "icon is recommended"); warnings and errors fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_default_render_has_every_object(default_docs: list[Manifest]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in default_docs)
    assert kinds == [
        ("ClusterRole", "kscope-processor"),
        ("ClusterRoleBinding", "kscope-processor"),
        ("DaemonSet", "kscope-agent"),
        ("Deployment", "kscope-processor"),
        ("Service", "kscope-processor"),
        ("ServiceAccount", "kscope-agent"),
        ("ServiceAccount", "kscope-processor"),
    ]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("which", ["default_docs", "tls_docs"])
def test_every_manifest_validates(which: str, kube_version: str, request: pytest.FixtureRequest) -> None:
    docs: list[Manifest] = request.getfixturevalue(which)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {kube_version}: {exc.message}")


def test_validator_catches_a_bad_manifest(default_docs: list[Manifest]) -> None:
    """Guard against a validator that passes everything: a misspelt field must fail."""
    daemonset = yaml.safe_load(yaml.safe_dump(only(default_docs, "DaemonSet")))
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, "1.30.0", strict=True)


def test_standard_labels_everywhere(default_docs: list[Manifest]) -> None:
    for doc in default_docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kscope"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "kscope"
        assert labels["helm.sh/chart"] == "kscope-0.1.0"
    for kind in ("DaemonSet", "Deployment"):
        workload = only(default_docs, kind)
        selector = workload["spec"]["selector"]["matchLabels"]
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
    service = only(default_docs, "Service")
    assert service["spec"]["selector"] == only(default_docs, "Deployment")["spec"]["selector"]["matchLabels"]


def test_names_fit_dns_labels_for_the_longest_release(chart: helm.Chart) -> None:
    release = "r" * 53  # Helm's limit for a release name
    docs = [
        d
        for path, text in chart.render(None, name=release, namespace=NAMESPACE).items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_notes_name_the_processor_address(chart: helm.Chart) -> None:
    notes = chart.render(None, name=RELEASE, namespace=NAMESPACE)["kscope/templates/NOTES.txt"]
    assert "kscope-processor.observability.svc:9440" in notes
    assert "in plaintext" in notes


# --- the node agent -----------------------------------------------------------------------------


def test_agent_is_not_privileged_and_has_exactly_its_capabilities(default_docs: list[Manifest]) -> None:
    agent = container(only(default_docs, "DaemonSet"))
    sc = agent["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert len(sc["capabilities"]["add"]) == len(AGENT_CAPABILITIES)


def test_agent_host_namespaces_and_dns(default_docs: list[Manifest]) -> None:
    pod = only(default_docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "hostIPC" not in pod


def test_agent_has_no_api_access(default_docs: list[Manifest]) -> None:
    pod = only(default_docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    accounts = {d["metadata"]["name"]: d for d in default_docs if d["kind"] == "ServiceAccount"}
    assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
    binding = only(default_docs, "ClusterRoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["kscope-processor"]


def test_agent_host_mounts(default_docs: list[Manifest]) -> None:
    pod = only(default_docs, "DaemonSet")["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in container(only(default_docs, "DaemonSet"))["volumeMounts"]}
    expected = {
        "/sys/kernel/btf": "/sys/kernel/btf",
        "/sys/fs/cgroup": "/sys/fs/cgroup",
        "/sys/kernel/tracing": "/sys/kernel/tracing",
        "/proc": "/host/proc",
    }
    assert sorted(host_paths.values()) == sorted(expected)
    for name, host_path in host_paths.items():
        assert mounts[name]["mountPath"] == expected[host_path]
        assert mounts[name]["readOnly"] is True, f"{host_path} must be mounted read-only"


def test_agent_bpffs_is_optional_and_writable(chart: helm.Chart) -> None:
    docs = render(chart, {"agent": {"bpffs": {"enabled": True}}})
    daemonset = only(docs, "DaemonSet")
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["sys-fs-bpf"]["hostPath"]["path"] == "/sys/fs/bpf"
    mount = next(m for m in container(daemonset)["volumeMounts"] if m["name"] == "sys-fs-bpf")
    assert mount["mountPath"] == "/sys/fs/bpf"
    assert not mount.get("readOnly", False)


def test_agent_runs_everywhere_and_rolls_gradually(default_docs: list[Manifest]) -> None:
    daemonset = only(default_docs, "DaemonSet")
    assert daemonset["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    agent = container(daemonset)
    assert agent["resources"]["requests"] and agent["resources"]["limits"]
    assert {"name": "metrics", "containerPort": 9442, "protocol": "TCP"} in agent["ports"]


def test_agent_args_point_at_the_processor_service(default_docs: list[Manifest]) -> None:
    agent = container(only(default_docs, "DaemonSet"))
    service = only(default_docs, "Service")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-ingest")
    assert agent["command"] == ["kscope-agent"]
    assert f"--processor={service['metadata']['name']}.{NAMESPACE}.svc:{port}" in agent["args"]
    assert "--proc-root=/host/proc" in agent["args"]
    # Self-metrics on the pod's (with hostNetwork: the node's) IP, where kubelet's probes connect.
    assert "--metrics-addr=$(POD_IP)" in agent["args"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in agent["env"]
    assert agent["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert not any(a.startswith("--tls") for a in agent["args"])


def test_agent_options(chart: helm.Chart) -> None:
    docs = render(
        chart,
        {
            "agent": {
                "extraCapabilities": ["SYS_RESOURCE"],
                "priorityClassName": "system-node-critical",
                "updateStrategy": {"maxUnavailable": "10%"},
                "extraArgs": ["--interval=2"],
                "extraEnv": [{"name": "KSCOPE_DEBUG", "value": "1"}],
                "tolerations": [],
            }
        },
    )
    daemonset = only(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    agent = container(daemonset)
    assert set(agent["securityContext"]["capabilities"]["add"]) == AGENT_CAPABILITIES | {"SYS_RESOURCE"}
    assert pod["priorityClassName"] == "system-node-critical"
    assert "tolerations" not in pod
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%"
    assert agent["args"][-1] == "--interval=2"
    assert {"name": "KSCOPE_DEBUG", "value": "1"} in agent["env"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


# --- the cluster processor ----------------------------------------------------------------------


def test_processor_runs_as_non_root(default_docs: list[Manifest]) -> None:
    deployment = only(default_docs, "Deployment")
    pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 65532
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(deployment)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_processor_service_ports(default_docs: list[Manifest]) -> None:
    service = only(default_docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc-ingest"]["port"] == 9440
    assert ports["grpc-ingest"]["targetPort"] == "grpc-ingest"
    assert "metrics" in ports
    processor = container(only(default_docs, "Deployment"))
    assert {p["name"] for p in processor["ports"]} == {"grpc-ingest", "metrics", "trace-join"}
    assert processor["command"] == ["kscope-processor"]


def test_processor_replicas_find_each_other_for_the_trace_join(chart: helm.Chart, default_docs: list[Manifest]) -> None:
    """The peers are the processor Service's ready endpoints (its EndpointSlices, which the
    processor already watches), each on the trace-join port; the replica's own address from the
    downward API. waitSeconds 0 turns the join off: no port, no peers."""
    deployment, service = only(default_docs, "Deployment"), only(default_docs, "Service")
    proc = container(deployment)
    assert {"--trace-wait=30", "--trace-listen=0.0.0.0:9442",
            f"--trace-peer-service={NAMESPACE}/{service['metadata']['name']}"} <= set(proc["args"])  # fmt: skip
    env = {e["name"]: e for e in proc["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"name": "trace-join", "containerPort": 9442, "protocol": "TCP"} in proc["ports"]
    off = container(only(render(chart, {"processor": {"traceJoin": {"waitSeconds": 0}}}), "Deployment"))
    assert "--trace-wait=0" in off["args"] and not any(a.startswith("--trace-listen") for a in off["args"])
    assert "trace-join" not in {p["name"] for p in off["ports"]}
    with pytest.raises(Exception, match=r"traceJoin\.port must differ"):
        render(chart, {"processor": {"traceJoin": {"port": 9441}}})


def test_processor_replicas_and_default_otlp(chart: helm.Chart, default_docs: list[Manifest]) -> None:
    assert only(default_docs, "Deployment")["spec"]["replicas"] == 2
    env = {e["name"]: e for e in container(only(default_docs, "Deployment"))["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == chart.values["otlp"]["endpoint"]
    assert env["OTEL_EXPORTER_OTLP_INSECURE"]["value"] == "true"
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in env
    docs = render(chart, {"processor": {"replicas": 5}})
    assert only(docs, "Deployment")["spec"]["replicas"] == 5


def test_cluster_role_is_read_only(default_docs: list[Manifest]) -> None:
    role = only(default_docs, "ClusterRole")
    granted: set[tuple[str, str]] = set()
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= READ_VERBS, rule
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        granted |= {(group, resource) for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted == {
        ("", "pods"),
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("apps", "replicasets"),
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("apps", "daemonsets"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
    }
    binding = only(default_docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kscope-processor", "namespace": NAMESPACE}]


def test_rbac_can_be_left_out(chart: helm.Chart) -> None:
    kinds = {d["kind"] for d in render(chart, {"rbac": {"create": False}})}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


# --- TLS between agent and processor, custom OTLP endpoint --------------------------------------


def test_tls_secret_mounted_read_only_in_both(tls_docs: list[Manifest]) -> None:
    for kind in ("DaemonSet", "Deployment"):
        workload = only(tls_docs, kind)
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "kscope-mtls"
        mount = next(m for m in container(workload)["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        args = container(workload)["args"]
        for flag, file in (("--tls-ca", "ca.crt"), ("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
            assert f"{flag}={mount['mountPath']}/{file}" in args, (kind, args)
    agent_args = container(only(tls_docs, "DaemonSet"))["args"]
    assert f"--tls-server-name=kscope-processor.{NAMESPACE}.svc" in agent_args


def test_custom_otlp_endpoint_and_headers_secret(tls_docs: list[Manifest]) -> None:
    env = {e["name"]: e for e in container(only(tls_docs, "Deployment"))["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "https://collector.example.internal:4317"
    assert env["OTEL_EXPORTER_OTLP_INSECURE"]["value"] == "false"
    ref = env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"]
    secret = only(tls_docs, "Secret")
    assert ref == {"name": secret["metadata"]["name"], "key": "headers"}
    # Credentials never appear in the pod spec, and values are percent-encoded (OTLP exporter spec).
    assert "s3cr3t" not in yaml.safe_dump(only(tls_docs, "Deployment"))
    assert secret["stringData"]["headers"] == "authorization=Bearer%20s3cr3t%2Btoken,x-tenant=team-a"


def test_existing_headers_secret(chart: helm.Chart) -> None:
    docs = render(chart, {"otlp": {"headersSecret": {"name": "vendor-otlp", "key": "h"}}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = {e["name"]: e for e in container(only(docs, "Deployment"))["env"]}
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {"name": "vendor-otlp", "key": "h"}


# --- values.schema.json, enforced by the Helm engine --------------------------------------------


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"otlp": {"endpoint": 5}}, "/otlp/endpoint"),
    ({"otlp": {"insecure": "yes"}}, "/otlp/insecure"),
    ({"otlpEndpoint": "x:4317"}, "otlpEndpoint"),
    ({"agent": {"metricsPort": 70000}}, "/agent/metricsPort"),
    ({"agent": {"extraCapabilities": ["SYS_ADMIN"]}}, "/agent/extraCapabilities/0"),
    ({"agent": {"updateStrategy": {"maxUnavailable": 0}}}, "/agent/updateStrategy/maxUnavailable"),
    ({"processor": {"replicas": "two"}}, "/processor/replicas"),
    ({"processor": {"imagee": {}}}, "imagee"),
    ({"tls": {"enabled": True}}, "/tls/secretName"),
    ({"agent": {"seccompProfile": {"type": "Localhost"}}}, "/agent/seccompProfile"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[where for _, where in BAD_VALUES])
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as excinfo:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    message = str(excinfo.value)
    assert "schema" in message
    assert where in message, message


def test_lint_reports_a_schema_violation() -> None:
    report = helm.lint(CHART, {"otlp": {"endpoint": 5}})
    assert any("/otlp/endpoint" in e for e in report["errors"]), report


@pytest.mark.parametrize("which", ["default_docs", "tls_docs"])
def test_agent_args_are_what_the_agent_accepts(which: str, request: pytest.FixtureRequest) -> None:
    from node_exporter.cli import agent_parser

    docs: list[Manifest] = request.getfixturevalue(which)
    agent = container(only(docs, "DaemonSet"))
    assert agent["command"][-1] == "kscope-agent" or agent["command"] == ["kscope-agent"]
    args = agent_parser().parse_args(agent.get("args", []))  # exits (SystemExit) on an unknown flag
    assert args.processor and args.proc_root == "/host/proc"
    assert args.nat and not args.l7  # the defaults: NAT on, experimental L7 off
    if which == "tls_docs":
        assert args.tls_ca and args.tls_cert and args.tls_key


def test_agent_l7_record_rate_reaches_the_agent(chart: helm.Chart) -> None:
    from node_exporter.cli import agent_parser

    docs = render(chart, {"agent": {"l7": True, "l7RecordRate": 250}})
    args = agent_parser().parse_args(container(only(docs, "DaemonSet"))["args"])
    assert args.l7 and args.l7_record_rate == 250
    with pytest.raises(Exception, match="schema"):
        render(chart, {"agent": {"l7": True, "l7RecordRate": -1}})


def test_agent_l7_trace_ratio_reaches_the_agent(chart: helm.Chart) -> None:
    from node_exporter.cli import agent_parser

    default = agent_parser().parse_args(container(only(render(chart, {"agent": {"l7": True}}), "DaemonSet"))["args"])
    assert default.l7_trace_ratio is None  # auto
    docs = render(chart, {"agent": {"l7": True, "l7TraceRatio": 0.25}})
    assert agent_parser().parse_args(container(only(docs, "DaemonSet"))["args"]).l7_trace_ratio == 0.25
    for bad in (0, 1.5, "sometimes"):
        with pytest.raises(Exception, match="schema"):
            render(chart, {"agent": {"l7": True, "l7TraceRatio": bad}})


def test_agent_sweep_interval_reaches_the_agent(chart: helm.Chart) -> None:
    from node_exporter.cli import agent_parser

    default = agent_parser().parse_args(container(only(render(chart, {}), "DaemonSet"))["args"])
    assert default.sweep_interval == 5
    docs = render(chart, {"agent": {"sweepIntervalSeconds": 2.5}})
    assert agent_parser().parse_args(container(only(docs, "DaemonSet"))["args"]).sweep_interval == 2.5
    for bad in (0, -1, "5s"):
        with pytest.raises(Exception, match="schema"):
            render(chart, {"agent": {"sweepIntervalSeconds": bad}})


# --- Prometheus endpoint, ServiceMonitor, Grafana dashboards -------------------------------------

PROM_VALUES: dict[str, Any] = {
    "prometheus": {"enabled": True, "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}},
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "kscope"}},
}
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))


@pytest.fixture(scope="module")
def prom_docs(chart: helm.Chart) -> list[Manifest]:
    return render(chart, PROM_VALUES)


def service_monitor_errors(doc: Manifest) -> str:
    """ "" when ``doc`` is a valid ServiceMonitor: prometheus-operator's models (generated from its CRD)
    in strict mode, and nothing of the document dropped on the way (a misspelt field would be)."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
    from pydantic import ValidationError

    try:
        model = ServiceMonitor.model_validate(doc, strict=True)
    except ValidationError as exc:
        return str(exc)
    back = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return "" if back == doc else f"fields the CRD does not have: {doc} != {back}"


def test_prometheus_off_by_default(default_docs: list[Manifest]) -> None:
    assert not [d for d in default_docs if d["kind"] in ("ServiceMonitor", "ConfigMap")]
    assert not [a for a in container(only(default_docs, "Deployment"))["args"] if "prometheus" in a]


def test_prometheus_port_reaches_the_processor(prom_docs: list[Manifest]) -> None:
    from cluster_processor.main import _parser

    processor = container(only(prom_docs, "Deployment"))
    assert _parser().parse_args(processor["args"]).prometheus_port == 9464
    assert {p["name"]: p["containerPort"] for p in processor["ports"]}["prometheus"] == 9464
    ports = {p["name"]: p for p in only(prom_docs, "Service")["spec"]["ports"]}
    assert ports["prometheus"]["port"] == 9464 and ports["prometheus"]["targetPort"] == "prometheus"


def test_service_monitor_scrapes_the_processor_with_honor_labels(prom_docs: list[Manifest]) -> None:
    sm = only(prom_docs, "ServiceMonitor")
    assert service_monitor_errors(sm) == ""
    assert sm["metadata"]["labels"]["release"] == "kps"
    service = only(prom_docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    by_port = {e["port"]: e for e in sm["spec"]["endpoints"]}
    assert set(by_port) <= {p["name"] for p in service["spec"]["ports"]}
    assert by_port["prometheus"]["honorLabels"] is True  # each series' own job and instance
    assert "honorLabels" not in by_port["metrics"]


def test_service_monitor_check_catches_a_bad_one(prom_docs: list[Manifest]) -> None:
    sm = yaml.safe_load(yaml.safe_dump(only(prom_docs, "ServiceMonitor")))
    sm["spec"]["endpoints"][0]["honorLabel"] = True
    assert "does not have" in service_monitor_errors(sm)
    sm = yaml.safe_load(yaml.safe_dump(only(prom_docs, "ServiceMonitor")))
    sm["spec"]["endpoints"][0]["interval"] = "30 seconds"
    assert "interval" in service_monitor_errors(sm)


def test_prometheus_port_must_be_its_own(chart: helm.Chart) -> None:
    for taken in (9440, 9441):
        with pytest.raises(Exception, match=r"prometheus\.port must differ"):
            render(chart, {"prometheus": {"enabled": True, "port": taken}})
    assert render(chart, {"prometheus": {"enabled": False, "port": 9441}})  # off: no port, no clash


def test_service_monitor_needs_the_endpoint(chart: helm.Chart) -> None:
    with pytest.raises(Exception, match=r"needs prometheus\.enabled"):
        render(chart, {"prometheus": {"serviceMonitor": {"enabled": True}}})


def test_dashboards_as_sidecar_config_maps(chart: helm.Chart, prom_docs: list[Manifest]) -> None:
    assert {p.stem for p in DASHBOARDS} == {"kscope-service-map", "kscope-red", "kscope-network", "kscope-dns"}
    maps = {d["metadata"]["name"]: d for d in prom_docs if d["kind"] == "ConfigMap"}
    assert set(maps) == {f"kscope-dashboard-{p.stem.removeprefix('kscope-')}" for p in DASHBOARDS}
    for path in DASHBOARDS:
        cm = maps[f"kscope-dashboard-{path.stem.removeprefix('kscope-')}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "kscope"}
        assert cm["data"] == {path.name: path.read_text().rstrip("\n")}
        kubernetes_validate.validate(cm, "1.30.0", strict=True)
    other = render(chart, {"dashboards": {"enabled": True, "label": "example.com/dashboard", "labelValue": "kscope"}})
    labels = [d["metadata"]["labels"] for d in other if d["kind"] == "ConfigMap"]
    assert len(labels) == len(DASHBOARDS) and all(lb["example.com/dashboard"] == "kscope" for lb in labels)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_prometheus_and_dashboards_render_valid(prom_docs: list[Manifest], kube_version: str) -> None:
    for doc in prom_docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # not a built-in kind: checked against its CRD's models above
        kubernetes_validate.validate(doc, kube_version, strict=True)


def test_lint_passes_with_prometheus_and_dashboards() -> None:
    report = helm.lint(CHART, PROM_VALUES, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"prometheus": {"port": 0}}, "/prometheus/port"),
        ({"prometheus": {"serviceMonitor": {"interval": "30 seconds"}}}, "/prometheus/serviceMonitor/interval"),
        ({"prometheus": {"serviceMonitor": {"labels": {"x": "a b"}}}}, "/prometheus/serviceMonitor/labels/x"),
        ({"dashboards": {"labelValue": 1}}, "/dashboards/labelValue"),
        ({"dashboards": {"label": "no spaces"}}, "/dashboards/label"),
        ({"dashboards": {"enable": True}}, "enable"),
    ],
)  # fmt: skip
def test_schema_rejects_bad_prometheus_values(chart: helm.Chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as excinfo:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(excinfo.value), str(excinfo.value)


def test_dashboards_are_grafana_dashboards() -> None:
    """Each file is a dashboard Grafana imports: a uid, a datasource variable every query uses, and
    the panels' PromQL (checked against a real Prometheus in tests/e2e/test_prometheus.py)."""
    import json

    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and board["title"].startswith("kscope / ")
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        targets = [t for p in board["panels"] if p["type"] != "row" for t in p["targets"]]
        assert targets and all(t["datasource"]["uid"] == "${datasource}" and t["expr"] for t in targets)
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
    service_map = json.loads((CHART / "dashboards" / "kscope-service-map.json").read_text())
    assert any(p["type"] == "nodeGraph" for p in service_map["panels"])
