"""Every store failure the page shows is one sentence that names the fix, never raw exception text.

`StoreError` messages are already written that way. A `MilvusException` carries pymilvus'
internals (codes, gRPC details, stack-like text); it is mapped here by what happened.
"""

from __future__ import annotations

from pymilvus import MilvusException

from rag.connection import StoreError, is_released
from rag.settings import SettingsError


def explain(e: Exception, collection: str, uri: str) -> str:
    """One line for the user about `e`, raised while working on `collection` at `uri`."""
    if isinstance(e, (StoreError, SettingsError, FileNotFoundError)):
        return " ".join(str(e).split())
    if not isinstance(e, MilvusException):
        return f"unexpected {type(e).__name__} while reading collection {collection!r}; see the rag-ui log and retry"
    msg = str(getattr(e, "message", e)).lower()
    if is_released(e):
        return (f"collection {collection!r} is not loaded in Milvus and could not be loaded; "
                f"check that Milvus at {uri} has memory for it, then restart rag-ui")
    if "not found" in msg or "not exist" in msg or "can't find" in msg:
        return f"collection {collection!r} no longer exists at {uri}; ingest documents again (Knowledge base tab)"
    if any(w in msg for w in ("connect", "unavailable", "deadline", "timeout", "closed channel")):
        return f"cannot reach Milvus at {uri}; start it (or fix MILVUS_URI) and retry"
    code = getattr(e, "code", None)
    return (f"Milvus refused the request on collection {collection!r} (error code {code}); "
            f"check the Milvus log at {uri} and retry")
