"""Gradio web UI: streamed, cited answers over the indexed docs, and knowledge-base management."""

# `rag` first: its import shields pymilvus' import-time check of MILVUS_URI from a Milvus Lite
# path, and every ui module (app.py imports pymilvus directly) loads after this package file.
import rag  # noqa: F401
