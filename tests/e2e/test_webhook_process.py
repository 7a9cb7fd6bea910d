"""`outrigger control-plane --webhook`: the real process serves /inject and /validate over HTTPS,
and the chart's own `helm test` script passes against it."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import trustme

from tests.control_plane.kube_api import service
from tests.control_plane.webhooks.pods import assert_valid, pod
from tests.control_plane.webhooks.reviews import admission_review, answer_of, patched
from tests.e2e.mesh_processes import START_TIMEOUT, Child, Processes
from tests.helm.chart import find, objects

_READY_LINE = re.compile(
    r"HTTP on (?P<http_host>\S+):(?P<http>\d+), webhooks \(HTTPS\) on \S+:(?P<port>\d+)"
)


@dataclass
class WebhookProcess:
    child: Child
    ca: trustme.CA
    ca_file: Path
    port: int
    http_port: int

    def client(self) -> httpx.AsyncClient:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{self.port}", verify=context, timeout=5.0, trust_env=False
        )


async def start_webhook_process(procs: Processes, tmp_path: Path) -> WebhookProcess:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key, mesh = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "mesh.yaml"
    server.cert_chain_pems[0].write_to_path(cert)
    server.private_key_pem.write_to_path(key)
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(ca_file)
    mesh.write_text("injection: {image: registry.example/outrigger:e2e}\n")
    child = procs.start(
        "control-plane",
        "control-plane",
        "--mesh", str(mesh),
        "--xds", "127.0.0.1:0",
        "--http", "127.0.0.1:0",
        "--webhook", "127.0.0.1:0",
        "--webhook-cert", str(cert),
        "--webhook-key", str(key),
    )  # fmt: skip
    match = await child.wait_for_output(_READY_LINE, START_TIMEOUT)
    return WebhookProcess(child, ca, ca_file, int(match["port"]), int(match["http"]))


async def test_the_control_plane_process_injects_pods_over_https(
    procs: Processes, tmp_path: Path
) -> None:
    webhook = await start_webhook_process(procs, tmp_path)
    review = admission_review(pod())
    async with webhook.client() as client:
        reply = await client.post("/inject", json=review)
    assert reply.status_code == 200, webhook.child.output()
    injected = patched(review, answer_of(review, reply.content))
    assert_valid(injected)
    assert injected["spec"]["initContainers"][1]["image"] == "registry.example/outrigger:e2e"


async def test_the_control_plane_process_validates_policy_annotations_over_https(
    procs: Processes, tmp_path: Path
) -> None:
    webhook = await start_webhook_process(procs, tmp_path)
    answers = []
    async with webhook.client() as client:
        for value in ("2s", "2 seconds"):
            obj = service("payments", "shop", annotations={"outrigger.dev/timeout": value})
            review = admission_review(obj, kind="Service")
            review["request"]["name"] = "payments"  # named objects arrive with their name
            reply = await client.post("/validate", json=review)
            assert reply.status_code == 200, webhook.child.output()
            answers.append(answer_of(review, reply.content))
    good, bad = answers
    assert good["allowed"] is True
    assert bad["allowed"] is False
    assert bad["status"]["message"] == (
        'outrigger.dev/timeout: must be a duration like "250ms", "1.5s", "2s" or "1m", '
        'got "2 seconds"'
    )
    assert "webhook /validate denied Service shop/payments" in webhook.child.output()


async def test_the_charts_helm_test_passes_against_the_control_plane_process(
    procs: Processes, tmp_path: Path
) -> None:
    """The script `helm test` runs in its pod, rendered by the chart, run here against the real
    process: /ready, /validate admits 2s and denies "soon", /inject admits a pod."""
    webhook = await start_webhook_process(procs, tmp_path)
    test_pod = find(objects(), "Pod", "outrigger-test")
    (container,) = test_pod["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(
        READY_URL=f"http://127.0.0.1:{webhook.http_port}/ready",
        WEBHOOK_URL=f"https://127.0.0.1:{webhook.port}",
        CA_FILE=str(webhook.ca_file),
    )
    assert (env["VALIDATE"], env["INJECT"]) == ("true", "true")
    script = await asyncio.create_subprocess_exec(
        sys.executable, "-c", container["args"][0],
        env={**env, "PATH": os.environ.get("PATH", "")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        output, _ = await script.communicate()
    text = output.decode()
    assert script.returncode == 0, text + webhook.child.output()
    assert "ok   /validate admits outrigger.dev/timeout: 2s" in text
    assert "ok   /validate denies outrigger.dev/timeout: soon" in text
    assert "ok   /inject admits a pod" in text


async def test_the_webhook_flag_without_a_certificate_is_refused(procs: Processes) -> None:
    child = procs.start("control-plane", "control-plane", "--mesh", "/dev/null",
                        "--xds", "127.0.0.1:0", "--http", "127.0.0.1:0",
                        "--webhook", "127.0.0.1:0")  # fmt: skip
    assert child.popen.wait(timeout=START_TIMEOUT) != 0
    assert "--webhook needs --webhook-cert and --webhook-key" in child.output()
