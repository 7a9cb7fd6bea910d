"""`outrigger control-plane --webhook`: the real process serves /inject over HTTPS."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import httpx
import trustme

from tests.control_plane.webhooks.pods import assert_valid, pod
from tests.control_plane.webhooks.reviews import admission_review, answer_of, patched
from tests.e2e.mesh_processes import START_TIMEOUT, Processes

_WEBHOOK_LINE = re.compile(r"webhooks \(HTTPS\) on (?P<host>\S+):(?P<port>\d+)")


async def test_the_control_plane_process_injects_pods_over_https(
    procs: Processes, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key, mesh = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "mesh.yaml"
    server.cert_chain_pems[0].write_to_path(cert)
    server.private_key_pem.write_to_path(key)
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
    match = await child.wait_for_output(_WEBHOOK_LINE, START_TIMEOUT)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    review = admission_review(pod())
    async with httpx.AsyncClient(verify=context, timeout=5.0, trust_env=False) as client:
        reply = await client.post(f"https://127.0.0.1:{match['port']}/inject", json=review)
    assert reply.status_code == 200, child.output()
    injected = patched(review, answer_of(review, reply.content))
    assert_valid(injected)
    assert injected["spec"]["initContainers"][1]["image"] == "registry.example/outrigger:e2e"


async def test_the_webhook_flag_without_a_certificate_is_refused(procs: Processes) -> None:
    child = procs.start("control-plane", "control-plane", "--mesh", "/dev/null",
                        "--xds", "127.0.0.1:0", "--http", "127.0.0.1:0",
                        "--webhook", "127.0.0.1:0")  # fmt: skip
    assert child.popen.wait(timeout=START_TIMEOUT) != 0
    assert "--webhook needs --webhook-cert and --webhook-key" in child.output()
