# Two commands for a newcomer: `make run` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUESTION ?= How does incremental ingest decide which files to re-embed?

.PHONY: setup run ingest ask test lint serve-demo chromium screenshot clean

setup: $(STAMP)

# Everything, torch==2.13.0 included, resolves in one pip step: a separate or looser torch
# requirement would make pip fetch the multi-gigabyte CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# A real Milvus 2.3 standalone server (embedded etcd/rocksmq) for tests/deploy/server_suite;
	# --no-deps because its pins would downgrade pymilvus. Tests run it in a loopback-only netns.
	$(BIN)/pip install -q --no-deps milvus==2.3.5
	touch $(STAMP)

ingest: setup
	$(BIN)/rag-ingest docs/

ask: ingest
	$(BIN)/rag-ask "$(QUESTION)"

# A newcomer's first command: index docs/, answer QUESTION in the terminal (retrieval-only
# without an LLM), then serve the web UI on the same db. Each step ends before the next opens
# the Milvus Lite db: one process at a time.
run: ingest
	$(BIN)/rag-ask "$(QUESTION)"
	@echo "make run: starting the web UI at http://$${RAG_UI_HOST:-127.0.0.1}:$${RAG_UI_PORT:-7860}/ (Ctrl+C stops it)"
	$(BIN)/rag-ui

lint: setup
	$(BIN)/ruff check .

# Browser tests need Debian's chromium; without it they skip and print why.
chromium:
	@tests/ui/install_chromium.sh || echo "make: Chromium not installed; browser tests will be skipped (reason printed)"

test: setup chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

screenshot: setup chromium
	$(BIN)/python -m tests.ui.make_screenshot

# A tiny random DeepSeek-V3 checkpoint served on CPU: the text is gibberish, the protocol is real.
checkpoints/tiny/config.json: | setup
	$(BIN)/model-host make-checkpoint --out checkpoints/tiny --preset tiny --dtype bf16

serve-demo: setup checkpoints/tiny/config.json
	$(BIN)/model-host serve --checkpoint checkpoints/tiny --port 8000 --kv-memory-gb 0.25

clean:
	rm -rf $(VENV) data build *.egg-info .pytest_cache
