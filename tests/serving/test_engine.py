"""Engine-level checks: batching equals solo runs, prefix caching, preemption, block accounting."""

from __future__ import annotations

import random

import pytest

from model_host.engine.engine import Engine, EngineConfig, RequestError
from model_host.generate import generate
from model_host.sampler import SamplingParams
from model_host.tokenizer import StreamDecoder, Tokenizer


def _prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    words = ["milvus", "vector", "index", "latent", "cache", "expert", "router", "token", "block", "prefix", "query"]
    return [tok.encode(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 30))), add_bos=True)
            for _ in range(n)]


def test_continuous_batching_matches_solo_runs(tiny_model):
    """16 requests of different lengths arriving at different steps: greedy output equals solo runs."""
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(max_batch=6, kv_memory_gb=0.02, block_size=8))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = _prompts(tok, 16)
    arrivals = {i: i // 2 for i in range(16)}  # two new requests every step while others decode
    seqs, step = {}, 0
    while len(seqs) < 16 or engine.has_work:
        for i, at in arrivals.items():
            if at == step:
                seqs[i] = engine.add(prompts[i], params)
        engine.step()
        step += 1
    for i, p in enumerate(prompts):
        solo = generate(model, tok, p, params)
        assert seqs[i].output_ids == solo.token_ids, f"request {i} diverged under batching"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_cache_reuses_blocks_and_keeps_output(tiny_model):
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(max_batch=4, kv_memory_gb=0.02, block_size=8))
    shared = tok.encode("system prompt with retrieved context " * 12, add_bos=True)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = engine.generate([shared + tok.encode(" question one")], params)[0]
    second = engine.generate([shared + tok.encode(" question one")], params)[0]
    other = engine.generate([shared + tok.encode(" another question")], params)[0]
    assert first.prompt_cached_tokens == 0
    assert second.prompt_cached_tokens >= len(shared) - 8  # every full block of the shared prefix
    assert other.prompt_cached_tokens >= len(shared) - 8
    assert second.output_ids == first.output_ids  # cached latents give the same answer
    assert engine.blocks.hit_rate > 0.3


def test_preemption_when_cache_is_small_still_completes(tiny_model):
    """A cache far too small for the batch: sequences are preempted and recomputed, never OOM.

    Four 40-token prompts with 24 new tokens need 8 blocks of 8 each at the end (32 in all),
    and the cache has 20: at least one sequence must be preempted, yet each fits alone.
    """
    model, tok = tiny_model
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [[tok.bos_id] + [1000 + 37 * i + j for j in range(39)] for i in range(4)]
    bytes_per_block = model.num_cache_layers * 8 * (model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim) * 4
    engine = Engine(model, tok, EngineConfig(max_batch=4, kv_memory_gb=20 * bytes_per_block / 2**30, block_size=8))
    assert engine.blocks.num_blocks == 20
    seqs = engine.generate(prompts, params)
    assert engine.scheduler.preemptions > 0
    for p, s in zip(prompts, seqs, strict=True):
        assert s.output_ids == generate(model, tok, p, params).token_ids
    assert engine.blocks.num_free == 20


def test_request_longer_than_the_cache_is_refused(tiny_model):
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(kv_memory_gb=0.0005, block_size=8))
    with pytest.raises(RequestError, match="maximum context length"):
        engine.add(list(range(10, 10 + engine.capacity_tokens)), SamplingParams(max_tokens=4))


def test_abort_frees_blocks(tiny_model):
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(max_batch=4, kv_memory_gb=0.02, block_size=8))
    seqs = [engine.add(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in _prompts(tok, 3)]
    engine.step()
    engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    for s in seqs:
        engine.abort(s)
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work


class _BrokenDecoder(StreamDecoder):
    def push(self, token_id: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected decoder fault")


class _FirstDecoderBreaks(Tokenizer):
    """The real tokenizer, except that the first request's stream decoder fails on its first token."""

    def __init__(self, path):
        super().__init__(path)
        self.handed_out = 0

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        self.handed_out += 1
        cls = _BrokenDecoder if self.handed_out == 1 else StreamDecoder
        return cls(self, skip_special_tokens=skip_special_tokens)


def test_a_request_failing_inside_a_step_fails_alone(tiny_model, tiny_checkpoint):
    model, tok = tiny_model
    engine = Engine(model, _FirstDecoderBreaks(tiny_checkpoint), EngineConfig(max_batch=4, kv_memory_gb=0.02))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    prompts = _prompts(tok, 2)
    broken, healthy = engine.generate(prompts, params)
    assert broken.finish_reason == "error" and healthy.finish_reason == "length"
    assert healthy.output_ids == generate(model, tok, prompts[1], params).token_ids
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work
