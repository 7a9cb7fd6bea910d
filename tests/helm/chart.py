"""The chart, rendered by the real Helm engine (helm-python-sdk binds Helm's Go SDK; no helm
binary), and the value sets the tests render it with."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm/outrigger"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RELEASE = "outrigger"
NAMESPACE = "outrigger-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas known.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

# A base64 PEM the size of a real CA, for certificates=secret (the chart never decodes it).
CA_BUNDLE = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "ha": {
        "controlPlane": {
            "replicas": 3,
            "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
            "topologySpread": [
                {
                    "topologyKey": "topology.kubernetes.io/zone",
                    "maxSkew": 1,
                    "whenUnsatisfiable": "DoNotSchedule",
                },
                {
                    "topologyKey": "kubernetes.io/hostname",
                    "maxSkew": 1,
                    "whenUnsatisfiable": "ScheduleAnyway",
                },
            ],
            "priorityClassName": "system-cluster-critical",
            "resources": {
                "requests": {"cpu": "500m", "memory": "1Gi"},
                "limits": {"memory": "2Gi"},
            },
        },
        "webhook": {"inject": {"failurePolicy": "Fail", "timeoutSeconds": 5}},
    },
    "cert-manager": {"webhook": {"certificates": "certManager"}},
    "cert-manager-cluster-issuer": {
        "webhook": {
            "certificates": "certManager",
            "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}},
        }
    },
    "existing-secret": {
        "webhook": {
            "certificates": "secret",
            "secret": {"name": "outrigger-webhook-certs", "caBundle": CA_BUNDLE},
        }
    },
    "self": {"webhook": {"certificates": "self"}},
    "jaeger": {"tracing": {"jaeger": {"enabled": True}, "sampling": 1.0}},
    "custom": {
        "fullnameOverride": "mesh",
        "commonLabels": {"team": "platform"},
        "image": {"repository": "registry.example/outrigger", "digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": ["regcred"],
        "controlPlane": {
            "replicas": 1,
            "watchNamespaces": ["shop", "payments"],
            "debounce": "250ms",
            "podDisruptionBudget": {"enabled": False, "maxUnavailable": 1},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "mesh", "operator": "Exists", "effect": "NoSchedule"}],
            "podAnnotations": {"example.com/owner": "platform"},
            "serviceAccount": {"annotations": {"iam.example/role": "outrigger"}},
        },
        "webhook": {
            "inject": {"failurePolicy": "Ignore"},
            "validate": {"enabled": False},
        },
        "mesh": {
            "outboundPolicy": "registry_only",
            "defaults": {"timeout": "10s", "retries": {"attempts": 1}},
        },
        "injection": {
            "nativeSidecar": False,
            "logLevel": "debug",
            "interception": {
                "excludeOutboundPorts": [5432],
                "excludeOutboundCIDRs": ["10.0.0.0/8"],
            },
        },
        "tracing": {"otlpEndpoint": "http://otel-collector.observability:4317", "sampling": 0.1},
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "podMonitor": {"enabled": True, "interval": "15s"},
            "grafanaDashboard": {"folder": "Mesh", "namespace": "monitoring"},
        },
    },
}


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(
    values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE, name: str = RELEASE
) -> dict[str, str]:
    """Template path -> rendered text (as `helm template`; `lookup` finds nothing)."""
    return chart().render(values or {}, name=name, namespace=namespace)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of a render, NOTES.txt left out, in template order."""
    found: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        found.extend(doc for doc in yaml.safe_load_all(rendered[path]) if doc)
    return found


def objects(values: dict[str, Any] | None = None, **kwargs: str) -> list[dict[str, Any]]:
    return documents(render(values, **kwargs))


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return [o["kind"] for o in objs]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Pod and every workload's pod template."""
    specs = []
    for o in objs:
        if o["kind"] == "Pod":
            specs.append((o["metadata"]["name"], o["spec"]))
        elif o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
    return specs


@functools.cache
def _crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    group = api_version.split("/", 1)[0].split(".", 1)[0]
    path = SCHEMAS / f"{kind.lower()}-{group}-{api_version.rsplit('/', 1)[1]}.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


CRD_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")


def validate(obj: dict[str, Any], kube_version: str) -> None:
    """Kubernetes' own schema (strict: unknown fields fail) for built-in kinds; the checked-in
    schema of the fields we use for cert-manager and Prometheus-operator objects."""
    if obj["apiVersion"].startswith(CRD_GROUPS):
        jsonschema.Draft7Validator(_crd_schema(obj["apiVersion"], obj["kind"])).validate(obj)
    else:
        kubernetes_validate.validate(obj, kube_version, strict=True)
