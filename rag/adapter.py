"""The query adapter: a linear map of question vectors, fitted per collection at ingest.

A paraphrased question ("Can I use Kafka instead of the default log broker?") and the chunk
that answers it often share no words and sit apart in the embedding space. Every collection
with the heading route already holds pairs of the same kind: each chunk's own heading (often a
question in FAQ docs, a topic label elsewhere) and the chunk under it. From those pairs ingest
fits a matrix W (dim x dim, near the identity) by a contrastive loss: W moves a heading's vector
towards its own section's chunks and away from the others. Hybrid search then embeds the question
as before and searches the dense and heading routes with `normalize(q @ W)`; BM25 and the
similarities the score floor reads are unchanged (docs/retrieval.md, "The query adapter";
numbers in docs/benchmarks.md, "Round 5").

W lives in a small side collection, `<collection>__query_adapter` (one row per matrix row), named
by the `rag.query_adapter` property of the main collection: Milvus Lite and servers alike, no
file beside the data. Collections without the heading vector get none and search as before.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pymilvus import DataType, MilvusClient

from rag.schema import HEADING_FIELD, heading_text
from rag.store import STRONG, MilvusStore
from rag.types import Chunk

log = logging.getLogger(__name__)

PROPERTY = "rag.query_adapter"  # on the main collection: "<side collection>@<fit time, ns>@<chunks fitted on>"
PENDING = "rag.query_adapter_pending"  # chunks written or deleted since that fit
# Refit once the chunks written or deleted since the last fit reach this share of the chunks it
# saw. Reading every vector back and fitting takes ~12 s at 25,000 chunks; a one-file edit of a
# large collection barely moves W, so it waits until the changes add up.
REFIT_SHARE = 0.2
SUFFIX = "__query_adapter"
# Fit settings (docs/benchmarks.md, "Round 5"): en paraphrase dev hybrid hit@5 0.824 for each of
# 4 seeds; L2 0.03 rather than 0.01 keeps SciFact's hybrid nDCG@10 within 0.01 (0.863-0.867 over
# seeds against 0.872 without; 0.854 at 0.01).
TAU = 0.05  # softmax temperature over cosine similarities
L2 = 0.03  # pull of W towards the identity
EPOCHS = 20
BATCH = 256  # headings per step
NEGATIVES = 2048  # chunks sampled per step as the softmax's other candidates
LR = 0.5
MIN_HEADINGS = 32  # fewer distinct headings: no adapter (too little to learn from)
MAX_ROWS = 200_000  # chunks read for the fit; a larger collection fits on its first ones


def fit(queries: np.ndarray, positives: Sequence[Sequence[int]], chunks: np.ndarray, seed: int = 0) -> np.ndarray:
    """W (dim x dim) with `normalize(queries[i] @ W)` close to `chunks[positives[i]]`.

    Minibatch softmax cross-entropy at temperature TAU over each batch's positives plus
    NEGATIVES sampled chunks, L2 towards the identity; plain gradient steps, deterministic."""
    d = queries.shape[1]
    eye = np.eye(d, dtype=np.float32)
    w = eye.copy()
    rng = np.random.default_rng(seed)
    n = len(queries)
    for _ in range(EPOCHS):
        order = rng.permutation(n)
        for b0 in range(0, n, BATCH):
            rows = order[b0 : b0 + BATCH]
            pos = [np.asarray(positives[r], dtype=np.int64) for r in rows]
            sampled = rng.choice(len(chunks), min(NEGATIVES, len(chunks)), replace=False)
            cand, inverse = np.unique(np.concatenate([*pos, sampled]), return_inverse=True)
            target = np.zeros((len(rows), len(cand)), np.float32)
            at = 0
            for r, p in enumerate(pos):
                target[r, inverse[at : at + len(p)]] = 1.0 / len(p)
                at += len(p)
            c = chunks[cand]
            q = queries[rows]
            logits = (q @ w) @ c.T / TAU
            logits -= logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            grad = q.T @ ((prob - target) @ c) / TAU / len(rows) + L2 * (w - eye)
            w -= LR * grad.astype(np.float32)
    return w


def apply(w: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """The adapted query vector, unit length."""
    out = np.asarray(vector, dtype=np.float32) @ w
    return out / max(float(np.linalg.norm(out)), 1e-12)


def _read_pairs(store: MilvusStore) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """(one heading vector per distinct heading text, the chunk rows under each, chunk vectors),
    read batch by batch into float32 arrays (as Python lists, 200,000 rows' two vectors would
    take ~4 GB)."""
    groups: dict[str, list[int]] = defaultdict(list)
    heads: dict[str, np.ndarray] = {}
    vectors: list[np.ndarray] = []
    n = 0  # rows read so far
    it = store.client.query_iterator(store.collection, batch_size=2000, filter="", limit=MAX_ROWS,
                                     output_fields=["vector", HEADING_FIELD, "source", "header_path", "metadata"],
                                     consistency_level=STRONG)
    try:
        while batch := it.next():
            for i, r in enumerate(batch, start=n):
                path = tuple(h for h in r["header_path"].split(" › ") if h)
                md = r.get("metadata") or {}
                chunk = Chunk(source=r["source"], chunk_index=0, text="", header_path=path, start=0, end=0,
                              metadata={"front_matter": md["front_matter"]} if "front_matter" in md else {})
                text = heading_text(chunk)
                groups[text].append(i)
                if text not in heads:
                    heads[text] = np.asarray(r[HEADING_FIELD], dtype=np.float32)
            vectors.append(np.asarray([r["vector"] for r in batch], dtype=np.float32))
            n += len(batch)
    finally:
        it.close()
    queries = np.stack([heads[t] for t in groups]) if groups else np.empty((0, 0), np.float32)
    chunks = np.concatenate(vectors) if vectors else np.empty((0, 0), np.float32)
    return queries, list(groups.values()), chunks


def side_collection(store: MilvusStore) -> str:
    return store.collection + SUFFIX


def fitted(store: MilvusStore) -> bool:
    """Whether the collection's adapter is settled: fitted, or known to have none (made before
    this version: not yet, so the next ingest fits it, changed files or not)."""
    return PROPERTY in (store.describe().get("properties") or {})


def refresh(store: MilvusStore, changed: int) -> int | None:
    """After an ingest that wrote or deleted `changed` chunks: refit where the collection has no
    settled adapter yet or the changes since the last fit reach REFIT_SHARE of the chunks it saw
    (returns the headings learnt from, as :func:`fit_and_save`); otherwise add them to the pending
    count and keep W (returns None)."""
    props = store.describe().get("properties") or {}
    if PROPERTY in props:
        parts = props[PROPERTY].split("@")
        fitted_on = int(parts[2]) if len(parts) > 2 else 0  # older stamps: refit on any change
        pending = int(props.get(PENDING) or 0) + changed
        if pending < max(1.0, REFIT_SHARE * fitted_on):
            if changed:
                store.client.alter_collection_properties(store.collection, {PENDING: str(pending)})
            return None
    return fit_and_save(store)


def fit_and_save(store: MilvusStore) -> int:
    """Fit W on the collection's (heading, chunk) pairs and store it; returns the number of
    distinct headings it learnt from (0: no adapter, for a collection without the heading
    vector or with under MIN_HEADINGS headings; any previous one is removed)."""
    client, name = store.client, side_collection(store)
    empty = (np.empty((0, 0), np.float32), [], np.empty((0, 0), np.float32))
    queries, members, chunks = _read_pairs(store) if store.heading else empty
    if client.has_collection(name):
        client.drop_collection(name)
    if len(members) < MIN_HEADINGS:
        client.alter_collection_properties(store.collection, {PROPERTY: f"@{time.time_ns()}@{len(chunks)}", PENDING: "0"})
        return 0
    w = fit(queries, members, chunks)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("weights", DataType.FLOAT_VECTOR, dim=w.shape[0])
    index = client.prepare_index_params()
    index.add_index("weights", index_type="AUTOINDEX", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=index, consistency_level=STRONG)
    client.insert(name, [{"row": i, "weights": w[i].tolist()} for i in range(w.shape[0])])
    client.flush(name)
    client.alter_collection_properties(store.collection,
                                       {PROPERTY: f"{name}@{time.time_ns()}@{len(chunks)}", PENDING: "0"})
    return len(members)


def load(store: MilvusStore, dim: int) -> np.ndarray | None:
    """The collection's W, or None where it has none (or one of another dimension). Read from
    Milvus once per store and fit (`store.adapters`: the UI builds a retriever per question;
    a refit changes the stamp)."""
    stamp = (store.describe().get("properties") or {}).get(PROPERTY) or ""
    name = stamp.split("@")[0]
    if stamp in store.adapters:
        return store.adapters[stamp]
    if not name or not store.client.has_collection(name):
        return None
    store.client.load_collection(name)
    rows = store.client.query(name, filter="row >= 0", output_fields=["row", "weights"], limit=dim + 1,
                              consistency_level=STRONG)
    if len(rows) != dim or any(len(r["weights"]) != dim for r in rows):
        log.warning("query adapter %r does not match the embedder (dim %d); searching without it", name, dim)
        return None
    rows.sort(key=lambda r: int(r["row"]))
    w = store.adapters[stamp] = np.asarray([r["weights"] for r in rows], dtype=np.float32)
    return w
