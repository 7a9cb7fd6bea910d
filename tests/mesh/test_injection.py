from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh.injection import (
    DEFAULT_IMAGE,
    Injection,
    InjectionError,
    Interception,
    Ports,
    Resources,
    parse_injection,
    quantity_value,
    read_cidrs,
    read_include_cidrs,
    read_ports,
    read_quantity,
    read_sampling,
)
from mesh.model import MeshError, load_mesh, parse_mesh

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mesh.yaml"


def error_of(section: Any) -> str:
    with pytest.raises(MeshError) as caught:
        parse_mesh({"injection": section}, "mesh.yaml")
    return str(caught.value)


def test_a_mesh_without_the_section_gets_the_defaults() -> None:
    injection = parse_mesh({}, "mesh.yaml").injection
    assert injection == Injection()
    assert injection.image == DEFAULT_IMAGE
    assert injection.native_sidecar is True
    assert injection.control_plane == "outrigger.outrigger-system.svc:15010"
    assert injection.control_plane_namespace == "outrigger-system"
    assert injection.trace_sampling is None  # the xDS value applies
    assert injection.resources == Resources("100m", "128Mi", None, None)  # Istio's requests
    assert injection.ports.all() == (15000, 15001, 15006, 15021, 15090)  # Istio's numbers
    assert injection.interception.include_outbound_cidrs is None  # every destination


def test_the_example_mesh_sets_every_key() -> None:
    injection = load_mesh(EXAMPLE).injection
    assert injection == Injection(
        image="registry.example/outrigger:0.1.0",
        image_pull_policy="IfNotPresent",
        native_sidecar=True,
        control_plane="outrigger.outrigger-system.svc:15010",
        control_plane_namespace="outrigger-system",
        proxy_log_level="info",
        trace_sampling=None,
        resources=Resources(cpu="100m", memory="128Mi", cpu_limit=None, memory_limit="1Gi"),
        ports=Ports(),
        interception=Interception(
            exclude_inbound_ports=(),
            exclude_outbound_ports=(),
            include_outbound_cidrs=None,
            exclude_outbound_cidrs=("169.254.169.254/32",),
        ),
    )


def test_a_full_section_is_read_into_frozen_settings() -> None:
    injection = parse_injection(
        {
            "image": "outrigger:dev",
            "image_pull_policy": "Always",
            "native_sidecar": False,
            "control_plane": "[fd00::1]:15010",
            "control_plane_namespace": "mesh",
            "proxy_log_level": "debug",
            "trace_sampling": 0.25,
            "proxy_cpu": 0.5,
            "proxy_cpu_limit": None,
            "proxy_memory_limit": "2Gi",
            "ports": {"outbound": 16001, "metrics": 9901},
            "interception": {
                "exclude_inbound_ports": [9090, 8080, 9090],
                "exclude_outbound_ports": ["5432"],
                "include_outbound_cidrs": ["10.0.0.1/8", "fd00::/8"],
                "exclude_outbound_cidrs": ["10.1.2.3"],
            },
        }
    )
    assert injection.image_pull_policy == "Always"
    assert injection.native_sidecar is False
    assert injection.control_plane == "[fd00::1]:15010"
    assert injection.trace_sampling == 0.25
    # proxy_memory kept its default; no cpu limit
    assert injection.resources == Resources(
        cpu="0.5", memory="128Mi", cpu_limit=None, memory_limit="2Gi"
    )
    assert injection.ports == Ports(outbound=16001, metrics=9901)
    assert injection.interception == Interception(
        exclude_inbound_ports=(8080, 9090),
        exclude_outbound_ports=(5432,),
        include_outbound_cidrs=("10.0.0.0/8", "fd00::/8"),
        exclude_outbound_cidrs=("10.1.2.3/32",),
    )


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"imag": "x"},
            "mesh.yaml: injection.imag: unknown key; allowed keys are image, image_pull_policy",
        ),
        ("yes", "mesh.yaml: injection: must be a mapping with keys image, image_pull_policy"),
        ({"image": "out rigger"}, "mesh.yaml: injection.image: must be an image reference"),
        (
            {"image_pull_policy": "always"},
            'injection.image_pull_policy: must be one of Always, IfNotPresent, Never, got "always"',
        ),
        ({"native_sidecar": "no"}, "injection.native_sidecar: must be true or false"),
        (
            {"control_plane": "outrigger:xds"},
            'injection.control_plane: must be HOST:PORT, e.g. "outrigger.outrigger-system.svc',
        ),
        (
            {"control_plane_namespace": "Mesh"},
            "injection.control_plane_namespace: must be a namespace",
        ),
        (
            {"proxy_log_level": "trace"},
            "injection.proxy_log_level: must be one of debug, info, warning, error",
        ),
        ({"trace_sampling": 5}, "injection.trace_sampling: must be a fraction from 0 to 1"),
        (
            {"proxy_cpu": "lots"},
            "injection.proxy_cpu: must be a Kubernetes quantity greater than zero, "
            'like "100m", "0.5" or "2", got "lots"',
        ),
        (
            {"proxy_memory": "0Mi"},
            "injection.proxy_memory: must be a Kubernetes quantity greater than zero",
        ),
        (
            {"resources": {"requests": {}}},
            "injection.resources: unknown key; allowed keys are image, image_pull_policy",
        ),
        (
            {"proxy_memory": "2Gi", "proxy_memory_limit": "1Gi"},
            "injection.proxy_memory: the request (2Gi) must not exceed the limit "
            "injection.proxy_memory_limit (1Gi)",
        ),
        (
            {"ports": {"health": 0}},
            "injection.ports.health: must be a port number from 1 to 65535, got 0",
        ),
        (
            {"ports": {"metrics": 15021}},
            "injection.ports.metrics: 15021 is already injection.ports.health",
        ),
        (
            {"ports": {"stats": 1}},
            "injection.ports.stats: unknown key; allowed keys are admin, outbound, inbound",
        ),
        (
            {"interception": {"exclude_inbound_ports": [0]}},
            "injection.interception.exclude_inbound_ports: must be ports from 1 to 65535",
        ),
        (
            {"interception": {"include_outbound_cidrs": ["*", "10.0.0.0/8"]}},
            'injection.interception.include_outbound_cidrs: "*" means every destination and '
            "stands alone",
        ),
        (
            {"interception": {"exclude_outbound_cidrs": ["10.0.0.0/33"]}},
            "injection.interception.exclude_outbound_cidrs: must be IPv4 or IPv6 CIDRs",
        ),
    ],
)
def test_every_error_names_the_key_and_the_form(section: Any, expected: str) -> None:
    message = error_of(section)
    assert message.startswith("mesh.yaml: ")
    assert expected in message


def test_annotation_forms_are_comma_separated_text() -> None:
    assert read_ports("a", "15020, 8080,8080") == (8080, 15020)
    assert read_ports("a", "") == ()
    assert read_cidrs("a", "10.0.0.0/8, 192.168.1.7") == ("10.0.0.0/8", "192.168.1.7/32")
    assert read_include_cidrs("a", "*") is None
    assert read_sampling("a", "0.05") == 0.05
    with pytest.raises(InjectionError, match=r'^a: must be a fraction from 0 to 1.*got "1e-2"'):
        read_sampling("a", "1e-2")
    with pytest.raises(InjectionError, match=r"^a: must be ports from 1 to 65535"):
        read_ports("a", "80;443")


@pytest.mark.parametrize(
    ("text", "amount"),
    [("100m", "0.1"), ("2", "2"), ("1Gi", "1073741824"), ("1.5k", "1500"), ("128e6", "128000000")],
)
def test_quantities_are_read_as_kubernetes_reads_them(text: str, amount: str) -> None:
    assert read_quantity("a", text) == text
    assert quantity_value(text) == quantity_value(amount)


@pytest.mark.parametrize("bad", ["", "-1", "1 Gi", "1gi", "1.5.0", "0m", True, None])
def test_bad_quantities_are_refused(bad: object) -> None:
    with pytest.raises(InjectionError, match=r"^r: must be a Kubernetes quantity"):
        read_quantity("r", bad)
