"""Fixtures of the retrieval tests: a small English markdown corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

TOPICS = {
    "storage.md": ("Storage", "Milvus keeps inserted data as incremental logs in object storage and metadata in etcd."),
    "index.md": ("Index building", "Indexes such as HNSW and IVF_FLAT are built per segment; nlist and nprobe trade recall for speed."),
    "partitions.md": ("Partition keys", "A partition key routes entities to partitions so that a search can skip the others."),
}


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """Three one-section markdown pages in tmp_path/docs."""
    root = tmp_path / "docs"
    root.mkdir()
    for name, (title, text) in TOPICS.items():
        (root / name).write_text(f"# {title}\n\n{text}\n", encoding="utf-8")
    return root
