"""Incremental, idempotent, crash-safe ingest of files into one Milvus collection.

Per file the collection stores its content hash and chunk count. A run:
1. reads the stored state (ids per source and hash) once;
2. skips files whose one stored version has this hash and all its chunks: no embedding;
3. for new and changed files, upserts the new chunks (ids are deterministic), then deletes the
   ids of older versions; files gone from an ingested folder lose their chunks (unless no-prune).
A run killed at any point leaves, per file, either a complete current version, or an
incomplete or mixed one that the next run detects and redoes, so a re-run converges to the
state of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

from pymilvus import MilvusException
from tqdm.auto import tqdm

from ingest.chunker import Chunker, blobs
from ingest.config import IngestConfig
from ingest.loader import Document, Skip, discover, load, source_name
from rag import adapter
from rag.bm25 import resolve_analyzer
from rag.config import RagConfig
from rag.embedder import Embedder, MiniLMEmbedder, make_embedder, resolve_name
from rag.schema import row_problem
from rag.store import MilvusStore
from rag.types import Chunk


@dataclasses.dataclass
class IngestReport:
    files_new: int = 0
    files_changed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    files_skipped: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0
    chunks_embedded: int = 0
    blobs_dropped: int = 0  # non-text runs (inline base64 images, hex dumps) left out of chunks
    seconds: float = 0.0
    embed_seconds: float = 0.0
    dry_run: bool = False
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    collection: str = ""

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_written / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "written"
        dropped = f"; {self.blobs_dropped} non-text runs left out (see warnings)" if self.blobs_dropped else ""
        return (
            f"{'[dry run] ' if self.dry_run else ''}{self.collection}: files {self.files_new} new, "
            f"{self.files_changed} changed, {self.files_unchanged} unchanged, {self.files_removed} removed, "
            f"{self.files_skipped} skipped; chunks {self.chunks_written} {verb}, {self.chunks_deleted} deleted{dropped}; "
            f"{self.seconds:.1f} s ({self.chunks_per_second:.1f} chunks/s, embedding {self.embed_seconds:.1f} s)"
        )


# Share of CJK letters above which a corpus counts as Chinese/Japanese/Korean (jieba BM25, and
# e5 under --embedder auto). Letters, not words, are counted: an English word is ~5 letters, a
# CJK character about one word-piece, and Chinese technical docs are full of English names, so
# the Chinese Milvus and TiDB docs score only 0.2-0.3 while English corpora score ~0.00.
CJK_MAJORITY = 0.1


def cjk_share(texts: Sequence[str]) -> float:
    """Share of letters that are CJK ideographs or kana/hangul: decides the BM25 analyzer."""
    cjk = letters = 0
    for t in texts:
        for ch in t[:20000]:
            if ch.isalpha():
                letters += 1
                if unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")):
                    cjk += 1
    return cjk / letters if letters else 0.0


def _under(source: str, roots: Sequence[str]) -> bool:
    return any(source == r or source.startswith(r.rstrip("/") + "/") for r in roots)


def ingest(
    paths: Sequence[str],
    rag_config: RagConfig,
    config: IngestConfig,
    *,
    recreate: bool = False,
    dry_run: bool = False,
    embedder: Embedder | None = None,
    store: MilvusStore | None = None,
    progress: bool = True,
    warn: Callable[[str], None] = tqdm.write,
    name: Callable[[Path], str] = source_name,
    after_upsert: Callable[[], None] | None = None,
) -> IngestReport:
    """Bring the collection in line with `paths`. Raises StoreError/FileNotFoundError for bad input.

    `name` gives each file its stored source name; the UI names uploads by their place in the
    uploads folder, so the name does not depend on the folder rag-ui was started from.
    `after_upsert` runs once every new chunk is written and before any old version is deleted:
    the window in which a changed file is stored twice, where the crash tests kill a run.
    """
    t0 = time.perf_counter()
    report = IngestReport(dry_run=dry_run, collection=rag_config.collection)
    found = discover(paths, config.glob_list, name)
    if not found.files and not found.skipped:
        raise FileNotFoundError(
            f"no files match {config.globs!r} under {', '.join(paths)}; check the path or pass --glob"
        )
    for skip in found.skipped:
        report.skipped.append((skip.source, skip.reason))
        warn(f"skipped {skip.source}: {skip.reason}")

    docs: list[Document] = []
    for f in tqdm(found.files, desc="reading", unit="file", disable=not progress, leave=False):
        doc = load(f, int(config.max_file_mb * 1e6), name)
        if isinstance(doc, Skip):
            report.skipped.append((doc.source, doc.reason))
            warn(f"skipped {doc.source}: {doc.reason}")
            continue
        if "front_matter_error" in doc.metadata:
            warn(f"{doc.source}: {doc.metadata['front_matter_error']}")
        docs.append(doc)

    share = cjk_share([d.text for d in docs[:200]])
    own_store = store is None
    store = store or MilvusStore(rag_config.milvus_uri, rag_config.collection, rag_config.milvus_token)
    try:
        if embedder is None:
            recorded = None if recreate else store.recorded_embedder()
            embedder = make_embedder(rag_config, resolve_name(rag_config.embedder, recorded, share > CJK_MAJORITY))
        if share > CJK_MAJORITY and isinstance(embedder, MiniLMEmbedder):
            warn(f"this corpus is {share:.0%} CJK text but all-MiniLM-L6-v2 is English-only; "
                 f"--embedder e5 (multilingual; or auto) retrieves it far better (with --recreate)")
        if dry_run and not store.exists():
            states = {}
        elif dry_run:
            store.open_existing(embedder, answering=False)  # loaded: a reopened collection is 'released'
            states = store.file_states()
        else:
            analyzer = resolve_analyzer(config.analyzer, share > CJK_MAJORITY)
            store.ensure(embedder, recreate=recreate, analyzer=analyzer)
            states = {} if recreate else store.file_states()
        if store.bm25 and not store.heading and embedder.heading_weight > 0:
            # Made before the heading route: it keeps working as it was, but only a rebuild adds it.
            warn("this collection predates hybrid search's heading route (questions matched against each "
                 "section's own heading); rag-ingest --recreate rebuilds it with the route")

        todo = [d for d in docs if d.source not in states or not states[d.source].is_complete(d.file_hash)]
        report.files_unchanged = len(docs) - len(todo)
        current = {d.source for d in docs} | {s for s, _ in report.skipped}
        removed = [s for s in states if s not in current and _under(s, found.roots)] if config.prune else []
        report.files_removed = len(removed)

        chunker = Chunker(embedder.count_tokens, embedder.max_tokens, config.chunk_size, config.chunk_overlap)
        chunks: list[Chunk] = []
        stale_ids: list[str] = []
        for doc in tqdm(todo, desc="chunking", unit="file", disable=not progress or not todo, leave=False):
            new = chunker.chunk(doc)
            # One file's content never aborts the run: a row Milvus would refuse (a source path
            # or heading over its VARCHAR limit) skips that file, which keeps what it had stored.
            problem = next((p for p in map(row_problem, new) if p), None)
            if problem:
                report.skipped.append((doc.source, f"{problem}; shorten it"))
                warn(f"skipped {doc.source}: {problem}; shorten it")
                continue
            if dropped := blobs(doc.text, doc.body_start):
                report.blobs_dropped += len(dropped)
                line = doc.text.count("\n", 0, dropped[0].start) + 1
                warn(f"{doc.source}: left out {len(dropped)} non-text run(s) of "
                     f"{sum(b.end - b.start for b in dropped):,} characters without spaces (first at line {line}: "
                     f"{doc.text[dropped[0].start : dropped[0].start + 24]}...), such as an inline base64 image "
                     f"or a hex dump, which no embedder can read; link such data from a separate file instead")
            chunks.extend(new)
            if doc.source in states:
                report.files_changed += 1
                keep = {c.id for c in new}
                stale_ids.extend(i for i in states[doc.source].ids if i not in keep)
            else:
                report.files_new += 1
        for src in removed:
            stale_ids.extend(states[src].ids)
        report.files_skipped = len(report.skipped)
        report.chunks_written = len(chunks)
        report.chunks_deleted = len(stale_ids)
        if dry_run:
            report.seconds = time.perf_counter() - t0
            return report

        # Embed in large batches across files: the embedder sorts each batch by length, and
        # bigger batches keep the model busy. Upsert right after each batch so a crash loses
        # at most one batch of work.
        bar = tqdm(total=len(chunks), desc="embedding", unit="chunk", disable=not progress or not chunks)
        for i in range(0, len(chunks), config.embed_batch):
            batch = chunks[i : i + config.embed_batch]
            te = time.perf_counter()
            vectors = embedder.embed_documents([chunker.embed_text(c) for c in batch])
            report.embed_seconds += time.perf_counter() - te
            # The store embeds the batch's headings itself (heading route): embedding time too.
            report.embed_seconds += store.upsert(batch, vectors, embedder.model_id)
            report.chunks_embedded += len(batch)
            bar.update(len(batch))
        bar.close()
        if after_upsert is not None:
            after_upsert()
        # Old versions go only after every new chunk is in, so a file is never missing.
        store.delete_ids(stale_ids)
        if chunks or stale_ids:
            store.flush()
        # The query adapter follows the contents: fitted on a new collection, refitted once the
        # changes add up (rag/adapter.py). The chunks are stored by now: a failure here costs
        # the adapter, not the run.
        try:
            adapter.refresh(store, len(chunks) + len(stale_ids))
        except MilvusException as e:
            warn(f"could not store the query adapter ({e}); hybrid search runs without it until the next ingest")
        store.mark_ingested()
    finally:
        if own_store:
            store.close()
    report.seconds = time.perf_counter() - t0
    return report

