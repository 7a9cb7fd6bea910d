"""k8s/examples: the demo's shop for a real cluster. Valid Kubernetes objects (kubernetes-validate,
strict, the oldest and newest Kubernetes the chart supports) with valid annotations, wired as the
demo is (frontend -> orders -> payments, one payments replica failing), runnable by the image the
README's `helm install` injects, and still valid once injected with that install's settings.

What no test here can show (no cluster): that the pods start and the kubelet, DNS and kube-proxy
do their part. tests/e2e/test_shop_example.py runs the shop's own apps and annotations through a
real control plane and sidecar on one machine."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control_plane.webhooks.inject import PROXY_UID
from mesh.annotations import CALLS, check, parse_calls
from mesh.injection import POD_TEMPLATES, VERSION
from sidecar.settings import DEFAULTS as SIDECAR_DEFAULTS
from tests.control_plane.webhooks.pods import template_of
from tests.helm.chart import KUBE_VERSIONS, find, objects

Json = dict[str, Any]
OUTRIGGER = Path(sys.executable).with_name("outrigger")
EXAMPLES = Path(__file__).resolve().parents[2] / "k8s" / "examples"
SHOP = EXAMPLES / "shop.yaml"
IMAGE = f"registry.example/outrigger:{VERSION}"  # the README's `sed` replaces registry.example
# The README's install: `helm install ... --set image.repository=registry.example/outrigger`
# with tracing.jaeger.enabled=true.
INSTALL = {
    "image": {"repository": "registry.example/outrigger"},
    "tracing": {"jaeger": {"enabled": True}},
}


def documents() -> list[tuple[str, Json]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((f"{path.name}: {doc['kind']} {doc['metadata']['name']}", doc))
    return found


def shop() -> dict[str, Json]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(SHOP.read_text())}


def workloads(docs: dict[str, Json]) -> dict[str, Json]:
    return {name: d for name, d in docs.items() if d["kind"] in POD_TEMPLATES}


def app_container(doc: Json) -> Json:
    (container,) = template_of(doc)["spec"]["containers"]
    assert isinstance(container, dict)
    return container


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_each_object_is_valid_for_kubernetes(name: str, doc: Json, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_each_objects_outrigger_annotations_are_valid(name: str, doc: Json) -> None:
    assert check(doc["metadata"].get("annotations") or {}) == []


def test_the_shop_calls_frontend_orders_payments_and_the_load_calls_frontend() -> None:
    docs = shop()
    services = {d["metadata"]["name"]: d for d in docs.values() if d["kind"] == "Service"}
    assert set(services) == {"frontend", "orders", "payments"}
    calls = {
        name: parse_calls(doc["metadata"]["annotations"][CALLS])[0]
        for name, doc in {**services, "loadgen": docs["Job/loadgen"]}.items()
        if CALLS in doc["metadata"].get("annotations", {})
    }
    assert calls == {"loadgen": ("frontend",), "frontend": ("orders",), "orders": ("payments",)}
    downstream = {name: shlex.join(app_container(d)["args"]) for name, d in workloads(docs).items()}
    assert "--downstream http://orders/" in downstream["Deployment/frontend"]
    assert "--downstream http://payments/" in downstream["Deployment/orders"]
    assert downstream["Job/loadgen"].startswith("http://frontend/ ")


def test_the_payments_service_selects_a_healthy_deployment_and_a_failing_one() -> None:
    docs = shop()
    selector = docs["Service/payments"]["spec"]["selector"]
    selected = {
        name: app_container(d)["args"]
        for name, d in workloads(docs).items()
        if selector.items() <= template_of(d)["metadata"]["labels"].items()
    }
    assert set(selected) == {"Deployment/payments", "Deployment/payments-flaky"}
    assert "--failure-rate" not in selected["Deployment/payments"]
    flaky = selected["Deployment/payments-flaky"]
    assert flaky[flaky.index("--failure-rate") + 1] == "1"
    # Two Deployments must not select each other's pods (they would fight over them).
    deployments = [d for d in docs.values() if d["kind"] == "Deployment"]
    for d in deployments:
        mine = d["spec"]["selector"]["matchLabels"].items()
        owners = [o for o in deployments if mine <= template_of(o)["metadata"]["labels"].items()]
        assert owners == [d], d["metadata"]["name"]


def test_every_container_runs_the_image_as_a_user_its_sidecar_intercepts() -> None:
    for name, doc in workloads(shop()).items():
        container, pod = app_container(doc), template_of(doc)["spec"]
        assert container["image"] == IMAGE, name  # one sed replaces the registry everywhere
        assert container["command"][:2] == ["python", "-m"], name
        # The image's default user is the sidecar's, whose traffic the rules never redirect.
        user = container.get("securityContext", {}).get("runAsUser")
        user = pod.get("securityContext", {}).get("runAsUser") if user is None else user
        assert user is not None and user != PROXY_UID, name


def test_every_app_listens_on_the_port_its_sidecar_forwards_to() -> None:
    app_port = int(SIDECAR_DEFAULTS["app"].rsplit(":", 1)[1])
    for name, doc in workloads(shop()).items():
        container = app_container(doc)
        if container["command"][2] != "outrigger.demo.service":
            continue
        args = container["args"]
        assert args[args.index("--listen") + 1] == f"0.0.0.0:{app_port}", name
        assert container["ports"] == [{"name": "http", "containerPort": app_port}], name
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def injected_shop(tmp_path: Path) -> tuple[dict[str, Json], str | None]:
    """`outrigger inject -f k8s/examples/shop.yaml --mesh FILE` (the webhook's code, offline)
    with the mesh file of the README's install; and that install's OTLP endpoint."""
    text = find(objects(INSTALL), "ConfigMap", "outrigger-mesh")["data"]["mesh.yaml"]
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(text)
    done = subprocess.run(
        [str(OUTRIGGER), "inject", "-f", str(SHOP), "--mesh", str(mesh)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    docs = [d for d in yaml.safe_load_all(done.stdout) if d is not None]
    endpoint = yaml.safe_load(text)["tracing"]["otlp_endpoint"]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}, endpoint


def test_the_injected_shop_is_valid_and_every_pod_gets_the_sidecar_of_the_same_image(
    tmp_path: Path,
) -> None:
    injected, endpoint = injected_shop(tmp_path)
    assert injected.keys() == shop().keys()
    for name, doc in injected.items():
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] not in POD_TEMPLATES:
            continue
        spec = template_of(doc)["spec"]
        added = {c["name"]: c for c in spec["initContainers"]}
        assert list(added) == ["outrigger-init", "outrigger-proxy"], name  # native sidecar
        assert {c["image"] for c in added.values()} == {IMAGE}, name
        args = added["outrigger-proxy"]["args"]
        assert args[args.index("--otlp-endpoint") + 1] == endpoint, name
    assert endpoint is not None and "jaeger" in endpoint
    proxy = {
        name: template_of(d)["spec"]["initContainers"][1]["args"]
        for name, d in workloads(injected).items()
    }
    # The failing replica's sidecar is a payments sidecar: the Service is what callers see.
    flaky = proxy["Deployment/payments-flaky"]
    assert flaky[flaky.index("--service") + 1] == "payments"
    # The load's sidecar starts every trace and samples all of them.
    loadgen = proxy["Job/loadgen"]
    assert loadgen[loadgen.index("--trace-sampling") + 1] == "1"
    assert "--trace-sampling" not in proxy["Deployment/frontend"]
