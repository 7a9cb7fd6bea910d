"""k8s/examples/shop.yaml on one machine, as far as it goes without a cluster: its Namespace and
Services (annotations as written) served by the fake API server to a real `outrigger
control-plane --kubernetes`, real sidecars for frontend and orders, and the demo apps started
with the manifest's own container args. What k8s/examples/README.md tells a user to expect:

- the failing payments replica is hidden: every request to frontend succeeds, because orders'
  sidecar retries payments on another replica; then its breaker ejects the failing one;
- the trace of a request is one trace across the apps (they pass the headers on): orders'
  CLIENT span to payments has an attempt span per try, the first to the failing replica (503),
  and the breaker's ejection is an event naming that replica;
- `outrigger status` lists the sidecars, synced;
- the story's timeout: `outrigger.dev/timeout: 50ms` on orders while payments is slow gives 504
  UT at frontend; back to 3s, success again.

Where a cluster differs (and this stands in): the kubelet starts the pods and the sidecars (here
processes), DNS and kube-proxy give `http://orders/` its ClusterIP and the pod's iptables rules
send the app's call to its sidecar (here the app's `--proxy`, which the sidecar routes the same
way, by the Host), EndpointSlices come from the EndpointSlice controller (here written from the
apps' addresses), the apps are reached without their own inbound sidecar, and the load generator
and its sidecar are the test's client sending a sampled `traceparent`.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from outrigger.demo.traces import CLIENT, SpanRecord, TraceStore, receive
from tests.control_plane.kube_api import (
    RESOURCES,
    FakeKubeApi,
    endpoint_slice,
    running_api,
    write_kubeconfig,
)
from tests.e2e.mesh_processes import (
    Processes,
    get_json,
    start_control_plane,
    start_demo_app,
    start_sidecar,
    wait_until,
)

SHOP = Path(__file__).resolve().parents[2] / "k8s" / "examples" / "shop.yaml"
REQUESTS = 60  # the failing replica is picked 1 time in 3: its breaker trips within them
WAIT = 15.0


def manifests() -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(SHOP.read_text())}


def app_args(deployment: dict[str, Any], pod: str, proxy: str | None = None) -> list[str]:
    """The Deployment's container args for pod POD, on 127.0.0.1 port 0 instead of 0.0.0.0:8080,
    with `--proxy` (the sidecar's outbound listener) where a pod has its iptables rules."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "outrigger.demo.service"]
    args = [arg.replace("$(POD_NAME)", pod) for arg in container["args"]]
    assert args[:2] == ["--name", pod]
    args[args.index("--listen") + 1] = "127.0.0.1:0"
    return args[2:] + (["--proxy", f"http://{proxy}"] if proxy else [])


def pod_slice(service: str, pod: str, address: str) -> dict[str, Any]:
    """An EndpointSlice of SERVICE holding one pod (the apps listen on different ports)."""
    host, port = address.rsplit(":", 1)
    return endpoint_slice(f"{service}-{pod}", "shop", service, [host], int(port))


def annotate(api: FakeKubeApi, name: str, key: str, value: str) -> None:
    change = {f"outrigger.dev/{key}": value}
    api.edit("Service", "shop", name, lambda s: s["metadata"]["annotations"].update(change))


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include LABELS (Prometheus text)."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def traceparent() -> tuple[str, str]:
    """A sampled W3C traceparent, as the load generator's sidecar (trace-sampling 1) sends."""
    trace_id, span_id = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    return trace_id, f"00-{trace_id}-{span_id}-01"


def endpoint_of(span: SpanRecord) -> str:
    return f"{span.attributes.get('server.address')}:{span.attributes.get('server.port')}"


@pytest.mark.timeout(120)
async def test_the_shop_example_hides_its_failing_replica_and_traces_every_attempt(
    tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = manifests()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # the sidecars export within 0.1 s
    store = TraceStore(max_kept=REQUESTS)
    async with (
        running_api() as api,
        receive(store) as (receiver, otlp),
        httpx.AsyncClient(timeout=10.0, trust_env=False) as http,
    ):
        for doc in shop.values():
            if doc["kind"] in RESOURCES:  # the Namespace and the Services, as written
                api.create(doc)

        # payments: its Deployment's two replicas, and payments-flaky's one (--failure-rate 1).
        payments = {
            pod: await start_demo_app(procs, pod, *app_args(shop[f"Deployment/{d}"], pod))
            for d, pod in (
                ("payments", "payments-a"),
                ("payments", "payments-b"),
                ("payments-flaky", "payments-flaky-a"),
            )
        }
        flaky = payments["payments-flaky-a"]
        for pod, address in payments.items():
            api.create(pod_slice("payments", pod, address))

        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api)
        source = f"--kubernetes --kubeconfig {kubeconfig} --namespaces shop --debounce 50ms"
        cp = await start_control_plane(procs, None, extra=tuple(source.split()))
        pod = ("--namespace", "shop", "--initial-fetch-timeout", "0s", "--otlp-endpoint", otlp)
        sidecars = {
            name: await start_sidecar(
                procs, f"{name}~shop-e2e", control_plane=cp.xds, app="127.0.0.1:9", extra=pod
            )
            for name in ("frontend", "orders")
        }
        orders = await start_demo_app(
            procs,
            "orders-a",
            *app_args(shop["Deployment/orders"], "orders-a", sidecars["orders"].outbound),
        )
        api.create(pod_slice("orders", "orders-a", orders))
        frontend = await start_demo_app(
            procs,
            "frontend-a",
            *app_args(shop["Deployment/frontend"], "frontend-a", sidecars["frontend"].outbound),
        )

        async def every_endpoint_known() -> bool:
            dump = await get_json(http, f"http://{sidecars['orders'].admin}/config_dump")
            service = dump["services"].get("outbound|80||payments.shop.svc.cluster.local") or {}
            return len(service.get("endpoints", [])) == len(payments)

        async def routed() -> bool:
            return (await http.get(f"http://{frontend}/")).status_code == 200

        await wait_until("orders' sidecar knows the 3 payments replicas", every_endpoint_known)
        await wait_until("frontend -> orders -> payments answers", routed)

        # 1. The load: every request succeeds although one payments replica fails them all.
        sent: dict[str, str] = {}  # trace id -> the load's span id (the parent it sent)
        for _ in range(REQUESTS):
            trace_id, header = traceparent()
            sent[trace_id] = header.split("-")[2]
            reply = await http.get(f"http://{frontend}/", headers={"traceparent": header})
            assert reply.status_code == 200, reply.text
            assert reply.text.startswith("frontend-a <- orders-a <- payments-")
            assert "payments-flaky" not in reply.text

        # orders' sidecar retried, and its breaker ejected the failing replica.
        stats = (await http.get(f"http://{sidecars['orders'].admin}/stats/prometheus")).text
        assert metric(stats, "outrigger_retries_total", destination="payments") >= 1
        assert metric(stats, "outrigger_ejections_total", destination="payments") >= 1
        assert (
            metric(
                stats,
                "outrigger_requests_total",
                direction="outbound",
                destination="payments",
                code="503",
            )
            == 0
        )

        # 2. Traces: one per request across both sidecars; the retried ones show each attempt.
        def retried_traces() -> list[list[SpanRecord]]:
            found = []
            for trace_id in sent:
                spans = [s for s in store.spans() if s.trace_id == trace_id]
                services = {(s.service, s.kind, s.retried) for s in spans}
                if {("orders", CLIENT, True), ("frontend", CLIENT, False)} <= services:
                    found.append(spans)
            return found

        def ejection_seen() -> bool:
            return any(
                name == "outrigger.breaker.ejected"
                and f"{a['server.address']}:{a['server.port']}" == flaky
                for s in store.spans()
                for name, a in s.events
            )

        arrived = await receiver.until(lambda: bool(retried_traces()) and ejection_seen(), WAIT)
        assert arrived, sorted({(s.service, s.name, s.kind) for s in store.spans()})
        spans = retried_traces()[0]
        (front,) = [s for s in spans if s.service == "frontend" and s.kind == CLIENT]
        (back,) = [s for s in spans if s.service == "orders" and s.kind == CLIENT]
        assert (front.name, back.name) == ("GET orders", "GET payments")
        assert front.parent == sent[front.trace_id]  # the load's span, as it sent it
        assert back.parent == front.span_id  # joined up through the orders app's headers
        attempts = sorted(
            (s for s in spans if s.parent == back.span_id and s.is_attempt),
            key=lambda s: s.attributes["outrigger.attempt"],
        )
        assert [s.name for s in attempts] == [f"attempt {n + 1}" for n in range(len(attempts))]
        assert len(attempts) == back.attempts >= 2
        assert (endpoint_of(attempts[0]), attempts[0].attributes["http.response.status_code"]) == (
            flaky,
            503,
        )
        assert attempts[-1].attributes["http.response.status_code"] == 200
        assert endpoint_of(attempts[-1]) in set(payments.values()) - {flaky}

        # 3. outrigger status: both sidecars, every type synced.
        status = subprocess.run(
            [sys.executable, "-m", "outrigger.cli", "status", "--control-plane", cp.xds],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
        assert set(rows) == {"frontend~shop-e2e", "orders~shop-e2e"}
        assert all(row.count("SYNCED") == 4 for row in rows.values()), status.stdout

        # 4. The story's timeout: orders at 50ms while payments answers in 100ms: 504 UT.
        for address in payments.values():
            await http.post(f"http://{address}/delay?ms=100")
        annotate(api, "orders", "timeout", "50ms")

        async def timed_out() -> httpx.Response | None:
            reply = await http.get(f"http://{frontend}/")
            return reply if reply.status_code == 504 else None

        reply = await wait_until("504 at frontend", timed_out)
        assert "UT" in reply.text
        annotate(api, "orders", "timeout", "3s")
        for address in payments.values():
            await http.post(f"http://{address}/delay?ms=0")
        await wait_until("success again", routed)
