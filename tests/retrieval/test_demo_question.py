"""`make run`'s own question must find its answer (the numbered list in docs/ingest.md) in the top 3
of the default retrieval mode, over this repository's docs/, with every setting at its default."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import IngestConfig
from ingest.pipeline import ingest
from rag.config import RagConfig
from rag.pipeline import RagPipeline

REPO = Path(__file__).resolve().parents[2]
DEMO_QUESTION = "How does incremental ingest decide which files to re-embed?"
ANSWER = "1. reads the stored state once"  # the list under "How a run decides what to re-embed"


def _demo_question() -> str:
    """The question as the Makefile asks it, so the test follows a change of the demo."""
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith("QUESTION") and "=" in line:  # QUESTION ?= ...
            return line.split("=", 1)[1].strip()
    raise AssertionError("Makefile has no QUESTION ?= line")


@pytest.mark.slow
def test_demo_question_answer_in_top_3_of_the_default_mode(tmp_path: Path):
    assert _demo_question() == DEMO_QUESTION
    uri = str(tmp_path / "milvus.db")
    config = RagConfig.load(environ={}, milvus_uri=uri)
    ingest([str(REPO / "docs")], config, IngestConfig.load(environ={}), progress=False, warn=lambda m: None)
    pipe = RagPipeline(config)
    try:
        r = pipe.retriever.retrieve(DEMO_QUESTION, 3)
        assert r.mode == config.mode == "hybrid"
        ranks = [i for i, h in enumerate(r.hits, 1) if h.source.endswith("ingest.md") and ANSWER in h.text]
        assert ranks, [(h.source, h.header_path) for h in r.hits]
    finally:
        pipe.close()
