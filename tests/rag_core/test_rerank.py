"""LLM rerank and HyDE against a real OpenAI-protocol server (the stub) over the real FAQ store."""

from __future__ import annotations

import logging

from rag.config import RagConfig
from rag.llm import LLMClient
from rag.pipeline import RagPipeline
from rag.prompt import count_tokens
from rag.rerank import RERANK_SYSTEM, HydeWriter, LLMReranker, parse_ranking
from rag.retriever import Retriever
from rag.store import MilvusStore
from tests.support.openai_stub import free_port

QUESTION = "How is data stored in milvus?"


def test_parse_ranking_is_robust_and_loses_no_passage():
    assert parse_ranking("3, 1, 2", 3) == [2, 0, 1]
    assert parse_ranking("Ranking: [2] > [5] > [2] > [9]", 5) == [1, 4, 0, 2, 3]  # repeat and 9 ignored
    assert parse_ranking("I cannot rank these.", 4) is None
    assert parse_ranking("0, 7", 3) is None


def test_llm_reorders_the_first_stage_hits(openai_stub, faq_store: MilvusStore, embedder):
    openai_stub.state.reply = "3, 1"
    first = Retriever(faq_store, embedder).retrieve(QUESTION, k=4).hits
    reranker = LLMReranker(LLMClient(openai_stub.base_url, None, "k"), count_tokens, token_budget=3000)
    r = Retriever(faq_store, embedder, reranker=reranker, rerank_candidates=4).retrieve(QUESTION, k=3)
    assert [h.id for h in r.hits] == [first[2].id, first[0].id, first[1].id]  # unnamed ones keep their order
    assert [h.rank for h in r.hits] == [1, 2, 3] and r.rerank_ms > 0
    assert len(openai_stub.state.requests) == 1  # one request per question
    req = openai_stub.state.requests[0]
    assert req["messages"][0]["content"] == RERANK_SYSTEM and req["temperature"] == 0.0
    user = req["messages"][1]["content"]
    assert QUESTION in user and "[4] " in user and "[5] " not in user


def test_token_budget_limits_what_is_sent(openai_stub, faq_store: MilvusStore, embedder):
    openai_stub.state.reply = "2, 1"
    hits = Retriever(faq_store, embedder).retrieve(QUESTION, k=10).hits
    reranker = LLMReranker(LLMClient(openai_stub.base_url, None, "k"), count_tokens, token_budget=700)
    out = reranker.rerank(QUESTION, hits, k=10)
    user = openai_stub.state.requests[-1]["messages"][1]["content"]
    sent = sum(1 for n in range(1, 11) if f"[{n}] " in user)
    assert 2 <= sent < 10
    assert count_tokens(user) < 700 + 100  # passages within the budget; the question and labels on top
    assert [h.id for h in out] == [hits[1].id, hits[0].id, *[h.id for h in hits[2:]]]


def test_bad_reply_or_dead_llm_keeps_the_order_with_one_warning(openai_stub, faq_store, embedder, caplog):
    hits = Retriever(faq_store, embedder).retrieve(QUESTION, k=5).hits
    openai_stub.state.reply = "Sorry, I can't help with that."
    reranker = LLMReranker(LLMClient(openai_stub.base_url, None, "k"), count_tokens)
    with caplog.at_level(logging.WARNING, logger="rag.rerank"):
        assert reranker.rerank(QUESTION, hits, 3) == hits[:3]
        assert reranker.rerank(QUESTION, hits, 3) == hits[:3]
    assert len([r for r in caplog.records if "rerank skipped" in r.getMessage()]) == 1
    dead = LLMReranker(LLMClient(f"http://127.0.0.1:{free_port()}/v1", "m", "k", timeout=2), count_tokens)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rag.rerank"):
        assert dead.rerank(QUESTION, hits, 5) == hits
    assert "cannot connect" in caplog.records[0].getMessage()


def test_hyde_passage_steers_the_query_vector(openai_stub, faq_store: MilvusStore, embedder):
    vague = "Where does it all go?"
    passage = "Milvus stores data in object storage such as MinIO or S3, and the log in Pulsar or Kafka."
    openai_stub.state.reply = passage
    plain = Retriever(faq_store, embedder).retrieve(vague, k=3).hits
    hyde = HydeWriter(LLMClient(openai_stub.base_url, None, "k"))
    steered = Retriever(faq_store, embedder, hyde=hyde).retrieve(vague, k=3).hits
    target = "Product FAQ › Where does Milvus store data?"
    assert target not in [h.header_path for h in plain]
    assert target in [h.header_path for h in steered]
    assert openai_stub.state.requests[-1]["messages"][1]["content"] == vague


def test_pipeline_uses_the_stages_only_with_an_llm(openai_stub, faq_store: MilvusStore, embedder, caplog):
    openai_stub.state.reply = "2, 1"
    base = RagPipeline(RagConfig.load(environ={}), embedder, faq_store, store_open=True).retriever
    with caplog.at_level(logging.WARNING, logger="rag.rerank"):
        off = RagPipeline(RagConfig.load(environ={"RAG_RERANK": "llm", "RAG_HYDE": "1"}), embedder, faq_store,
                          store_open=True).retriever
    assert off.reranker is None and off.hyde is None
    assert "need an LLM" in caplog.text
    assert [h.id for h in off.retrieve(QUESTION, 3).hits] == [h.id for h in base.retrieve(QUESTION, 3).hits]
    assert openai_stub.state.requests == []
    on = RagPipeline(RagConfig.load(environ={"LLM_BASE_URL": openai_stub.base_url, "RAG_RERANK": "llm"}), embedder,
                     faq_store, store_open=True).retriever
    hits = on.retrieve(QUESTION, 3).hits
    first = base.retrieve(QUESTION, 20).hits
    assert [h.id for h in hits] == [first[1].id, first[0].id, first[2].id]
    assert len(openai_stub.state.requests) == 1
