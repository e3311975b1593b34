"""Retrieval evaluation on top of `ingest` and `rag`: metrics, dataset readers, runners and `rag-eval`.

It lives outside `rag` because its runners chunk documents with `ingest`, and `rag` imports
neither `ingest` nor `ui` (tests/test_layering.py checks it).
"""
