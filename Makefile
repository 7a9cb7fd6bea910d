# One entry point for people and CI. `make test` runs every check CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The compiled codec (sidecar/protocol/native.pyx); `make install` builds it, and every target
# that runs the code rebuilds it in place when the .pyx changed.
NATIVE := sidecar/protocol/native$(shell $(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

.PHONY: install check lint typecheck test run demo bench clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# xds-protos ships an old copy of opentelemetry/proto/ that overwrites opentelemetry-proto's
	# files depending on install order; put the real ones back so the OTLP exporter imports.
	$(BIN)/pip install -q --no-deps --force-reinstall \
		"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

$(NATIVE): sidecar/protocol/native.pyx setup.py | $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $(NATIVE)

install: $(STAMP) $(NATIVE)

lint: $(STAMP)
	$(BIN)/ruff check mesh sidecar control_plane outrigger tests
	$(BIN)/ruff format --check mesh sidecar control_plane outrigger tests

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck $(NATIVE)
	$(BIN)/pytest -q

test: check

# A sidecar in front of the example mesh (standalone), on the default ports.
run: $(STAMP) $(NATIVE)
	$(BIN)/outrigger sidecar --mesh examples/mesh.yaml --service frontend

# The whole mesh on this machine: control plane, frontend -> orders -> payments, traffic, live view.
demo: $(STAMP) $(NATIVE)
	$(BIN)/outrigger demo

bench: $(STAMP) $(NATIVE)
	$(BIN)/python tests/bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build sidecar/protocol/native*.so
