from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from control_plane.webhooks.inject import (
    IPTABLES_FLAGS,
    SIDECAR_FLAGS,
    inject_pod,
)
from mesh.injection import Injection, InjectionError, Interception, Ports, Resources
from tests.control_plane.webhooks.pods import (
    apply,
    assert_valid,
    containers_by_name,
    large_pod,
    pod,
)

Json = dict[str, Any]
DEFAULTS = Injection(
    image="registry.example/outrigger:0.1.0",
    resources=Resources(cpu="100m", memory="128Mi", cpu_limit="2", memory_limit="1Gi"),
)


def injected(
    document: Json,
    namespace: str | None = "shop",
    otlp_endpoint: str | None = None,
    **settings: Any,
) -> Json:
    """The injected pod, checked three ways: the patch gives the same pod, the Kubernetes
    schemas accept it, and the input was not touched."""
    before = copy.deepcopy(document)
    mesh = dataclasses.replace(DEFAULTS, **settings)
    result = inject_pod(document, namespace=namespace, injection=mesh, otlp_endpoint=otlp_endpoint)
    assert document == before
    assert result.skipped is None
    assert apply(document, result.patch) == result.pod
    assert_valid(result.pod)
    return result.pod


def proxy_of(document: Json) -> Json:
    spec = document["spec"]
    found = [
        c
        for c in spec.get("initContainers", []) + spec["containers"]
        if c["name"] == "outrigger-proxy"
    ]
    assert len(found) == 1
    return found[0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_native_sidecar_order_is_init_then_proxy_then_the_apps_own() -> None:
    spec = injected(pod(initContainers=[{"name": "migrate", "image": "flyway:10"}]))["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [
        "outrigger-init",
        "outrigger-proxy",
        "migrate",
    ]
    assert [c["name"] for c in spec["containers"]] == ["web"]
    assert spec["initContainers"][1]["restartPolicy"] == "Always"
    assert "lifecycle" not in spec["initContainers"][1]


def test_the_init_container_is_root_with_only_net_admin_and_net_raw() -> None:
    init = containers_by_name(injected(pod())["spec"])["outrigger-init"]
    security = init["securityContext"]
    assert (security["runAsUser"], security["runAsNonRoot"]) == (0, False)
    assert security["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert init["command"] == ["outrigger"]
    assert init["args"] == [
        "iptables",
        "--proxy-uid",
        "1337",
        "--outbound-port",
        "15001",
        "--inbound-port",
        "15006",
        "--exclude-inbound-ports",
        "15000,15001,15006,15021,15090",
    ]


def test_the_init_container_overrides_a_non_root_pod_security_context() -> None:
    document = pod(securityContext={"runAsNonRoot": True, "runAsUser": 1000})
    init = containers_by_name(injected(document)["spec"])["outrigger-init"]
    assert init["securityContext"]["runAsNonRoot"] is False
    assert init["securityContext"]["runAsUser"] == 0


def test_the_proxy_is_unprivileged_with_a_read_only_root_and_a_writable_snapshot_cache() -> None:
    document = injected(pod())
    proxy = proxy_of(document)
    security = proxy["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["runAsNonRoot"]) == (
        1337,
        1337,
        True,
    )
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    cache = flag(proxy["args"], "--snapshot-cache")
    (mount,) = proxy["volumeMounts"]
    assert cache.startswith(mount["mountPath"] + "/")
    volumes = {v["name"]: v for v in document["spec"]["volumes"]}
    assert volumes[mount["name"]] == {"name": "outrigger-cache", "emptyDir": {}}


def test_the_proxy_learns_its_pod_from_the_downward_api() -> None:
    env = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in proxy_of(injected(pod()))["env"]
    }
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "SERVICE_ACCOUNT": "spec.serviceAccountName",
        "NODE_NAME": "spec.nodeName",
    }


def test_the_proxy_command_line() -> None:
    proxy = proxy_of(injected(pod(), control_plane="cp.mesh.svc:15010"))
    assert proxy["command"] == ["outrigger"]
    assert proxy["args"] == [
        "sidecar",
        "--control-plane",
        "cp.mesh.svc:15010",
        "--service",
        "web",
        "--namespace",
        "$(POD_NAMESPACE)",
        "--outbound",
        "127.0.0.1:15001",
        "--inbound",
        "0.0.0.0:15006",
        "--admin",
        "127.0.0.1:15000",
        "--health",
        "0.0.0.0:15021",
        "--metrics",
        "0.0.0.0:15090",
        "--snapshot-cache",
        "/var/lib/outrigger/snapshot.json",
        "--log-level",
        "info",
    ]


def test_probes_hit_the_health_port_and_metrics_are_declared_for_prometheus() -> None:
    document = injected(pod())
    proxy = proxy_of(document)
    for probe in ("readinessProbe", "startupProbe"):
        assert proxy[probe]["httpGet"]["path"] == "/healthz/ready"
        assert proxy[probe]["httpGet"]["port"] == 15021
    assert proxy["ports"] == [{"name": "outrigger-prom", "containerPort": 15090, "protocol": "TCP"}]
    annotations = document["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15090"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"


def test_the_apps_own_prometheus_annotations_are_never_overwritten() -> None:
    document = injected(pod(annotations={"prometheus.io/port": "9100"}))
    annotations = document["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100"
    assert "prometheus.io/scrape" not in annotations
    assert "prometheus.io/path" not in annotations


@pytest.mark.parametrize(
    ("labels", "account", "service"),
    [
        ({"app.kubernetes.io/name": "shop-web", "app": "web"}, "sa", "shop-web"),
        ({"app": "web"}, "sa", "web"),
        ({"tier": "front"}, "web-sa", "web-sa"),
        ({}, None, "default"),
    ],
)
def test_service_name_from_labels_else_the_service_account(
    labels: Json, account: str | None, service: str
) -> None:
    document = pod(labels=labels)
    if account is None:
        del document["spec"]["serviceAccountName"]
    else:
        document["spec"]["serviceAccountName"] = account
    assert flag(proxy_of(injected(document))["args"], "--service") == service


def test_plain_container_mode_puts_the_proxy_first_and_holds_the_app_until_ready() -> None:
    document = pod(
        annotations={"outrigger.dev/native-sidecar": "false"},
        initContainers=[{"name": "migrate", "image": "flyway:10"}],
    )
    spec = injected(document)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["outrigger-init", "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["outrigger-proxy", "web"]
    proxy = spec["containers"][0]
    assert "restartPolicy" not in proxy
    assert proxy["lifecycle"]["postStart"]["exec"]["command"] == [
        "outrigger",
        "wait",
        "--timeout",
        "60s",
        "--url",
        "http://127.0.0.1:15021/healthz/ready",
    ]


def test_the_mesh_can_make_plain_containers_the_default_and_a_pod_can_opt_back() -> None:
    plain = injected(pod(), native_sidecar=False)
    assert plain["spec"]["containers"][0]["name"] == "outrigger-proxy"
    native = injected(
        pod(annotations={"outrigger.dev/native-sidecar": "true"}), native_sidecar=False
    )
    assert native["spec"]["initContainers"][1]["name"] == "outrigger-proxy"


@pytest.mark.parametrize("restart", ["Never", "OnFailure"])
def test_pods_that_run_to_completion_always_get_the_native_sidecar(restart: str) -> None:
    document = pod(restartPolicy=restart, annotations={"outrigger.dev/native-sidecar": "false"})
    result = inject_pod(document, namespace="shop", injection=Injection(native_sidecar=False))
    assert [c["name"] for c in result.pod["spec"]["containers"]] == ["web"]
    assert result.pod["spec"]["initContainers"][1]["restartPolicy"] == "Always"
    assert any("native-sidecar" in w and "is ignored" in w for w in result.warnings)


def test_annotations_reach_the_command_lines_and_resources() -> None:
    document = pod(
        annotations={
            "outrigger.dev/proxy-cpu": "250m",
            "outrigger.dev/proxy-memory": "256Mi",
            "outrigger.dev/proxy-cpu-limit": "1",
            "outrigger.dev/proxy-memory-limit": "512Mi",
            "outrigger.dev/trace-sampling": "0.5",
            "outrigger.dev/proxy-log-level": "debug",
            "outrigger.dev/exclude-outbound-ports": "5432, 6379",
            "outrigger.dev/exclude-inbound-ports": "9100",
            "outrigger.dev/include-outbound-cidrs": "10.0.0.0/8,fd00::/8",
            "outrigger.dev/exclude-outbound-cidrs": "10.96.0.1",
        }
    )
    spec = injected(document, otlp_endpoint="http://jaeger.tracing.svc:4317")["spec"]
    init, proxy = spec["initContainers"][0], spec["initContainers"][1]
    assert proxy["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    assert flag(proxy["args"], "--trace-sampling") == "0.5"
    assert flag(proxy["args"], "--otlp-endpoint") == "http://jaeger.tracing.svc:4317"
    assert flag(proxy["args"], "--log-level") == "debug"
    assert init["args"][init["args"].index("--exclude-inbound-ports") :] == [
        "--exclude-inbound-ports",
        "9100,15000,15001,15006,15021,15090",
        "--exclude-outbound-ports",
        "5432,6379",
        "--include-outbound-cidrs",
        "10.0.0.0/8,fd00::/8",
        "--exclude-outbound-cidrs",
        "10.96.0.1/32",
    ]
    # Every flag the injector knows was used here: the lists are complete and nothing else.
    assert {a for a in proxy["args"] if a.startswith("--")} == set(SIDECAR_FLAGS)
    assert {a for a in init["args"] if a.startswith("--")} == set(IPTABLES_FLAGS)


def test_mesh_defaults_apply_when_the_pod_says_nothing() -> None:
    settings = {
        "proxy_log_level": "warning",
        "trace_sampling": 0.1,
        "resources": Resources(cpu="50m", memory="64Mi", cpu_limit=None, memory_limit="256Mi"),
        "interception": Interception(exclude_outbound_ports=(3306,), include_outbound_cidrs=None),
    }
    spec = injected(pod(), **settings)["spec"]
    init, proxy = spec["initContainers"][0], spec["initContainers"][1]
    assert proxy["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert flag(proxy["args"], "--log-level") == "warning"
    assert flag(proxy["args"], "--trace-sampling") == "0.1"
    assert flag(init["args"], "--exclude-outbound-ports") == "3306"
    assert "--include-outbound-cidrs" not in init["args"]


def test_without_a_sampling_setting_the_mesh_value_from_xds_applies() -> None:
    assert "--trace-sampling" not in proxy_of(injected(pod()))["args"]


def test_a_default_request_is_lowered_to_a_smaller_limit_the_pod_sets() -> None:
    document = pod(annotations={"outrigger.dev/proxy-memory-limit": "100Mi"})
    resources = proxy_of(injected(document))["resources"]
    assert resources["requests"]["memory"] == "100Mi"  # the default 128Mi would not fit
    assert resources["limits"]["memory"] == "100Mi"


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {"outrigger.dev/proxy-cpu": "lots"},
            "annotation outrigger.dev/proxy-cpu: must be a Kubernetes quantity greater than "
            'zero, like "100m", "0.5" or "2", got "lots"',
        ),
        (
            {"outrigger.dev/proxy-memory": "1GB"},
            "annotation outrigger.dev/proxy-memory: must be a Kubernetes quantity greater than "
            'zero, like "128Mi" or "1Gi", got "1GB"',
        ),
        (
            {"outrigger.dev/proxy-cpu": "3"},
            "annotation outrigger.dev/proxy-cpu: the request (3) must not exceed the limit "
            "the mesh's injection.proxy_cpu_limit (2)",
        ),
        (
            {"outrigger.dev/proxy-memory": "1Gi", "outrigger.dev/proxy-memory-limit": "512Mi"},
            "annotation outrigger.dev/proxy-memory: the request (1Gi) must not exceed the limit "
            "annotation outrigger.dev/proxy-memory-limit (512Mi)",
        ),
        (
            {"outrigger.dev/proxy-cpu-limit": "0"},
            "annotation outrigger.dev/proxy-cpu-limit: must be a Kubernetes quantity",
        ),
        (
            {"outrigger.dev/proxy-memory-limit": "-1Gi"},
            "annotation outrigger.dev/proxy-memory-limit: must be a Kubernetes quantity",
        ),
        (
            {"outrigger.dev/trace-sampling": "10%"},
            "annotation outrigger.dev/trace-sampling: must be a fraction from 0 to 1, like "
            '"0.01" (1%) or "1" (every new trace), got "10%"',
        ),
        (
            {"outrigger.dev/proxy-log-level": "verbose"},
            "annotation outrigger.dev/proxy-log-level: must be one of debug, info, warning, "
            'error, got "verbose"',
        ),
        (
            {"outrigger.dev/exclude-outbound-ports": "3306,http"},
            "annotation outrigger.dev/exclude-outbound-ports: must be ports from 1 to 65535",
        ),
        (
            {"outrigger.dev/exclude-inbound-ports": "70000"},
            "annotation outrigger.dev/exclude-inbound-ports: must be ports from 1 to 65535",
        ),
        (
            {"outrigger.dev/include-outbound-cidrs": "10.0.0.0/8,*"},
            'annotation outrigger.dev/include-outbound-cidrs: "*" means every destination',
        ),
        (
            {"outrigger.dev/exclude-outbound-cidrs": "10.0.0.0/40"},
            "annotation outrigger.dev/exclude-outbound-cidrs: must be IPv4 or IPv6 CIDRs",
        ),
        (
            {"outrigger.dev/native-sidecar": "no"},
            "annotation outrigger.dev/native-sidecar: must be true or false (quoted in an "
            'annotation: "false"), got "no"',
        ),
        (
            {"outrigger.dev/trace-sampling": 0.5},
            "annotation outrigger.dev/trace-sampling: must be a string (quote it in YAML: "
            '"0.5"), got 0.5',
        ),
        (
            {"outrigger.dev/inject": "yes"},
            'annotation outrigger.dev/inject: must be "enabled" or "disabled", got "yes"',
        ),
    ],
)
def test_a_bad_annotation_is_refused_with_its_key_and_form(annotations: Json, message: str) -> None:
    with pytest.raises(InjectionError) as caught:
        inject_pod(pod(annotations=annotations), namespace="shop", injection=DEFAULTS)
    assert str(caught.value).startswith(message)


def test_a_bad_inject_label_is_refused() -> None:
    with pytest.raises(InjectionError, match=r'^label outrigger\.dev/inject: must be "enabled"'):
        inject_pod(
            pod(labels={"outrigger.dev/inject": "true"}), namespace="shop", injection=DEFAULTS
        )


@pytest.mark.parametrize(
    ("document", "namespace", "reason"),
    [
        (
            pod(labels={"outrigger.dev/inject": "disabled"}),
            "shop",
            "label outrigger.dev/inject is disabled",
        ),
        (
            pod(annotations={"outrigger.dev/inject": "disabled"}),
            "shop",
            "annotation outrigger.dev/inject is disabled",
        ),
    ],
)
def test_a_pod_that_says_disabled_is_left_alone_quietly(
    document: Json, namespace: str, reason: str
) -> None:
    result = inject_pod(document, namespace=namespace, injection=DEFAULTS)
    assert (result.skipped, result.patch, result.warnings) == (reason, [], ())
    assert result.pod == document


@pytest.mark.parametrize(
    ("document", "namespace", "reason"),
    [
        (pod(hostNetwork=True), "shop", "the pod uses hostNetwork"),
        (pod(), "kube-system", "pods in namespace kube-system are never injected"),
        (pod(), "kube-public", "pods in namespace kube-public are never injected"),
        (pod(), "outrigger-system", "pods in namespace outrigger-system are never injected"),
    ],
)
def test_pods_that_are_never_injected_say_why(document: Json, namespace: str, reason: str) -> None:
    result = inject_pod(document, namespace=namespace, injection=DEFAULTS)
    assert result.skipped is not None
    assert result.skipped.startswith(reason)
    assert result.patch == []
    assert result.pod == document
    assert result.warnings == (f"not injected: {result.skipped}",)


def test_the_control_planes_namespace_follows_the_mesh_setting() -> None:
    mesh = Injection(control_plane_namespace="mesh")
    assert inject_pod(pod(), namespace="mesh", injection=mesh).skipped is not None
    assert inject_pod(pod(), namespace="outrigger-system", injection=mesh).skipped is None


def test_the_inject_label_wins_over_the_annotation() -> None:
    document = pod(
        labels={"app": "web", "outrigger.dev/inject": "enabled"},
        annotations={"outrigger.dev/inject": "disabled"},
    )
    assert inject_pod(document, namespace="shop", injection=DEFAULTS).skipped is None


@pytest.mark.parametrize("native", [True, False])
def test_injecting_an_injected_pod_changes_nothing(native: bool) -> None:
    once = injected(pod(), native_sidecar=native)
    twice = inject_pod(once, namespace="shop", injection=DEFAULTS)
    assert twice.skipped == "already injected"
    assert twice.patch == []
    assert twice.pod == once


def test_the_status_annotation_records_what_was_done() -> None:
    document = pod(annotations={"outrigger.dev/exclude-inbound-ports": "9100"})
    status = json.loads(injected(document)["metadata"]["annotations"]["outrigger.dev/status"])
    assert status["image"] == DEFAULTS.image
    assert status["version"]
    assert status["initContainers"] == ["outrigger-init", "outrigger-proxy"]
    assert status["containers"] == []
    assert status["volumes"] == ["outrigger-cache"]
    assert status["nativeSidecar"] is True
    assert status["interception"] == {
        "proxyUid": 1337,
        "outboundPort": 15001,
        "inboundPort": 15006,
        "excludeInboundPorts": [9100, 15000, 15001, 15006, 15021, 15090],
        "excludeOutboundPorts": [],
        "includeOutboundCidrs": "*",
        "excludeOutboundCidrs": [],
    }


def test_a_pod_with_no_annotations_init_containers_or_volumes_gets_them_created() -> None:
    document = pod()
    assert "annotations" not in document["metadata"]
    result = inject_pod(document, namespace="shop", injection=DEFAULTS)
    assert [op["path"] for op in result.patch] == [
        "/metadata/annotations",
        "/spec/initContainers",
        "/spec/volumes",
    ]
    assert apply(document, result.patch) == result.pod


def test_a_pod_template_without_metadata_or_namespace_is_injected() -> None:
    template = {"spec": pod()["spec"]}
    result = inject_pod(template, namespace=None, injection=DEFAULTS)
    assert result.skipped is None
    assert apply(template, result.patch) == result.pod
    assert "outrigger.dev/status" in result.pod["metadata"]["annotations"]


def test_a_large_pod_keeps_every_container_volume_and_annotation() -> None:
    document = large_pod()
    spec = injected(document)["spec"]
    assert len(spec["containers"]) == len(document["spec"]["containers"])
    assert [c["name"] for c in spec["initContainers"]][2:] == [
        c["name"] for c in document["spec"]["initContainers"]
    ]
    assert spec["volumes"][:-1] == document["spec"]["volumes"]


def test_unknown_outrigger_annotations_get_a_warning() -> None:
    result = inject_pod(
        pod(annotations={"outrigger.dev/timeout": "2s", "outrigger.dev/calls": "orders"}),
        namespace="shop",
        injection=DEFAULTS,
    )
    assert result.warnings == (
        "annotation outrigger.dev/timeout is not a pod setting; it does nothing here",
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            pod(initContainers=[{"name": "outrigger-init", "image": "x"}]),
            "already has a container named outrigger-init",
        ),
        (
            pod(volumes=[{"name": "outrigger-cache", "emptyDir": {}}]),
            "already has a volume named outrigger-cache",
        ),
        (
            {"metadata": {}, "spec": {"containers": []}},
            "spec.containers: a pod needs at least one container",
        ),
        ({"metadata": {}}, "spec: must be the pod's spec"),
        (
            {"metadata": {}, "spec": {"containers": [{"image": "x"}]}},
            "spec.containers: must be a list of containers, each with a name",
        ),
        (
            {"metadata": {"annotations": ["x"]}, "spec": pod()["spec"]},
            "metadata.annotations: must be a mapping",
        ),
    ],
)
def test_pods_that_cannot_be_injected_are_refused_with_the_field(
    document: Json, message: str
) -> None:
    with pytest.raises(InjectionError, match=message):
        inject_pod(document, namespace="shop", injection=DEFAULTS)


def test_a_stale_status_annotation_without_the_proxy_is_injected_again() -> None:
    # e.g. a manifest written from `kubectl get pod -o yaml` with the containers edited out
    stale = injected(pod())
    stale["spec"] = pod()["spec"]
    result = inject_pod(stale, namespace="shop", injection=DEFAULTS)
    assert result.skipped is None
    assert [c["name"] for c in result.pod["spec"]["initContainers"]][:2] == [
        "outrigger-init",
        "outrigger-proxy",
    ]
    assert apply(stale, result.patch) == result.pod


def test_the_meshs_ports_reach_every_place_that_names_them() -> None:
    ports = Ports(admin=16000, outbound=16001, inbound=16006, health=16021, metrics=16090)
    document = injected(pod(annotations={"outrigger.dev/native-sidecar": "false"}), ports=ports)
    proxy = document["spec"]["containers"][0]
    init = document["spec"]["initContainers"][0]
    assert flag(proxy["args"], "--outbound") == "127.0.0.1:16001"
    assert flag(proxy["args"], "--inbound") == "0.0.0.0:16006"
    assert flag(proxy["args"], "--admin") == "127.0.0.1:16000"
    assert flag(proxy["args"], "--health") == "0.0.0.0:16021"
    assert flag(proxy["args"], "--metrics") == "0.0.0.0:16090"
    assert flag(init["args"], "--outbound-port") == "16001"
    assert flag(init["args"], "--inbound-port") == "16006"
    assert flag(init["args"], "--exclude-inbound-ports") == "16000,16001,16006,16021,16090"
    assert proxy["readinessProbe"]["httpGet"]["port"] == 16021
    assert proxy["ports"][0]["containerPort"] == 16090
    assert document["metadata"]["annotations"]["prometheus.io/port"] == "16090"
    wait = proxy["lifecycle"]["postStart"]["exec"]["command"]
    assert flag(wait, "--url") == "http://127.0.0.1:16021/healthz/ready"
