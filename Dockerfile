# syntax=docker/dockerfile:1
# One image for the control plane, the sidecar and the init container (`outrigger iptables`).
#
#   docker build -t registry.example/outrigger:0.1.0 .
#
# Dependencies come from requirements.lock (the versions the tests pass with), installed by
# scripts/install.sh, the same script `make install` runs (it undoes the xds-protos /
# opentelemetry-proto overwrite whatever the install order).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY scripts/install.sh scripts/install.sh
COPY requirements.lock pyproject.toml setup.py README.md ./
COPY mesh mesh
COPY sidecar sidecar
COPY control_plane control_plane
COPY outrigger outrigger
# gcc and libc6-dev compile the HTTP codec (sidecar/protocol/native.pyx; the slim image has the
# Python headers); the build fails unless the compiled codec loads. The final stage needs neither.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && python -m venv /opt/outrigger \
 && scripts/install.sh /opt/outrigger/bin/python -c requirements.lock '.[demo]' \
 && OUTRIGGER_CODEC=native /opt/outrigger/bin/python -c "import sidecar.protocol" \
 && /opt/outrigger/bin/outrigger --help >/dev/null

FROM ${PYTHON_IMAGE}
# iptables for the init container (iptables-restore; nft and legacy backends both ship).
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 outrigger \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin outrigger
COPY --from=build /opt/outrigger /opt/outrigger
ENV PATH=/opt/outrigger/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The sidecar's uid: its own traffic is never redirected. The injector runs the init
# container as root (NET_ADMIN, NET_RAW); everything else runs as this user.
USER 1337:1337
ENTRYPOINT ["outrigger"]
CMD ["--help"]
