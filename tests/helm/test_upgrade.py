"""certificates=chart keeps its CA across `helm upgrade`: the chart's `lookup` finds the Secret
the install made and reuses it. An offline render (`helm template`) cannot look anything up, so
this test renders cluster-aware, as `helm upgrade` does, against a stand-in API server that
speaks the Kubernetes wire protocol for what `lookup` asks (discovery of v1, GET of a Secret)
and answers 404 Status objects to anything else."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import helm_python
import pytest

from tests.helm.chart import NAMESPACE, RELEASE, chart, documents, find, objects

SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/outrigger-webhook-tls"
V1_RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {
            "name": "secrets",
            "singularName": "secret",
            "namespaced": True,
            "kind": "Secret",
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }
    ],
}


class ApiServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ApiHandler)
        self.secret: dict[str, Any] | None = None
        self.paths: list[str] = []


class ApiHandler(http.server.BaseHTTPRequestHandler):
    server: ApiServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.paths.append(path)
        if path == "/api/v1":
            self.answer(200, V1_RESOURCES)
        elif path == SECRET_PATH and self.server.secret is not None:
            self.answer(200, self.server.secret)
        else:
            status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
            self.answer(404, {**status, "reason": "NotFound", "code": 404})

    def answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


def upgrade_render(api: ApiServer) -> list[dict[str, Any]]:
    host, port = api.server_address[:2]
    kubeconfig = json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": f"http://{host!s}:{port}"}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
    )
    with helm_python.Config(kubeconfig_content=kubeconfig, namespace=NAMESPACE) as config:
        rendered = config.render(chart(), {}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    return documents(rendered)


def bundles(objs: list[dict[str, Any]]) -> set[str]:
    configs = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
    return {
        h["clientConfig"]["caBundle"] for o in objs if o["kind"] in configs for h in o["webhooks"]
    }


def test_an_upgrade_reuses_the_ca_and_certificate_the_install_made(api: ApiServer) -> None:
    installed = find(objects(), "Secret", "outrigger-webhook-tls")
    api.secret = {**installed, "metadata": {**installed["metadata"], "resourceVersion": "41"}}
    upgraded = upgrade_render(api)
    assert SECRET_PATH in api.paths  # the render really asked the cluster
    assert find(upgraded, "Secret", "outrigger-webhook-tls")["data"] == installed["data"]
    assert bundles(upgraded) == {installed["data"]["ca.crt"]}


def test_without_a_secret_in_the_cluster_a_new_ca_is_made(api: ApiServer) -> None:
    upgraded = upgrade_render(api)
    assert SECRET_PATH in api.paths
    secret = find(upgraded, "Secret", "outrigger-webhook-tls")
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert bundles(upgraded) == {secret["data"]["ca.crt"]}


def test_an_incomplete_secret_is_replaced_not_half_reused(api: ApiServer) -> None:
    installed = find(objects(), "Secret", "outrigger-webhook-tls")
    partial = {k: v for k, v in installed["data"].items() if k != "tls.key"}
    api.secret = {**installed, "data": partial}
    secret = find(upgrade_render(api), "Secret", "outrigger-webhook-tls")
    assert secret["data"]["ca.crt"] != installed["data"]["ca.crt"]
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
