"""`kscope` and `kscope-agent` command lines.

Errors a user can act on print one line, never a traceback, and exit 2 (the command line: a
flag or value) or 3 (the host: privilege, capabilities, BTF, libbpf, hooks, BPF objects, a port);
each parser's --help lists the codes.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from kscope_common import logging_setup
from kscope_common.cli import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE, add_version, exit_status_epilog, parser
from kscope_common.runtime import tune_gc
from node_exporter.errors import HostError, KscopeError

DESCRIPTION = "eBPF-based TCP observability, no code changes"
ENVIRONMENT = (
    "this host cannot run it (not root: lacking CAP_BPF and CAP_PERFMON\n"
    "     (or CAP_SYS_ADMIN) or CAP_NET_ADMIN; no kernel BTF; no libbpf; a required kernel hook\n"
    "     missing; BPF objects missing from the install or --bpf-dir; the --metrics-port in use)"
)


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
        "summed in the kernel per socket, method, path and status (metrics stay exact, spans are sampled); "
        "0: every request is a record",
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
        help="watch this host's TCP connections (local mode, no Kubernetes)",
        epilog=exit_status_epilog(ENVIRONMENT),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(run)
    _add_agent_args(run)
    run.add_argument("--no-live", action="store_true", help="no terminal view (default when not a terminal)")
    return top


def _run(args: argparse.Namespace, live: bool) -> int:
    logging_setup.configure(args.log_level)
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
        live=live,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        l7=args.l7,
        l7_probe=args.l7_probe,
        l7_record_rate=args.l7_record_rate,
        capture_bytes=args.capture_bytes,
        processor=args.processor,
        node_name=args.node_name or os.environ.get("NODE_NAME") or socket.gethostname(),
        proc_root=args.proc_root,
        tls=tls,
        nat=args.nat,
        conntrack_netns=args.conntrack_netns,
    )
    try:
        agent = Agent(opts)
        agent.install_signal_handlers()
        tune_gc()  # everything built so far (BTF, loaded objects, descriptors) lives as long as the agent
        agent.run()
    except HostError as exc:
        print(f"kscope: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KscopeError as exc:
        print(f"kscope: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    live = not args.no_live and sys.stdout.isatty()
    return _run(args, live)


def agent_parser() -> argparse.ArgumentParser:
    p = parser("kscope-agent", "kscope node agent (what the Helm chart runs)", ENVIRONMENT)
    _add_agent_args(p)
    return p


def agent_main(argv: list[str] | None = None) -> int:
    return _run(agent_parser().parse_args(argv), live=False)


if __name__ == "__main__":
    sys.exit(main())
