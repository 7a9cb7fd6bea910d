# One entry point for people and CI. `make test` runs every check CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install check lint typecheck test run demo bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# xds-protos ships an old copy of opentelemetry/proto/ that overwrites opentelemetry-proto's
	# files depending on install order; put the real ones back so the OTLP exporter imports.
	$(BIN)/pip install -q --no-deps --force-reinstall \
		"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check mesh sidecar control_plane outrigger tests
	$(BIN)/ruff format --check mesh sidecar control_plane outrigger tests

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck
	$(BIN)/pytest -q

test: check

# A sidecar in front of the example mesh (standalone), on the default ports.
run: $(STAMP)
	$(BIN)/outrigger sidecar --mesh examples/mesh.yaml --service frontend

# The whole mesh on this machine: control plane, frontend -> orders -> payments, traffic, live view.
demo: $(STAMP)
	$(BIN)/outrigger demo

bench: $(STAMP)
	$(BIN)/python tests/bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
