"""Connecting to Milvus (Lite, a server or Zilliz Cloud) with one clear line for each usual
failure, the error type every store problem the user can fix is raised as, and reads that
survive a released collection."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from pymilvus import MilvusClient, MilvusException

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A store problem the user can fix; the message is one line that names the fix."""


def is_released(e: MilvusException) -> bool:
    """Milvus' answer to a search or query on a collection that is not loaded (any more)."""
    msg = str(getattr(e, "message", e)).lower()
    return "released" in msg or "not loaded" in msg


R = TypeVar("R")


def reloading(method: Callable[..., R]) -> Callable[..., R]:
    """Run a read; if Milvus says the collection is released (a restart, or another client
    released it), load it and retry once instead of failing the user's request."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> R:
        try:
            return method(self, *args, **kwargs)
        except MilvusException as e:
            if not is_released(e):
                raise
            log.info("collection %r was released; loading it again", self.collection)
            self.client.load_collection(self.collection)
            return method(self, *args, **kwargs)

    return run


def is_local_uri(uri: str) -> bool:
    return "://" not in uri


def connect(uri: str, token: str | None = None) -> MilvusClient:
    """Open Milvus Lite or a server, turning the usual failures into one clear line."""
    kwargs: dict[str, Any] = {"uri": uri}
    if token:
        kwargs["token"] = token
    if is_local_uri(uri):
        parent = os.path.dirname(os.path.abspath(uri))
        os.makedirs(parent, exist_ok=True)
        # Milvus Lite logs a traceback for a locked db before raising; our one line says it all.
        logging.getLogger("milvus_lite").setLevel(logging.CRITICAL)
    else:
        kwargs["timeout"] = 10
    try:
        return MilvusClient(**kwargs)
    except MilvusException as e:
        if is_local_uri(uri) and not uri.endswith(".db"):
            # pymilvus only treats paths ending in .db as Milvus Lite; anything else is not a lock problem.
            raise StoreError(f"Milvus Lite path {uri!r} must end in .db (e.g. ./data/milvus.db); fix MILVUS_URI / --uri") from e
        if is_local_uri(uri) and "Open local milvus failed" not in str(getattr(e, "message", "")):
            # The embedded server started but did not answer (e.g. a heavily loaded machine).
            raise StoreError(f"cannot connect to Milvus Lite db {uri!r}: {getattr(e, 'message', e)}; retry") from e
        if is_local_uri(uri):
            raise StoreError(
                f"cannot open Milvus Lite db {uri!r}: another process (a running rag-ui, rag-ingest or notebook?) "
                f"holds its lock; stop it, or point MILVUS_URI at another path"
            ) from e
        raise StoreError(
            f"cannot reach Milvus at {uri}: {e.message if hasattr(e, 'message') else e}; "
            f"start the server or fix MILVUS_URI / MILVUS_TOKEN"
        ) from e
