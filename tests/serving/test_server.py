"""The OpenAI-compatible server, over real HTTP on 127.0.0.1, through the `openai` SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.serving.conftest import HANDLES, MODEL

# Every test runs with the routes on a thread of the engine's process and as an API process does
# (the engine reached over the hub's socket): the same behaviour either way.
pytestmark = pytest.mark.parametrize("serve", HANDLES, indirect=True)

CHAT = [{"role": "system", "content": "You answer from context."}, {"role": "user", "content": "Where is data stored?"}]


def test_models_health_metrics_and_non_streamed_chat(serve):
    with serve() as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="x")
        assert [m.id for m in client.models.list().data] == [MODEL]
        r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5
        assert r.usage.prompt_tokens == len(s.engine.tokenizer.encode_chat(CHAT))
        root = s.base_url.removesuffix("/v1")
        assert httpx.get(f"{root}/health").json()["status"] == "ok"
        text = httpx.get(f"{root}/metrics").text
        assert f"model_host_kv_blocks_total {float(s.engine.blocks.num_blocks)}" in text
        assert "model_host_kv_blocks_used 0.0" in text  # the finished request's blocks are free again
        for name in ("model_host_requests_running", "model_host_requests_waiting", "model_host_kv_blocks_free",
                     "model_host_prefix_cache_hit_rate",
                     "model_host_generation_tokens_per_second", "model_host_time_to_first_token_seconds_bucket",
                     "model_host_inter_token_latency_seconds_bucket"):
            assert name in text, name
        assert 'model_host_requests_total{finish_reason="length",status="ok"} 1.0' in text
        # one prefill step and four decode steps (5 tokens): each step's time, by what it ran
        assert 'model_host_step_seconds_count{kind="prefill"} 1.0' in text
        assert 'model_host_step_seconds_count{kind="decode"} 4.0' in text
        assert 0 < float(text.split('model_host_step_seconds_sum{kind="decode"} ')[1].split()[0]) < 60
        # and their query rows: the whole prompt once, then one row a decode step
        assert f'model_host_step_rows_total{{kind="prefill"}} {float(r.usage.prompt_tokens)}' in text
        assert 'model_host_step_rows_total{kind="decode"} 4.0' in text


def test_streamed_chunks_equal_non_streamed_text_for_same_seed(serve):
    with serve() as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="x")
        kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
        full = client.chat.completions.create(**kw).choices[0].message.content
        stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        pieces, usage, finish = [], None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert "".join(pieces) == full and full
        assert usage is not None and usage.completion_tokens >= 1 and finish in ("stop", "length")


def test_32_concurrent_streaming_clients_finish_with_correct_usage(serve):
    with serve(max_batch=16) as s:
        prompt_len = len(s.engine.tokenizer.encode_chat(CHAT))

        async def one(client: openai.AsyncOpenAI, i: int):
            stream = await client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=4 + i % 4, temperature=0.7, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            usage, n_text = None, 0
            async for chunk in stream:
                usage = chunk.usage or usage
                n_text += sum(1 for c in chunk.choices if c.delta.content)
            return i, usage

        async def main():
            async with openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(32)))

        for i, usage in asyncio.run(main()):
            assert usage.completion_tokens == 4 + i % 4
            assert usage.prompt_tokens == prompt_len
        assert s.engine.blocks.num_free == s.engine.blocks.num_blocks


def _wait_for(pred, timeout=30.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.05)


def test_cancelled_streams_return_all_blocks(serve):
    with serve(max_batch=8) as s:
        start = s.engine.blocks.num_free

        async def cancel_after_two_chunks(client):
            stream = await client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=500, stream=True, extra_body={"ignore_eos": True})
            n = 0
            async for _ in stream:
                n += 1
                if n == 3:
                    break
            await stream.close()

        async def main():
            async with openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0) as client:
                await asyncio.gather(*(cancel_after_two_chunks(client) for _ in range(6)))

        asyncio.run(main())
        _wait_for(lambda: s.engine.blocks.num_free == start and not s.engine.has_work)

        # Explicit abort by id frees the blocks too.
        with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{s.base_url}/chat/completions",
            json={"model": MODEL, "messages": CHAT, "max_tokens": 500, "stream": True, "ignore_eos": True},
        ) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            rid = json.loads(first[6:])["id"]
            assert http.post(f"{s.base_url}/abort", json={"id": rid}).json() == {"id": rid, "aborted": True}
            _wait_for(lambda: s.engine.blocks.num_free == start)


def test_prefix_caching_over_http_reports_cached_tokens_and_same_output(serve):
    context = "Context passage about Milvus storage and object stores. " * 20
    msgs = [{"role": "system", "content": context}, {"role": "user", "content": "Where is data stored?"}]
    with serve(block_size=16) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="x")
        kw = dict(model=MODEL, messages=msgs, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        a = client.chat.completions.create(**kw)
        b = client.chat.completions.create(**kw)
        assert a.usage.prompt_tokens_details.cached_tokens == 0
        assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 16
        assert a.choices[0].message.content == b.choices[0].message.content
        assert "model_host_prefix_cache_hit_rate" in httpx.get(s.base_url.removesuffix("/v1") + "/metrics").text


BAD_REQUESTS = [
    ("malformed json", b"{not json", 400),
    ("messages missing", {"model": MODEL}, 400),
    ("messages empty", {"model": MODEL, "messages": []}, 400),
    ("wrong type", {"model": MODEL, "messages": "hello"}, 400),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("temperature type", {"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400),
    ("unknown model", {"model": "gpt-9", "messages": CHAT}, 404),
    ("max_tokens zero", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400),
    ("max_tokens negative", {"model": MODEL, "messages": CHAT, "max_tokens": -5}, 400),
    ("beyond context", {"model": MODEL, "messages": CHAT, "max_tokens": 10_000_000}, 400),
    ("n > 1", {"model": MODEL, "messages": CHAT, "n": 3}, 400),
    ("oversized body", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]}, 413),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_server_stays_up(serve, name, body, status):
    with serve(max_body_bytes=200_000) as s, httpx.Client(timeout=30) as http:
        url = f"{s.base_url}/chat/completions"
        r = http.post(url, content=body) if isinstance(body, bytes) else http.post(url, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
        ok = http.post(url, json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key_and_completions_endpoint(serve):
    with serve(api_key="sekret") as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=s.base_url, api_key="sekret")
        r = client.completions.create(model=MODEL, prompt="The vector database", max_tokens=3,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_streamed_events_are_canonical_json_with_the_full_text(serve, route):
    """Text events are spliced into a per-request template (not serialized whole each time):
    every event must still be the JSON that serializing its payload gives, and the texts must add
    up to the non-streamed answer (random tokens of the tiny model: arbitrary Unicode, quotes)."""
    body = {"model": MODEL, "max_tokens": 24, "temperature": 1.0, "seed": 7, "ignore_eos": True,
            **({"messages": CHAT} if route == "chat/completions" else {"prompt": "Where is data stored?"})}
    with serve() as s, httpx.Client(timeout=60) as http:
        whole = http.post(f"{s.base_url}/{route}", json=body).json()["choices"][0]
        with http.stream("POST", f"{s.base_url}/{route}", json={**body, "stream": True}) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert [json.dumps(p, ensure_ascii=False) for p in payloads] == events[:-1]
    if route == "chat/completions":
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads)
        assert text == whole["message"]["content"]
    else:
        assert "".join(p["choices"][0]["text"] for p in payloads) == whole["text"]
    assert len(payloads) > 10 and all(p["choices"][0].get("logprobs") is None for p in payloads)
