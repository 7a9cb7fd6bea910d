"""The Grafana dashboard (helm/outrigger/dashboards/outrigger.json) is valid and cannot rot: every
metric its queries name is exported by a running in-process sidecar's /stats/prometheus."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.model import parse_mesh
from sidecar.app import Sidecar
from sidecar.settings import SidecarSettings
from sidecar.xds.interpret import snapshot_from_mesh

pytestmark = pytest.mark.timeout(30)

DASHBOARD = Path(__file__).resolve().parents[2] / "helm/outrigger/dashboards/outrigger.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\boutrigger_[a-z_]+")
WAIT = 5.0
# What a family of each type puts on the wire (the text format's sample names).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def queries(doc: dict[str, Any]) -> list[str]:
    """Every PromQL string: panel targets and the template variables' queries."""
    found = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def refused() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def exported_names() -> set[str]:
    """Sample names a sidecar with one service (after one request) exports."""
    settings = SidecarSettings.from_args(
        argparse.Namespace(
            config=None,
            mesh=None,
            control_plane=None,
            service="frontend",
            namespace=None,
            node_id=None,
            outbound="127.0.0.1:0",
            inbound="127.0.0.1:0",
            app="127.0.0.1:1",
            admin="127.0.0.1:0",
            drain_timeout="1s",
            snapshot_cache=None,
            access_log=None,
        )
    )
    sidecar = Sidecar(settings)
    doc = {"services": [{"name": "payments", "endpoints": [refused()]}]}
    sidecar.apply(snapshot_from_mesh(parse_mesh(doc, "test")))
    async with asyncio.timeout(WAIT):
        await sidecar.start()
    try:
        out_host, out_port = sidecar.addresses["outbound"]
        admin_host, admin_port = sidecar.addresses["admin"]
        async with httpx.AsyncClient(timeout=WAIT, trust_env=False) as client:
            resp = await client.get(f"http://{out_host}:{out_port}/", headers={"host": "payments"})
            assert resp.status_code == 503  # a request with a flag: every label is in use
            stats = await client.get(f"http://{admin_host}:{admin_port}/stats/prometheus")
            stats.raise_for_status()
    finally:
        async with asyncio.timeout(WAIT):
            await sidecar.drain()
    names: set[str] = set()
    for family in text_string_to_metric_families(stats.text):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_is_a_grafana_dashboard_with_datasource_and_destination_variables() -> None:
    doc = load()
    assert doc["title"] == "Outrigger"
    assert doc["uid"]
    assert 36 <= doc["schemaVersion"] <= 41
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    destination = variables["destination"]
    assert destination["type"] == "query"
    assert destination["datasource"] == DATASOURCE
    assert destination["includeAll"] and destination["multi"]
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    for panel in panels(doc):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert METRIC.search(target["expr"]), target["expr"]
            if re.search(r"by \([a-z, ]*destination", target["expr"]):
                # A per-destination series follows the variable.
                assert 'destination=~"$destination"' in target["expr"], target["expr"]


def test_dashboard_covers_the_golden_signals_retries_breakers_flags_and_config() -> None:
    exprs = "\n".join(queries(load()))
    for needle in (
        "rate(outrigger_requests_total",
        'code!~"5.."',
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        "outrigger_request_duration_seconds_bucket",
        "outrigger_retries_total",
        "outrigger_budget_exhausted_total",
        "outrigger_ejections_total",
        "outrigger_endpoints_ejected",
        "outrigger_endpoint_breaker_state",
        "sum by (flags)",
        "outrigger_config_info",
    ):
        assert needle in exprs, needle


async def test_every_metric_the_dashboard_queries_is_exported() -> None:
    used = {name for expr in queries(load()) for name in METRIC.findall(expr)}
    assert len(used) >= 10
    exported = await exported_names()
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics the sidecar does not export: {missing}"
