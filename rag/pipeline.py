"""Question in, cited answer out: retrieve -> score floor -> prompt -> streamed LLM answer."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

from rag.config import RagConfig
from rag.embedder import Embedder, make_embedder, resolve_name
from rag.llm import Delta, LLMClient, Usage
from rag.prompt import NO_CONTEXT_ANSWER, build_prompt
from rag.rerank import llm_stages
from rag.retriever import Retriever
from rag.store import MilvusStore
from rag.types import Hit

NO_LLM_NOTE = (
    "No LLM is configured (set DEEPSEEK_API_KEY, or LLM_BASE_URL for a model host), "
    "so this is retrieval-only mode: here are the most relevant passages."
)
REWRITE_PROMPT = (
    "Rewrite the user's last question as one standalone question that can be understood without the "
    "conversation. Keep names and technical terms exactly. Reply with the question only."
)
HISTORY_TURNS = 6  # bounded history for question rewriting; older turns rarely matter


@dataclasses.dataclass
class Retrieved:
    """First event of an answer: the passages that will be cited, numbered from 1."""

    hits: list[Hit]
    mode: str
    question: str  # the question actually searched (after rewriting)


@dataclasses.dataclass
class Finished:
    """Last event: the whole answer, its sources and per-stage timings in milliseconds."""

    answer: str
    reasoning: str
    hits: list[Hit]
    status: str  # "answered", "retrieval-only" or "no-context"
    timings: dict[str, float]
    usage: Usage | None = None


Event = Retrieved | Delta | Finished


class RagPipeline:
    """Owns the embedder, the store handle, the retriever and the optional LLM client."""

    def __init__(
        self, config: RagConfig, embedder: Embedder | None = None, store: MilvusStore | None = None,
        *, store_open: bool = False,
    ):
        """`store_open`: the caller already opened `store` for `embedder` (checked and loaded it)
        and reuses it across pipelines, as the UI does; opening again costs ~6 Milvus calls."""
        self.config = config
        self.store = store or MilvusStore(config.milvus_uri, config.collection, config.milvus_token)
        self.embedder = embedder or make_embedder(config, resolve_name(config.embedder, self.store.recorded_embedder()))
        if not (store_open and store is not None):
            self.store.open_existing(self.embedder)
        llm = config.llm
        self.llm = LLMClient(*llm, timeout=config.llm_timeout) if llm else None
        self.retriever = Retriever(self.store, self.embedder, config.mode, config.rrf_k, collapse=config.collapse,
                                   query_adapter=config.query_adapter,
                                   **llm_stages(config, self.llm))

    @property
    def score_floor(self) -> float:
        return self.config.score_floor if self.config.score_floor is not None else self.embedder.score_floor

    def rewrite(self, question: str, history: list[tuple[str, str]]) -> str:
        """Make a follow-up standalone, from the last few (user, assistant) turns."""
        if not history:
            return question
        turns = history[-HISTORY_TURNS:]
        if self.llm is None:
            # Without an LLM, prefixing the previous question keeps its topic words in the query.
            return f"{turns[-1][0]} {question}"
        convo = "\n".join(f"User: {u}\nAssistant: {a[:500]}" for u, a in turns)
        messages = [
            {"role": "system", "content": REWRITE_PROMPT},
            {"role": "user", "content": f"Conversation:\n{convo}\n\nLast question: {question}"},
        ]
        rewritten = self.llm.complete(messages, max_tokens=96).strip()
        return rewritten or question

    def ask(
        self, question: str, k: int | None = None, filter: str = "", mode: str | None = None,
        history: list[tuple[str, str]] | None = None, use_llm: bool = True,
        load_model_ms: float | None = None,
    ) -> Iterator[Event]:
        """Stream the events of one answer: Retrieved, then Deltas, then Finished.

        `load_model_ms`: time the caller spent loading the embedding model for this answer,
        reported in the timings (the first question of a process pays it).
        """
        t0 = time.perf_counter()
        searched = self.rewrite(question, history or []) if history else question
        r = self.retriever.retrieve(searched, k or self.config.top_k, filter, mode)
        floor = self.score_floor
        hits = [h for h in r.hits if h.similarity is None or h.similarity >= floor]
        timings = {"embed_ms": r.embed_ms, "search_ms": r.search_ms}
        if load_model_ms is not None:
            timings["load_model_ms"] = load_model_ms
        llm = self.llm if use_llm else None
        prompt = build_prompt(question if not history else searched, hits, self.config.context_tokens)
        hits = prompt.hits
        yield Retrieved(hits, r.mode, searched)

        if not hits:
            status, answer = "no-context", NO_CONTEXT_ANSWER
        elif llm is None:
            status, answer = "retrieval-only", NO_LLM_NOTE
        else:
            status, parts, reasoning = "answered", [], []
            t_llm = time.perf_counter()
            for delta in llm.stream(prompt.messages, self.config.max_answer_tokens, self.config.temperature):
                timings.setdefault("llm_first_token_ms", (time.perf_counter() - t_llm) * 1e3)
                (parts if delta.kind == "answer" else reasoning).append(delta.text)
                yield delta
            timings["total_ms"] = (time.perf_counter() - t0) * 1e3
            yield Finished("".join(parts), "".join(reasoning), hits, status, timings, llm.usage)
            return
        yield Delta("answer", answer)
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        yield Finished(answer, "", hits, status, timings)

    @property
    def needs_query_vectors(self) -> bool:
        """Whether answering embeds the question (every mode but BM25 on a BM25 collection)."""
        return self.config.mode != "bm25" or not self.store.bm25

    def close(self) -> None:
        self.store.close()
