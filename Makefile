# swarm: the Makefile is the interface. `make run` and `make test` do all set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SWARM := $(VENV)/bin/swarm
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
MODEL ?= smollm2-135m
BENCH_MODELS ?= smollm2-135m gemma3-270m

.PHONY: install install-dev system-deps browser cross-compiler models run chat test lint bench clean

# What a node needs (runtime dependencies and the default model): kept lean so that
# `make run` on a fresh clone serves its first reply within about a minute.
install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	# pip 24.1+ reports download progress as numbers, which the dashboard shows.
	$(PY) -m pip install --quiet --upgrade 'pip>=24.1'
	$(PY) -m pip install --quiet -e .
	$(PY) -m kernels.cpu.build || echo "note: CPU qmatmul kernel not built; packed weights use the reference path"
	$(SWARM) pull smollm2-135m
	touch $(STAMP)

# Test and lint tools, and the official API clients the tests drive the node with.
install-dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

# libsodium for libnacl (the peer transport's crypto); Debian's package.
system-deps:
	@ldconfig -p | grep -q libsodium || { apt-get update -qq && apt-get install -y -qq libsodium23; }

# Debian's Chromium for the dashboard's browser tests (Playwright drives it; its own
# browser download is never used). Where it cannot be installed those tests skip.
browser:
	@test -x /usr/bin/chromium || { command -v apt-get > /dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "note: chromium not installed; tests/test_browser.py will skip"

# An ARM cross compiler and qemu's user-mode emulator, with which the tests build the CPU
# kernels for ARM machines and run them (tests/test_kernels_arm.py). Where they cannot
# be installed those tests skip.
cross-compiler:
	@{ command -v aarch64-linux-gnu-g++ > /dev/null && command -v qemu-aarch64 > /dev/null; } || \
		{ command -v apt-get > /dev/null && apt-get update -qq && \
		apt-get install -y -qq g++-aarch64-linux-gnu qemu-user; } || \
		echo "note: g++-aarch64-linux-gnu or qemu-user not installed; the ARM kernel tests will skip"

# Both real models: the default one and Gemma 3 270M, used by the real-model tests.
models: install-dev browser cross-compiler
	$(SWARM) pull smollm2-135m > /dev/null
	$(SWARM) pull gemma3-270m --data-dir .test-data > /dev/null

# The full node: model, OpenAI/Anthropic/MCP APIs and dashboard on 127.0.0.1:8800.
run: install
	$(SWARM) run $(MODEL)

chat: install
	$(SWARM) chat $(MODEL)

test: models
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check swarm kernels control tests tools
	$(VENV)/bin/ruff format --check swarm kernels control tests tools

bench: models
	$(PY) -m pip install --quiet -e '.[bench]'
	for m in $(BENCH_MODELS); do $(SWARM) bench $$m --data-dir .test-data --baseline llama-cpp; done

clean:
	rm -rf $(VENV) .test-data .pytest_cache
