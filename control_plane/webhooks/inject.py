"""The sidecar injector: a pod in, the injected pod and the RFC 6902 JSONPatch between them out.

`inject_pod` is one pure function of the pod (metadata and spec), its namespace and the mesh's
`injection:` settings. The `/inject` admission webhook and `outrigger inject` both call it, so they
produce the same pod for the same input. It never mutates its input (the result shares the parts
it did not change).

Selection. The API server picks the pods the webhook sees (by label: the namespace label
`outrigger.dev/inject=enabled`, or the pod label `outrigger.dev/inject: enabled`), and
`outrigger inject` injects what it is given; here only the vetoes apply, in this order:

1. a pod that already has an `outrigger-proxy` container is left alone (injecting twice is a no-op);
2. the pod label `outrigger.dev/inject: disabled` (or, without the label, the same annotation);
3. hostNetwork pods (their iptables rules would be the node's);
4. pods in kube-system, kube-public and the control plane's own namespace.

What is added (Istio's layout, the names are ours):

- `outrigger-init`: `outrigger iptables ...` as root, with NET_ADMIN and NET_RAW and every other
  capability dropped (added capabilities do not take effect for a non-root user);
- `outrigger-proxy`: `outrigger sidecar ...` as uid/gid 1337, non-root, read-only root file
  system, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault; the snapshot
  cache on the `outrigger-cache` emptyDir, so a restarted proxy starts from its last good config;
  downward-API env; readiness and startup probes on `:15021/healthz/ready`;
- by default a native sidecar (an init container with `restartPolicy: Always`): the init
  containers become `outrigger-init`, `outrigger-proxy`, then the pod's own. Else (annotation
  `outrigger.dev/native-sidecar: "false"` or the mesh's `native_sidecar: false`) a plain container,
  first of the pod's containers, whose postStart `outrigger wait` holds the app until the proxy is
  ready. A pod that runs to completion (restartPolicy Never or OnFailure: every Job and CronJob
  pod) always gets the native sidecar, which cannot keep it from finishing;
- the `prometheus.io/scrape|port|path` annotations for the proxy's metrics port, unless the pod
  has any of its own;
- `outrigger.dev/status`: what was done (version, image, containers and volume added, native or
  not, the interception settings), JSON.

Settings come from the pod's annotations (keys in mesh.annotations, POD_KEYS), else the mesh's
`injection:` defaults. A value that cannot be used raises `InjectionError` (mesh.injection)
naming the annotation and the form: the webhook denies the pod with that reason rather than
inject something broken.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from control_plane.webhooks.review import AdmissionRequest, AdmissionResponse
from mesh.annotations import (
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_OUTBOUND_CIDRS,
    INJECT,
    NATIVE_SIDECAR,
    POD_KEYS,
    PREFIX,
    PROXY_CPU,
    PROXY_CPU_LIMIT,
    PROXY_LOG_LEVEL,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    STATUS,
    TRACE_SAMPLING,
)
from mesh.injection import (
    VERSION,
    Injection,
    InjectionError,
    Interception,
    LogLevel,
    Ports,
    Resources,
    check_limits,
    lower_quantity,
    read_bool,
    read_cidrs,
    read_include_cidrs,
    read_log_level,
    read_memory,
    read_ports,
    read_quantity,
    read_sampling,
    show,
)

Json = dict[str, Any]
T = TypeVar("T")
Reader = Callable[[str, str], T]

PROMETHEUS: Final = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")

PROXY_UID: Final = 1337
READY_PATH: Final = "/healthz/ready"
METRICS_PATH: Final = "/stats/prometheus"

INIT_CONTAINER: Final = "outrigger-init"
PROXY_CONTAINER: Final = "outrigger-proxy"
CACHE_VOLUME: Final = "outrigger-cache"
CACHE_DIR: Final = "/var/lib/outrigger"
SNAPSHOT_CACHE: Final = CACHE_DIR + "/snapshot.json"
NEVER_INJECTED: Final = ("kube-system", "kube-public")

# Every flag the injector can put on the two command lines (tests hold the CLI to these).
SIDECAR_FLAGS: Final = (
    "--control-plane",
    "--service",
    "--namespace",
    "--outbound",
    "--inbound",
    "--admin",
    "--health",
    "--metrics",
    "--snapshot-cache",
    "--log-level",
    "--trace-sampling",
    "--otlp-endpoint",
)
IPTABLES_FLAGS: Final = (
    "--proxy-uid",
    "--outbound-port",
    "--inbound-port",
    "--exclude-inbound-ports",
    "--exclude-outbound-ports",
    "--include-outbound-cidrs",
    "--exclude-outbound-cidrs",
)
WAIT_TIMEOUT: Final = "60s"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """What one pod's proxy gets: the mesh's defaults with the pod's annotations applied."""

    service: str
    native_sidecar: bool
    log_level: LogLevel
    trace_sampling: float | None  # None: the xDS value applies
    otlp_endpoint: str | None  # the mesh's tracing.otlp_endpoint; None: OTEL_* or tracing off
    resources: Resources
    ports: Ports  # the mesh's; not a pod setting
    interception: Interception


@dataclass(frozen=True, slots=True)
class Injected:
    pod: Json  # the injected pod, or the input itself when nothing was done
    patch: list[Json]  # RFC 6902 operations from the input to `pod`; [] when nothing was done
    skipped: str | None = None  # why the pod was left alone; None when it was injected
    warnings: tuple[str, ...] = ()  # for the user: what was asked and will not happen


# -- settings ----------------------------------------------------------------------------------


def _strings(metadata: Json, field: str) -> dict[str, Any]:
    value = metadata.get(field)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InjectionError(f"metadata.{field}: must be a mapping of strings, got {show(value)}")
    return dict(value)


def _pod_annotations(metadata: Json) -> dict[str, str]:
    """The pod's outrigger.dev/ annotations, each a string (an unquoted YAML number is not)."""
    found: dict[str, str] = {}
    for key, value in _strings(metadata, "annotations").items():
        if isinstance(key, str) and key.startswith(PREFIX):
            if not isinstance(value, str):
                raise InjectionError(
                    f'annotation {key}: must be a string (quote it in YAML: "{value}"), '
                    f"got {show(value)}"
                )
            found[key] = value
    return found


def _setting(annotations: Mapping[str, str], key: str, reader: Reader[T], default: T) -> T:
    """The annotation read with a mesh.injection reader, or the mesh's default."""
    return reader(f"annotation {key}", annotations[key]) if key in annotations else default


def runs_to_completion(spec: Json) -> bool:
    """restartPolicy Never or OnFailure: a Job's or CronJob's pod, or a pod meant to finish."""
    return spec.get("restartPolicy") in ("Never", "OnFailure")


def service_name(metadata: Json, spec: Json) -> str:
    """app.kubernetes.io/name, else app, else the service account (Istio's canonical name)."""
    labels = _strings(metadata, "labels")
    for key in ("app.kubernetes.io/name", "app"):
        value = labels.get(key)
        if isinstance(value, str) and value:
            return value
    account = spec.get("serviceAccountName")
    return account if isinstance(account, str) and account else "default"


def _resources(annotations: Mapping[str, str], defaults: Resources) -> Resources:
    cpu_limit = _setting(annotations, PROXY_CPU_LIMIT, read_quantity, defaults.cpu_limit)
    memory_limit = _setting(annotations, PROXY_MEMORY_LIMIT, read_memory, defaults.memory_limit)
    # A request the pod leaves unset is the mesh's default, lowered to a smaller limit the pod
    # set (as Kubernetes defaults an unset request to its limit); a request it sets must fit.
    resources = Resources(
        cpu=_setting(
            annotations, PROXY_CPU, read_quantity, lower_quantity(defaults.cpu, cpu_limit)
        ),
        memory=_setting(
            annotations, PROXY_MEMORY, read_memory, lower_quantity(defaults.memory, memory_limit)
        ),
        cpu_limit=cpu_limit,
        memory_limit=memory_limit,
    )

    def name(key: str, mesh_key: str) -> str:
        return f"annotation {key}" if key in annotations else f"the mesh's {mesh_key}"

    check_limits(
        resources,
        {
            "cpu": name(PROXY_CPU, "injection.proxy_cpu"),
            "memory": name(PROXY_MEMORY, "injection.proxy_memory"),
            "cpu_limit": name(PROXY_CPU_LIMIT, "injection.proxy_cpu_limit"),
            "memory_limit": name(PROXY_MEMORY_LIMIT, "injection.proxy_memory_limit"),
        },
    )
    return resources


def proxy_settings(
    metadata: Json, spec: Json, injection: Injection, otlp_endpoint: str | None = None
) -> ProxySettings:
    """The mesh's defaults with the pod's annotations applied. Raises InjectionError."""
    annotations = _pod_annotations(metadata)
    defaults = injection.interception
    native = _setting(annotations, NATIVE_SIDECAR, read_bool, injection.native_sidecar)
    return ProxySettings(
        service=service_name(metadata, spec),
        native_sidecar=native or runs_to_completion(spec),
        log_level=_setting(annotations, PROXY_LOG_LEVEL, read_log_level, injection.proxy_log_level),
        trace_sampling=_setting(
            annotations, TRACE_SAMPLING, read_sampling, injection.trace_sampling
        ),
        otlp_endpoint=otlp_endpoint,
        resources=_resources(annotations, injection.resources),
        ports=injection.ports,
        interception=Interception(
            exclude_inbound_ports=_setting(
                annotations, EXCLUDE_INBOUND_PORTS, read_ports, defaults.exclude_inbound_ports
            ),
            exclude_outbound_ports=_setting(
                annotations, EXCLUDE_OUTBOUND_PORTS, read_ports, defaults.exclude_outbound_ports
            ),
            include_outbound_cidrs=_setting(
                annotations,
                INCLUDE_OUTBOUND_CIDRS,
                read_include_cidrs,
                defaults.include_outbound_cidrs,
            ),
            exclude_outbound_cidrs=_setting(
                annotations, EXCLUDE_OUTBOUND_CIDRS, read_cidrs, defaults.exclude_outbound_cidrs
            ),
        ),
    )


# -- what is added ------------------------------------------------------------------------------


def sidecar_args(settings: ProxySettings, injection: Injection) -> list[str]:
    """`outrigger sidecar ...` for the proxy; the namespace comes from the downward API."""
    ports = settings.ports
    args = [
        "sidecar",
        "--control-plane",
        injection.control_plane,
        "--service",
        settings.service,
        "--namespace",
        "$(POD_NAMESPACE)",
        "--outbound",
        f"127.0.0.1:{ports.outbound}",  # REDIRECT from OUTPUT delivers to 127.0.0.1
        "--inbound",
        f"0.0.0.0:{ports.inbound}",  # REDIRECT from PREROUTING delivers to the pod IP
        "--admin",
        f"127.0.0.1:{ports.admin}",
        "--health",
        f"0.0.0.0:{ports.health}",
        "--metrics",
        f"0.0.0.0:{ports.metrics}",
        "--snapshot-cache",
        SNAPSHOT_CACHE,
        "--log-level",
        settings.log_level,
    ]
    if settings.trace_sampling is not None:  # else the mesh's tracing.sampling, from xDS
        args += ["--trace-sampling", f"{settings.trace_sampling:g}"]
    if settings.otlp_endpoint is not None:  # xDS does not carry it
        args += ["--otlp-endpoint", settings.otlp_endpoint]
    return args


def excluded_inbound_ports(settings: ProxySettings) -> list[int]:
    """The sidecar's own ports and the pod's exclusions: inbound traffic never redirected."""
    return sorted({*settings.ports.all(), *settings.interception.exclude_inbound_ports})


def _ports(ports: Sequence[int]) -> str:
    return ",".join(map(str, ports))


def iptables_args(settings: ProxySettings) -> list[str]:
    """`outrigger iptables ...` for the init container."""
    interception = settings.interception
    args = [
        "iptables",
        "--proxy-uid",
        str(PROXY_UID),
        "--outbound-port",
        str(settings.ports.outbound),
        "--inbound-port",
        str(settings.ports.inbound),
        "--exclude-inbound-ports",
        _ports(excluded_inbound_ports(settings)),
    ]
    if interception.exclude_outbound_ports:
        args += ["--exclude-outbound-ports", _ports(interception.exclude_outbound_ports)]
    if interception.include_outbound_cidrs is not None:  # None: every destination
        args += ["--include-outbound-cidrs", ",".join(interception.include_outbound_cidrs)]
    if interception.exclude_outbound_cidrs:
        args += ["--exclude-outbound-cidrs", ",".join(interception.exclude_outbound_cidrs)]
    return args


def _resource_block(resources: Resources) -> Json:
    block: Json = {"requests": {"cpu": resources.cpu, "memory": resources.memory}}
    limits = {
        name: value
        for name, value in (("cpu", resources.cpu_limit), ("memory", resources.memory_limit))
        if value is not None
    }
    if limits:
        block["limits"] = limits
    return block


def _security(*, root: bool) -> Json:
    if root:
        # iptables needs root: capabilities added to a non-root user never take effect. Its lock
        # file lives in /run, so the root file system stays writable here (as Istio's init).
        identity: Json = {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False}
        capabilities: Json = {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    else:
        identity = {"runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": True}
        capabilities = {"drop": ["ALL"]}
    return {
        **identity,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": not root,
        "capabilities": capabilities,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _field_env(name: str, path: str) -> Json:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _probe(port: int, period: int, failures: int) -> Json:
    return {
        "httpGet": {"path": READY_PATH, "port": port, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def init_container(settings: ProxySettings, injection: Injection) -> Json:
    return {
        "name": INIT_CONTAINER,
        "image": injection.image,
        "imagePullPolicy": injection.image_pull_policy,
        "command": ["outrigger"],
        "args": iptables_args(settings),
        "resources": _resource_block(settings.resources),
        "securityContext": _security(root=True),
    }


def proxy_container(settings: ProxySettings, injection: Injection) -> Json:
    ports = settings.ports
    container: Json = {
        "name": PROXY_CONTAINER,
        "image": injection.image,
        "imagePullPolicy": injection.image_pull_policy,
        "command": ["outrigger"],
        "args": sidecar_args(settings, injection),
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            _field_env("NODE_NAME", "spec.nodeName"),
        ],
        "ports": [{"name": "outrigger-prom", "containerPort": ports.metrics, "protocol": "TCP"}],
        # Istio's timings: the startup probe allows ten minutes to a first config.
        "startupProbe": _probe(ports.health, period=1, failures=600),
        "readinessProbe": _probe(ports.health, period=15, failures=4),
        "resources": _resource_block(settings.resources),
        "securityContext": _security(root=False),
        "volumeMounts": [{"name": CACHE_VOLUME, "mountPath": CACHE_DIR}],
    }
    if settings.native_sidecar:
        container["restartPolicy"] = "Always"
    else:
        # The kubelet starts the next container only once this hook returns.
        ready = f"http://127.0.0.1:{ports.health}{READY_PATH}"
        wait = ["outrigger", "wait", "--timeout", WAIT_TIMEOUT, "--url", ready]
        container["lifecycle"] = {"postStart": {"exec": {"command": wait}}}
    return container


def status(settings: ProxySettings, injection: Injection) -> str:
    """The `outrigger.dev/status` annotation: what was added, with which settings."""
    interception = settings.interception
    native = settings.native_sidecar
    return json.dumps(
        {
            "version": VERSION,
            "image": injection.image,
            "initContainers": [INIT_CONTAINER, PROXY_CONTAINER] if native else [INIT_CONTAINER],
            "containers": [] if native else [PROXY_CONTAINER],
            "volumes": [CACHE_VOLUME],
            "nativeSidecar": native,
            "interception": {
                "proxyUid": PROXY_UID,
                "outboundPort": settings.ports.outbound,
                "inboundPort": settings.ports.inbound,
                "excludeInboundPorts": excluded_inbound_ports(settings),
                "excludeOutboundPorts": list(interception.exclude_outbound_ports),
                "includeOutboundCidrs": (
                    "*"
                    if interception.include_outbound_cidrs is None
                    else list(interception.include_outbound_cidrs)
                ),
                "excludeOutboundCidrs": list(interception.exclude_outbound_cidrs),
            },
        },
        separators=(",", ":"),
    )


# -- selection ----------------------------------------------------------------------------------


def _containers(spec: Json, field: str) -> list[Json]:
    value = spec.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(item, Mapping) and isinstance(item.get("name"), str) for item in value
    ):
        raise InjectionError(f"spec.{field}: must be a list of containers, each with a name")
    return value


def _names(spec: Json, field: str) -> set[str]:
    return {item["name"] for item in _containers(spec, field)}


def declined(metadata: Json, spec: Json) -> str | None:
    """Why the pod itself says no (already injected, or disabled), or None.

    Raises InjectionError for an inject label or annotation that is neither value."""
    if PROXY_CONTAINER in _names(spec, "initContainers") | _names(spec, "containers"):
        return "already injected"
    labels = _strings(metadata, "labels")
    if INJECT in labels:
        choice, where = labels[INJECT], "label"
    else:
        choice, where = _pod_annotations(metadata).get(INJECT, "enabled"), "annotation"
    if choice not in ("enabled", "disabled"):
        raise InjectionError(
            f'{where} {INJECT}: must be "enabled" or "disabled", got {show(choice)}'
        )
    return f"{where} {INJECT} is disabled" if choice == "disabled" else None


def excluded(spec: Json, namespace: str | None, injection: Injection) -> str | None:
    """Why the pod is never injected whatever it asks (hostNetwork, system namespaces), or None."""
    if spec.get("hostNetwork") is True:
        return "the pod uses hostNetwork (its rules would be the node's)"
    if namespace in (*NEVER_INJECTED, injection.control_plane_namespace):
        return f"pods in namespace {namespace} are never injected"
    return None


def warnings_for(metadata: Json, spec: Json) -> tuple[str, ...]:
    """Things the pod asked for that will not happen as written."""
    found = [
        f"annotation {key} is not a pod setting; it does nothing here"
        for key in sorted(_pod_annotations(metadata))
        if key not in POD_KEYS
    ]
    native = _pod_annotations(metadata).get(NATIVE_SIDECAR)
    if native == "false" and runs_to_completion(spec):
        found.append(
            f'annotation {NATIVE_SIDECAR}: "false" is ignored: a pod that runs to completion '
            f"(restartPolicy {spec.get('restartPolicy')}) gets the native sidecar, so it can finish"
        )
    return tuple(found)


# -- the patch ----------------------------------------------------------------------------------


def pointer(*parts: str) -> str:
    """An RFC 6901 JSON pointer: '~' and '/' in a part are escaped."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def inject_pod(
    pod: Json, *, namespace: str | None, injection: Injection, otlp_endpoint: str | None = None
) -> Injected:
    """The injected pod and the JSONPatch to it, or the pod untouched with the reason.

    `pod` is a Pod (or a pod template: metadata and spec); `namespace` is where it runs, when
    known; `injection` and `otlp_endpoint` are the mesh file's `injection:` section and
    `tracing.otlp_endpoint`. Raises InjectionError when the pod asks for something that cannot
    be done.
    """
    if not isinstance(pod, dict):
        raise InjectionError(f"a pod must be a mapping, got {show(pod)}")
    metadata, spec = pod.get("metadata") or {}, pod.get("spec")
    if not isinstance(metadata, dict):
        raise InjectionError(f"metadata: must be a mapping, got {show(metadata)}")
    if not isinstance(spec, dict):
        raise InjectionError(f"spec: must be the pod's spec (a mapping), got {show(spec)}")
    if not _containers(spec, "containers"):
        raise InjectionError("spec.containers: a pod needs at least one container")
    reason = declined(metadata, spec)
    if reason is not None:
        return Injected(pod=pod, patch=[], skipped=reason)
    reason = excluded(spec, namespace, injection)
    if reason is not None:  # the pod or its namespace asked for a sidecar: say why not
        return Injected(pod=pod, patch=[], skipped=reason, warnings=(f"not injected: {reason}",))
    if INIT_CONTAINER in _names(spec, "initContainers") | _names(spec, "containers"):
        raise InjectionError(f"spec: the pod already has a container named {INIT_CONTAINER}")
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise InjectionError("spec.volumes: must be a list of volumes")
    if any(isinstance(v, Mapping) and v.get("name") == CACHE_VOLUME for v in volumes):
        raise InjectionError(f"spec.volumes: the pod already has a volume named {CACHE_VOLUME}")

    settings = proxy_settings(metadata, spec, injection, otlp_endpoint)
    init, proxy = init_container(settings, injection), proxy_container(settings, injection)
    volume: Json = {"name": CACHE_VOLUME, "emptyDir": {}}
    annotations = _strings(metadata, "annotations")
    added = {STATUS: status(settings, injection)}
    if not any(key in annotations for key in PROMETHEUS):
        scrape = ("true", str(settings.ports.metrics), METRICS_PATH)
        added.update(zip(PROMETHEUS, scrape, strict=True))

    patch: list[Json] = []
    if "metadata" not in pod or pod["metadata"] is None:
        patch.append({"op": "add", "path": "/metadata", "value": {"annotations": added}})
    elif metadata.get("annotations") is None:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": added})
    else:
        patch += [
            {"op": "add", "path": pointer("metadata", "annotations", k), "value": v}
            for k, v in added.items()
        ]
    inits = _containers(spec, "initContainers")
    new_inits = [init, proxy] if settings.native_sidecar else [init]
    if spec.get("initContainers") is None:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": new_inits})
    else:
        patch += [
            {"op": "add", "path": f"/spec/initContainers/{i}", "value": c}
            for i, c in enumerate(new_inits)
        ]
    containers = _containers(spec, "containers")
    new_containers = containers if settings.native_sidecar else [proxy, *containers]
    if not settings.native_sidecar:
        patch.append({"op": "add", "path": "/spec/containers/0", "value": proxy})
    if spec.get("volumes") is None:
        patch.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
    else:
        patch.append({"op": "add", "path": "/spec/volumes/-", "value": volume})

    injected = {
        **pod,
        "metadata": {**metadata, "annotations": {**annotations, **added}},
        "spec": {
            **spec,
            "initContainers": [*new_inits, *inits],
            "containers": new_containers,
            "volumes": [*volumes, volume],
        },
    }
    return Injected(
        pod=injected,
        patch=patch,
        warnings=warnings_for(metadata, spec),
    )


# -- the /inject webhook ------------------------------------------------------------------------


def admit(
    request: AdmissionRequest, injection: Injection, otlp_endpoint: str | None = None
) -> AdmissionResponse:
    """The `/inject` answer: a pod CREATE gets its patch (or is denied with the reason); any
    other object passes untouched with a warning, other operations pass untouched."""
    if (request.kind.group, request.kind.kind) != ("", "Pod") or request.sub_resource:
        target = request.resource + (f"/{request.sub_resource}" if request.sub_resource else "")
        what = f"{request.kind} ({target})"
        return AdmissionResponse(
            allowed=True,
            warnings=(f"outrigger /inject changes only pods; {what} passed untouched",),
        )
    if request.operation != "CREATE":
        return AdmissionResponse(allowed=True)  # a running pod's containers cannot change
    pod = request.object
    namespace = request.namespace
    if not namespace and isinstance(pod, dict) and isinstance(pod.get("metadata"), dict):
        namespace = pod["metadata"].get("namespace") or ""
    try:
        result = inject_pod(
            pod, namespace=namespace or None, injection=injection, otlp_endpoint=otlp_endpoint
        )
    except InjectionError as exc:
        return AdmissionResponse.deny(f"outrigger sidecar injection: {exc}", code=400)
    return AdmissionResponse(
        allowed=True,
        patch=result.patch,
        warnings=tuple(f"outrigger: {warning}" for warning in result.warnings),
    )
