"""The chart renders for every supported set of values, each object is valid for Kubernetes 1.29
and the newest schemas, bad values are refused by the schema with the key named, `helm lint` is
clean, and every pod meets the "restricted" Pod Security Standard."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest
import yaml

from tests.helm.chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    SCENARIOS,
    chart,
    find,
    kinds,
    objects,
    pod_specs,
    render,
    validate,
)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_validates_against_kubernetes_1_29_and_the_newest_schemas(
    scenario: str,
) -> None:
    objs = objects(SCENARIOS[scenario])
    assert "Deployment" in kinds(objs)
    for obj in objs:
        for version in KUBE_VERSIONS:
            validate(obj, version)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "two objects with the same kind, namespace and name"


def test_a_typo_in_a_cert_manager_object_is_caught_by_the_checked_in_schema() -> None:
    certificate = find(objects(SCENARIOS["cert-manager"]), "Certificate", "outrigger-webhook")
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    with pytest.raises(Exception, match="dnsName"):
        validate(certificate, KUBE_VERSIONS[0])


def test_each_scenario_makes_the_objects_it_promises() -> None:
    default = kinds(objects())
    for kind in (
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "Pod",
    ):
        assert kind in default, kind
    assert "Certificate" not in default and "ServiceMonitor" not in default
    assert find(objects(SCENARIOS["ha"]), "Deployment")["spec"]["replicas"] == 3
    certmanager = objects(SCENARIOS["cert-manager"])
    assert kinds(certmanager).count("Certificate") == 2  # the CA and the serving certificate
    assert kinds(certmanager).count("Issuer") == 2  # self-signed (for the CA) and the CA issuer
    assert "Secret" not in kinds(certmanager)  # cert-manager writes it
    with_issuer = objects(SCENARIOS["cert-manager-cluster-issuer"])
    assert kinds(with_issuer).count("Certificate") == 1 and "Issuer" not in kinds(with_issuer)
    assert find(with_issuer, "Certificate")["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert "Secret" not in kinds(objects(SCENARIOS["existing-secret"]))
    jaeger = objects(SCENARIOS["jaeger"])
    assert find(jaeger, "Deployment", "jaeger") and find(jaeger, "Service", "jaeger")
    custom = objects(SCENARIOS["custom"])
    assert "PodDisruptionBudget" not in kinds(custom)
    assert "ValidatingWebhookConfiguration" not in kinds(custom)
    assert find(custom, "ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"
    assert find(custom, "PodMonitor")
    assert find(custom, "ConfigMap", "mesh-dashboard")["metadata"]["namespace"] == "monitoring"
    assert all(o["metadata"]["labels"]["team"] == "platform" for o in custom)


def test_the_jaeger_service_has_otlp_grpc_and_the_ui_and_sidecars_are_pointed_at_it() -> None:
    objs = objects(SCENARIOS["jaeger"])
    ports = {p["name"]: p["port"] for p in find(objs, "Service", "jaeger")["spec"]["ports"]}
    assert ports["grpc-otlp"] == 4317 and ports["http-ui"] == 16686
    mesh = yaml.safe_load(find(objs, "ConfigMap", "outrigger-mesh")["data"]["mesh.yaml"])
    assert mesh["tracing"] == {
        "sampling": 1.0,
        "otlp_endpoint": f"http://jaeger.{NAMESPACE}.svc:4317",
    }


def test_an_existing_collector_is_used_instead_and_both_at_once_is_refused() -> None:
    objs = objects(SCENARIOS["custom"])
    mesh = yaml.safe_load(find(objs, "ConfigMap", "mesh-mesh")["data"]["mesh.yaml"])
    assert mesh["tracing"]["otlp_endpoint"] == "http://otel-collector.observability:4317"
    both = {"tracing": {"otlpEndpoint": "http://collector:4317", "jaeger": {"enabled": True}}}
    with pytest.raises(helm_python.HelmRenderError, match=r"tracing.otlpEndpoint.*jaeger.enabled"):
        render(both)


def test_the_grafana_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar() -> None:
    cm = find(objects(), "ConfigMap", "outrigger-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["outrigger.json"] == (CHART / "dashboards/outrigger.json").read_text().strip()


@pytest.mark.parametrize(
    ("setting", "key", "complaint"),
    [
        ({"controlPlane": {"replicas": "two"}}, "/controlPlane/replicas", "want integer"),
        ({"controlPlane": {"replicas": 0}}, "/controlPlane/replicas", "minimum"),
        ({"controlPlane": {"replica": 2}}, "/controlPlane", "'replica' not allowed"),
        ({"webhook": {"certificates": "vault"}}, "/webhook/certificates", "must be one of"),
        ({"webhook": {"inject": {"failurePolicy": "Retry"}}}, "failurePolicy", "must be one of"),
        ({"webhook": {"validate": {"timeoutSeconds": 60}}}, "timeoutSeconds", "maximum"),
        ({"webhook": {"certificates": "secret"}}, "/webhook/secret/name", "minLength"),
        ({"tracing": {"sampling": 1.5}}, "/tracing/sampling", "maximum"),
        ({"tracing": {"otlpEndpoint": "jaeger:4317"}}, "/tracing/otlpEndpoint", "does not match"),
        ({"mesh": {"outboundPolicy": "deny"}}, "/mesh/outboundPolicy", "must be one of"),
        ({"injection": {"ports": {"inbound": 70000}}}, "/injection/ports/inbound", "maximum"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "must be one of"),
        ({"jaeger": {"enabled": True}}, "(root)|jaeger", "not allowed"),
    ],
)
def test_invalid_values_are_refused_by_the_schema_naming_the_key(
    setting: dict[str, Any], key: str, complaint: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as refused:
        chart().validate_schema(setting)
    message = str(refused.value)
    assert any(k in message for k in key.split("|")), message
    assert complaint in message, message
    with pytest.raises(helm_python.HelmValuesError):  # and `helm install` would stop there
        render(setting)


def test_set_replicas_two_on_the_command_line_is_refused_naming_the_key() -> None:
    values = helm_python.parse_set_string("controlPlane.replicas=two")
    with pytest.raises(helm_python.HelmValuesError, match=r"/controlPlane/replicas.*integer"):
        render(values)


def test_helm_lint_is_clean_for_every_scenario() -> None:
    for scenario, values in SCENARIOS.items():
        for version in KUBE_VERSIONS:
            report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{version}")
            problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
            assert not problems, (scenario, version, problems)


def test_chart_metadata_requires_kubernetes_1_29_and_admits_managed_cluster_versions() -> None:
    meta = chart().metadata
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.29.0-0"


RESTRICTED_CAPS = {"NET_BIND_SERVICE"}


def assert_restricted(name: str, spec: dict[str, Any]) -> None:
    """The "restricted" Pod Security Standard (and a read-only root filesystem) for every
    container; the pod-level settings count where the container leaves them out."""
    pod = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), (name, key)
    for volume in spec.get("volumes", []):
        assert set(volume) & {"configMap", "secret", "emptyDir", "projected"}, (name, volume)
    for container in spec.get("initContainers", []) + spec["containers"]:
        ctx = container.get("securityContext", {})
        where = (name, container["name"])
        assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod.get("runAsUser", 1)) != 0, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert not ctx.get("privileged"), where
        assert ctx["capabilities"]["drop"] == ["ALL"], where
        assert set(ctx["capabilities"].get("add", [])) <= RESTRICTED_CAPS, where
        seccomp = ctx.get("seccompProfile", pod.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert not container.get("ports") or all("hostPort" not in p for p in container["ports"])
        assert "limits" in container.get("resources", {}), where


@pytest.mark.parametrize("scenario", ["default", "jaeger", "self", "custom"])
def test_every_pod_meets_the_restricted_pod_security_standard(scenario: str) -> None:
    specs = pod_specs(objects(SCENARIOS[scenario]))
    assert specs
    for name, spec in specs:
        assert_restricted(name, spec)


def test_the_control_plane_runs_as_uid_1337_and_stops_gracefully() -> None:
    deployment = find(objects(), "Deployment", "outrigger")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 1337
    assert spec["terminationGracePeriodSeconds"] == 30
    container = spec["containers"][0]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert {p["port"] for p in probes.values()} == {"http-monitoring"}
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/live"


def test_replicas_spread_over_nodes_and_a_disruption_budget_keeps_one() -> None:
    objs = objects()
    spec = find(objs, "Deployment")["spec"]
    assert spec["replicas"] == 2
    (constraint,) = spec["template"]["spec"]["topologySpreadConstraints"]
    assert constraint["topologyKey"] == "kubernetes.io/hostname"
    assert constraint["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = find(objs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"] == spec["selector"]
    ha = find(objects(SCENARIOS["ha"]), "Deployment")["spec"]["template"]["spec"]
    keys = [c["topologyKey"] for c in ha["topologySpreadConstraints"]]
    assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]


def test_the_service_exposes_the_named_ports_on_the_control_plane_container() -> None:
    objs = objects()
    service = find(objs, "Service", "outrigger")["spec"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]}
    assert ports == {
        "grpc-xds": (15010, "grpc-xds"),
        "http-monitoring": (15014, "http-monitoring"),
        "https-webhook": (443, "https-webhook"),
    }
    deployment = find(objs, "Deployment", "outrigger")["spec"]
    container = deployment["template"]["spec"]["containers"][0]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared == {"grpc-xds": 15010, "http-monitoring": 15014, "https-webhook": 15017}
    assert service["selector"] == deployment["selector"]["matchLabels"]


def test_the_mesh_file_is_mounted_and_passed_with_mesh_beside_kubernetes() -> None:
    objs = objects()
    spec = find(objs, "Deployment", "outrigger")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["args"][:3] == [
        "control-plane",
        "--kubernetes",
        "--mesh=/etc/outrigger/mesh.yaml",
    ]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "mesh"]
    assert mount["mountPath"] == "/etc/outrigger" and "subPath" not in mount  # updates reach it
    (volume,) = [v for v in spec["volumes"] if v["name"] == "mesh"]
    assert "mesh.yaml" in find(objs, "ConfigMap", volume["configMap"]["name"])["data"]
