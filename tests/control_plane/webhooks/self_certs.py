"""`webhook.certificates: self` against the fake API server: the chart's own Secret and webhook
configurations (rendered by Helm) seeded into it, keepers for replicas, control planes serving
what they keep, and TLS probes that trust what the API server would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from kubernetes_asyncio import client as kube_client

from control_plane.app import ControlPlane
from control_plane.webhooks.keeper import CertificateKeeper, SelfCertificates
from tests.control_plane.kube_api import NAMED, FakeKubeApi
from tests.helm.chart import NAMESPACE, SCENARIOS, objects

DNS = f"outrigger.{NAMESPACE}.svc"
SECRET = "outrigger-webhook-tls"
MUTATING, VALIDATING = "outrigger-inject", "outrigger-validate"
SETTINGS = SelfCertificates(NAMESPACE, SECRET, DNS, MUTATING, VALIDATING)
SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}"
CONFIG_PATHS = {
    "MutatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/"
    f"mutatingwebhookconfigurations/{MUTATING}",
    "ValidatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/"
    f"validatingwebhookconfigurations/{VALIDATING}",
}
WAIT = 10.0


def seed_chart_objects(api: FakeKubeApi, values: dict[str, Any] | None = None) -> None:
    """The Secret (empty) and the webhook configurations the chart renders in self mode."""
    for obj in objects(SCENARIOS["self"] if values is None else values):
        if obj["kind"] in NAMED:
            api.create(obj)


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = datetime.timedelta()

    def __call__(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset


def keeper_for(api: FakeKubeApi, **settings: Any) -> CertificateKeeper:
    return CertificateKeeper(kube_client.Configuration(host=api.url), SETTINGS, **settings)


@dataclass
class Replica:
    plane: ControlPlane
    keeper: CertificateKeeper

    @property
    def port(self) -> int:
        assert self.plane.webhooks is not None
        return self.plane.webhooks.port

    def metric(self, name: str, **labels: str) -> float:
        value = self.plane.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@contextlib.asynccontextmanager
async def replica(api: FakeKubeApi, **settings: Any) -> AsyncIterator[Replica]:
    """A control plane (no source) whose webhooks serve what its keeper keeps."""
    plane = ControlPlane(None)
    keeper = keeper_for(api, registry=plane.metrics.registry, **settings)
    try:
        async with asyncio.timeout(WAIT):
            await plane.start("127.0.0.1:0", None, webhook="127.0.0.1:0", certificates=keeper)
        yield Replica(plane, keeper)
    finally:
        async with asyncio.timeout(WAIT):
            await plane.stop(0)


def secret_data(api: FakeKubeApi) -> dict[str, bytes]:
    data = api.get("Secret", NAMESPACE, SECRET).get("data") or {}
    return {key: base64.b64decode(value) for key, value in data.items()}


def ca_bundles(api: FakeKubeApi) -> dict[str, str | None]:
    """Every webhook's caBundle (base64), by webhook name."""
    found = {}
    for kind, name in (("MutatingWebhookConfiguration", MUTATING),
                       ("ValidatingWebhookConfiguration", VALIDATING)):  # fmt: skip
        for hook in api.get(kind, "", name)["webhooks"]:
            found[hook["name"]] = hook["clientConfig"].get("caBundle")
    return found


def writes(api: FakeKubeApi, method: str, path: str) -> int:
    return sum(1 for m, p, _ in api.requests if (m, p) == (method, path))


async def served_certificate(
    port: int, ca_bundle_b64: str | None = None, *, dns: str = DNS
) -> x509.Certificate:
    """The certificate the webhook port serves. With a CA bundle, verified as the API server
    does (that CA, the Service's DNS name); without, just fetched."""
    context = ssl.create_default_context()
    if ca_bundle_b64 is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=base64.b64decode(ca_bundle_b64).decode())
    async with asyncio.timeout(WAIT):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=dns
        )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return x509.load_der_x509_certificate(der)
