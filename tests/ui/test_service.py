"""The UI's one store handle: opened once per collection, loaded again after a release, and
Milvus errors turned into one sentence that names the fix (issue 14, items 2 and 3)."""

from __future__ import annotations

import pytest
from pymilvus import MilvusException

from ingest.config import IngestConfig
from rag import adapter
from rag.config import RagConfig
from rag.store import MilvusStore
from tests.ui.conftest import FIXTURE_DOCS
from ui import views
from ui.backends import Backend, Probe, Prober
from ui.chat import respond
from ui.errors import explain
from ui.service import KnowledgeBase

QUESTIONS = [
    "How do I back up the index?", "Where does Milvus Lite keep the index?", "How does hybrid search fuse results?",
    "Which files are re-embedded?", "What does the score floor do?", "How do I change the chunk size?",
    "Can two processes open the database?", "What is retrieval-only mode?", "Which settings exist?",
    "How are sources cited?",
]


class CountingStore(MilvusStore):
    """A real store that records each open for search (the collection checks and the load)."""

    def __init__(self, uri: str, collection: str):
        super().__init__(uri, collection)
        self.opens: list[str] = []  # shared by the per-collection views, which are shallow copies

    def open_existing(self, embedder) -> None:
        self.opens.append(self.collection)
        super().open_existing(embedder)


@pytest.fixture
def kb(milvus_uri, embedder):
    store = CountingStore(milvus_uri, "docs")
    kb = KnowledgeBase(RagConfig.load({}, milvus_uri=milvus_uri), IngestConfig.load({}), embedder=embedder,
                       store=store)
    kb.ingest([str(FIXTURE_DOCS)], "docs")
    try:
        yield kb
    finally:
        kb.close()


def ask(kb: KnowledgeBase, question: str) -> list[dict]:
    *_, messages = respond(kb, Prober(), Backend("retrieval-only"), question, [], "docs", 3, 0.0, "hybrid")
    return messages


def test_one_open_store_serves_ten_questions(kb):
    """Issue 14.3: RagPipeline used to open the shared store again for every question."""
    store = kb.store("docs")
    before = len(store.opens)
    for q in QUESTIONS:
        messages = ask(kb, q)
        assert messages[-1]["metadata"]["title"].startswith("Sources"), messages[-1]
    assert len(store.opens) - before <= 1, store.opens  # at most the first question opens it


def test_a_released_collection_is_loaded_again(kb):
    """Issue 14.2: after a release (a restart, or another client) stats and questions still work."""
    client = kb.store("docs").client
    client.release_collection("docs")
    stats = kb.stats("docs")
    assert stats is not None and stats["files"] == 4 and stats["chunks"] > 4
    client.release_collection("docs")
    messages = ask(kb, QUESTIONS[0])
    assert messages[-1]["metadata"]["title"].startswith("Sources")
    assert "⚠️" not in str(messages)


def test_the_collection_list_leaves_out_query_adapters(kb):
    """A collection's query adapter is a side collection (rag/adapter.py), not one to pick."""
    kb.store("docs").client.create_collection("docs" + adapter.SUFFIX, dimension=4)
    assert "docs" in kb.collections() and "docs" + adapter.SUFFIX not in kb.collections()


@pytest.mark.parametrize(("error", "fix"), [
    (MilvusException(101, "Collection 'docs' is in state 'released'; call load() before search/get/query"),
     "restart rag-ui"),
    (MilvusException(100, "can't find collection[database=default][collection=docs]"), "ingest documents again"),
    (MilvusException(2, "Fail connecting to server on 127.0.0.1:19530, illegal connection params or server unavailable"),
     "start it (or fix MILVUS_URI)"),
    (MilvusException(65535, "segcore: internal error <stack trace follows>"), "check the Milvus log"),
])
def test_milvus_errors_become_one_sentence_that_names_the_fix(error, fix):
    text = explain(error, "docs", "./data/milvus.db")
    assert fix in text and "\n" not in text
    for raw in ("MilvusException", "code=", "<", "segcore"):
        assert raw not in text


def test_banner_follows_the_row_count():
    backend, probe = Backend("retrieval-only"), Probe(True, "no LLM")
    for stats in (None, {"files": 0, "chunks": 0}):
        assert "is empty" in views.banner(backend, probe, "docs", stats)
    assert "is empty" not in views.banner(backend, probe, "docs", {"files": 4, "chunks": 10})
