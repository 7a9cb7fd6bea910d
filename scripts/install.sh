#!/bin/sh
# Install Outrigger and its dependencies into one Python environment, in an order-proof way.
# `make install` (the dev venv) and the Dockerfile (the image) both use this script.
#
#   scripts/install.sh PYTHON PIP-INSTALL-ARGUMENTS...
#   scripts/install.sh .venv/bin/python -c requirements.lock -e '.[dev]'
#   scripts/install.sh /opt/outrigger/bin/python -c requirements.lock .
#
# The trap: xds-protos ships an old copy of opentelemetry/proto/ that overwrites
# opentelemetry-proto's files or is overwritten by them, depending on install order; with the
# old files the OTLP exporter fails to import. So after installing, reinstall the real
# opentelemetry-proto (the version just installed, without its dependencies) on top.
set -eu
if [ "$#" -lt 2 ]; then
    echo "usage: $0 PYTHON PIP-INSTALL-ARGUMENTS..." >&2
    exit 2
fi
python=$1
shift
"$python" -m pip install -q "$@"
version=$("$python" -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
"$python" -m pip install -q --no-deps --force-reinstall "opentelemetry-proto==$version"
# Prove the fix held: the OTLP exporter imports with the files now on disk.
"$python" -c "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter"
