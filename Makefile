# One command to run the demo, one to run the tests; both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-micro bench-soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

PORT ?= 8080
IDP_PORT ?= 8090

demo: $(VENV)/.installed
	$(BIN)/extauthz demo --port $(PORT) --idp-port $(IDP_PORT)

lint: $(VENV)/.installed
	$(BIN)/ruff check extauthz tests bench
	$(BIN)/mypy

test: $(VENV)/.installed lint
	@(command -v redis-server && command -v wrk && command -v valgrind) >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq redis-server wrk valgrind)
	$(BIN)/pytest -q -n auto

# make bench ARGS="--smoke" | ARGS="--duration 30 --only jwt_rbac,shipped_filtered_10k" (docs/benchmarks.md)
bench: $(VENV)/.installed
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.compare $(ARGS)

bench-micro: $(VENV)/.installed
	$(BIN)/python -m bench.micro $(ARGS)

bench-soak: $(VENV)/.installed
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
