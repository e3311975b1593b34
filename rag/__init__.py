"""Retrieval-augmented answering over markdown docs: embedder, Milvus store, retriever, prompt, LLM client.

Data flows one way: (ingest: loader -> chunker) -> embedder -> store -> retriever -> prompt -> LLM.
`rag` never imports `ingest` or `ui`; both build on it.
"""
