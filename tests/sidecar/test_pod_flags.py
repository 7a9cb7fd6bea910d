"""The flags the injector gives a sidecar in a pod: --health, --metrics, --log-level,
--trace-sampling, and --detect-timeout beside them. Real `outrigger sidecar` processes."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.settings import SETTING_KEYS, SettingsError, SidecarSettings
from tests.sidecar.proxy_fixtures import WAIT, SidecarProcess

POD_PORTS = ("--health", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
MESH: dict[str, Any] = {
    "tracing": {"sampling": 0.25},
    "services": [{"name": "payments", "endpoints": ["127.0.0.1:9"]}],
}


def _args(**flags: Any) -> argparse.Namespace:
    values: dict[str, Any] = dict.fromkeys(SETTING_KEYS)
    values.update(config=None, service="web")
    values.update(flags)
    return argparse.Namespace(**values)


async def _until(client: httpx.AsyncClient, url: str, status: int) -> httpx.Response:
    """GET `url` until it answers `status` (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            response = await client.get(url)
            if response.status_code == status:
                return response
            await asyncio.sleep(0.05)


def test_the_pod_flags_default_to_off_and_laptop_friendly_values() -> None:
    settings = SidecarSettings.from_args(_args())
    assert (settings.health, settings.metrics, settings.trace_sampling) == (None, None, None)
    assert (settings.log_level, settings.detect_timeout) == ("info", 0.1)
    assert settings.tcp_idle_timeout == 3600.0  # Envoy's tcp_proxy default
    assert settings.stream_idle_timeout == 300.0  # Envoy's stream_idle_timeout default


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"health": "15021"}, r"^health: expected HOST:PORT"),
        ({"metrics": "0.0.0.0"}, r"^metrics: expected HOST:PORT"),
        ({"log_level": "loud"}, r"^log_level: must be one of debug, info, warning, error"),
        ({"trace_sampling": "2"}, r"^trace_sampling: must be"),
        ({"detect_timeout": "100"}, r"^detect_timeout: expected a duration"),
        ({"tcp_idle_timeout": "soon"}, r"^tcp_idle_timeout: expected a duration"),
        ({"stream_idle_timeout": "5"}, r"^stream_idle_timeout: expected a duration"),
    ],
)
def test_a_bad_pod_flag_names_the_flag_and_the_form(flags: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        SidecarSettings.from_args(_args(**flags))


async def test_healthz_stays_503_on_the_embedded_default_while_ready_turns_200(
    tmp_path: Path,
) -> None:
    # No control plane answers: after the initial fetch timeout the embedded default serves
    # traffic (/ready), yet the pod must not be declared ready on it (/healthz/ready).
    proc = await SidecarProcess.spawn(
        tmp_path,
        None,
        extra=(*POD_PORTS, "--control-plane", "127.0.0.1:1", "--initial-fetch-timeout", "100ms"),
    )
    try:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            await _until(client, proc.url("admin", "/ready"), 200)
            health = await client.get(proc.url("health", "/healthz/ready"))
            assert health.status_code == 503
            assert "embedded default only; no config from 127.0.0.1:1" in health.text
    finally:
        await proc.stop()


async def test_health_and_metrics_ports_serve_their_one_page(tmp_path: Path) -> None:
    proc = await SidecarProcess.spawn(tmp_path, MESH, extra=POD_PORTS)
    try:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            health = await _until(client, proc.url("health", "/healthz/ready"), 200)
            assert health.text == "ready\n"
            metrics = await client.get(proc.url("metrics", "/stats/prometheus"))
            assert metrics.status_code == 200
            assert 'outrigger_config_info{version="' in metrics.text
            # the pod IP's ports expose nothing else of the admin port
            for listener in ("health", "metrics"):
                assert (await client.post(proc.url(listener, "/drain"))).status_code == 404
                assert (await client.get(proc.url(listener, "/config_dump"))).status_code == 404
            assert (await client.get(proc.url("health", "/stats/prometheus"))).status_code == 404
    finally:
        await proc.stop()


async def test_trace_sampling_overrides_the_xds_value_and_config_dump_says_so(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    overridden = await SidecarProcess.spawn(tmp_path / "a", MESH, extra=("--trace-sampling", "0.5"))
    plain = await SidecarProcess.spawn(tmp_path / "b", MESH)
    try:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            dump = (await client.get(overridden.url("admin", "/config_dump"))).json()
            assert dump["trace_sampling"] == {
                "value": 0.5,
                "from": "--trace-sampling",
                "xds_value": 0.25,
            }
            dump = (await client.get(plain.url("admin", "/config_dump"))).json()
            assert dump["trace_sampling"]["value"] == 0.25
            assert dump["trace_sampling"]["from"].startswith("xDS")
    finally:
        await overridden.stop()
        await plain.stop()


async def test_log_level_debug_shows_debug_lines_and_warning_hides_info(tmp_path: Path) -> None:
    for level in ("debug", "warning"):
        (tmp_path / level).mkdir()
    debug = await SidecarProcess.spawn(tmp_path / "debug", MESH, extra=("--log-level", "debug"))
    quiet = await SidecarProcess.spawn(tmp_path / "warning", MESH, extra=("--log-level", "warning"))
    try:
        async with asyncio.timeout(WAIT):  # the start-up heap is frozen just after listening
            while " DEBUG " not in (tmp_path / "debug" / "sidecar.log").read_text():
                await asyncio.sleep(0.05)
        # logged before the listening line, at INFO: a warning-level sidecar never wrote it
        assert "applied config version" in (tmp_path / "debug" / "sidecar.log").read_text()
        assert "applied config version" not in (tmp_path / "warning" / "sidecar.log").read_text()
    finally:
        await debug.stop()
        await quiet.stop()
