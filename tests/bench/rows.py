"""The rows of the benchmark table: what wrk talks to, and how to start it.

A row is a name, a one-line description and a `start(env) -> Target` function. To add a row,
append a `Row` to `ROWS` (for Outrigger variants, `outrigger_row(...)` with a policy and/or a
tracing block). `run.py --rows a,b,c` selects rows by name; `DEFAULT_ROWS` is what `make bench`
runs.

Every row forwards to the same upstream: one nginx worker returning a fixed 1 KiB body at `/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from processes import BenchError, HttpResult, Proc, ProcessGroup, free_port, http_get, wait_until

BODY_SIZE = 1024
READY_TIMEOUT_S = 10.0
SIDECAR_READY_TIMEOUT_S = 15.0
MESH_SERVICE = "upstream"  # wrk sends `Host: upstream` to the sidecar's outbound listener
# Keep client and upstream connections open for the whole run in every proxy, so that no row
# measures connection churn the others do not (nginx closes after 1000 requests by default).
KEEPALIVE_REQUESTS = 10_000_000
MAX_CONNECTIONS = 8192
OUTRIGGER = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "outrigger"
# nginx `upstream { keepalive N; }` caches at most N idle upstream connections per worker and
# closes the rest, so with more concurrent requests than N it opens and closes an upstream
# connection for most requests (measured here: keepalive 64 at 256 connections halves nginx's
# req/s and doubles its CPU per request). HAProxy's `http-reuse always` has no such cap, and a
# sidecar pool should not have one either; so the default is above every connection count we
# run. `run.py --nginx-keepalive 64` reproduces the capped configuration.
NGINX_UPSTREAM_KEEPALIVE = 1024
# The upstream's stub_status page (requests answered so far); never loaded by wrk
UPSTREAM_STATUS_PATH = "/bench-upstream-status"


def make_body() -> bytes:
    """1024 bytes of printable ASCII with no quotes, `$`, `;` or backslashes (nginx-safe)."""
    pattern = b"outrigger-bench-0123456789-abcdefghijklmnopqrstuvwxyz-"
    return (pattern * (BODY_SIZE // len(pattern) + 1))[:BODY_SIZE]


@dataclass(frozen=True)
class Pins:
    """taskset CPU lists; None = not pinned."""

    wrk: str | None
    proxy: str | None
    upstream: str | None


@dataclass
class Env:
    """What every row's `start` gets: the process group, a work dir, the upstream, the pins."""

    group: ProcessGroup
    workdir: Path
    pins: Pins
    body: bytes
    upstream_port: int = 0
    nginx_keepalive: int = NGINX_UPSTREAM_KEEPALIVE
    outrigger: Path = OUTRIGGER
    # argv put before the sidecar's (cost.py runs it under `valgrind --tool=callgrind python`);
    # the floor rows run under it too, in place of their python
    sidecar_wrapper: tuple[str, ...] = ()
    sidecar_ready_timeout_s: float = SIDECAR_READY_TIMEOUT_S


@dataclass(frozen=True)
class Target:
    """A started row: wrk loads `url` (with `host`); `measured` is the process whose CPU and
    RSS are reported (the proxy under test; the upstream itself for `direct`); `stats_url` is
    the sidecar's /stats/prometheus (its event loop's longest stall), None for other rows."""

    url: str
    host: str | None
    listen: tuple[str, int]
    measured: Proc | None
    stats_url: str | None = None


@dataclass(frozen=True)
class Row:
    name: str
    description: str
    start: Callable[[Env], Target]


# --- checks ----------------------------------------------------------------------------------


def body_check(url: str, body: bytes, host: str | None = None) -> Callable[[], str | None]:
    """Ready when GET `url` answers 200 with exactly our 1 KiB body."""

    def check() -> str | None:
        r: HttpResult = http_get(url, host=host)
        if r.status == 200 and r.body == body:
            return None
        return f"status {r.status}, {len(r.body)} body bytes: {r.body[:200]!r}"

    return check


# --- nginx -----------------------------------------------------------------------------------


def _nginx_common(prefix: Path) -> str:
    return f"""daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {MAX_CONNECTIONS * 2};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {MAX_CONNECTIONS}; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""  access_log off;
  keepalive_requests {KEEPALIVE_REQUESTS};
  keepalive_timeout 300s;
  client_body_temp_path {prefix}/client_body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
"""


def _start_nginx(env: Env, name: str, conf_body: str, cpus: str | None) -> Proc:
    prefix = env.workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_body.replace("@PREFIX@", str(prefix)))
    return env.group.start(
        name,
        ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        cpus=cpus,
    )


def start_upstream(env: Env) -> tuple[Proc, int]:
    """The shared upstream: nginx, 1 worker, `return 200` with the 1 KiB body at `/`, and its
    request counter at UPSTREAM_STATUS_PATH (cost.py --wrk-connections counts requests with it)."""
    port = free_port()
    prefix = env.workdir / "upstream"
    conf = (
        _nginx_common(prefix)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = / {{
      default_type text/plain;
      return 200 "{env.body.decode("ascii")}";
    }}
    location = {UPSTREAM_STATUS_PATH} {{
      stub_status;
    }}
  }}
}}
"""
    )
    proc = _start_nginx(env, "upstream", conf, env.pins.upstream)
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, body_check(url, env.body), timeout_s=READY_TIMEOUT_S, what="upstream nginx")
    return proc, port


def start_direct(env: Env) -> Target:
    port = env.upstream_port
    upstream = next(p for p in env.group.procs if p.name == "upstream")
    return Target(
        url=f"http://127.0.0.1:{port}/", host=None, listen=("127.0.0.1", port), measured=upstream
    )


def start_nginx_proxy(env: Env) -> Target:
    return nginx_proxy(env, "nginx-proxy", env.upstream_port, env.pins.proxy)


def nginx_proxy(env: Env, name: str, upstream_port: int, cpus: str | None) -> Target:
    """nginx as a reverse proxy to 127.0.0.1:`upstream_port` (1 worker, upstream keepalive
    pool, no access log), started as `name` and checked to answer the 1 KiB body."""
    port = free_port()
    prefix = env.workdir / name
    conf = (
        _nginx_common(prefix)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""  upstream bench_upstream {{
    server 127.0.0.1:{upstream_port};
    keepalive {env.nginx_keepalive};
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://bench_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    )
    proc = _start_nginx(env, name, conf, cpus)
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, body_check(url, env.body), timeout_s=READY_TIMEOUT_S, what=name)
    return Target(url=url, host=None, listen=("127.0.0.1", port), measured=proc)


# --- HAProxy ---------------------------------------------------------------------------------


def start_haproxy(env: Env) -> Target:
    port = free_port()
    prefix = env.workdir / "haproxy"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "haproxy.cfg"
    conf.write_text(
        f"""global
  nbthread 1
  maxconn {MAX_CONNECTIONS}

defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  timeout http-request 300s

frontend bench
  bind 127.0.0.1:{port}
  default_backend upstream

backend upstream
  server upstream 127.0.0.1:{env.upstream_port}
"""
    )
    # -db: foreground, no daemon, no master-worker: one process with one thread.
    proc = env.group.start("haproxy", ["haproxy", "-db", "-f", str(conf)], cpus=env.pins.proxy)
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, body_check(url, env.body), timeout_s=READY_TIMEOUT_S, what="haproxy")
    return Target(url=url, host=None, listen=("127.0.0.1", port), measured=proc)


# --- the Python floor ------------------------------------------------------------------------

FLOOR = Path(__file__).resolve().parent / "floor.py"
# How often a floor under `Env.sidecar_wrapper` wakes (floor.py --wake), as the sidecar's
# connection sweep does every 0.5 s: callgrind_control is answered only by a running process.
FLOOR_WAKE_S = 0.5


def floor_row(name: str, description: str, *, task: bool) -> Row:
    """A row running `floor.py`: the least a uvloop + httptools forwarder does (its docstring)."""

    def start(env: Env) -> Target:
        return floor_proxy(env, name, env.upstream_port, env.pins.proxy, task=task)

    return Row(name=name, description=description, start=start)


def floor_proxy(
    env: Env, name: str, upstream_port: int, cpus: str | None, *, task: bool = False
) -> Target:
    """`floor.py` forwarding to 127.0.0.1:`upstream_port`, started as `name` and checked to
    answer the 1 KiB body."""
    port = free_port()
    python = env.outrigger.with_name("python")  # that venv has uvloop and httptools
    argv = [str(python), str(FLOOR), str(port), str(upstream_port)]
    argv += ["--task"] if task else []
    ready_s = READY_TIMEOUT_S
    if env.sidecar_wrapper:  # under callgrind as the sidecar is, woken for its control
        argv = [*env.sidecar_wrapper, *argv[1:], "--wake", str(FLOOR_WAKE_S)]
        ready_s = env.sidecar_ready_timeout_s
    proc = env.group.start(name, argv, cpus=cpus)
    url = f"http://127.0.0.1:{port}/"
    wait_until(proc, body_check(url, env.body), timeout_s=ready_s, what=name)
    return Target(url=url, host=None, listen=("127.0.0.1", port), measured=proc)


# --- Outrigger -------------------------------------------------------------------------------


def mesh_document(
    upstream_port: int,
    *,
    policy: Mapping[str, Any] | None,
    tracing: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The mesh file (README.md, "Mesh file"): one service `upstream` on the nginx."""
    service: dict[str, Any] = {
        "name": MESH_SERVICE,
        "namespace": "default",
        "port": 80,
        "endpoints": [f"127.0.0.1:{upstream_port}"],
    }
    if policy is not None:
        service["policy"] = dict(policy)
    doc: dict[str, Any] = {"outbound_policy": "allow_any", "services": [service]}
    if tracing is not None:
        doc["tracing"] = dict(tracing)
    return doc


@dataclass(frozen=True)
class Sidecar:
    """A started, ready `outrigger sidecar` and its listeners' ports (all on 127.0.0.1)."""

    proc: Proc
    outbound: int
    inbound: int
    admin: int

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}/stats/prometheus"


def start_sidecar(
    env: Env, name: str, mesh: Mapping[str, Any], *, app_port: int, cpus: str | None
) -> Sidecar:
    """`outrigger sidecar --mesh <mesh> --app 127.0.0.1:<app_port>` on free ports, waited for
    until its `/ready` answers 200 (bounded by `env.sidecar_ready_timeout_s`)."""
    outbound, inbound, admin = free_port(), free_port(), free_port()
    path = env.workdir / f"{name}.mesh.yaml"
    path.write_text(yaml.safe_dump(dict(mesh), sort_keys=False))
    argv = [
        *env.sidecar_wrapper,
        str(env.outrigger),
        "sidecar",
        "--mesh",
        str(path),
        "--service",
        "bench",
        "--outbound",
        f"127.0.0.1:{outbound}",
        "--inbound",
        f"127.0.0.1:{inbound}",
        "--app",
        f"127.0.0.1:{app_port}",
        "--admin",
        f"127.0.0.1:{admin}",
    ]
    proc = env.group.start(name, argv, cpus=cpus)

    def ready() -> str | None:
        r = http_get(f"http://127.0.0.1:{admin}/ready")
        return None if r.status == 200 else f"/ready answered {r.status}"

    try:
        wait_until(proc, ready, timeout_s=env.sidecar_ready_timeout_s, what=f"{name} readiness")
    except BenchError as exc:
        raise BenchError(f"sidecar failed to become ready: {exc}") from exc
    return Sidecar(proc, outbound, inbound, admin)


def outrigger_row(
    name: str,
    description: str,
    *,
    policy: Mapping[str, Any] | None = None,
    tracing_sampling: float | None = None,
) -> Row:
    """A row running one sidecar; wrk sends `Host: upstream` to its outbound listener."""

    def start(env: Env) -> Target:
        tracing: dict[str, Any] | None = None
        if tracing_sampling is not None:
            # Nothing listens there: spans are built and exported to a dead port (for now).
            tracing = {
                "sampling": tracing_sampling,
                "otlp_endpoint": f"http://127.0.0.1:{free_port()}",
            }
        mesh = mesh_document(env.upstream_port, policy=policy, tracing=tracing)
        sidecar = start_sidecar(env, name, mesh, app_port=env.upstream_port, cpus=env.pins.proxy)
        url = f"http://127.0.0.1:{sidecar.outbound}/"
        wait_until(
            sidecar.proc,
            body_check(url, env.body, host=MESH_SERVICE),
            timeout_s=READY_TIMEOUT_S,
            what="sidecar did not proxy GET / with Host: upstream to the 1 KiB body",
        )
        return Target(
            url=url,
            host=MESH_SERVICE,
            listen=("127.0.0.1", sidecar.outbound),
            measured=sidecar.proc,
            stats_url=sidecar.stats_url,
        )

    return Row(name=name, description=description, start=start)


# Every policy layer on, set so that none of them fires on a healthy upstream: the row measures
# the cost of the machinery, not of retries or rejections.
BENCH_POLICY: dict[str, Any] = {
    "timeout": "2s",
    "connect_timeout": "1s",
    "retries": {
        "attempts": 2,
        "per_try_timeout": "1s",
        "retry_on": ["connect-failure", "reset", "gateway-error", "503"],
        "backoff": {"base": "25ms", "max": "250ms"},
        "budget": {"percent": 20, "min_concurrency": 3},
    },
    "circuit_breaker": {
        "consecutive_failures": 5,
        "open_for": "30s",
        "max_ejection_percent": 50,
        "max_requests": MAX_CONNECTIONS,
        "max_pending": MAX_CONNECTIONS,
    },
    "load_balancer": "least_request",
}

ROWS: list[Row] = [
    Row("direct", "wrk → upstream nginx, no proxy (the ceiling)", start_direct),
    Row(
        "nginx",
        "wrk → nginx reverse proxy (1 worker, upstream keepalive pool) → upstream",
        start_nginx_proxy,
    ),
    Row("haproxy", "wrk → HAProxy (nbthread 1, http-reuse always) → upstream", start_haproxy),
    floor_row(
        "python-floor",
        "wrk → floor.py: uvloop + httptools, pooled upstream, no checks at all → upstream",
        task=False,
    ),
    floor_row(
        "python-floor-task",
        "floor.py --task: the same with one asyncio task per request (as layered policies use)",
        task=True,
    ),
    outrigger_row("outrigger", "wrk → Outrigger sidecar outbound (no policy) → upstream"),
    outrigger_row(
        "outrigger-policy",
        "sidecar with timeout + retries + breaker + least_request (none of them firing)",
        policy=BENCH_POLICY,
    ),
    outrigger_row(
        "outrigger-trace-1pct",
        "sidecar, tracing sampled at 1% (OTLP to a port where nothing listens)",
        tracing_sampling=0.01,
    ),
    outrigger_row(
        "outrigger-trace-100pct",
        "sidecar, tracing sampled at 100% (OTLP to a port where nothing listens)",
        tracing_sampling=1.0,
    ),
]

DEFAULT_ROWS = [
    "direct",
    "nginx",
    "haproxy",
    "python-floor",
    "python-floor-task",
    "outrigger",
    "outrigger-policy",
]


def by_name() -> dict[str, Row]:
    return {r.name: r for r in ROWS}
