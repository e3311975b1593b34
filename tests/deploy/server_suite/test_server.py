"""Store, ingest and retrieval against a real Milvus server, through the code that serves Milvus Lite.

Creating a collection on a server takes seconds (schema, index, load), so each test uses one
collection for a whole story rather than one collection per assertion.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from ingest.chunker import Chunker
from ingest.config import IngestConfig
from ingest.loader import load
from ingest.pipeline import ingest
from rag.config import RagConfig
from rag.pipeline import Finished, RagPipeline
from rag.retriever import Retriever
from rag.store import MilvusStore, StoreError
from rag.types import Chunk

TOKEN = os.environ.get("MILVUS_TOKEN") or None


def _config(milvus_server, collection: str, **kw) -> RagConfig:
    return RagConfig.load({}, milvus_uri=milvus_server.uri, milvus_token=TOKEN, collection=collection, **kw)


def _chunks(source: str, file_hash: str, texts: list[str]) -> list[Chunk]:
    return [
        Chunk(source=source, chunk_index=i, text=t, header_path=("Doc", f"Part {i}"), start=0, end=len(t),
              file_hash=file_hash, chunk_count=len(texts))
        for i, t in enumerate(texts)
    ]


def _ask(pipeline: RagPipeline, question: str, **kw) -> Finished:
    events = list(pipeline.ask(question, use_llm=False, **kw))
    assert isinstance(events[-1], Finished)
    return events[-1]


def _bm25_supported(version: tuple[int, int]) -> bool:
    return version >= (2, 5)


class _OtherEmbedder:
    model_id, dim, max_tokens, score_floor = "other-model", 8, 128, 0.2

    def count_tokens(self, text):
        return len(text.split())

    def embed_documents(self, texts):
        return np.zeros((len(texts), 8), dtype=np.float32)

    def embed_query(self, text):
        return np.zeros(8, dtype=np.float32)


def test_store_on_server(milvus_server, server_version, collection, embedder, caplog):
    """Create (BM25 capability detection), Strong read-your-writes across clients, embedder guard."""
    writer = MilvusStore(milvus_server.uri, collection, TOKEN)
    with caplog.at_level(logging.WARNING):
        writer.ensure(embedder)
    fields = {f["name"] for f in writer.describe()["fields"]}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("rag")]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:200] for r in errors]
    if _bm25_supported(server_version):
        assert writer.bm25 and "sparse" in fields and not warnings
    else:  # 2.3 / 2.4: one warning, a dense-only collection, nothing fails
        assert not writer.bm25 and "sparse" not in fields
        assert len(warnings) == 1 and "falls back to dense" in warnings[0].getMessage(), warnings
    assert (writer.describe().get("properties") or {}).get("rag.embedder") == embedder.model_id

    # Writes are visible at once, to this client and to another one, without a flush.
    reader = MilvusStore(milvus_server.uri, collection, TOKEN)
    reader.ensure(embedder)
    question = embedder.embed_query("where are the widget settings stored?")
    v1 = _chunks("a.md", "h1", ["The widget stores its settings in widget.toml.", "Backups run nightly at 02:00."])
    writer.upsert(v1, embedder.embed_documents([c.text for c in v1]), embedder.model_id)
    assert reader.file_states()["a.md"].is_complete("h1")
    assert reader.search_dense(question, 1)[0].id == v1[0].id

    # A new version beside the old one reads as incomplete until the old ids are deleted.
    v2 = _chunks("a.md", "h2", ["The widget now keeps its settings in config.yaml."])
    writer.upsert(v2, embedder.embed_documents([c.text for c in v2]), embedder.model_id)
    assert not reader.file_states()["a.md"].is_complete("h2")
    writer.delete_ids([c.id for c in v1])
    state = reader.file_states()["a.md"]
    assert state.is_complete("h2") and state.ids == [v2[0].id]
    assert [h.id for h in reader.search_dense(question, 3)] == [v2[0].id]

    with pytest.raises(StoreError, match="re-run with --recreate"):
        reader.ensure(_OtherEmbedder())
    writer.close()
    reader.close()


def test_ingest_lifecycle_on_server(milvus_server, collection, embedder, corpus, capsys):
    """New, unchanged, changed, removed and skipped files; an interrupted run is repaired."""
    config = _config(milvus_server, collection)
    ic = IngestConfig.load({})
    (corpus / "logo.md").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0binary")

    def run():
        return ingest([str(corpus)], config, ic, embedder=embedder, progress=False, warn=print)

    first = run()
    assert (first.files_new, first.files_skipped) == (3, 1), first.summary()
    assert "binary file" in capsys.readouterr().out
    again = run()
    assert (again.files_unchanged, again.chunks_embedded, again.chunks_deleted) == (3, 0, 0), again.summary()

    (corpus / "oncall.md").write_text("# On-call\n\nThe rotation changes every Thursday now.\n", encoding="utf-8")
    (corpus / "backup.md").unlink()
    changed = run()
    assert (changed.files_changed, changed.files_removed, changed.files_unchanged) == (1, 1, 1), changed.summary()

    # Simulate a run killed between its upserts and its deletes: two versions of install.md.
    target = corpus / "install.md"
    target.write_text(target.read_text(encoding="utf-8") + "\n## On Windows\n\nUse the MSI installer.\n", encoding="utf-8")
    doc = load(target, int(5e6))
    new = Chunker(embedder.count_tokens, embedder.max_tokens, ic.chunk_size, ic.chunk_overlap).chunk(doc)
    store = MilvusStore(milvus_server.uri, collection, TOKEN)
    store.ensure(embedder)
    store.upsert(new[:1], embedder.embed_documents([new[0].text]), embedder.model_id)
    state = store.file_states()[doc.source]
    assert len(state.ids_by_hash) == 2 and not state.is_complete(doc.file_hash)

    repaired = run()
    assert (repaired.files_changed, repaired.files_unchanged) == (1, 1), repaired.summary()
    state = store.file_states()[doc.source]
    assert state.is_complete(doc.file_hash) and sorted(state.ids) == sorted(c.id for c in new)
    stats = store.stats()
    assert sorted(s.rsplit("/", 1)[-1] for s in stats["sources"]) == ["install.md", "oncall.md"]
    assert stats["last_ingest"]
    store.close()


def test_unreachable_server_is_one_clear_line():
    with pytest.raises(StoreError, match=r"cannot reach Milvus at http://127\.0\.0\.1:9: .*start the server"):
        MilvusStore("http://127.0.0.1:9", "docs")


# Last: it restarts the server.
def test_retrieval_and_restart(milvus_server, server_version, collection, embedder, corpus, caplog, capsys):
    """Retrieval modes, filters, score floor and rag-ask; then a restart and a released collection."""
    config = _config(milvus_server, collection)
    ingest([str(corpus)], config, IngestConfig.load({}), embedder=embedder, progress=False)

    pipeline = RagPipeline(config, embedder=embedder)
    done = _ask(pipeline, "How do I restore the database from a backup?")
    assert done.status == "retrieval-only" and done.hits[0].source.endswith("backup.md")
    assert all(h.similarity is not None and h.similarity >= pipeline.score_floor for h in done.hits)

    caplog.clear()
    retriever = Retriever(pipeline.store, embedder, mode="hybrid")
    with caplog.at_level(logging.WARNING):
        results = [retriever.retrieve("widget restore --from latest", 3) for _ in range(2)]
    if _bm25_supported(server_version):
        assert all(r.mode == "hybrid" for r in results)
    else:
        assert all(r.mode == "dense" for r in results)
        assert len([r for r in caplog.records if "no BM25 field" in r.getMessage()]) == 1, "one warning"
    assert results[0].hits[0].source.endswith("backup.md")

    oncall = next(h.source for h in _ask(pipeline, "on-call rotation").hits if h.source.endswith("oncall.md"))
    prefix = oncall[: -len("oncall.md")]
    filtered = _ask(pipeline, "How do I install it?", filter=f'source like "{prefix}on%"')
    assert {h.source for h in filtered.hits} <= {oncall}
    unrelated = _ask(pipeline, "What is the capital of Mongolia?")
    assert unrelated.status == "no-context" and not unrelated.hits
    pipeline.close()

    from rag import cli

    capsys.readouterr()
    rc = cli.main(["--uri", milvus_server.uri, "--collection", collection, "--retrieval-only", "--json",
                   "--mode", "hybrid", "When is the database backed up?"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "retrieval-only" and out["sources"][0]["source"].endswith("backup.md")

    if not milvus_server.restartable:
        pytest.skip("an external server (MILVUS_URI) cannot be restarted from here; the rest passed")
    from pymilvus import MilvusClient

    seconds = milvus_server.restart()
    print(f"\nMilvus restarted in {seconds:.1f} s at {milvus_server.uri}")
    config = _config(milvus_server, collection)  # the port can change across a restart
    client = MilvusClient(uri=config.milvus_uri, token=TOKEN or "")
    print("load state after restart:", client.get_load_state(collection)["state"])
    # Whatever the server restored, a released collection cannot be searched until it is loaded.
    client.release_collection(collection)
    assert "NotLoad" in str(client.get_load_state(collection)["state"])
    with pytest.raises(Exception, match="(?i)load"):
        client.search(collection, data=[embedder.embed_query("backup").tolist()], anns_field="vector", limit=1)

    pipeline = RagPipeline(config, embedder=embedder)  # opening an existing collection loads it
    assert "Loaded" in str(client.get_load_state(collection)["state"])
    done = _ask(pipeline, "When does the on-call rotation change?")
    assert done.hits and done.hits[0].source.endswith("oncall.md")
    assert pipeline.store.stats()["files"] == 3
    pipeline.close()
    client.close()
