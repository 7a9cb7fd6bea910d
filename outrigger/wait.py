"""`outrigger wait [--timeout 60s] [--url URL]`: block until the local sidecar is ready.

In plain-container mode the injector runs this as the proxy container's postStart hook: the
kubelet starts the app's containers only once the hook returns, so the app never runs before
its proxy can carry its traffic (Istio's holdApplicationUntilProxyStarts). It asks the
sidecar's health port every INTERVAL, each answer bounded by the time left, and exits 0 on the
first 200; after the timeout it exits 1 saying what it last got. Proxy variables are ignored:
the sidecar is local.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from mesh.model import parse_duration

DEFAULT_URL = "http://127.0.0.1:15021/healthz/ready"
INTERVAL = 0.25


def wait_ready(url: str, timeout: float, interval: float = INTERVAL) -> tuple[bool, str]:
    """(ready, what the sidecar last answered), within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(trust_env=False) as client:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, last
            try:
                reply = client.get(url, timeout=min(left, 1.0))
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if reply.status_code == 200:
                    return True, "200"
                last = f"HTTP {reply.status_code}"
            time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def run_wait(args: argparse.Namespace) -> int:
    timeout = parse_duration(args.timeout)
    if timeout is None:
        form = 'a duration like "60s" or "500ms"'
        print(f"outrigger wait: --timeout must be {form}, got {args.timeout!r}", file=sys.stderr)
        return 2
    url = args.url or DEFAULT_URL
    ready, last = wait_ready(url, timeout)
    if ready:
        print(f"outrigger wait: the sidecar is ready ({url})")
        return 0
    print(
        f"outrigger wait: the sidecar was not ready within {args.timeout} "
        f"({url}; last answer: {last})",
        file=sys.stderr,
    )
    return 1
