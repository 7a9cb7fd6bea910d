"""Guards the install-order trap: xds-protos ships an old copy of opentelemetry/proto/ that can
overwrite opentelemetry-proto's files (the Makefile reinstalls opentelemetry-proto last)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata


def test_otlp_exporter_and_envoy_protos_import_in_one_process() -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_pb2
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    scope = InstrumentationScope(name="outrigger", version="1")
    assert InstrumentationScope.FromString(scope.SerializeToString()).name == "outrigger"
    assert cluster_pb2.Cluster(name="c").name == "c"
    assert listener_pb2.Listener(name="l").name == "l"
    assert callable(OTLPSpanExporter)


def test_opentelemetry_proto_files_are_the_ones_its_distribution_installed() -> None:
    files = importlib.metadata.files("opentelemetry-proto") or []
    checked = 0
    for record in files:
        if record.suffix != ".py" or record.hash is None or record.hash.mode != "sha256":
            continue
        digest = hashlib.sha256(record.locate().read_bytes()).digest()  # type: ignore[attr-defined]
        assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == record.hash.value, (
            f"{record} was overwritten (by xds-protos?); reinstall opentelemetry-proto last"
        )
        checked += 1
    assert checked > 10
