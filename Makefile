# One entry point for people and CI. `make test` runs every check CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The compiled codec (sidecar/protocol/native.pyx); `make install` builds it, and every target
# that runs the code rebuilds it in place when the .pyx changed.
NATIVE := sidecar/protocol/native$(shell $(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

.PHONY: install check lint typecheck test run demo bench clean lock manifests golden image-venv

# Every dependency at the version in requirements.lock (the versions the tests pass with; the
# image installs the same), by the install script the Dockerfile uses too.
$(STAMP): pyproject.toml requirements.lock setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	scripts/install.sh $(BIN)/python -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# (pip builds it as `make install` does: Cython and setuptools come from the build requirements.)
$(NATIVE): sidecar/protocol/native.pyx setup.py | $(STAMP)
	$(BIN)/pip install -q --no-deps -e .
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

# The throughput table (run.py), then the latency two sidecars add at 1,000 req/s against two nginx
# proxies and two Python floor forwarders in their places (latency.py, ~1 min 40 s).
bench: $(STAMP) $(NATIVE)
	$(BIN)/python tests/bench/run.py
	$(BIN)/python tests/bench/latency.py

# Re-resolve every dependency at its newest allowed version into a fresh venv and pin the result.
# Run `make clean install check` afterwards: the lock is what the tests pass with.
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	scripts/install.sh .lock-venv/bin/python -e '.[dev]'
	{ echo "# The versions the tests pass with: \`make lock\` writes this file (pip freeze of a fresh"; \
	  echo "# venv with '.[dev]'); \`make install\` and the Dockerfile install with it as constraints."; \
	  .lock-venv/bin/pip freeze --exclude outrigger; } > requirements.lock
	rm -rf .lock-venv

# What the Dockerfile's build stage does, in a fresh venv outside the tree: the runtime
# dependencies from requirements.lock, the package non-editable, then the commands answer.
# (No container engine runs here; CI runs this to prove the image's install recipe. The demo
# extra is in: the demo ships in the image.)
image-venv:
	rm -rf /tmp/outrigger-image-venv
	$(PY) -m venv /tmp/outrigger-image-venv
	scripts/install.sh /tmp/outrigger-image-venv/bin/python -c requirements.lock '.[demo]'
	cd /tmp && /tmp/outrigger-image-venv/bin/outrigger --help >/dev/null
	cd /tmp && /tmp/outrigger-image-venv/bin/outrigger control-plane --help >/dev/null
	cd /tmp && /tmp/outrigger-image-venv/bin/python -c "import sidecar.app, control_plane.app, outrigger.demo.run"
	cd /tmp && OUTRIGGER_CODEC=native /tmp/outrigger-image-venv/bin/python -c "import sidecar.protocol"
	rm -rf /tmp/outrigger-image-venv

# k8s/outrigger.yaml: the chart rendered with webhook.certificates=self (tests fail when stale).
manifests: $(STAMP)
	$(BIN)/python -m tests.helm.manifests > k8s/outrigger.yaml

# tests/helm/golden/: the default render with certificates masked, after a deliberate chart change.
golden: $(STAMP)
	$(BIN)/python -m tests.helm.golden

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build sidecar/protocol/native*.so
