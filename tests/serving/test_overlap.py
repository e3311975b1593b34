"""Overlapped steps (EngineConfig.overlap): step n+1 is queued before step n's tokens are read.

On the CPU nothing runs asynchronously, but the bookkeeping is the same as on a GPU: PENDING
token slots, decode rows fed from the previous step's device tensor, one dropped row after a
stop, and outputs one step late. Every check compares against the synchronous engine.
"""

from __future__ import annotations

import random

import pytest

from model_host.engine.engine import Engine, EngineConfig
from model_host.engine.sequence import PENDING
from model_host.generate import generate
from model_host.sampler import SamplingParams
from model_host.tokenizer import Tokenizer


class _EosAt(Tokenizer):
    """The real tokenizer with another end-of-sequence id: a random model then stops on EOS."""

    def __init__(self, path, eos_id: int):
        super().__init__(path)
        self.eos_id = eos_id


def _prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    words = ["milvus", "vector", "index", "latent", "cache", "expert", "router", "token", "block", "prefix"]
    return [tok.encode(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 40))), add_bos=True)
            for _ in range(n)]


def _run(model, tok, overlap: bool, requests, kv_gb: float = 0.02, arrivals_per_step: int = 2) -> dict:
    """Requests arriving a few per step; everything a client sees, per request."""
    engine = Engine(model, tok, EngineConfig(max_batch=5, kv_memory_gb=kv_gb, block_size=8, overlap=overlap))
    assert engine.overlap is overlap
    seen: dict[int, dict] = {}
    seqs, pending = [], list(requests)
    while pending or engine.has_work:
        for prompt, params in pending[:arrivals_per_step]:
            seqs.append(engine.add(prompt, params))
        del pending[:arrivals_per_step]
        for o in engine.step():
            r = seen.setdefault(o.seq.id, {"text": "", "tokens": [], "logprobs": [], "ttft": 0})
            r["text"] += o.text
            r["tokens"] += [] if o.token is None else [o.token]
            r["logprobs"] += [] if o.logprob is None else [(o.logprob.token, round(o.logprob.logprob, 4),
                                                            [t for t, _ in o.logprob.top])]
            r["ttft"] += o.ttft is not None
            r["finished"] = o.finished
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
    assert not any(PENDING in s.token_ids for s in seqs)
    return {"preemptions": engine.scheduler.preemptions, "hits": engine.blocks.hits,
            "requests": [(s.output_ids, s.finish_reason, s.num_output, seen[s.id]) for s in seqs]}


def test_overlapped_steps_give_every_request_what_synchronous_steps_give(tiny_model, tiny_checkpoint):
    """Greedy and seeded sampling, logprobs, stop strings, EOS and max_tokens, prefix hits, with
    requests arriving while others decode: token ids, text, finish reasons, usage and logprobs
    equal the synchronous engine's, and no request stops late or early."""
    model, tok = tiny_model
    prompts = _prompts(tok, 12)
    shared = tok.encode("system rules and retrieved passages " * 6, add_bos=True)
    prompts += [shared + p[1:] for p in prompts[:4]]  # prefix hits
    probe = generate(model, tok, prompts[0], SamplingParams(max_tokens=6, ignore_eos=True)).token_ids
    eos_tok = _EosAt(tiny_checkpoint, eos_id=probe[3])  # request 0 (greedy) stops on its 4th token
    stop_text = tok.decode([probe[2]])
    kinds = [SamplingParams(max_tokens=9), SamplingParams(max_tokens=7, temperature=0.9, seed=3, logprobs=2),
             SamplingParams(max_tokens=5, top_k=5, temperature=1.0, seed=11), SamplingParams(max_tokens=8, stop=(stop_text,)),
             SamplingParams(max_tokens=1), SamplingParams(max_tokens=6, logprobs=0)]
    requests = [(p, kinds[i % len(kinds)]) for i, p in enumerate(prompts)]
    sync = _run(model, eos_tok, False, requests)
    over = _run(model, eos_tok, True, requests)
    assert over["requests"] == sync["requests"]
    reasons = {r[1] for r in sync["requests"]}
    assert reasons == {"stop", "length"}, reasons  # both kinds of ending were exercised
    assert sync["requests"][0][0] == probe[:3] and sync["requests"][0][1] == "stop"  # EOS: 3 tokens, not counted
    assert over["hits"] == sync["hits"] > 0  # blocks filled by decodes were published all the same


def test_overlapped_preemption_recomputes_only_read_tokens(tiny_model):
    """A cache too small for the batch: a preempted sequence whose last token is still on the
    device waits until it is read, then is recomputed; outputs equal solo runs."""
    model, tok = tiny_model
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [[tok.bos_id] + [1000 + 37 * i + j for j in range(39)] for i in range(4)]
    per_block = model.num_cache_layers * 8 * (model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim) * 4
    res = _run(model, tok, True, [(p, params) for p in prompts], kv_gb=20 * per_block / 2**30, arrivals_per_step=4)
    assert res["preemptions"] > 0
    for p, (out, reason, n, _) in zip(prompts, res["requests"], strict=True):
        assert out == generate(model, tok, p, params).token_ids and reason == "length" and n == 24


def test_abort_with_a_token_in_flight_counts_only_read_tokens(tiny_model):
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(max_batch=4, kv_memory_gb=0.02, block_size=8, overlap=True))
    seq = engine.add(_prompts(tok, 1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    read = []
    for _ in range(4):
        read += [o.token for o in engine.step()]
    assert seq.awaiting_token and len(read) == 3  # the prefill's token and two decodes read; one in flight
    engine.abort(seq)
    assert seq.output_ids == read and seq.num_output == 3
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.step() == [] and not engine.has_work  # the dropped step's token is never emitted


def test_overlap_refuses_speculation(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="speculative"):
        Engine(model, tok, EngineConfig(kv_memory_gb=0.02, speculative_tokens=1, overlap=True))


def test_overlap_defaults_off_where_nothing_runs_asynchronously(tiny_model):
    model, tok = tiny_model
    assert Engine(model, tok, EngineConfig(kv_memory_gb=0.02)).overlap is False  # CPU: no graphs


def test_tensor_parallel_serving_keeps_tokens_on_the_host():
    """Under --tp the other ranks take each step's tokens from rank 0's plan (host lists), so
    serve turns overlap off there whatever the flag says, and the TP runner refuses device tokens."""
    from model_host.cli import build_parser
    from model_host.server.cli import _engine_config

    args = build_parser().parse_args(["serve", "--checkpoint", "x", "--overlap", "on", "--kv-memory-gb", "1"])
    assert _engine_config(args, world=1).overlap is True
    assert _engine_config(args, world=2).overlap is False


def test_served_answers_are_the_same_with_overlapped_steps(serve, tiny_model):
    """Over HTTP, streamed and not, with logprobs and stop strings, 6 requests at once: the text,
    finish reasons and usage of an overlapped server equal the synchronous server's."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from tests.serving.conftest import MODEL

    _, tok = tiny_model
    prompts = [" ".join(["vector index segment"] * n) for n in (1, 5, 9, 2, 14, 3)]

    def answers(overlap: bool) -> list:
        with serve(max_batch=4, overlap=overlap) as s:
            client = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)

            def one(i: int):
                kw = dict(model=MODEL, prompt=prompts[i], max_tokens=5 + i, temperature=0,
                          logprobs=1 if i % 2 else None, stop=["\n"] if i % 3 == 0 else None)
                if i % 2:
                    c = client.completions.create(**kw).choices[0]
                    return c.text, c.finish_reason, c.logprobs.tokens
                text, reason = "", None
                for chunk in client.completions.create(stream=True, **kw):
                    if chunk.choices:
                        text += chunk.choices[0].text
                        reason = chunk.choices[0].finish_reason or reason
                return text, reason

            with ThreadPoolExecutor(len(prompts)) as pool:
                return list(pool.map(one, range(len(prompts))))

    assert answers(True) == answers(False)
