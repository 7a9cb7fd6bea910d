"""`webhook.certificates: self`: control planes make, share, renew and publish their webhooks'
certificate through the Kubernetes API (the strict fake API server, seeded with the objects the
chart renders), and serve it over real TLS that trusts what the API server would."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import ssl

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from control_plane.app import ControlPlaneError, UsageError, start_from_args
from control_plane.webhooks.authority import TlsMaterial
from outrigger.cli import build_parser
from tests.control_plane.kube_api import running_api, until
from tests.control_plane.webhooks.pods import pod
from tests.control_plane.webhooks.reviews import admission_review, answer_of
from tests.control_plane.webhooks.self_certs import (
    CONFIG_PATHS,
    DNS,
    MUTATING,
    SECRET,
    SECRET_PATH,
    Clock,
    ca_bundles,
    replica,
    secret_data,
    seed_chart_objects,
    served_certificate,
    writes,
)
from tests.helm.chart import NAMESPACE

DAY = datetime.timedelta(days=1)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


async def test_a_first_replica_fills_the_secret_patches_both_configurations_and_serves() -> None:
    async with running_api() as api:
        seed_chart_objects(api)
        assert set(ca_bundles(api).values()) == {None}  # the chart leaves them to us
        async with replica(api) as one:
            data = secret_data(api)
            assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
            bundle = base64.b64encode(data["ca.crt"]).decode()
            assert ca_bundles(api) == {
                "namespace.inject.outrigger.dev": bundle,
                "object.inject.outrigger.dev": bundle,
                "validate.outrigger.dev": bundle,
            }
            # The API server's view: the caBundle it was given vouches for the Service's name.
            served = await served_certificate(one.port, bundle)
            assert pem(served) == data["tls.crt"]
            review = admission_review(pod())
            context = ssl.create_default_context(cadata=data["ca.crt"].decode())
            async with httpx.AsyncClient(verify=context, timeout=5) as client:
                reply = await client.post(
                    f"https://127.0.0.1:{one.port}/inject",
                    json=review,
                    extensions={"sni_hostname": DNS},
                )
            assert answer_of(review, reply.content)["allowed"] is True
            expiry = one.metric("outrigger_webhook_certificate_expiry_timestamp_seconds")
            assert expiry == served.not_valid_after_utc.timestamp()
            assert one.metric("outrigger_webhook_secret_writes_total", result="written") == 1


async def test_replicas_starting_at_once_agree_on_one_certificate() -> None:
    async with running_api() as api, contextlib.AsyncExitStack() as stack:
        seed_chart_objects(api)
        # Both read the empty Secret, and later the unpatched configuration, at the same time.
        api.hold_reads("Secret")
        api.hold_reads("MutatingWebhookConfiguration")
        first, second = await asyncio.gather(
            stack.enter_async_context(replica(api)), stack.enter_async_context(replica(api))
        )
        # One write won; the other got 409 Conflict and took the winner's certificate.
        assert writes(api, "PUT", SECRET_PATH) == 2
        outcomes = sorted(
            (r.metric("outrigger_webhook_secret_writes_total", result="written"),
             r.metric("outrigger_webhook_secret_writes_total", result="conflict"))
            for r in (first, second)
        )  # fmt: skip
        assert outcomes == [(0, 1), (1, 0)]
        data = secret_data(api)
        for one in (first, second):
            assert pem(await served_certificate(one.port)) == data["tls.crt"]
        bundle = base64.b64encode(data["ca.crt"]).decode()
        assert set(ca_bundles(api).values()) == {bundle}
        # Both patched the mutating configuration from the same version: one won, one reread.
        assert writes(api, "PATCH", CONFIG_PATHS["MutatingWebhookConfiguration"]) == 2
        patched = sum(
            r.metric("outrigger_webhook_ca_bundle_patches_total",
                     kind="MutatingWebhookConfiguration")
            for r in (first, second)
        )  # fmt: skip
        assert patched == 1


async def test_a_restarted_replica_reuses_the_stored_certificate_and_writes_nothing() -> None:
    async with running_api() as api:
        seed_chart_objects(api)
        async with replica(api):
            before = secret_data(api)
        requests = len(api.requests)
        async with replica(api) as again:
            assert pem(await served_certificate(again.port)) == before["tls.crt"]
        assert secret_data(api) == before
        assert {m for m, _, _ in api.requests[requests:]} == {"GET"}  # no PUT, no PATCH


async def test_the_serving_certificate_is_renewed_before_expiry_and_ca_bundle_stays() -> None:
    clock = Clock()
    async with running_api() as api:
        seed_chart_objects(api)
        async with replica(api, clock=clock, interval=0.05) as one:
            before = secret_data(api)
            bundles = ca_bundles(api)
            patches = writes(api, "PATCH", CONFIG_PATHS["MutatingWebhookConfiguration"])
            clock.offset = 250 * DAY  # 115 of 365 days left: due
            await until("the new certificate written", lambda: secret_data(api) != before)
            after = secret_data(api)
            assert after["ca.crt"] == before["ca.crt"] and after["ca.key"] == before["ca.key"]
            assert after["tls.crt"] != before["tls.crt"]
            served = await until_served(one.port, after["tls.crt"])
            assert served.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + 600 * DAY
            assert ca_bundles(api) == bundles
            assert writes(api, "PATCH", CONFIG_PATHS["MutatingWebhookConfiguration"]) == patches


async def until_served(port: int, cert_pem: bytes) -> x509.Certificate:
    for _ in range(200):
        served = await served_certificate(port)
        if pem(served) == cert_pem:
            return served
        await asyncio.sleep(0.02)
    raise AssertionError("the webhook never served the new certificate")


async def test_a_new_ca_is_trusted_before_it_is_served_and_a_stale_replica_does_not_undo_it() -> (
    None
):
    clock = Clock()
    async with running_api() as api:
        seed_chart_objects(api)
        async with replica(api, clock=clock) as a, replica(api, clock=clock) as b:
            old = secret_data(api)
            stale = TlsMaterial(old["ca.crt"], old["ca.key"], old["tls.crt"], old["tls.key"])
            clock.offset = 2500 * DAY  # the CA has less than a third of its ten years left
            await a.keeper.settle()
            new = secret_data(api)
            new_ca, old_ca = x509.load_pem_x509_certificates(new["ca.crt"])
            assert pem(old_ca) == old["ca.crt"]
            x509.load_pem_x509_certificate(new["tls.crt"]).verify_directly_issued_by(new_ca)
            # Trusted first: every webhook's caBundle holds both CAs, so b, still serving the
            # old CA's certificate, stays trusted while a serves the new CA's.
            bundle = base64.b64encode(new["ca.crt"]).decode()
            assert set(ca_bundles(api).values()) == {bundle}
            assert pem(await served_certificate(a.port)) == new["tls.crt"]
            assert pem(await served_certificate(b.port, bundle)) == old["tls.crt"]
            # b read the Secret before a wrote it: it must not put the old bundle back.
            patches = len([r for r in api.requests if r[0] == "PATCH"])
            assert await b.keeper.publish(stale, defer_to_newer=True) is False
            await b.keeper.settle()
            assert len([r for r in api.requests if r[0] == "PATCH"]) == patches
            assert set(ca_bundles(api).values()) == {bundle}
            assert pem(await served_certificate(b.port)) == new["tls.crt"]


async def test_a_ca_bundle_someone_removed_is_patched_back_and_only_there() -> None:
    async with running_api() as api:
        seed_chart_objects(api)
        async with replica(api) as one:
            bundle = ca_bundles(api)["validate.outrigger.dev"]

            def wipe(config: dict[str, object]) -> None:
                hooks = config["webhooks"]
                assert isinstance(hooks, list)
                del hooks[1]["clientConfig"]["caBundle"]

            api.edit("MutatingWebhookConfiguration", "", MUTATING, wipe)
            validating = writes(api, "PATCH", CONFIG_PATHS["ValidatingWebhookConfiguration"])
            await one.keeper.settle()
            assert set(ca_bundles(api).values()) == {bundle}
            assert writes(api, "PATCH", CONFIG_PATHS["ValidatingWebhookConfiguration"]) == (
                validating
            )


async def test_when_the_api_fails_later_the_current_certificate_keeps_serving() -> None:
    async with running_api() as api:
        seed_chart_objects(api)
        async with replica(api, interval=0.05) as one:
            before = await served_certificate(one.port)
            one.keeper.backoff.base = 0.05
            await api.stop()
            await until(
                "a failure counted",
                lambda: one.metric("outrigger_webhook_certificate_failures_total") >= 2,
            )
            assert await served_certificate(one.port) == before
            await api.start()


async def test_without_its_secret_the_control_plane_says_how_to_make_it() -> None:
    async with running_api() as api:
        seed_chart_objects(api)
        api.objects["Secret"].clear()
        with pytest.raises(ControlPlaneError) as refused:
            async with replica(api):
                pass
    assert str(refused.value) == (
        f"webhook certificates (--webhook-secret): get Secret {NAMESPACE}/{SECRET}: HTTP 404: "
        f'secrets "{SECRET}" not found (the chart creates this Secret, empty; without the '
        f"chart: kubectl -n {NAMESPACE} create secret generic {SECRET})"
    )


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["control-plane", "--mesh=m.yaml", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--webhook=127.0.0.1:0",), "--webhook needs --webhook-cert and --webhook-key"),
        (
            ("--webhook=127.0.0.1:0", "--webhook-secret=s", "--webhook-cert=c", "--webhook-key=k"),
            "--webhook-secret and --webhook-cert/--webhook-key exclude each other",
        ),
        (("--webhook-secret=s", f"--webhook-dns-name={DNS}"), "--webhook-secret needs --webhook"),
        (("--webhook=127.0.0.1:0", "--webhook-secret=s"), "needs --webhook-dns-name"),
        (
            ("--webhook=127.0.0.1:0", "--webhook-secret=s", f"--webhook-dns-name={DNS}"),
            "the Secret's namespace comes from the POD_NAMESPACE environment variable",
        ),
    ],
)
async def test_self_certificate_flags_that_do_not_fit_are_refused(
    argv: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(UsageError, match=message):
        await start_from_args(args(*argv))
