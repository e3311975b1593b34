"""The Milvus collection: opening and creating it, writes, the per-file ingest state, and search
(its schema and row limits are in `rag.schema`).

The same code serves Milvus Lite (a local path), a Milvus server and Zilliz Cloud (a URI);
pymilvus' `MilvusClient` hides the difference. The collection records which embedder wrote
it (`rag.embedder` property); opening it with another embedder, dimension or metric is an
error, so vectors of two models never mix.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pymilvus import AnnSearchRequest, MilvusException, RRFRanker

from rag import bm25
from rag.connection import StoreError, connect, is_local_uri, reloading
from rag.embedder import Embedder, embedder_name
from rag.schema import (
    HEADING_FIELD,
    SCHEMA_VERSION,
    build_schema,
    foreign_shape,
    heading_text,
    ip_params,
    routes,
    row_problem,
)
from rag.types import Chunk, FileState, Hit

log = logging.getLogger(__name__)

OUTPUT_FIELDS = ["text", "source", "header_path", "chunk_index", "metadata"]
STRONG = "Strong"  # ingest state must see its own writes, on a server too


class MilvusStore:
    """One collection of chunks. Create it with `ensure`, then write and search."""

    def __init__(self, uri: str, collection: str, token: str | None = None):
        self.uri = uri
        self.collection = collection
        self.client = connect(uri, token)
        self.bm25 = False
        self.analyzer = "standard"  # of the BM25 field; read from the collection when it is opened
        self.heading = False  # whether the collection has the heading vector (hybrid's third route)
        self.embedder: Embedder | None = None  # set by ensure / open_existing; embeds headings on upsert
        # Query adapters read from Milvus (rag/adapter.py), by their stamp: the UI asks one
        # question per retriever, and its per-collection views (shallow copies) share this dict.
        self.adapters: dict[str, np.ndarray] = {}
        # query_iterator asks Milvus Lite for an optional timestamp RPC it lacks; the in-process
        # server logs a traceback and the client a warning, then both carry on correctly.
        logging.getLogger("pymilvus").setLevel(logging.ERROR)
        if is_local_uri(uri):
            logging.getLogger("grpc._server").setLevel(logging.CRITICAL)

    # -- lifecycle -------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.client.has_collection(self.collection)

    def describe(self) -> dict[str, Any]:
        return self.client.describe_collection(self.collection)

    def _check_ours(self, desc: dict[str, Any]) -> None:
        """Refuse a collection rag-ingest did not make: describe it, and never advise dropping it."""
        if shape := foreign_shape(desc):
            raise StoreError(
                f"collection {self.collection!r} at {self.uri} was not made by rag-ingest (fields: {shape}); "
                f"leave it to its owner and choose another --collection name (RAG_COLLECTION)"
            )

    def recorded_embedder(self) -> str | None:
        """The model id of the embedder that built the collection; None when there is no collection."""
        if not self.exists():
            return None
        return (self.describe().get("properties") or {}).get("rag.embedder") or None

    def check_compatible(self, embedder: Embedder, answering: bool = False) -> None:
        """Raise StoreError unless rag-ingest made the collection with this embedder, dimension and
        metric. The advice fits the command: rag-ingest can rebuild it (--recreate); the answering
        side (rag-ask, rag-ui, rag-eval) must use the collection's own embedder or re-ingest."""
        desc = self.describe()
        self._check_ours(desc)
        props = desc.get("properties") or {}
        dim = next(int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == "vector")
        metric = self.client.describe_index(self.collection, "vector").get("metric_type")
        problems = []
        if dim != embedder.dim:
            problems.append(f"dimension {dim} (this embedder: {embedder.dim})")
        if metric != "IP":
            problems.append(f"metric {metric} (need IP)")
        if props.get("rag.schema", "1") != SCHEMA_VERSION:
            raise StoreError(
                f"collection {self.collection!r} has schema {props.get('rag.schema', '1')}, from an older version "
                f"(this version needs {SCHEMA_VERSION}: BM25 over title, headings and text); rebuild it with "
                f"`rag-ingest PATH --recreate`"
            )
        if props.get("rag.embedder") != embedder.model_id:
            problems.append(f"embedder {props.get('rag.embedder')!r} (this run: {embedder.model_id!r})")
        if not problems:
            return
        built = f"collection {self.collection!r} was built with " + ", ".join(problems)
        if not answering:
            raise StoreError(built + "; re-run with --recreate to rebuild it, or choose another --collection name")
        own = embedder_name(props.get("rag.embedder") or "")
        use = f"answer with its own embedder (--embedder {own}, RAG_EMBEDDER={own})" if own else (
            "answer with the embedder that built it")
        raise StoreError(
            f"{built}; {use}, or re-ingest it with this one: "
            f"rag-ingest PATH --collection {self.collection} --embedder {embedder_name(embedder.model_id) or '<name>'} --recreate"
        )

    def ensure(self, embedder: Embedder, recreate: bool = False, analyzer: str = "standard") -> None:
        """Open the collection (checking it matches `embedder`), or create it."""
        if recreate and self.exists():
            self._check_ours(self.describe())  # --recreate drops only what rag-ingest made
            self.client.drop_collection(self.collection)
        if self.exists():
            self._load(embedder, answering=False)
            return
        self._create(embedder, analyzer)

    def open_existing(self, embedder: Embedder, answering: bool = True) -> None:
        """Open for retrieval (or a dry run): the collection must exist and match the embedder."""
        if not self.exists():
            raise StoreError(
                f"collection {self.collection!r} does not exist at {self.uri}; run `rag-ingest PATH` first"
            )
        self._load(embedder, answering)

    def _load(self, embedder: Embedder, answering: bool) -> None:
        self.check_compatible(embedder, answering)
        desc = self.describe()
        self.bm25, self.heading = routes(desc)
        self.analyzer = (desc.get("properties") or {}).get("rag.analyzer", "standard")
        self.embedder = embedder
        # A reopened collection is not searchable until loaded (Lite and server alike).
        self.client.load_collection(self.collection)

    def _create(self, embedder: Embedder, analyzer: str) -> None:
        # Attempts, best first: BM25 with the chosen analyzer; BM25 with the standard analyzer
        # (Milvus Lite builds jieba only when the `jieba` package is installed); no BM25 at all
        # (a server older than 2.5), i.e. dense only. Each fallback logs one warning line.
        # The heading vector serves hybrid search only, so it goes with BM25, and only for an
        # embedder with a heading route (no vectors paid for and never searched). It needs a
        # second vector field (Milvus 2.4+), which every server with BM25 (2.5+) has.
        self.embedder = embedder
        attempt: str | None = analyzer
        while True:
            with_bm25 = attempt is not None
            with_heading = with_bm25 and embedder.heading_weight > 0
            schema = build_schema(embedder.dim, attempt or "standard", with_bm25, with_heading)
            index = self.client.prepare_index_params()
            index.add_index("vector", index_type="AUTOINDEX", metric_type="IP")
            if with_heading:
                index.add_index(HEADING_FIELD, index_type="AUTOINDEX", metric_type="IP")
            if with_bm25:
                index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            props = {
                "rag.embedder": embedder.model_id,
                "rag.schema": SCHEMA_VERSION,
                "rag.analyzer": attempt or "none",
            }
            # A server without BM25 (< 2.5) rejects the sparse index; pymilvus would log that
            # expected rejection as an ERROR with a traceback before our one warning below.
            pymilvus_log = logging.getLogger("pymilvus")
            level = pymilvus_log.level
            if with_bm25:
                pymilvus_log.setLevel(logging.CRITICAL)
            try:
                self.client.create_collection(
                    self.collection, schema=schema, index_params=index,
                    consistency_level=STRONG, properties=props,
                )
            except MilvusException as e:
                if not with_bm25:
                    raise StoreError(f"cannot create collection {self.collection!r}: {e}") from e
                if self.exists():
                    self.client.drop_collection(self.collection)
                reason = str(getattr(e, "message", e))
                if attempt != "standard" and any(w in reason.lower() for w in (attempt, "tokenizer", "analyzer")):
                    log.warning("Milvus at %s cannot build the %s analyzer (%s); BM25 uses the standard analyzer",
                                self.uri, attempt, reason)
                    attempt = "standard"
                    continue
                log.warning("Milvus at %s has no BM25 functions (%s); hybrid search falls back to dense",
                            self.uri, reason)
                attempt = None
                continue
            finally:
                pymilvus_log.setLevel(level)
            # Servers older than 2.5 accept the schema but silently drop functions.
            self.bm25, self.heading = routes(self.describe())
            self.analyzer = attempt or "standard"
            if with_bm25 and not self.bm25:
                # Its `sparse` field would then be an ordinary field that every upsert must fill;
                # rebuild the collection without it.
                log.warning("Milvus at %s dropped the BM25 function; hybrid search falls back to dense", self.uri)
                self.client.drop_collection(self.collection)
                attempt = None
                continue
            return

    def close(self) -> None:
        self.client.close()

    # -- writes ----------------------------------------------------------------------------

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray, embedder_id: str) -> float:
        """Write chunks; ids are deterministic, so writing the same chunk twice is a no-op.

        Where the collection has the heading vector, each distinct heading text of the batch
        is embedded once (with the embedder the store was opened with) and written in the
        same row, so a chunk is never stored without it. Returns the seconds that embedding
        took (ingest counts them as embedding time)."""
        heads: list[np.ndarray | None] = [None] * len(chunks)
        t0 = time.perf_counter()
        if self.heading and chunks:
            if self.embedder is None:
                raise StoreError(f"collection {self.collection!r} was not opened with an embedder (ensure it first)")
            texts = [heading_text(c) for c in chunks]
            distinct = list(dict.fromkeys(texts))
            by_text = dict(zip(distinct, self.embedder.embed_documents(distinct), strict=True))
            heads = [by_text[t] for t in texts]
        embed_seconds = time.perf_counter() - t0
        rows = []
        for chunk, vec, head in zip(chunks, vectors, heads, strict=True):
            lexical = bm25.document_text(chunk, self.analyzer) if self.bm25 else ""
            if problem := row_problem(chunk, lexical):
                raise StoreError(f"{chunk.source}: {problem}; shorten it (or lower --chunk-size)")
            rows.append({
                "id": chunk.id, "vector": vec.tolist(), "text": chunk.text, "source": chunk.source,
                "header_path": chunk.heading, "chunk_index": chunk.chunk_index,
                "chunk_count": chunk.chunk_count, "file_hash": chunk.file_hash, "embedder": embedder_id,
                "metadata": {"start": chunk.start, "end": chunk.end, **chunk.metadata},
                **({"bm25_text": lexical} if self.bm25 else {}),
                **({HEADING_FIELD: np.asarray(head, dtype=np.float32).tolist()} if head is not None else {}),
            })
        if rows:
            self.client.upsert(self.collection, rows)
        return embed_seconds

    def delete_ids(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        for i in range(0, len(ids), 1000):  # keep filter expressions a sane size
            self.client.delete(self.collection, ids=ids[i : i + 1000])
        return len(ids)

    def flush(self) -> None:
        self.client.flush(self.collection)

    def mark_ingested(self) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.client.alter_collection_properties(self.collection, {"rag.last_ingest": stamp})

    # -- ingest state ----------------------------------------------------------------------

    @reloading
    def file_states(self) -> dict[str, FileState]:
        """Every source in the collection with its stored versions, read in pages."""
        states: dict[str, FileState] = defaultdict(FileState)
        it = self.client.query_iterator(
            self.collection, batch_size=2000, filter="",
            output_fields=["source", "file_hash", "chunk_count"], consistency_level=STRONG,
        )
        try:
            while batch := it.next():
                for row in batch:
                    st = states[row["source"]]
                    st.ids_by_hash[row["file_hash"]].append(row["id"])
                    st.expected[row["file_hash"]] = int(row["chunk_count"])
        finally:
            it.close()
        return dict(states)

    def stats(self) -> dict[str, Any]:
        """Files, chunks, embedder, dimension and last ingest time, for the CLI and UI."""
        desc = self.describe()
        props = desc.get("properties") or {}
        per_source = Counter(
            src for src, st in self.file_states().items() for _ in st.ids
        )
        dim = next((int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == "vector"), None)
        return {
            "collection": self.collection,
            "files": len(per_source),
            "chunks": sum(per_source.values()),
            "embedder": props.get("rag.embedder"),
            "dim": dim,
            "bm25": routes(desc)[0],
            "metric": "IP",  # _create indexes the vectors by inner product (cosine on unit vectors)
            "analyzer": props.get("rag.analyzer"),
            "last_ingest": props.get("rag.last_ingest"),
            "sources": dict(sorted(per_source.items())),
        }

    def source_chunks(self, source: str) -> list[Hit]:
        """Every stored chunk of one source file, in chunk order (citation panel, chunk browser).

        Hits with score 0: nothing was searched. An unknown source gives an empty list."""
        return sorted(self._query(f"source == {json.dumps(source)}"), key=lambda h: h.chunk_index)

    def chunk(self, chunk_id: str) -> Hit | None:
        """The stored chunk with this id, or None."""
        found = self._query(f"id == {json.dumps(chunk_id)}")
        return found[0] if found else None

    @reloading
    def _query(self, filter: str) -> list[Hit]:
        rows = self.client.query(self.collection, filter=filter, output_fields=["id", *OUTPUT_FIELDS],
                                 consistency_level=STRONG)
        return [Hit(id=r["id"], score=0.0, text=r["text"], source=r["source"], header_path=r["header_path"],
                    chunk_index=int(r["chunk_index"]), metadata=r.get("metadata") or {}) for r in rows]

    # -- search ----------------------------------------------------------------------------

    @staticmethod
    def _hits(rows: list[dict], sign: float = 1.0, query: np.ndarray | None = None, dense: bool = False) -> list[Hit]:
        hits = []
        for r in rows:
            e = r["entity"]
            score = sign * float(r["distance"])
            sim = score if dense else None
            if query is not None and "vector" in e:
                sim = float(np.dot(np.asarray(e["vector"], dtype=np.float32), query))
            hits.append(Hit(
                id=r["id"], score=score, text=e["text"], source=e["source"], header_path=e["header_path"],
                chunk_index=int(e["chunk_index"]), metadata=e.get("metadata") or {}, similarity=sim,
            ))
        return hits

    @reloading
    def search_dense(self, vector: np.ndarray, k: int, filter: str = "", query: np.ndarray | None = None) -> list[Hit]:
        """Top-k by inner product (cosine on unit vectors). With `query` (the question's own
        vector, where `vector` is an adapted one), each hit's similarity is to `query`."""
        res = self.client.search(
            self.collection, data=[vector.tolist()], anns_field="vector", limit=k, filter=filter,
            output_fields=OUTPUT_FIELDS + (["vector"] if query is not None else []),
            search_params=ip_params(k), consistency_level=STRONG,
        )
        return self._hits(res[0], dense=True, query=query)

    @reloading
    def search_heading(self, vector: np.ndarray, k: int, filter: str = "", query: np.ndarray | None = None) -> list[Hit]:
        """Top-k by the question's similarity to each chunk's heading (the heading route).

        Chunks of one section share a heading, hence its score: ties go to the chunk whose own
        vector is closer, so twice k are fetched and re-sorted. Each hit's `similarity` is the
        chunk's own to `query` (default `vector`; for fusion and the score floor); its score is the heading's."""
        res = self.client.search(
            self.collection, data=[vector.tolist()], anns_field=HEADING_FIELD, limit=2 * k, filter=filter,
            output_fields=[*OUTPUT_FIELDS, "vector"], search_params=ip_params(2 * k),
            consistency_level=STRONG,
        )
        hits = self._hits(res[0], query=vector if query is None else query)
        hits.sort(key=lambda h: (-round(h.score, 5), -(h.similarity or 0.0)))
        return hits[:k]

    @reloading
    def search_bm25(self, text: str, k: int, filter: str = "", query: np.ndarray | None = None) -> list[Hit]:
        """Top-k by Milvus BM25 over the analyzed text; scores are reported positive.

        With the question's `query` vector, each hit also gets its dense similarity (for fusion
        and the score floor).
        """
        res = self.client.search(
            self.collection, data=[bm25.query_text(text, self.analyzer)], anns_field="sparse", limit=k, filter=filter,
            output_fields=OUTPUT_FIELDS + (["vector"] if query is not None else []),
            search_params={"metric_type": "BM25"}, consistency_level=STRONG,
        )
        # Milvus Lite reports BM25 as a negated distance; a server reports the score itself.
        rows = res[0]
        sign = -1.0 if rows and float(rows[0]["distance"]) < 0 else 1.0
        return self._hits(rows, sign, query=query)

    @reloading
    def search_hybrid(
        self, vector: np.ndarray, text: str, k: int, filter: str = "",
        rrf_k: int = 10, candidates: int | None = None,
    ) -> list[Hit]:
        """Dense + BM25 fused in Milvus by reciprocal-rank fusion (equal weights; see Retriever)."""
        n = candidates or max(k * 4, 20)
        reqs = [
            AnnSearchRequest([vector.tolist()], "vector", {"metric_type": "IP"}, n, expr=filter or None),
            AnnSearchRequest([bm25.query_text(text, self.analyzer)], "sparse", {"metric_type": "BM25"}, n,
                             expr=filter or None),
        ]
        ranker = RRFRanker(rrf_k)
        # The fused score is rank-based; the vectors give each hit its dense similarity too,
        # which the score floor needs.
        res = self.client.hybrid_search(
            self.collection, reqs, ranker, limit=k, output_fields=[*OUTPUT_FIELDS, "vector"],
            consistency_level=STRONG,
        )
        return self._hits(res[0], query=vector)

