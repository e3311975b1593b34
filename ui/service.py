"""The one store handle the UI process owns, shared by chat and knowledge-base management.

Milvus Lite lets one process open a database, and pymilvus wants one client per database per
process, so `KnowledgeBase` opens a single `MilvusStore` and hands out per-collection views
that share its client. Searches run concurrently; writes (ingest, delete) take `write_lock`
so two uploads never interleave their upserts and deletes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ingest.config import IngestConfig
from ingest.loader import source_name
from ingest.pipeline import IngestReport, ingest
from rag import adapter
from rag.config import RagConfig
from rag.embedder import Embedder, make_embedder, resolve_name
from rag.llm import LLMClient
from rag.pipeline import RagPipeline
from rag.store import MilvusStore, StoreError
from ui.backends import Backend

log = logging.getLogger(__name__)
STATS_TTL = 30.0  # seconds; our own writes invalidate at once, the TTL covers other writers of a server
COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")  # Milvus' rule for collection names


def check_collection_name(name: str) -> str:
    name = (name or "").strip()
    if not COLLECTION_RE.match(name):
        raise StoreError(
            f"collection name {name!r} is not valid: use letters, digits and underscores, starting with a letter"
        )
    return name


def embedder_for(rag_config: RagConfig, store: MilvusStore) -> Embedder:
    """The configured embedder; `auto` resolves to the one the collection was built with, else MiniLM."""
    return make_embedder(rag_config, resolve_name(rag_config.embedder, store.recorded_embedder()))


class KnowledgeBase:
    """Owns the embedder and the Milvus client; builds a light `RagPipeline` per question."""

    def __init__(
        self, rag_config: RagConfig, ingest_config: IngestConfig, embedder: Embedder | None = None,
        store: MilvusStore | None = None,
    ):
        """`store`: an already connected store for `rag_config`'s database (default: connect to it)."""
        self.rag_config = rag_config
        self.ingest_config = ingest_config
        self._base = store or MilvusStore(rag_config.milvus_uri, rag_config.collection, rag_config.milvus_token)
        self.embedder = embedder or embedder_for(rag_config, self._base)
        self._views: dict[str, MilvusStore] = {}
        self._embedders: dict[str, Embedder] = {self.embedder.model_id: self.embedder}
        self._opened: set[str] = set()
        self._recorded: dict[str, str] = {}  # collection -> the embedder model id it records
        self._views_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self._stats: dict[str, tuple[float, dict[str, Any] | None]] = {}
        # Load an existing collection now: after a restart Milvus holds it released, and the
        # first stats read (sidebar, Knowledge-base tab) would fail instead of showing its rows.
        try:
            if self.exists(rag_config.collection):
                self._open(rag_config.collection)
        except StoreError as e:  # e.g. another embedder's collection: each question explains it
            log.warning("%s", e)

    # -- stores ----------------------------------------------------------------------------

    def store(self, collection: str) -> MilvusStore:
        """A store for `collection` that shares the process' one Milvus client."""
        collection = check_collection_name(collection)
        with self._views_lock:
            view = self._views.get(collection)
            if view is None:
                # A shallow copy shares `client`; only the collection name and BM25 flag differ.
                view = copy.copy(self._base)
                view.collection = collection
                view.bm25 = False
                self._views[collection] = view
            return view

    def exists(self, collection: str) -> bool:
        return self.store(collection).exists()

    def collections(self) -> list[str]:
        try:
            # A collection's query adapter (rag/adapter.py) is part of it, not one to pick.
            return sorted(c for c in self._base.client.list_collections() if not c.endswith(adapter.SUFFIX))
        except Exception as e:  # a server gone away must not break page rendering
            log.warning("cannot list collections: %s", e)
            return []

    def embedder_of(self, collection: str) -> Embedder:
        """The embedder that built `collection` (its questions and uploads use it), else the UI's own."""
        # Cached per collection once known: the UI never drops a collection, and reading it
        # costs two Milvus calls that would otherwise come before every question.
        recorded = self._recorded.get(collection) or self.store(collection).recorded_embedder()
        if recorded is None:
            return self.embedder
        with self._views_lock:
            self._recorded[collection] = recorded
            if recorded not in self._embedders:
                self._embedders[recorded] = make_embedder(self.rag_config, resolve_name("auto", recorded))
            return self._embedders[recorded]

    def _open(self, collection: str) -> MilvusStore:
        """The view, opened for search (loaded and checked against its embedder) once."""
        view = self.store(collection)
        embedder = self.embedder_of(collection)
        with self._views_lock:
            if collection not in self._opened:
                view.open_existing(embedder)
                self._opened.add(collection)
        return view

    # -- answering ---------------------------------------------------------------------------

    def pipeline(
        self, collection: str, backend: Backend, model: str | None, top_k: int,
        score_floor: float | None, mode: str,
    ) -> RagPipeline:
        """A pipeline for one question with this session's settings (cheap: handles are shared)."""
        view = self._open(collection)
        # No LLM in the config: the client is attached below from the chosen backend, so the
        # pipeline never falls back to environment variables the user did not pick.
        config = dataclasses.replace(
            self.rag_config, collection=view.collection, top_k=int(top_k), score_floor=score_floor, mode=mode,
            llm_base_url=None, deepseek_api_key=None,
        )
        pipe = RagPipeline(config, embedder=self.embedder_of(view.collection), store=view, store_open=True)
        if backend.kind != "retrieval-only":
            assert backend.base_url and backend.api_key
            pipe.llm = LLMClient(backend.base_url, model, backend.api_key, timeout=self.rag_config.llm_timeout)
        return pipe

    # -- knowledge base ----------------------------------------------------------------------

    def stats(self, collection: str, max_age: float = 0.0) -> dict[str, Any] | None:
        """`MilvusStore.stats()` for the collection, or None when it does not exist yet.

        Stats read every chunk's source, so the status timer asks for a cached copy (`max_age`).
        """
        view = self.store(collection)
        cached = self._stats.get(view.collection)
        if max_age and cached and time.monotonic() - cached[0] < max_age:
            return cached[1]
        stats = view.stats() if view.exists() else None
        self._stats[view.collection] = (time.monotonic(), stats)
        return stats

    def ingest(
        self, paths: Sequence[str | Path], collection: str, warn: Callable[[str], None] | None = None,
        name: Callable[[Path], str] = source_name,
    ) -> IngestReport:
        """The CLI's incremental ingest of `paths`, into the shared store, one writer at a time.

        `name` gives each file its source name (uploads: `uploads.upload_source_namer`)."""
        view = self.store(collection)
        config = dataclasses.replace(self.rag_config, collection=view.collection)
        with self.write_lock:
            try:
                report = ingest(
                    [str(p) for p in paths], config, self.ingest_config, embedder=self.embedder_of(view.collection),
                    store=view, progress=True, warn=warn or (lambda msg: log.warning("%s", msg)), name=name,
                )
            finally:
                self._stats.pop(view.collection, None)  # even a failed run may have written
            with self._views_lock:
                self._opened.add(view.collection)  # ingest() ensured (created or loaded) it
        return report

    def delete_source(self, collection: str, source: str) -> int:
        """Remove every chunk of `source`; returns how many were deleted."""
        view = self.store(collection)
        with self.write_lock:
            if not view.exists():
                raise StoreError(f"collection {collection!r} does not exist")
            state = view.file_states().get(source)
            if state is None:
                return 0
            n = view.delete_ids(state.ids)
            view.flush()
            view.mark_ingested()
            self._stats.pop(view.collection, None)
        return n

    def close(self) -> None:
        self._base.close()
