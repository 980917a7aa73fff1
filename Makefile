# One command to run the demo, one to run the tests; both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

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
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(BIN)/pytest -q -n auto

bench: $(VENV)/.installed
	$(BIN)/python -m bench.check_latency
	$(BIN)/python -m bench.filter_engine
	$(BIN)/python -m bench.relationships

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
