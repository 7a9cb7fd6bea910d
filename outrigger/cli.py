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


def _control_plane_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("control-plane", help="run the xDS control plane")
    p.add_argument("--mesh", help="mesh file to serve (reloaded when it changes)")
    p.add_argument("--kubernetes", action="store_true", help="read the Kubernetes API")
    p.add_argument("--xds", default="127.0.0.1:15010", help="ADS gRPC listen address")
    p.add_argument("--http", default="127.0.0.1:15014", help="HTTP listen address (metrics)")


def _status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="each connected sidecar and the config it ACKed")
    p.add_argument("--control-plane", default="127.0.0.1:15010", help="xDS address")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outrigger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _sidecar_parser(sub)
    _control_plane_parser(sub)
    _status_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "sidecar":
        from sidecar.app import run_sidecar

        return run_sidecar(args)
    if args.command == "control-plane":
        from control_plane.app import run_control_plane

        return run_control_plane(args)
    if args.command == "status":
        from outrigger.status import run_status

        return run_status(args)
    if args.command == "demo":
        from outrigger.demo.run import run_demo

        return run_demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
