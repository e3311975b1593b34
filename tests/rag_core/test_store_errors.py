"""Store failures a user can fix: another embedder's collection, a locked db, an unreachable server."""

from __future__ import annotations

from pathlib import Path

import pytest
from pymilvus import DataType, MilvusClient

from rag.config import RagConfig
from rag.embedder import Embedder
from rag.pipeline import RagPipeline
from rag.store import MilvusStore, StoreError
from tests.rag_core.conftest import cli_env, do_ingest, rows, run_cli
from tests.support.hash_embedder import HashEmbedder
from tests.support.openai_stub import free_port


def test_hash_embedder_is_an_embedder():
    assert isinstance(HashEmbedder(), Embedder)


@pytest.mark.parametrize(
    ("other", "named"),
    [(HashEmbedder(8), "dimension 8 (this embedder: 384)"),
     (HashEmbedder(384, "test/other-384d"), "embedder 'test/other-384d'")],
    ids=["dimension", "same-dim-other-model"],
)
def test_other_embedders_collection_is_refused_and_left_alone(small_corpus: Path, milvus_uri: str, embedder,
                                                              other, named):
    built = do_ingest([small_corpus], milvus_uri, other)
    store = MilvusStore(milvus_uri, "docs")
    try:
        before = rows(store)
        assert len(before) == built.chunks_written > 0

        with pytest.raises(StoreError) as err:
            store.ensure(embedder)
        msg = str(err.value)
        assert "\n" not in msg and named in msg and "--recreate" in msg

        with pytest.raises(StoreError, match="--recreate"):  # the ingest path says the same, writes nothing
            do_ingest([small_corpus], milvus_uri, embedder)
        with pytest.raises(StoreError) as err:  # the answering path refuses too, with its own advice
            RagPipeline(RagConfig.load(environ={}, milvus_uri=milvus_uri), embedder=embedder, store=store)
        msg = str(err.value)
        assert named in msg and "re-run with --recreate" not in msg
        assert "re-ingest it with this one: rag-ingest PATH --collection docs --embedder minilm --recreate" in msg

        after = rows(store)
        assert after.keys() == before.keys()
        assert store.describe()["properties"]["rag.embedder"] == other.model_id
    finally:
        store.close()


def test_answering_advice_names_the_collections_own_embedder(small_corpus: Path, milvus_uri: str, embedder):
    """rag-ask, rag-ui and rag-eval have no --recreate: they are told which --embedder matches."""
    do_ingest([small_corpus], milvus_uri, embedder)
    store = MilvusStore(milvus_uri, "docs")
    try:
        with pytest.raises(StoreError) as err:
            RagPipeline(RagConfig.load(environ={}, milvus_uri=milvus_uri),
                        embedder=HashEmbedder(384, "test/other-384d"), store=store)
    finally:
        store.close()
    msg = str(err.value)
    assert "\n" not in msg and "embedder 'sentence-transformers/all-MiniLM-L6-v2'" in msg
    assert "answer with its own embedder (--embedder minilm, RAG_EMBEDDER=minilm)" in msg
    assert "re-run with --recreate" not in msg


def make_foreign_collection(uri: str) -> None:
    """Someone else's collection named `docs`: another schema, 128-d vectors, L2, three rows."""
    client = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=True)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=128)
    schema.add_field("title", DataType.VARCHAR, max_length=200)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="AUTOINDEX", metric_type="L2")
    client.create_collection("docs", schema=schema, index_params=index)
    client.insert("docs", [{"embedding": [float(i)] * 128, "title": f"row {i}"} for i in range(3)])
    client.flush("docs")
    client.close()


def test_foreign_collection_is_described_and_never_dropped(small_corpus: Path, milvus_uri: str, embedder):
    make_foreign_collection(milvus_uri)
    for attempt in (
        lambda: do_ingest([small_corpus], milvus_uri, embedder),
        lambda: do_ingest([small_corpus], milvus_uri, embedder, recreate=True),  # --recreate must not drop it
        lambda: RagPipeline(RagConfig.load(environ={}, milvus_uri=milvus_uri), embedder=embedder),
    ):
        with pytest.raises(StoreError) as err:
            attempt()
        msg = str(err.value)
        assert "\n" not in msg and "dimension None" not in msg and "--recreate" not in msg, msg
        assert "was not made by rag-ingest" in msg, msg
        assert "fields: pk INT64, embedding FLOAT_VECTOR(dim 128), title VARCHAR" in msg, msg
        assert "choose another --collection name" in msg, msg
    client = MilvusClient(milvus_uri)
    try:
        assert client.describe_collection("docs")["fields"][1]["name"] == "embedding"
        client.load_collection("docs")
        assert len(client.query("docs", filter="pk >= 0", output_fields=["title"])) == 3
    finally:
        client.close()


def test_recreate_rebuilds_with_the_new_embedder(small_corpus: Path, milvus_uri: str, embedder):
    do_ingest([small_corpus], milvus_uri, HashEmbedder(8))
    rep = do_ingest([small_corpus], milvus_uri, embedder, recreate=True)
    store = MilvusStore(milvus_uri, "docs")
    try:
        store.ensure(embedder)  # compatible now
        assert len(rows(store)) == rep.chunks_written
    finally:
        store.close()


def test_locked_db_gives_one_line_in_the_cli(tmp_path: Path, small_corpus: Path):
    uri = str(tmp_path / "locked.db")
    holder = MilvusStore(uri, "docs")  # this process holds the Milvus Lite lock
    try:
        for module, args in (("ingest.cli", ["docs", "--dry-run", "--quiet"]), ("rag.cli", ["any question"])):
            res = run_cli(module, *args, "--uri", uri, cwd=tmp_path, env=cli_env())
            assert res.returncode == 2, (module, res.stderr)
            assert "Traceback" not in res.stderr, res.stderr
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1, res.stderr
            assert "holds its lock" in lines[0] and uri in lines[0]
    finally:
        holder.close()


def test_unreachable_server_is_one_line_store_error():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreError) as err:
        MilvusStore(uri, "docs")
    msg = str(err.value)
    assert "\n" not in msg and f"cannot reach Milvus at {uri}" in msg and "MILVUS_URI" in msg


def test_lite_path_without_db_suffix_is_not_called_a_lock(tmp_path: Path):
    with pytest.raises(StoreError) as err:
        MilvusStore(str(tmp_path / "milvus"), "docs")
    assert "must end in .db" in str(err.value) and "lock" not in str(err.value)
