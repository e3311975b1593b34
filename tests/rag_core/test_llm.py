"""The answering path against a real OpenAI-protocol server (the stub): streaming, reasoning, citations."""

from __future__ import annotations

import time

import pytest

from rag.config import DEEPSEEK_BASE_URL, DEEPSEEK_MODEL, RagConfig
from rag.llm import Delta, LLMClient, LLMError
from rag.pipeline import Finished, RagPipeline, Retrieved
from rag.prompt import NO_CONTEXT_ANSWER, SYSTEM_PROMPT
from rag.store import MilvusStore
from tests.support.openai_stub import free_port

REPLY = "Milvus keeps inserted data in object storage such as MinIO [1] and metadata in etcd [2]."
REASONING = "Passage 1 covers storage; passage 2 covers metadata."
MESSAGES = [{"role": "user", "content": "hi"}]


def test_stream_yields_deltas_in_order_as_they_arrive(openai_stub):
    openai_stub.state.reply = REPLY
    openai_stub.state.delay_s = 0.1
    client = LLMClient(openai_stub.base_url, None, "not-needed")
    stamps: list[tuple[float, Delta]] = []
    for d in client.stream(MESSAGES):
        stamps.append((time.monotonic(), d))
    assert "".join(d.text for _, d in stamps) == REPLY
    assert all(d.kind == "answer" for _, d in stamps) and len(stamps) == len(REPLY.split(" "))
    assert stamps[-1][0] - stamps[0][0] > 0.5  # pieces arrived one by one, not all at the end
    assert client.model == "deepseek-chat"  # picked from /v1/models when LLM_MODEL is unset
    assert client.usage.prompt_tokens == 42 and client.usage.finish_reason == "stop"
    req = openai_stub.state.requests[-1]
    assert req["stream"] is True and req["messages"] == MESSAGES


def test_reasoning_content_is_kept_apart(openai_stub):
    openai_stub.state.reply = REPLY
    openai_stub.state.reasoning = REASONING
    deltas = list(LLMClient(openai_stub.base_url, "deepseek-reasoner", "k").stream(MESSAGES))
    kinds = [d.kind for d in deltas]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning first, then the answer
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == REASONING
    assert "".join(d.text for d in deltas if d.kind == "answer") == REPLY


def test_llm_failures_are_one_line(openai_stub):
    openai_stub.state.api_key = "right-key"
    with pytest.raises(LLMError, match="rejected the API key") as err:
        list(LLMClient(openai_stub.base_url, "m", "wrong-key").stream(MESSAGES))
    assert "\n" not in str(err.value)
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMError, match="cannot connect to the LLM") as err:
        list(LLMClient(url, "m", "k", timeout=5).stream(MESSAGES))
    assert url in str(err.value) and "\n" not in str(err.value)


def pipeline(stub, store: MilvusStore, embedder, **overrides) -> RagPipeline:
    config = RagConfig.load(environ={"LLM_BASE_URL": stub.base_url}, **overrides)
    return RagPipeline(config, embedder=embedder, store=store)  # not closed: the store is shared


def test_pipeline_streams_a_cited_answer(openai_stub, faq_store: MilvusStore, embedder):
    openai_stub.state.reply = REPLY
    openai_stub.state.reasoning = REASONING
    events = list(pipeline(openai_stub, faq_store, embedder, top_k=3).ask("How is data stored in milvus?"))
    assert isinstance(events[0], Retrieved) and isinstance(events[-1], Finished)
    deltas = events[1:-1]
    assert all(isinstance(d, Delta) for d in deltas)
    assert "".join(d.text for d in deltas if d.kind == "answer") == REPLY
    done = events[-1]
    assert done.status == "answered" and done.answer == REPLY and done.reasoning == REASONING
    assert REASONING not in done.answer
    assert done.hits == events[0].hits and 1 <= len(done.hits) <= 3
    assert set(done.timings) == {"embed_ms", "search_ms", "llm_first_token_ms", "total_ms"}
    assert done.usage is not None and done.usage.prompt_tokens == 42

    (req,) = openai_stub.state.requests
    assert req["model"] == "deepseek-chat" and req["stream"] is True
    assert req["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    user = req["messages"][1]["content"]
    for n, h in enumerate(done.hits, 1):  # the numbers the answer cites are the blocks it was given
        assert f"[{n}] {h.source} › {h.header_path}\n" in user
    assert "Where does Milvus store data?" in user


def test_no_passage_above_the_floor_means_no_llm_call(openai_stub, faq_store: MilvusStore, embedder):
    events = list(pipeline(openai_stub, faq_store, embedder, score_floor=0.99).ask("How is data stored in milvus?"))
    done = events[-1]
    assert isinstance(done, Finished) and done.status == "no-context"
    assert done.hits == [] and done.answer == NO_CONTEXT_ANSWER
    assert openai_stub.state.requests == []


def test_unrelated_question_falls_under_the_default_floor(openai_stub, faq_store: MilvusStore, embedder):
    events = list(pipeline(openai_stub, faq_store, embedder).ask("What is a good recipe for banana bread?"))
    assert events[-1].status == "no-context" and openai_stub.state.requests == []


def test_deepseek_key_alone_selects_the_deepseek_api():
    assert RagConfig.load(environ={"DEEPSEEK_API_KEY": "sk-test"}).llm == (DEEPSEEK_BASE_URL, DEEPSEEK_MODEL, "sk-test")
    assert DEEPSEEK_BASE_URL == "https://api.deepseek.com" and DEEPSEEK_MODEL == "deepseek-chat"
    both = RagConfig.load(environ={"DEEPSEEK_API_KEY": "sk-test", "LLM_BASE_URL": "http://127.0.0.1:8000/v1"})
    assert both.llm == ("http://127.0.0.1:8000/v1", None, "sk-test")  # an explicit endpoint wins
    assert RagConfig.load(environ={}).llm is None  # retrieval-only
