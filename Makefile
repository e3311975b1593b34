# Two commands for a newcomer: `make run` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUESTION ?= How does incremental ingest decide which files to re-embed?

.PHONY: setup run ingest ask test lint serve-demo clean

setup: $(STAMP)

# Everything, torch==2.13.0 included, resolves in one pip step: a separate or looser torch
# requirement would make pip fetch the multi-gigabyte CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

ingest: setup
	$(BIN)/rag-ingest docs/

ask: ingest
	$(BIN)/rag-ask "$(QUESTION)"

run: ask

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data build *.egg-info .pytest_cache
