"""Retrieval-augmented answering over markdown docs: embedder, Milvus store, retriever, prompt, LLM client.

Data flows one way: (ingest: loader -> chunker) -> embedder -> store -> retriever -> prompt -> LLM.
`rag` never imports `ingest` or `ui`; both build on it.
"""

import os as _os

# gRPC's C core logs keepalive throttling by a local Milvus Lite ("GOAWAY ... too_many_pings")
# as error lines on stderr during long ingests; the client backs off and nothing fails. Failed
# calls still raise from pymilvus. Read when grpc loads; GRPC_VERBOSITY=ERROR brings logs back.
_os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def _import_pymilvus_without_local_uri() -> None:
    """pymilvus reads MILVUS_URI at import time and rejects anything but http(s) URIs, while our
    MILVUS_URI may be a Milvus Lite path; hide a path from that import-time check only."""
    uri = _os.environ.get("MILVUS_URI")
    if uri is None or "://" in uri:
        return
    del _os.environ["MILVUS_URI"]
    try:
        import pymilvus  # noqa: F401
    finally:
        _os.environ["MILVUS_URI"] = uri


_import_pymilvus_without_local_uri()
