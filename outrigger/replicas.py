"""Which control planes `outrigger status` asks, and asking them all at once.

Each replica of the control plane knows only the sidecars connected to it, so with two
replicas each shows half the mesh. Like `istioctl proxy-status`, status asks every replica and
merges their answers, each row naming the replica its sidecar is connected to. The replicas are
a list of addresses (`--control-plane a:15010,b:15010`), or the control plane Service's
endpoints, read from its EndpointSlices through the Kubernetes API (`--kubernetes`): one
replica per endpoint, named by its pod, at the port named `grpc-xds`. Endpoints that are not
ready are asked too (a replica starting or stopping may still hold streams); one that does not
answer is named, never silently left out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import grpc

from control_plane.status import ProblemStatus, ProxyStatus, fetch_problems, fetch_status

XDS_PORT_NAME: Final = "grpc-xds"
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
API_TIMEOUT: Final = (10.0, 30.0)


class ReplicaError(Exception):
    """The replicas cannot be found (the message names what to check)."""


@dataclass(frozen=True, slots=True)
class Replica:
    name: str  # the pod's name, or the address given
    address: str  # HOST:PORT of its xDS port

    @property
    def where(self) -> str:
        """ "at 10.0.0.5:15010", or "outrigger-abc at 10.0.0.5:15010" when it has a name."""
        return (
            f"at {self.address}" if self.name == self.address else f"{self.name} at {self.address}"
        )


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What one replica answered, or why it did not."""

    replica: Replica
    proxies: list[ProxyStatus] = field(default_factory=list)
    problems: list[ProblemStatus] = field(default_factory=list)
    error: str = ""


def listed(addresses: str) -> list[Replica]:
    """`a:15010,b:15010` -> one replica each (named by its address)."""
    found = [a.strip() for a in addresses.split(",") if a.strip()]
    if not found:
        raise ReplicaError("--control-plane: expected HOST:PORT[,HOST:PORT...]")
    return [Replica(a, a) for a in dict.fromkeys(found)]


async def from_service(kubeconfig: Path | None, namespace: str, service: str) -> list[Replica]:
    """The endpoints of Service `namespace/service`, from its EndpointSlices."""
    from kubernetes_asyncio import client as kube_client

    from control_plane.sources import SourceError
    from control_plane.sources.kubernetes import load_configuration
    from control_plane.sources.reflector import api_call

    where = f"Service {namespace}/{service}"
    try:
        configuration = await load_configuration(kubeconfig)
    except SourceError as exc:
        raise ReplicaError(str(exc)) from None
    async with kube_client.ApiClient(configuration) as api:
        try:
            status, body = await api_call(
                kube_client.DiscoveryV1Api(api).list_namespaced_endpoint_slice,
                namespace,
                label_selector=f"{SERVICE_NAME_LABEL}={service}",
                timeout=API_TIMEOUT,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ReplicaError(f"cannot list the endpoints of {where}: {exc}") from None
    if status != 200:
        hint = (
            f" (you need list on endpointslices.discovery.k8s.io in {namespace})"
            if status == 403
            else ""
        )
        raise ReplicaError(f"cannot list the endpoints of {where}: HTTP {status}{hint}")
    replicas = _replicas(json.loads(body).get("items") or [])
    if not replicas:
        raise ReplicaError(
            f"{where} has no endpoints with a port named {XDS_PORT_NAME}: is the control plane "
            f"running? (kubectl -n {namespace} get endpointslices -l "
            f"{SERVICE_NAME_LABEL}={service}; --namespace and --service name another)"
        )
    return replicas


def _replicas(slices: Sequence[dict[str, Any]]) -> list[Replica]:
    found: dict[str, Replica] = {}
    for piece in slices:
        ports = [p.get("port") for p in piece.get("ports") or [] if p.get("name") == XDS_PORT_NAME]
        if not ports or ports[0] is None:
            continue
        for endpoint in piece.get("endpoints") or []:
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            # One endpoint is one pod; consumers use its first address (the API's rule).
            host = addresses[0]
            address = f"[{host}]:{ports[0]}" if ":" in host else f"{host}:{ports[0]}"
            name = (endpoint.get("targetRef") or {}).get("name") or address
            found[address] = Replica(name, address)
    return sorted(found.values(), key=lambda r: (r.name, r.address))


def ask(replica: Replica) -> ReplicaView:
    """The sidecars connected to `replica` and the problems it reports."""
    try:
        return ReplicaView(replica, fetch_status(replica.address), fetch_problems(replica.address))
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return ReplicaView(replica, error=code.name if code is not None else str(exc))


def ask_all(replicas: Sequence[Replica]) -> list[ReplicaView]:
    """Every replica at once (each within control_plane.status.TIMEOUT), in the given order."""
    with ThreadPoolExecutor(max_workers=min(16, len(replicas)) or 1) as pool:
        return list(pool.map(ask, replicas))


def replicas_for(args: Any) -> list[Replica]:
    """The replicas the command line names (ReplicaError when they cannot be found)."""
    if not args.kubernetes:
        return listed(args.control_plane or "127.0.0.1:15010")
    if args.control_plane:
        raise ReplicaError("--control-plane and --kubernetes exclude each other")
    kubeconfig = Path(args.kubeconfig) if args.kubeconfig else None
    return asyncio.run(from_service(kubeconfig, args.namespace, args.service))
