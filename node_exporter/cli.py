"""`kscope` and `kscope-agent` command lines.

Errors a user can act on print one line, never a traceback, and exit 2 (the command line: a
flag or value) or 3 (the host: privilege, capabilities, BTF, libbpf, hooks, BPF objects, a port);
each parser's --help lists the codes.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kscope_common import logging_setup
from kscope_common.cli import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE, add_version, exit_status_epilog, parser
from kscope_common.runtime import tune_gc
from node_exporter.errors import HostError, KscopeError

if TYPE_CHECKING:
    from node_exporter.agent import Agent
    from node_exporter.local.pipeline import LocalPipeline

DESCRIPTION = "eBPF-based TCP observability, no code changes"
ENVIRONMENT = (
    "this host cannot run it (not root: lacking CAP_BPF and CAP_PERFMON\n"
    "     (or CAP_SYS_ADMIN) or CAP_NET_ADMIN; no kernel BTF; no libbpf; a required kernel hook\n"
    "     missing; BPF objects missing from the install or --bpf-dir; the --metrics-port or\n"
    "     kscope run's --prometheus address in use)"
)


def _trace_ratio(text: str) -> float | None:
    """``--l7-trace-ratio``: ``auto`` (None) or a share in (0, 1]; argparse prints the error (exit 2)."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected auto or a share in (0, 1], got {text!r}")
    return value


def _add_agent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS", help="stop after this long")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="collection interval (1.0)")
    p.add_argument(
        "--sweep-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often sockets that went quiet are looked at for their last counts and requests (5.0; "
        "busy ones report every interval themselves): each look at a network namespace is a pass over "
        "the kernel's whole TCP hash table",
    )
    p.add_argument("--jsonl", metavar="FILE", help="append records as JSON lines (kscope.v1.NodeRecord)")
    p.add_argument("--netns-inode", type=int, default=0, metavar="INODE", help="only this network namespace")
    p.add_argument("--bpf-dir", type=Path, default=None, help="where l4.bpf.o is (default: build/bpf)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve self-metrics for Prometheus here")
    p.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address for --metrics-port (default 127.0.0.1; the chart passes the pod's IP, which with "
        "hostNetwork is the node's, where kubelet probes and Prometheus scrape)",
    )
    p.add_argument(
        "--l7",
        action="store_true",
        help="also trace requests (HTTP/1, DNS, TLS via OpenSSL); experimental: see bench/RESULTS.md for its cost",
    )
    p.add_argument("--capture-bytes", type=int, default=512, help="bytes of each message head captured (512)")
    p.add_argument(
        "--l7-probe",
        choices=["auto", "sockets", "syscalls"],
        default="auto",
        help="L7 capture: socket tracepoints (Linux 6.3+) or the syscall-exit fallback; auto picks what the kernel has",
    )
    p.add_argument(
        "--l7-record-rate",
        type=int,
        default=1000,
        metavar="N",
        help="HTTP/1 requests sent as records of their own, per second per CPU (1000); past it requests are "
        "summed in the kernel per socket, method, route and status (metrics stay exact, spans are sampled); "
        "what the agent pairs itself (databases, caches, HTTP/2, gRPC, TLS) past the same budget (x CPUs, "
        "node-wide) it sums per socket, operation and status each interval; 0: every request is a record",
    )
    p.add_argument(
        "--l7-trace-ratio",
        type=_trace_ratio,
        default=None,
        metavar="R|auto",
        help="share of HTTP/1 requests that may be records of their own (spans), chosen by the request's "
        "TCP sequence numbers so that both ends of a request choose alike; the others are summed. auto "
        "(the default): all while the node stays within --l7-record-rate, then 1/2, 1/4, ... as its "
        "requests pass it (docs/traces.md); R in (0, 1]: that share, always",
    )
    p.add_argument(
        "--no-l7-causal",
        dest="l7_causal",
        action="store_false",
        help="do not link a client call to the server request its thread was serving "
        "(thread-per-request servers only), nor by a shared X-Request-ID (docs/traces.md)",
    )
    p.add_argument(
        "--l7-summary-raw-paths",
        action="store_true",
        help="sum by the raw path instead of its route (/users/1 and /users/2 apart): only to measure what "
        "routes in the kernel buy (bench/idpaths.py)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=10,
        metavar="N",
        help="lower the agent's scheduling priority by N (10; 0 keeps it): the agent's batch work then "
        "waits for the node's applications instead of delaying them (p99 figures: bench/RESULTS.md)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--processor", metavar="HOST:PORT", help="ship batches to the cluster processor (gRPC)")
    p.add_argument("--node-name", default=None, help="this node's name (default: $NODE_NAME, else the hostname)")
    p.add_argument("--proc-root", default="/proc", help="the host's /proc (in a container: /host/proc)")
    p.add_argument("--tls-ca", type=Path, help="CA of the processor's certificate (turns TLS on)")
    p.add_argument("--tls-cert", type=Path, help="client certificate for mTLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="client key for mTLS")
    p.add_argument("--tls-server-name", help="name in the processor's certificate, if not the host")
    p.add_argument("--nat", action="store_true", help="resolve DNAT'ed remotes (Service VIPs) through conntrack")
    p.add_argument(
        "--conntrack-netns",
        metavar="PATH",
        default=None,
        help="network namespace whose conntrack to read, e.g. /proc/1/ns/net (default: the agent's own)",
    )


def _parser() -> argparse.ArgumentParser:
    top = parser("kscope", DESCRIPTION, ENVIRONMENT)
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="this host's live service map: agent and aggregation in one process (local mode, no Kubernetes)",
        epilog=exit_status_epilog(ENVIRONMENT),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(run)
    _add_agent_args(run)
    run.add_argument(
        "--no-live",
        action="store_true",
        help="no terminal map: one JSON object per interval on stdout instead (the default when stdout is "
        "not a terminal)",
    )
    run.add_argument("--no-l7", dest="l7", action="store_false", help="no request tracing (L4 only)")
    run.add_argument(
        "--otlp",
        metavar="ENDPOINT",
        help="also send OTLP/gRPC to ENDPOINT (http://host:4317 plaintext, https:// TLS) as the cluster "
        "processor does; OTEL_EXPORTER_OTLP_HEADERS is honoured",
    )
    run.add_argument(
        "--prometheus",
        metavar="ADDR",
        help="also serve the same metrics for Prometheus at ADDR ([HOST:]PORT; host 127.0.0.1 unless given), "
        "named as the processor's --prometheus-port names them",
    )
    run.set_defaults(l7=True)  # a newcomer wants to see requests; the agent (the chart) keeps --l7 opt-in
    return top


def _run(args: argparse.Namespace, live: bool | None) -> int:
    """``live``: None for the agent (no map), else whether ``kscope run``'s map is a terminal view."""
    logging_setup.configure(args.log_level)
    # `kill -USR1 PID` writes every thread's stack to stderr: how a stuck agent is diagnosed in place
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.interval <= 0:
        print("kscope: error: --interval must be > 0", file=sys.stderr)
        return EXIT_USAGE
    if args.sweep_interval <= 0:
        print("kscope: error: --sweep-interval must be > 0", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= args.capture_bytes <= 4096:
        print("kscope: error: --capture-bytes must be 1..4096", file=sys.stderr)
        return EXIT_USAGE
    if args.l7_record_rate < 0:
        print("kscope: error: --l7-record-rate must be >= 0 (0: every request a record)", file=sys.stderr)
        return EXIT_USAGE
    if not 0 <= args.nice <= 19:
        print("kscope: error: --nice must be 0..19", file=sys.stderr)
        return EXIT_USAGE
    if args.nice:
        # Before any thread starts: a thread inherits its creator's nice value (Linux: per thread).
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + args.nice)
    from node_exporter.agent import Agent, AgentOptions

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        from node_exporter.ship import ClientTls

        try:
            tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        except KscopeError as exc:
            print(f"kscope: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    opts = AgentOptions(
        interval_s=args.interval,
        sweep_s=args.sweep_interval,
        duration_s=args.duration,
        jsonl=args.jsonl,
        netns_inode=args.netns_inode,
        bpf_dir=args.bpf_dir,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        l7=args.l7,
        l7_probe=args.l7_probe,
        l7_record_rate=args.l7_record_rate,
        l7_trace_ratio=args.l7_trace_ratio,
        l7_summary_raw_paths=args.l7_summary_raw_paths,
        l7_causal=args.l7_causal,
        capture_bytes=args.capture_bytes,
        processor=args.processor,
        node_name=args.node_name or os.environ.get("NODE_NAME") or socket.gethostname(),
        proc_root=args.proc_root,
        tls=tls,
        nat=args.nat,
        conntrack_netns=args.conntrack_netns,
    )
    local = None
    try:
        if live is not None:
            local = _local_pipeline(args, opts.node_name)
        try:
            agent = Agent(opts, local=local)
        except BaseException:
            if local is not None:  # its servers and threads: the agent would have closed them
                local.close()
            raise
        agent.install_signal_handlers()
        tune_gc()  # everything built so far (BTF, loaded objects, descriptors) lives as long as the agent
        if local is None:
            agent.run()
        else:
            _run_local(agent, local, live is True)
    except HostError as exc:
        print(f"kscope: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KscopeError as exc:
        print(f"kscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _local_pipeline(args: argparse.Namespace, node_name: str) -> LocalPipeline:
    from cluster_processor.main import ProcessorConfigError, otlp_from_env
    from node_exporter.local.namer import LocalNamer
    from node_exporter.local.pipeline import LocalPipeline, local_settings

    target = None
    if args.otlp:
        try:
            target = otlp_from_env({**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": args.otlp})
        except ProcessorConfigError as exc:
            if "OTEL_EXPORTER_OTLP_ENDPOINT" not in str(exc):
                raise KscopeError(str(exc)) from exc  # the headers' variable: named as it is
            raise KscopeError(f"--otlp {args.otlp}: expected http://HOST:PORT (plaintext), https://HOST:PORT "
                              "(TLS) or HOST:PORT") from exc  # fmt: skip
    prometheus = _listen_address(args.prometheus, "--prometheus") if args.prometheus else None
    namer = LocalNamer(proc_root=args.proc_root)
    settings = local_settings(args.interval)
    return LocalPipeline(node_name, namer, settings=settings, otlp=target, prometheus=prometheus)


def _listen_address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise KscopeError(f"{flag}: expected [HOST:]PORT with a port 0..65535, not {text!r}")
    return host or "127.0.0.1", int(port)


def _run_local(agent: Agent, local: LocalPipeline, terminal: bool) -> None:
    """The agent with the map: each interval's aggregate to the terminal view (keys on stdin) or to
    stdout as JSON lines."""
    from node_exporter.local.app import JsonLines, LogBuffer, MapOutput, TerminalMap

    out: MapOutput
    logs = LogBuffer() if terminal and sys.stderr.isatty() else None
    out = TerminalMap(agent.stop) if terminal else JsonLines(sys.stdout)
    agent.on_interval = lambda a: out.update(local.flush(), a.metrics.values)
    stderr = sys.stderr
    try:
        if isinstance(out, TerminalMap):
            if logs is not None:
                sys.stderr = logs
            out.start()
        agent.run()
    finally:
        out.close()
        sys.stderr = stderr
        if logs is not None:
            logs.replay(stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    live = not args.no_live and sys.stdout.isatty()
    return _run(args, live)


def agent_parser() -> argparse.ArgumentParser:
    p = parser("kscope-agent", "kscope node agent (what the Helm chart runs)", ENVIRONMENT)
    _add_agent_args(p)
    return p


def agent_main(argv: list[str] | None = None) -> int:
    return _run(agent_parser().parse_args(argv), live=None)


if __name__ == "__main__":
    sys.exit(main())
