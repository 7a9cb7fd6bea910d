"""How fast the /inject webhook answers for a large pod (not collected by pytest).

    .venv/bin/python tests/bench/webhook.py [--reviews 500] [--containers 20] [--env 60]

Starts the real `outrigger control-plane --webhook` (certificates from trustme), then sends
AdmissionReviews for one large pod the way the API server does: one at a time on a kept-alive
HTTPS connection. Prints the review's size, the latency percentiles seen by the client (TLS,
HTTP, JSON both ways, the injection), the server's own mean from its
`outrigger_webhook_review_seconds` histogram (read to answer), and the CPU time of
`inject_pod` alone on the same pod. The aim is p99 under 100 ms; it is a figure, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trustme

from control_plane.webhooks.inject import inject_pod
from mesh.injection import Injection

_LINE = re.compile(rb"webhooks \(HTTPS\) on \S+:(\d+)")


def large_pod(containers: int, env: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "big-5d8f7c-",
            "namespace": "shop",
            "labels": {"app": "big", "pod-template-hash": "5d8f7c"},
            "annotations": {f"example.com/note-{i}": "x" * 200 for i in range(40)},
        },
        "spec": {
            "serviceAccountName": "big",
            "initContainers": [
                {"name": f"setup-{i}", "image": "busybox:1.36", "command": ["true"]}
                for i in range(5)
            ],
            "volumes": [{"name": f"data-{i}", "emptyDir": {}} for i in range(20)],
            "containers": [
                {
                    "name": f"app-{c}",
                    "image": f"registry.example/app-{c}:1.0",
                    "env": [{"name": f"SETTING_{i}", "value": "v" * 40} for i in range(env)],
                    "volumeMounts": [
                        {"name": f"data-{i}", "mountPath": f"/data/{i}"} for i in range(20)
                    ],
                }
                for c in range(containers)
            ],
        },
    }


def review(pod: dict[str, Any]) -> bytes:
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    request = {
        "uid": str(uuid.uuid4()),
        "kind": gvk,
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": gvk,
        "namespace": "shop",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod,
        "dryRun": False,
    }
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    return json.dumps(body).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(port: int, ca: trustme.CA, body: bytes, reviews: int) -> list[float]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    latencies: list[float] = []
    url = f"https://127.0.0.1:{port}/inject"
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(verify=context, timeout=10.0, trust_env=False) as client:
        for i in range(reviews + 20):  # the first 20 warm up (handshake, caches)
            started = time.perf_counter()
            reply = await client.post(url, content=body, headers=headers)
            elapsed = time.perf_counter() - started
            assert reply.status_code == 200 and b'"patchType":"JSONPatch"' in reply.content
            if i >= 20:
                latencies.append(elapsed)
    return latencies


def server_mean(port_http: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port_http}/metrics", trust_env=False).text
    total = float(re.search(r'review_seconds_sum\{path="/inject"\} (\S+)', text)[1])  # type: ignore[index]
    count = float(re.search(r'review_seconds_count\{path="/inject"\} (\S+)', text)[1])  # type: ignore[index]
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reviews", type=int, default=500)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--env", type=int, default=60, help="env entries per container")
    args = parser.parse_args()
    pod = large_pod(args.containers, args.env)
    body = review(pod)

    runs = 200
    started = time.process_time()
    for _ in range(runs):
        inject_pod(pod, namespace="shop", injection=Injection())
    inject_cpu = (time.process_time() - started) / runs

    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(Path(tmp, "tls.crt"))
        cert.private_key_pem.write_to_path(Path(tmp, "tls.key"))
        Path(tmp, "mesh.yaml").write_text("services: []\n")
        log = Path(tmp, "control-plane.log")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "outrigger.cli", "control-plane", "--mesh",
                 f"{tmp}/mesh.yaml", "--xds", "127.0.0.1:0", "--http", "127.0.0.1:0",
                 "--webhook", "127.0.0.1:0", "--webhook-cert", f"{tmp}/tls.crt",
                 "--webhook-key", f"{tmp}/tls.key"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 15
            while (match := _LINE.search(log.read_bytes())) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.05)
            http = int(re.search(rb"HTTP on \S+:(\d+)", log.read_bytes())[1])  # type: ignore[index]
            latencies = asyncio.run(measure(int(match[1]), ca, body, args.reviews))
            mean_server = server_mean(http)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    ms = [x * 1000 for x in latencies]
    print(
        f"pod: {args.containers} containers x {args.env} env, review {len(body) / 1024:.0f} KiB\n"
        f"inject_pod alone: {inject_cpu * 1e6:.0f} us CPU per pod\n"
        f"server, read to answer (mean): {mean_server * 1000:.2f} ms\n"
        f"client latency over {len(ms)} reviews on one kept-alive HTTPS connection: "
        f"p50 {statistics.median(ms):.2f} ms, p90 {percentile(ms, 0.90):.2f} ms, "
        f"p99 {percentile(ms, 0.99):.2f} ms, max {max(ms):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
