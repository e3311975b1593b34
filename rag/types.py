"""The small typed records that move between pipeline stages."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from typing import Any


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One embeddable piece of a source file, with everything the store keeps about it."""

    source: str  # path as ingested (relative to the working directory when inside it)
    chunk_index: int  # ordinal within the file
    text: str  # exact source text, source_text[start:end]
    header_path: tuple[str, ...]  # ("Install", "Linux", "Docker")
    start: int  # character offsets into the file's text
    end: int
    file_hash: str = ""
    chunk_count: int = 0  # chunks of this file version; lets a re-run detect half-written files
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        """Stable primary key: same path, ordinal and text give the same id on every run."""
        h = hashlib.sha256(f"{self.source}\0{self.chunk_index}\0{self.text}".encode())
        return h.hexdigest()[:32]

    @property
    def heading(self) -> str:
        return " › ".join(self.header_path)


@dataclasses.dataclass(frozen=True)
class Hit:
    """One retrieved passage. `score` is higher-is-better whatever the retrieval mode."""

    id: str
    score: float
    text: str
    source: str
    header_path: str
    chunk_index: int
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    similarity: float | None = None  # dense cosine to the question, when known (dense and hybrid)
    rank: int = 0  # 1-based position in the retrieval mode's ranking (0: not ranked yet)
    mode: str = ""  # the retrieval mode that ranked it: dense, bm25 or hybrid

    def score_label(self) -> str:
        """What a reader can judge: the similarity (or BM25 score) and the mode's rank, labelled.

        The hybrid `score` is a reciprocal-rank-fusion value (about 1/(k+rank)); it orders hits
        but is no similarity, so it is never what we show. The score floor speaks of similarity.
        """
        if self.similarity is not None:
            value = f"similarity {self.similarity:.3f}"
        elif self.mode == "bm25":
            value = f"BM25 score {self.score:.2f}"
        else:
            value = f"score {self.score:.3f}"
        return f"{value}, {self.mode or 'search'} rank {self.rank}" if self.rank else value

    def citation(self, n: int) -> str:
        heading = f" › {self.header_path}" if self.header_path else ""
        return f"[{n}] {self.source}{heading} ({self.score_label()})"


@dataclasses.dataclass
class FileState:
    """What the collection holds for one source file: ids per content hash, and expected counts."""

    ids_by_hash: dict[str, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    expected: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [i for ids in self.ids_by_hash.values() for i in ids]

    def is_complete(self, file_hash: str) -> bool:
        """True when exactly one version, `file_hash`, is stored with all its chunks.

        A run killed mid-file leaves fewer chunks than `chunk_count`, or two versions side by
        side; both read as incomplete, so the next run redoes that file and converges.
        """
        return (
            list(self.ids_by_hash) == [file_hash]
            and len(set(self.ids_by_hash[file_hash])) == self.expected.get(file_hash, -1)
        )
