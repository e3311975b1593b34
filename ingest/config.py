"""Settings of the `ingest` package (the `rag` settings cover Milvus and the embedder)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rag.bm25 import ANALYZERS
from rag.settings import SettingsError, env, load_settings

DEFAULT_GLOBS = "**/*.md,**/*.markdown,**/*.txt"
MAX_DEFAULT_OVERLAP = 32  # the overlap of the default 256-token chunks


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    chunk_size: int = env("RAG_CHUNK_SIZE", 256, "chunk length in the embedder's tokens, header path included")
    # Unset, it follows the chunk size: a fixed 32 would refuse every size under 66.
    chunk_overlap: int | None = env("RAG_CHUNK_OVERLAP", None, "tokens repeated between neighbouring chunks of "
                                    f"a section (default: chunk size / 8, at most {MAX_DEFAULT_OVERLAP})")
    globs: str = env("RAG_GLOB", DEFAULT_GLOBS, "comma-separated patterns picked up inside folders")
    max_file_mb: float = env("RAG_MAX_FILE_MB", 5.0, "larger files are skipped and reported")
    embed_batch: int = env("RAG_EMBED_BATCH", 256, "chunks per embedding call and Milvus upsert")
    prune: bool = env("RAG_PRUNE", True, "delete chunks of files gone from an ingested folder")
    analyzer: str = env("RAG_ANALYZER", "auto", "BM25 analyzer of a new collection: standard, english (stemmed, stop words), jieba, or auto (jieba for mostly-CJK corpora, else english)")

    def __post_init__(self) -> None:
        if self.chunk_size < 32:
            raise SettingsError(
                f"chunk size {self.chunk_size} is too small; use at least 32 tokens (--chunk-size, RAG_CHUNK_SIZE)"
            )
        if self.chunk_overlap is None:  # derived once here, so every reader sees a number
            object.__setattr__(self, "chunk_overlap", min(MAX_DEFAULT_OVERLAP, self.chunk_size // 8))
        if not 0 <= self.chunk_overlap < self.chunk_size // 2:
            raise SettingsError(
                f"chunk overlap {self.chunk_overlap} must be between 0 and half the chunk size ({self.chunk_size // 2}); "
                f"lower --chunk-overlap (RAG_CHUNK_OVERLAP) or unset it to follow the chunk size"
            )
        if self.analyzer not in ("auto", *ANALYZERS):
            raise SettingsError(f"analyzer {self.analyzer!r} is not one of auto, {', '.join(ANALYZERS)}")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> IngestConfig:
        return load_settings(cls, environ, **overrides)

    @property
    def glob_list(self) -> list[str]:
        return [g.strip() for g in self.globs.split(",") if g.strip()]
