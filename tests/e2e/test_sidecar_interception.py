"""The whole of interception, in network namespaces: injected pods, real sidecars, a real
control plane, apps that know nothing of the mesh.

Two pods (tests/e2e/netns.py). Each is set up as the injector sets up a pod: the command lines
are taken from `inject_pod` itself (`outrigger iptables ...` as root, as the init container
runs it; `outrigger sidecar ...` as uid 1337 with the injector's flags, the kubelet's
`$(POD_NAMESPACE)` expanded and the snapshot cache moved to a directory uid 1337 can write;
`outrigger wait` on /healthz/ready, as the postStart hook). A real `outrigger control-plane`
serves the mesh file; it runs in the server pod, on a port the pod's annotation excludes from
inbound interception (in a cluster it is a pod of its own).

The mesh names the server's apps by virtual addresses (ClusterIPs) no interface has: web
(10.96.0.10:80, HTTP, retried on 503), echo (10.96.0.11:7000, `protocol: tcp`), secure
(10.96.0.12:443, `protocol: tls`), mail (10.96.0.13:25, undeclared: its server speaks first).
The client app calls them with no proxy settings. What each sidecar did is read from its
metrics port (/stats/prometheus on 15090), as Prometheus would.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from control_plane.webhooks.inject import inject_pod
from mesh.injection import Injection
from tests.e2e.netns import PYTHON, Pod, PodProcess, require_root, two_pods

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

OUTRIGGER = [PYTHON, "-m", "outrigger.cli"]
PROGRAMS = [PYTHON, "-m", "tests.e2e.pod_programs"]
CONTROL_PLANE = "10.0.0.2:15010"
READY = "http://127.0.0.1:15021/healthz/ready"
SECURE_NAME = "secure.default.svc.cluster.local"
# ports the server pod's apps listen on
WEB, ECHO, TLS, MAIL, EXCLUDED, UNKNOWN = 8080, 7000, 8443, 2525, 9090, 7001


def mesh_doc(outbound_policy: str) -> dict[str, Any]:
    def service(name: str, port: int, address: str, target: int, **more: Any) -> dict[str, Any]:
        endpoints = [f"10.0.0.2:{target}"]
        return {"name": name, "port": port, "addresses": [address], "endpoints": endpoints, **more}

    return {
        "outbound_policy": outbound_policy,
        "services": [
            service("web", 80, "10.96.0.10", WEB, policy={"retries": {"attempts": 2}}),
            service("echo", 7000, "10.96.0.11", ECHO, protocol="tcp"),
            service("secure", 443, "10.96.0.12", TLS, protocol="tls"),
            service("mail", 25, "10.96.0.13", MAIL),
        ],
    }


def injected_commands(app: str, annotations: dict[str, str]) -> tuple[list[str], list[str]]:
    """The init container's and the proxy's args, as the injector writes them for a pod."""
    manifest = {
        "metadata": {"labels": {"app": app}, "annotations": annotations},
        "spec": {"containers": [{"name": app, "image": f"{app}:1"}]},
    }
    spec = inject_pod(
        manifest, namespace="default", injection=Injection(control_plane=CONTROL_PLANE)
    ).pod["spec"]
    containers = {c["name"]: c for c in spec["initContainers"]}
    return containers["outrigger-init"]["args"], containers["outrigger-proxy"]["args"]


@dataclass
class Scene:
    client: Pod
    server: Pod
    ca: Path
    apps: dict[int, PodProcess] = field(default_factory=dict)

    def call(self, host: str, port: int, *extra: str) -> dict[str, Any]:
        """The client app's TCP (or TLS) connection; what it got back."""
        return _last_json(self.client.python(*PROGRAMS[1:], "client", host, str(port), *extra,
                                             check=False))  # fmt: skip

    def get(self, host: str, port: int, *extra: str) -> dict[str, Any]:
        """The client app's HTTP GET."""
        return _last_json(
            self.client.python(*PROGRAMS[1:], "get", host, str(port), *extra, check=False)
        )

    def metrics(self, pod: Pod) -> Metrics:
        page = _last_json(
            pod.python(*PROGRAMS[1:], "get", "127.0.0.1", "15090", "--path", "/stats/prometheus")
        )
        return Metrics.parse(page["body"])


def _last_json(done: Any) -> dict[str, Any]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the program printed nothing: {done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@dataclass
class Metrics:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return cls(samples)

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of `name` over the samples whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, have), value in self.samples.items()
            if sample == name and wanted <= have
        )

    def tcp_closed(self, **labels: str) -> float:
        return self("outrigger_tcp_connections_closed_total", **labels)


@contextlib.contextmanager
def scene(logs: Path, outbound_policy: str = "allow_any") -> Iterator[Scene]:
    require_root()
    cache = Path(tempfile.mkdtemp(prefix="outrigger-cache-"))  # uid 1337 writes its snapshots
    cache.chmod(0o777)
    try:
        with two_pods(logs) as (client, server):
            yield _set_up(Scene(client, server, logs / "ca.pem"), logs, cache, outbound_policy)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _set_up(scene: Scene, logs: Path, cache: Path, outbound_policy: str) -> Scene:
    client, server = scene.client, scene.server
    commands = {  # app -> (init container args, proxy args)
        "client": injected_commands("client", {"outrigger.dev/exclude-outbound-ports": "9090"}),
        "web": injected_commands("web", {"outrigger.dev/exclude-inbound-ports": "15010"}),
    }
    # the init containers first: from here on the pods' TCP goes to their sidecars
    for pod, app in ((client, "client"), (server, "web")):
        pod.run([*OUTRIGGER, *commands[app][0]])

    ca = trustme.CA()
    ca.cert_pem.write_to_path(scene.ca)
    cert = ca.issue_cert(SECURE_NAME)
    cert.private_key_pem.write_to_path(logs / "server.key")
    for pem in cert.cert_chain_pems:
        pem.write_to_path(logs / "server.pem", append=True)
    programs = {
        WEB: ("http",),
        ECHO: ("echo",),
        TLS: ("tls-echo", "--cert-dir", str(logs)),
        MAIL: ("banner",),
        EXCLUDED: ("echo",),
        UNKNOWN: ("echo",),
    }
    for port, (program, *extra) in programs.items():
        scene.apps[port] = server.start(program, [*PROGRAMS, program, "--port", str(port), *extra])

    mesh = logs / "mesh.yaml"
    mesh.write_text(yaml.safe_dump(mesh_doc(outbound_policy)))
    control_plane = server.start(
        "control-plane",
        [*OUTRIGGER, "control-plane", "--mesh", str(mesh), "--xds", "0.0.0.0:15010",
         "--http", "127.0.0.1:15014"],
    )  # fmt: skip
    control_plane.wait_for_text("xDS (ADS, CSDS, health) on")
    for pod, app in ((server, "web"), (client, "client")):
        args = [
            "default"
            if arg == "$(POD_NAMESPACE)"
            else arg.replace("/var/lib/outrigger", str(cache / app))
            for arg in commands[app][1]
        ]
        (cache / app).mkdir(mode=0o777)
        (cache / app).chmod(0o777)
        pod.start("sidecar", [*OUTRIGGER, *args], uid=1337)
    for process in scene.apps.values():
        process.wait_for(lambda lines: any("listening" in line for line in lines), "listened")
    for pod in (server, client):  # the plain-container postStart hook's command
        pod.run([*OUTRIGGER, "wait", "--timeout", "20s", "--url", READY])
    return scene


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    with scene(tmp_path_factory.mktemp("interception")) as ready:
        yield ready


def app_requests(scene: Scene, host: str) -> list[dict[str, Any]]:
    lines = scene.apps[WEB].json_lines()
    return [line for line in lines if "request" in line and line["host"] == host]


def test_the_client_calls_a_service_address_and_both_sidecars_handle_it_with_a_retry(
    mesh: Scene,
) -> None:
    client_before, server_before = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    answer = mesh.get("10.96.0.10", 80)
    assert answer["status"] == 200, answer
    # the server app failed the first try (503); the client's sidecar retried it
    seen = app_requests(mesh, "10.96.0.10")
    assert [line["status"] for line in seen] == [503, 200]
    assert json.loads(answer["body"])["host"] == "10.96.0.10"  # the original Host, untouched
    client, server = mesh.metrics(mesh.client), mesh.metrics(mesh.server)

    def delta(after: Metrics, before: Metrics, name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    requests = "outrigger_requests_total"
    outbound = {"direction": "outbound", "destination": "web"}
    assert delta(client, client_before, requests, **outbound, code="200") == 1
    assert delta(client, client_before, "outrigger_retries_total", destination="web") == 1
    inbound = {"direction": "inbound", "destination": "inbound"}
    assert delta(server, server_before, requests, **inbound, code="503") == 1
    assert delta(server, server_before, requests, **inbound, code="200") == 1


def test_a_host_no_service_claims_is_routed_by_the_address_it_was_sent_to(mesh: Scene) -> None:
    answer = mesh.get("10.96.0.10", 80, "--host-header", "web.example.test")
    assert answer["status"] == 200, answer
    assert json.loads(answer["body"])["host"] == "web.example.test"
    assert [line["status"] for line in app_requests(mesh, "web.example.test")] == [503, 200]


def test_the_sidecars_own_connections_are_not_redirected_back_to_them(mesh: Scene) -> None:
    before = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    accepted = len([line for line in mesh.apps[WEB].json_lines() if "accepted" in line])
    assert mesh.get("10.96.0.10", 80, "--host-header", "once.example.test")["status"] == 200
    after = mesh.metrics(mesh.client), mesh.metrics(mesh.server)

    def delta(side: int, name: str, **labels: str) -> float:
        return after[side](name, **labels) - before[side](name, **labels)

    # One connection from the app entered the client's sidecar, one request: its upstream
    # connections (uid 1337) went out to the server pod, not back into it (that would be a
    # second connection and request, and again, and again).
    assert delta(0, "outrigger_connections_total", listener="outbound") == 1
    assert delta(0, "outrigger_requests_total", direction="outbound") == 1
    assert delta(0, "outrigger_tcp_connections_closed_total") == 0
    # The server's sidecar got the two tries, and its two connections to the app reached the
    # app (over lo) rather than its own inbound listener.
    assert delta(1, "outrigger_requests_total", direction="inbound") == 2
    now = len([line for line in mesh.apps[WEB].json_lines() if "accepted" in line])
    assert now - accepted == 2


def test_plain_tcp_passes_through_both_sidecars_untouched(mesh: Scene) -> None:
    before = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    sent = "plain bytes \x01\x7f and more"
    assert mesh.call("10.96.0.11", 7000, "--send", sent)["reply"] == sent + "<eof>"
    after = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    received = "outrigger_tcp_received_bytes_total"
    echo = {"direction": "outbound", "destination": "echo", "sni": "-"}
    assert after[0].tcp_closed(**echo) - before[0].tcp_closed(**echo) == 1
    assert after[0](received, **echo) - before[0](received, **echo) == len(sent.encode())
    inbound = {"direction": "inbound", "flags": "-"}
    assert after[1].tcp_closed(**inbound) - before[1].tcp_closed(**inbound) == 1


def test_tls_passes_through_end_to_end_with_its_server_name_in_the_metrics(mesh: Scene) -> None:
    before = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    answer = mesh.call("10.96.0.12", 443, "--send", "secret\n", "--tls-ca", str(mesh.ca),
                       "--sni", SECURE_NAME)  # fmt: skip
    assert answer.get("reply") == "tls:secret\n", answer  # the certificate verified: no MITM
    after = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    client_tls = {"direction": "outbound", "destination": "secure", "sni": SECURE_NAME}
    server_tls = {"direction": "inbound", "sni": SECURE_NAME}
    assert after[0].tcp_closed(**client_tls) - before[0].tcp_closed(**client_tls) == 1
    assert after[1].tcp_closed(**server_tls) - before[1].tcp_closed(**server_tls) == 1


def test_a_protocol_where_the_server_speaks_first_works(mesh: Scene) -> None:
    before = mesh.metrics(mesh.client)
    answer = mesh.call("10.96.0.13", 25, "--server-first", "--send", "EHLO client\r\n")
    assert answer["greeting"] == "220 banner.example ready\r\n", answer
    assert answer["reply"] == "250 EHLO client\r\n"
    mail = {"direction": "outbound", "destination": "mail"}
    assert mesh.metrics(mesh.client).tcp_closed(**mail) - before.tcp_closed(**mail) == 1


def test_an_excluded_port_bypasses_the_sidecar(mesh: Scene) -> None:
    before = mesh.metrics(mesh.client)
    assert mesh.call("10.0.0.2", EXCLUDED, "--send", "direct")["reply"] == "direct<eof>"
    after = mesh.metrics(mesh.client)
    assert after.tcp_closed() == before.tcp_closed()
    connections = "outrigger_connections_total"
    assert after(connections, listener="outbound") == before(connections, listener="outbound")
    # and a port that is not excluded does go through it
    assert mesh.call("10.0.0.2", UNKNOWN, "--send", "via")["reply"] == "via<eof>"
    passthrough = {"destination": "passthrough"}
    assert (
        mesh.metrics(mesh.client).tcp_closed(**passthrough) - before.tcp_closed(**passthrough) == 1
    )


def test_ipv6_connections_reach_the_sidecars_on_their_ipv6_listeners(mesh: Scene) -> None:
    # REDIRECT delivers IPv6 to ::1 (outbound) and to the pod's IPv6 address (inbound): the
    # sidecars listen there too, beside 127.0.0.1 and 0.0.0.0
    before = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    assert mesh.call("fd00::2", UNKNOWN, "--send", "over ipv6")["reply"] == "over ipv6<eof>"
    after = mesh.metrics(mesh.client), mesh.metrics(mesh.server)
    passthrough = {"direction": "outbound", "destination": "passthrough"}
    assert after[0].tcp_closed(**passthrough) - before[0].tcp_closed(**passthrough) == 1
    inbound = {"direction": "inbound"}
    assert after[1].tcp_closed(**inbound) - before[1].tcp_closed(**inbound) == 1


def test_registry_only_closes_an_unknown_destination_and_cleanup_restores_direct_traffic(
    tmp_path: Path,
) -> None:
    with scene(tmp_path, "registry_only") as locked:
        before = locked.metrics(locked.client)
        refused = locked.call("10.0.0.2", UNKNOWN, "--send", "let me out")
        assert refused.get("reply", "") == "", refused  # closed: nothing came back
        assert locked.get("10.0.0.2", UNKNOWN)["flags"] == "NR"  # HTTP: 502 NR, as before
        after = locked.metrics(locked.client)
        blocked = {"direction": "outbound", "flags": "NR"}
        assert after.tcp_closed(**blocked) - before.tcp_closed(**blocked) == 1
        # the mesh's own services still work under the lock
        assert locked.call("10.96.0.11", 7000, "--send", "known")["reply"] == "known<eof>"

        locked.client.run([*OUTRIGGER, "iptables", "--cleanup"])
        still = locked.metrics(locked.client)
        direct = locked.call("10.0.0.2", UNKNOWN, "--send", "free again")
        assert direct["reply"] == "free again<eof>"
        # straight to the server: the client's sidecar saw none of it
        assert locked.metrics(locked.client).tcp_closed() == still.tcp_closed()
