"""The webhook configurations reach the control plane where it serves them (Service, port 443
-> container 15017, paths /inject and /validate), select what the architecture says, trust the
certificate the control plane is given, and the RBAC grants exactly what each mode needs."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from tests.helm.chart import CA_BUNDLE, NAMESPACE, SCENARIOS, find, objects

HOST = f"outrigger.{NAMESPACE}.svc"


def webhooks(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every webhook entry of the render's (zero, one or two) webhook configurations, by name."""
    configs = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
    return {h["name"]: h for o in objs if o["kind"] in configs for h in o["webhooks"]}


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return value


@pytest.mark.parametrize("scenario", ["default", "self", "cert-manager", "existing-secret"])
def test_every_webhook_points_at_the_port_and_path_the_control_plane_serves(scenario: str) -> None:
    objs = objects(SCENARIOS[scenario])
    service = find(objs, "Service", "outrigger")
    container = find(objs, "Deployment", "outrigger")["spec"]["template"]["spec"]["containers"][0]
    listen_port = int(flag(container["args"], "--webhook").rsplit(":", 1)[1])
    hooks = webhooks(objs)
    assert set(hooks) == {
        "namespace.inject.outrigger.dev",
        "object.inject.outrigger.dev",
        "validate.outrigger.dev",
    }
    for name, hook in hooks.items():
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"]) == (service["metadata"]["name"], NAMESPACE)
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
        (target,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        assert target["containerPort"] == listen_port == 15017, name
        assert ref["path"] == ("/validate" if name.startswith("validate") else "/inject")
        assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
        assert 1 <= hook["timeoutSeconds"] <= 30


def test_injection_has_two_entries_the_pod_label_disabled_wins_and_system_namespaces_never() -> (
    None
):
    hooks = webhooks(objects())
    by_ns, by_pod = hooks["namespace.inject.outrigger.dev"], hooks["object.inject.outrigger.dev"]
    excluded = {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["kube-system", "kube-public", NAMESPACE],
    }
    label = "outrigger.dev/inject"
    assert by_ns["namespaceSelector"]["matchExpressions"] == [
        excluded,
        {"key": label, "operator": "In", "values": ["enabled"]},
    ]
    assert by_ns["objectSelector"]["matchExpressions"] == [
        {"key": label, "operator": "NotIn", "values": ["disabled"]}
    ]
    # The second entry: pods labelled enabled where the namespace is not (no double call).
    assert by_pod["namespaceSelector"]["matchExpressions"] == [
        excluded,
        {"key": label, "operator": "NotIn", "values": ["enabled"]},
    ]
    assert by_pod["objectSelector"]["matchExpressions"] == [
        {"key": label, "operator": "In", "values": ["enabled"]}
    ]
    for hook in (by_ns, by_pod):
        assert hook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert hook["failurePolicy"] == "Fail"  # the default: never run a pod unmeshed silently
    custom = webhooks(objects(SCENARIOS["custom"]))
    assert custom["object.inject.outrigger.dev"]["failurePolicy"] == "Ignore"


def test_validation_covers_services_and_namespaces_ignores_failures_and_skips_system() -> None:
    hook = webhooks(objects())["validate.outrigger.dev"]
    assert hook["failurePolicy"] == "Ignore"
    (rule,) = hook["rules"]
    assert sorted(rule["resources"]) == ["namespaces", "services"]
    assert sorted(rule["operations"]) == ["CREATE", "UPDATE"]
    assert hook["namespaceSelector"]["matchExpressions"] == [
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", NAMESPACE],
        }
    ]


def cel(expression: str, obj: dict[str, Any]) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(expression))
    return bool(program.evaluate({"object": celpy.json_to_cel(obj)}))


def test_only_objects_with_an_outrigger_annotation_reach_the_validating_webhook() -> None:
    (condition,) = webhooks(objects())["validate.outrigger.dev"]["matchConditions"]
    expression = condition["expression"]
    plain = {"metadata": {"name": "web", "labels": {"app": "web"}}}
    other = {"metadata": {"name": "web", "annotations": {"example.com/owner": "me"}}}
    ours = {"metadata": {"name": "web", "annotations": {"outrigger.dev/timeout": "2s"}}}
    lookalike = {"metadata": {"name": "web", "annotations": {"x.outrigger.dev/timeout": "2s"}}}
    assert not cel(expression, plain)
    assert not cel(expression, other)
    assert cel(expression, ours)
    assert not cel(expression, lookalike)


def test_host_network_pods_never_reach_the_injector() -> None:
    hook = webhooks(objects())["namespace.inject.outrigger.dev"]
    (condition,) = hook["matchConditions"]
    pod: dict[str, Any] = {"metadata": {"name": "p"}, "spec": {"containers": []}}
    assert cel(condition["expression"], pod)
    assert cel(condition["expression"], {**pod, "spec": {"hostNetwork": False}})
    assert not cel(condition["expression"], {**pod, "spec": {"hostNetwork": True}})


def handshake(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, server_name: str, tmp: Path) -> None:
    """A real TLS handshake: a server with the certificate, a client trusting only the CA and
    checking the name as the API server does (subjectAltName only, never the common name)."""
    (tmp / "tls.crt").write_bytes(cert_pem)
    (tmp / "tls.key").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca_pem.decode())
    client_ctx.hostname_checks_common_name = False
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(5)


def test_chart_certificates_are_one_ca_that_the_api_server_accepts_for_the_service(
    tmp_path: Path,
) -> None:
    objs = objects()
    secret = find(objs, "Secret", "outrigger-webhook-tls")
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    bundles = {hook["clientConfig"]["caBundle"] for hook in webhooks(objs).values()}
    assert bundles == {secret["data"]["ca.crt"]}  # one CA, generated once per render
    handshake(data["ca.crt"], data["tls.crt"], data["tls.key"], HOST, tmp_path)
    handshake(data["ca.crt"], data["tls.crt"], data["tls.key"], HOST + ".cluster.local", tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(
            data["ca.crt"], data["tls.crt"], data["tls.key"], "outrigger.default.svc", tmp_path
        )
    container = find(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert flag(container["args"], "--webhook-cert").endswith("/tls.crt")
    assert flag(container["args"], "--webhook-key").endswith("/tls.key")


def test_other_certificate_modes_leave_the_bundle_to_whoever_makes_the_certificate() -> None:
    cm = objects(SCENARIOS["cert-manager"])
    certificate = find(cm, "Certificate", "outrigger-webhook")
    assert certificate["spec"]["dnsNames"][0] == HOST
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        config = find(cm, kind)
        injected = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert injected == f"{NAMESPACE}/outrigger-webhook"
        assert all("caBundle" not in h["clientConfig"] for h in config["webhooks"])
    mounted = find(cm, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": certificate["spec"]["secretName"]}} in (
        mounted
    )
    existing = objects(SCENARIOS["existing-secret"])
    assert {h["clientConfig"]["caBundle"] for h in webhooks(existing).values()} == {CA_BUNDLE}
    volumes = find(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": "outrigger-webhook-certs"}} in volumes
    own = objects(SCENARIOS["self"])
    assert all("caBundle" not in h["clientConfig"] for h in webhooks(own).values())
    secret = find(own, "Secret", "outrigger-webhook-tls")
    assert "data" not in secret and "stringData" not in secret  # the control plane fills it


def rules(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for o in objs if o["kind"] == kind for r in o["rules"]]


def test_rbac_is_least_privilege_and_secrets_only_in_self_mode_by_name() -> None:
    reads = {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["list", "watch"]}
    slices = {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["list", "watch"],
    }
    events = {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}
    default = objects()
    assert rules(default, "ClusterRole") == [reads, slices, events]
    assert rules(default, "Role") == []
    own = objects(SCENARIOS["self"])
    assert rules(own, "ClusterRole") == [
        reads,
        slices,
        events,
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["outrigger-inject"],
            "verbs": ["get", "patch"],
        },
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["validatingwebhookconfigurations"],
            "resourceNames": ["outrigger-validate"],
            "verbs": ["get", "patch"],
        },
    ]
    assert rules(own, "Role") == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["outrigger-webhook-tls"],
            "verbs": ["get", "update"],
        }
    ]
    for scenario, values in SCENARIOS.items():
        for rule in rules(objects(values), "ClusterRole"):
            assert "secrets" not in rule["resources"] and "*" not in rule["verbs"], scenario
            assert "*" not in rule["resources"] and "*" not in rule["apiGroups"], scenario
    role = find(own, "Role")
    binding = find(own, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "outrigger", "namespace": NAMESPACE}
    ]


def test_self_mode_tells_the_control_plane_which_secret_and_webhooks_are_its_own() -> None:
    objs = objects(SCENARIOS["self"])
    container = find(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert flag(args, "--webhook-secret") == "outrigger-webhook-tls"
    assert flag(args, "--webhook-dns-name") == HOST
    assert (
        flag(args, "--mutating-webhook-configuration")
        == find(objs, "MutatingWebhookConfiguration")["metadata"]["name"]
    )
    assert (
        flag(args, "--validating-webhook-configuration")
        == find(objs, "ValidatingWebhookConfiguration")["metadata"]["name"]
    )
    assert not any(a.startswith(("--webhook-cert", "--webhook-key")) for a in args)
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # A configuration the chart does not render is neither named nor granted.
    alone = objects({"webhook": {"certificates": "self", "validate": {"enabled": False}}})
    args = find(alone, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--validating-webhook-configuration") for a in args)
    assert flag(args, "--mutating-webhook-configuration") == "outrigger-inject"
    kinds = {r for rule in rules(alone, "ClusterRole") for r in rule["resources"]}
    assert "validatingwebhookconfigurations" not in kinds
    assert "mutatingwebhookconfigurations" in kinds


def test_the_helm_test_pod_checks_readiness_and_both_webhooks_with_the_webhook_ca() -> None:
    objs = objects()
    pod = find(objs, "Pod", "outrigger-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["READY_URL"] == f"http://{HOST}:15014/ready"
    assert env["WEBHOOK_URL"] == f"https://{HOST}:443"
    assert env["VALIDATE"] == env["INJECT"] == "true"
    (volume,) = pod["spec"]["volumes"]
    assert volume["secret"]["secretName"] == "outrigger-webhook-tls"
    script = container["args"][0]
    compile(script, "helm-test", "exec")  # the script the pod runs is valid Python
    for needle in ('"/validate"', '"/inject"', 'answer["uid"] == uid', 'not bad["allowed"]'):
        assert needle in script
    existing = find(objects(SCENARIOS["existing-secret"]), "Pod", "outrigger-test")
    assert {"name": "CA_BUNDLE", "value": CA_BUNDLE} in existing["spec"]["containers"][0]["env"]


def test_the_mesh_files_injection_section_carries_image_address_ports_and_interception() -> None:
    objs = objects(SCENARIOS["custom"])
    mesh = yaml.safe_load(find(objs, "ConfigMap", "mesh-mesh")["data"]["mesh.yaml"])
    assert mesh["outbound_policy"] == "registry_only"
    assert mesh["defaults"] == {"timeout": "10s", "retries": {"attempts": 1}}
    injection = mesh["injection"]
    assert injection["image"] == "registry.example/outrigger@sha256:" + "ab" * 32
    assert injection["control_plane"] == f"mesh.{NAMESPACE}.svc:15010"
    assert injection["native_sidecar"] is False
    assert injection["proxy_log_level"] == "debug"
    assert injection["ports"] == {
        "admin": 15000,
        "outbound": 15001,
        "inbound": 15006,
        "health": 15021,
        "metrics": 15090,
    }
    assert injection["interception"]["exclude_outbound_ports"] == [5432]
    assert injection["interception"]["exclude_outbound_cidrs"] == ["10.0.0.0/8"]
    assert injection["interception"]["include_outbound_cidrs"] == ["*"]
    assert (injection["proxy_cpu"], injection["proxy_memory"], injection["proxy_memory_limit"]) == (
        "50m",
        "64Mi",
        "256Mi",
    )
    assert "proxy_cpu_limit" not in injection  # an empty value is left out, not written as ""
