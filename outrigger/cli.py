"""`outrigger`: one console script for the sidecar, the control plane and their tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _sidecar_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sidecar", help="run a sidecar proxy")
    p.add_argument("--config", help="sidecar.yaml: any of the flags below, as keys (dashes or _)")
    p.add_argument("--mesh", help="standalone: policy from this mesh file")
    p.add_argument("--control-plane", help="HOST:PORT of the control plane's xDS (ADS) server")
    p.add_argument("--service", help="the name of the service this sidecar fronts")
    p.add_argument("--namespace", default=None, help="the service's namespace (default: default)")
    p.add_argument("--node-id", default=None, help="xDS node id (default: service~hostname~pid)")
    p.add_argument("--outbound", default=None, help="outbound listener (default 127.0.0.1:15001)")
    p.add_argument("--inbound", default=None, help="inbound listener (default 127.0.0.1:15006)")
    p.add_argument("--app", default=None, help="the local app, HOST:PORT (default 127.0.0.1:8080)")
    p.add_argument("--admin", default=None, help="admin listener (default 127.0.0.1:15000)")
    p.add_argument("--drain-timeout", default=None, help="e.g. 20s (default)")
    p.add_argument("--snapshot-cache", default=None, help="keep the last good snapshot here")
    p.add_argument("--access-log", action="store_true", default=None, help="JSON access log")
    p.add_argument(
        "--initial-fetch-timeout",
        default=None,
        help="with --control-plane: serve the embedded default (allow_any, no services) if no "
        "config arrives within this (default 10s; 0s waits forever)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="send traces here (OTLP gRPC, e.g. http://127.0.0.1:4317); else the standard "
        "OTEL_EXPORTER_OTLP_ENDPOINT or the mesh's tracing.otlp_endpoint; none: tracing off",
    )
    p.add_argument(
        "--health",
        default=None,
        help="serve /healthz/ready here for kubelet probes (pod: 0.0.0.0:15021; default: off); "
        "503 until a config from the control plane, the snapshot cache or --mesh is applied",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="serve /stats/prometheus here for scrapes (pod: 0.0.0.0:15090; default: off)",
    )
    p.add_argument("--log-level", default=None, help="debug, info (default), warning or error")
    p.add_argument(
        "--trace-sampling",
        default=None,
        help="fraction of new traces sampled, 0 to 1; overrides the value from xDS (the mesh's "
        "tracing.sampling); /config_dump says which applies",
    )
    p.add_argument(
        "--detect-timeout",
        default=None,
        help="a redirected client that sends nothing this long is passed through as TCP "
        "(server-first protocols: MySQL, SMTP, ...; default 100ms)",
    )
    p.add_argument(
        "--tcp-idle-timeout",
        default=None,
        help="close a passed-through TCP connection after this long with no bytes either way "
        "(default 1h, as Envoy's tcp_proxy)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        default=None,
        help="end an HTTP/2 stream (gRPC call), a tunnel after a 101, or an upstream exchange "
        "after this long with no bytes either way (flag SI; default 5m, as Envoy's "
        "stream_idle_timeout; 0s: never)",
    )


def _control_plane_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("control-plane", help="run the xDS control plane")
    p.add_argument(
        "--mesh",
        help="mesh file to serve (reloaded when it changes); with --kubernetes, the mesh-wide "
        "settings (defaults, outbound_policy, tracing) and services outside the cluster",
    )
    p.add_argument(
        "--kubernetes",
        action="store_true",
        help="read Services, EndpointSlices and Namespaces from the Kubernetes API",
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="with --kubernetes: this kubeconfig (default: in-cluster, else ~/.kube/config)",
    )
    p.add_argument(
        "--namespaces",
        default=None,
        help="with --kubernetes: only these namespaces, comma-separated (default: all)",
    )
    p.add_argument(
        "--debounce",
        default="100ms",
        help="with --kubernetes: wait this long for a burst of changes to end (default 100ms)",
    )
    p.add_argument("--xds", default="127.0.0.1:15010", help="ADS gRPC listen address")
    p.add_argument(
        "--http",
        default="127.0.0.1:15014",
        help="HTTP listen address: /metrics, /live, /ready, /debug/problemz",
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=5000,
        help="serve at most this many sidecars (ADS streams); more are refused with "
        "RESOURCE_EXHAUSTED, which they retry with backoff (default 5000)",
    )
    p.add_argument(
        "--webhook",
        default=None,
        help="serve the admission webhooks (/inject, /validate) over HTTPS, e.g. 0.0.0.0:15017",
    )
    p.add_argument("--webhook-cert", default=None, help="PEM certificate (chain) for --webhook")
    p.add_argument("--webhook-key", default=None, help="PEM private key for --webhook")
    p.add_argument(
        "--webhook-secret",
        default=None,
        help="instead of --webhook-cert/--webhook-key: make a CA and serving certificate and "
        "keep them in this Secret (in $POD_NAMESPACE; it must exist), renewed before expiry",
    )
    p.add_argument(
        "--webhook-dns-name",
        default=None,
        help="with --webhook-secret: the name the certificate is for, e.g. "
        "outrigger.outrigger-system.svc",
    )
    p.add_argument(
        "--mutating-webhook-configuration",
        default=None,
        help="with --webhook-secret: patch its CA into this MutatingWebhookConfiguration",
    )
    p.add_argument(
        "--validating-webhook-configuration",
        default=None,
        help="with --webhook-secret: patch its CA into this ValidatingWebhookConfiguration",
    )


def _inject_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inject",
        help="print manifests with the sidecar injected (the webhook's code, offline)",
        description="Inject the sidecar into the Pods and pod templates of YAML manifests: "
        "outrigger inject -f app.yaml | kubectl apply -f -",
    )
    p.add_argument(
        "-f", "--file", required=True, help="YAML manifests (one or many), or - for stdin"
    )
    p.add_argument("--mesh", default=None, help="mesh file whose injection: section applies")


def _analyze_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from outrigger.analyze import DEFAULT_MAX_AMPLIFICATION, amplification_limit

    p = sub.add_parser(
        "analyze",
        help="offline findings on manifests and a mesh file (retry amplification, timeouts, "
        "invalid annotations, ...)",
        description="Check Kubernetes manifests and/or a mesh file without a cluster: every "
        "outrigger.dev/ annotation (the webhook's validator), retry amplification along call "
        "chains (outrigger.dev/calls, calls:), timeouts, retries and breakers. Exit status 1 "
        "when an error is found.",
    )
    p.add_argument(
        "-f",
        "--file",
        action="append",
        help="YAML or JSON manifests: a file, a directory (its .yaml, .yml and .json files), or "
        "- for stdin; repeatable",
    )
    p.add_argument("--mesh", default=None, help="a mesh file: its defaults: and its services")
    p.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="text (default) or json"
    )
    p.add_argument(
        "--max-amplification",
        type=amplification_limit,
        default=DEFAULT_MAX_AMPLIFICATION,
        help="warn about call chains whose deepest service can receive more requests than this "
        f"for one request at the top (default {DEFAULT_MAX_AMPLIFICATION})",
    )


def _wait_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "wait", help="block until the local sidecar is ready (plain-container postStart hook)"
    )
    p.add_argument("--timeout", default="60s", help="give up after this long (default 60s)")
    p.add_argument(
        "--url",
        default=None,
        help="the sidecar's readiness URL (default http://127.0.0.1:15021/healthz/ready)",
    )


def _iptables_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "iptables",
        help="install the pod's interception rules (the init container's command)",
        description="Redirect the pod's TCP connections to the sidecar with nat-table rules in "
        "the OUTRIGGER_* chains (IPv4, and IPv6 where the pod has it), applied atomically. "
        "Needs root with NET_ADMIN and NET_RAW, except for --dry-run.",
    )
    p.add_argument("--proxy-uid", default="1337", help="the sidecar's uid; its traffic stays")
    p.add_argument("--outbound-port", default="15001", help="outbound listener (default 15001)")
    p.add_argument("--inbound-port", default="15006", help="inbound listener (default 15006)")
    p.add_argument(
        "--exclude-inbound-ports",
        default="",
        help="ports not redirected on the way in, e.g. 15000,15021,15090 (the inbound and "
        "outbound ports always are)",
    )
    p.add_argument(
        "--exclude-outbound-ports", default="", help="destination ports not redirected, e.g. 3306"
    )
    p.add_argument(
        "--include-outbound-cidrs",
        default="*",
        help="destinations redirected: * (default, all) or CIDRs, e.g. 10.96.0.0/12; "
        "empty: no outbound redirect",
    )
    p.add_argument(
        "--exclude-outbound-cidrs",
        default="",
        help="destinations not redirected, e.g. 169.254.0.0/16",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the iptables-restore input, change nothing"
    )
    p.add_argument("--cleanup", action="store_true", help="remove the rules (and the chains)")


def _status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="each connected sidecar, the config it ACKed and the replica it uses",
        description="Ask every control plane replica for its sidecars (CSDS) and merge the "
        "answers; a replica that does not answer is named, and the exit status is then 1.",
    )
    p.add_argument(
        "--control-plane",
        default=None,
        help="xDS addresses of the replicas, HOST:PORT[,HOST:PORT...] (default 127.0.0.1:15010)",
    )
    p.add_argument(
        "--kubernetes",
        action="store_true",
        help="find the replicas as the endpoints of the control plane's Service (its pod IPs "
        "must be reachable from here: run it in the cluster, or port-forward and list them)",
    )
    p.add_argument("--kubeconfig", default=None, help="with --kubernetes: this kubeconfig")
    p.add_argument(
        "--namespace",
        default="outrigger-system",
        help="with --kubernetes: the control plane's namespace (default outrigger-system)",
    )
    p.add_argument(
        "--service",
        default="outrigger",
        help="with --kubernetes: the control plane's Service (default outrigger)",
    )


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="a whole mesh on this machine: control plane, 3 services, traffic, story"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="run N seconds without the live view (at least as long as the story, ~20s), print "
        "a summary: exit 1 if a step of the story did not happen, 3 if the latency guard "
        "failed (while nothing failed, the load's p50 was above 2x frontend's sidecar's + 5ms: "
        "the demo's own delays, e.g. a machine short of CPU, not the mesh's)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="send every sidecar's traces there (e.g. Jaeger; default OTEL_EXPORTER_OTLP_ENDPOINT);"
        " without either, the demo receives them and prints a retried request's waterfall",
    )
    p.add_argument("--rate", type=float, default=50.0, help="requests/s to frontend (default 50)")
    p.add_argument(
        "--mesh", default=None, help="mesh template (default: the shipped demo-mesh.yaml)"
    )


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag (tests check that what the chart runs is accepted here)."""
    parser = argparse.ArgumentParser(prog="outrigger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _sidecar_parser(sub)
    _control_plane_parser(sub)
    _iptables_parser(sub)
    _inject_parser(sub)
    _analyze_parser(sub)
    _wait_parser(sub)
    _status_parser(sub)
    _demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sidecar":
        from sidecar.app import run_sidecar

        return run_sidecar(args)
    if args.command == "control-plane":
        from control_plane.app import run_control_plane

        return run_control_plane(args)
    if args.command == "iptables":
        from sidecar.interception.iptables import run_iptables

        return run_iptables(args)
    if args.command == "inject":
        from outrigger.inject import run_inject

        return run_inject(args)
    if args.command == "analyze":
        if not args.file and not args.mesh:
            parser.error("outrigger analyze needs -f FILE|DIR|- (manifests), --mesh FILE, or both")
        from outrigger.analyze import run_analyze

        return run_analyze(args)
    if args.command == "wait":
        from outrigger.wait import run_wait

        return run_wait(args)
    if args.command == "status":
        from outrigger.status import run_status

        return run_status(args)
    if args.command == "demo":
        try:
            from outrigger.demo.run import run_demo
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != "rich":
                raise
            print(
                "outrigger demo: its live view needs the `demo` extra: "
                "pip install 'outrigger[demo]' (make demo installs it)",
                file=sys.stderr,
            )
            return 2
        return run_demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
