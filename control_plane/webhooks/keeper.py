"""`webhook.certificates: self`: the control plane keeps its webhooks' CA and serving
certificate in its own Secret, and that CA in the `caBundle` of its own two webhook
configurations, as istiod does. The certificates themselves are `authority`'s.

Several replicas start at once and share the one Secret. The Kubernetes API's optimistic
concurrency makes that safe without a lock or a leader:

1. GET the Secret. Material that is sound, for this DNS name and not due for renewal
   (`authority.review`) is used as it is: a restarted or second replica reuses what is stored.
2. Otherwise make new material (`authority.renew`: from the stored CA when that is sound) and
   PUT the Secret carrying the resourceVersion that was read. The first writer wins; the
   others get 409 Conflict, read again, and use what the winner wrote.
3. Each webhook configuration: GET it; where a webhook's caBundle differs from `ca.crt`, PATCH
   (a strategic merge by webhook name, carrying the resourceVersion read: 409 reads again).
   A configuration that already trusts a newer CA than this replica read means another
   replica wrote the Secret after this one read it: read the Secret again rather than undo it.
4. Only then hand the serving pair to the webhook server, so the API server trusts a new CA
   before any replica serves a certificate it signed.

Every `interval` (default 1 h) it does all of it again: that is how renewals happen, and how a
replica picks up another's. A failure (the API unreachable, RBAC) is logged and counted, the
pair served so far stays, and it is tried again after a backoff.

API calls: get and update on the one Secret, get and patch on the two configurations: what
the chart's Role and ClusterRole grant, by resourceNames. The Secret must exist (the chart
makes it empty), because RBAC cannot limit `create` to one name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client as kube_client
from prometheus_client import CollectorRegistry, Counter, Gauge

from control_plane.sources.reflector import Backoff, api_call
from control_plane.webhooks.authority import (
    Lifetimes,
    MaterialError,
    TlsMaterial,
    from_secret_data,
    newest_ca,
    renew,
    review,
)

log = logging.getLogger("outrigger.control_plane.webhooks")

INTERVAL: Final = 3600.0
MAX_CONFLICTS: Final = 5
TIMEOUT: Final = (10.0, 30.0)  # connect, read


class KeeperError(Exception):
    """A step that failed; the message names the object, what the API said and the fix."""


@dataclass(frozen=True, slots=True)
class SelfCertificates:
    """What the chart passes in self mode (`--webhook-secret`, `--webhook-dns-name`,
    `--mutating-webhook-configuration`, `--validating-webhook-configuration`)."""

    namespace: str  # the Secret's (POD_NAMESPACE)
    secret: str
    dns_name: str  # <service>.<namespace>.svc
    mutating: str | None = None
    validating: str | None = None


class KeeperMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.expiry = Gauge(
            "outrigger_webhook_certificate_expiry_timestamp_seconds",
            "When the webhook's serving certificate expires (Unix time; certificates=self)",
            registry=registry,
        )
        self.secret_writes = Counter(
            "outrigger_webhook_secret_writes",
            "Writes of new webhook certificates to the Secret, by result (written; conflict: "
            "another replica wrote first and its certificate is used)",
            ["result"],
            registry=registry,
        )
        self.ca_bundle_patches = Counter(
            "outrigger_webhook_ca_bundle_patches",
            "Patches of caBundle into a webhook configuration, by kind",
            ["kind"],
            registry=registry,
        )
        self.failures = Counter(
            "outrigger_webhook_certificate_failures",
            "Rounds of keeping the webhook certificates that failed (logged; retried)",
            registry=registry,
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True, slots=True)
class _Configuration:
    kind: str
    name: str
    read: Callable[..., Any]
    patch: Callable[..., Any]


class CertificateKeeper:
    def __init__(
        self,
        configuration: Any,
        settings: SelfCertificates,
        *,
        registry: CollectorRegistry | None = None,
        lifetimes: Lifetimes | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], datetime.datetime] = _now,
        on_material: Callable[[TlsMaterial], None] | None = None,
    ) -> None:
        self.settings = settings
        self.lifetimes = lifetimes if lifetimes is not None else Lifetimes()
        self.interval = interval
        self.clock = clock
        self.on_material = on_material
        self.metrics = KeeperMetrics(registry if registry is not None else CollectorRegistry())
        self.material: TlsMaterial | None = None  # what the webhook server was handed last
        self.backoff = Backoff(1.0, 300.0)
        self._api = kube_client.ApiClient(configuration)
        self._core = kube_client.CoreV1Api(self._api)
        admission = kube_client.AdmissionregistrationV1Api(self._api)
        mutating = _Configuration(
            "MutatingWebhookConfiguration",
            settings.mutating or "",
            admission.read_mutating_webhook_configuration,
            admission.patch_mutating_webhook_configuration,
        )
        validating = _Configuration(
            "ValidatingWebhookConfiguration",
            settings.validating or "",
            admission.read_validating_webhook_configuration,
            admission.patch_validating_webhook_configuration,
        )
        self._configurations = [c for c in (mutating, validating) if c.name]

    @property
    def where(self) -> str:
        return f"Secret {self.settings.namespace}/{self.settings.secret}"

    # -- one round ------------------------------------------------------------------------------

    async def settle(self) -> TlsMaterial:
        """Make sure the Secret holds current material and both configurations trust its CA,
        then hand the pair over if it changed. Raises KeeperError."""
        material = await self.ensure()
        if not await self.publish(material, defer_to_newer=True):
            log.info(
                "a webhook configuration trusts a newer CA than %s had: reading it again",
                self.where,
            )
            material = await self.ensure()
            await self.publish(material, defer_to_newer=False)
        if material != self.material:
            self.material = material
            self.metrics.expiry.set(material.not_after.timestamp())
            if self.on_material is not None:
                self.on_material(material)
        return material

    async def ensure(self) -> TlsMaterial:
        """The Secret's material, after writing new material when it is missing, unsound or due
        (the first writer wins; see the module's docstring)."""
        for _ in range(MAX_CONFLICTS):
            secret = await self._read_secret()
            stored: TlsMaterial | None = None
            try:
                stored = from_secret_data(secret.get("data"))
                reason = review(stored, self.settings.dns_name, self.clock())
            except MaterialError as exc:
                reason = str(exc)
            if stored is not None and reason is None:
                return stored
            fresh = renew(stored, self.settings.dns_name, self.clock(), self.lifetimes)
            secret["data"] = {**(secret.get("data") or {}), **fresh.secret_data()}
            status, _ = await self._call(
                f"update {self.where}",
                self._core.replace_namespaced_secret,
                self.settings.secret,
                self.settings.namespace,
                secret,
            )
            if status == 409:
                self.metrics.secret_writes.labels("conflict").inc()
                log.info(
                    "%s was written by another replica meanwhile: using its certificate", self.where
                )
                continue
            self.metrics.secret_writes.labels("written").inc()
            log.info(
                "wrote a new webhook certificate for %s to %s (%s)",
                self.settings.dns_name,
                self.where,
                reason,
            )
            return fresh
        raise KeeperError(f"{self.where} changed under every one of {MAX_CONFLICTS} attempts")

    async def publish(self, material: TlsMaterial, *, defer_to_newer: bool) -> bool:
        """Every webhook's caBundle = ca.crt, patched only where it differs. False (nothing
        patched in that configuration) when it trusts a newer CA than `material` and
        `defer_to_newer`."""
        wanted = material.ca_bundle_b64
        ours = newest_ca(material.ca_bundle)
        for config in self._configurations:
            what = f"{config.kind} {config.name}"
            for _ in range(MAX_CONFLICTS):
                _, found = await self._call(f"get {what}", config.read, config.name)
                hooks = found.get("webhooks") or []
                stale = [
                    h for h in hooks if (h.get("clientConfig") or {}).get("caBundle") != wanted
                ]
                if not stale:
                    break
                if (
                    defer_to_newer
                    and ours is not None
                    and any((theirs := _newest_in(h)) is not None and theirs > ours for h in stale)
                ):
                    return False
                patch = {
                    "metadata": {"resourceVersion": found["metadata"]["resourceVersion"]},
                    "webhooks": [
                        {"name": h["name"], "clientConfig": {"caBundle": wanted}} for h in stale
                    ],
                }
                status, _ = await self._call(f"patch {what}", config.patch, config.name, patch)
                if status == 409:
                    continue
                self.metrics.ca_bundle_patches.labels(config.kind).inc()
                log.info("patched caBundle of %s (%s)", what, ", ".join(h["name"] for h in stale))
                break
            else:
                raise KeeperError(f"{what} changed under every one of {MAX_CONFLICTS} attempts")
        return True

    # -- lifetime -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Settle every `interval` until cancelled; after a failure, sooner (backoff)."""
        delay = self.interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.settle()
            except Exception as exc:  # KeeperError, or a bug: either way the loop must live on
                self.metrics.failures.inc()
                delay = min(self.interval, self.backoff.next_delay())
                log.error(
                    "webhook certificates (self): %s; the current pair stays; trying "
                    "again in %.0fs",
                    exc,
                    delay,
                    exc_info=not isinstance(exc, KeeperError),
                )
            else:
                self.backoff.reset()
                delay = self.interval

    async def close(self) -> None:
        await self._api.close()

    # -- API ------------------------------------------------------------------------------------

    async def _read_secret(self) -> dict[str, Any]:
        _, secret = await self._call(
            f"get {self.where}",
            self._core.read_namespaced_secret,
            self.settings.secret,
            self.settings.namespace,
        )
        return secret

    async def _call(
        self, what: str, method: Callable[..., Any], *args: Any
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for 2xx and 409; KeeperError for anything else."""
        try:
            status, body = await api_call(method, *args, timeout=TIMEOUT)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KeeperError(f"{what}: {exc or type(exc).__name__}") from None
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            parsed = {"message": body[:200].decode("utf-8", "replace")}
            if 200 <= status < 300:
                raise KeeperError(f"{what}: HTTP {status} but not a JSON object: {parsed}")
        if 200 <= status < 300 or status == 409:
            return status, parsed
        message = parsed.get("message", "")
        raise KeeperError(f"{what}: HTTP {status}: {message}{self._hint(status, what)}")

    def _hint(self, status: int, what: str) -> str:
        if status == 403:
            return (
                " (RBAC: the control plane's service account needs get and update on "
                f"{self.where} and get and patch on its webhook configurations, by name, "
                "as the chart's Role and ClusterRole grant)"
            )
        if status == 404 and "Secret" in what:
            return (
                f" (the chart creates this Secret, empty; without the chart: kubectl -n "
                f"{self.settings.namespace} create secret generic {self.settings.secret})"
            )
        if status == 404:
            return (
                " (--mutating-webhook-configuration and --validating-webhook-configuration "
                "name the chart's, which must exist)"
            )
        return ""


def _newest_in(hook: dict[str, Any]) -> datetime.datetime | None:
    try:
        bundle = base64.b64decode((hook.get("clientConfig") or {}).get("caBundle") or "")
    except (binascii.Error, ValueError):
        return None
    return newest_ca(bundle)
