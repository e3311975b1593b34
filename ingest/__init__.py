"""Markdown folders -> header-aware chunks -> embeddings -> Milvus, incrementally and idempotently."""
