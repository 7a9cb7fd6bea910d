"""A control plane serving its admission webhooks over real HTTPS on 127.0.0.1 (trustme CA)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trustme

from control_plane.app import ControlPlane
from tests.control_plane.webhooks.reviews import answer_of

Json = dict[str, Any]
MESH = """
services: []
tracing:
  otlp_endpoint: "http://jaeger.tracing.svc:4317"
injection:
  image: registry.example/outrigger:{tag}
  control_plane: outrigger.mesh.svc:15010
"""


@dataclass
class Webhook:
    plane: ControlPlane
    ca: trustme.CA
    cert: Path
    key: Path
    mesh: Path

    @property
    def url(self) -> str:
        assert self.plane.webhooks is not None
        return f"https://127.0.0.1:{self.plane.webhooks.port}"

    def client(self, ca: trustme.CA | None = None) -> httpx.AsyncClient:
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        return httpx.AsyncClient(base_url=self.url, verify=context, timeout=5.0)

    async def review(self, review: Json, path: str = "/inject") -> Json:
        """The `response` of the answer to `review` (HTTP 200, JSON, the uid echoed)."""
        async with self.client() as client:
            reply = await client.post(path, json=review)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        return answer_of(review, reply.content)


def issue(ca: trustme.CA, cert: Path, key: Path) -> None:
    server = ca.issue_cert("127.0.0.1", "outrigger.outrigger-system.svc")
    server.cert_chain_pems[0].write_to_path(cert)
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(cert, append=True)
    server.private_key_pem.write_to_path(key)
