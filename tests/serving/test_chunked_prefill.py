"""Chunked prefill: a step spends at most --max-prefill-tokens on prompts, decodes keep running
while a long prompt is split over steps, and the tokens are those of an unchunked prefill."""

from __future__ import annotations

import pytest

from model_host.engine.engine import Engine, EngineConfig
from model_host.engine.memory import kv_budget, plan_kv
from model_host.engine.runner import capture_sizes
from model_host.kernels.graphs import DecodeGraphs
from model_host.sampler import SamplingParams


def _prompts(tok):
    shared = tok.encode("system rules and retrieved passages about milvus indexes " * 6, add_bos=True)
    return [shared + tok.encode(" which index is fastest?"),
            tok.encode("a short prompt", add_bos=True),
            shared + tok.encode(" how do I scale out a cluster with many query nodes?"),
            tok.encode("vector " * 45, add_bos=True)]


def _run(model, tok, budget: int, prompts):
    engine = Engine(model, tok, EngineConfig(max_batch=4, kv_memory_gb=0.02, block_size=8,
                                             max_prefill_tokens=budget))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    seqs, chunk_sizes = [], []
    for i, p in enumerate(prompts):  # staggered arrivals: later prompts meet running decodes
        seqs.append(engine.add(p, params))
        for _ in range(i + 1):
            batch = engine.scheduler.schedule()
            chunk_sizes += [c.length for c in batch.prefill]
            engine.execute(batch)
    while engine.has_work:
        batch = engine.scheduler.schedule()
        chunk_sizes += [c.length for c in batch.prefill]
        engine.execute(batch)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return [s.output_ids for s in seqs], chunk_sizes, engine


def test_chunked_prefill_gives_the_tokens_of_unchunked_prefill(tiny_model):
    model, tok = tiny_model
    prompts = _prompts(tok)
    whole, whole_chunks, _ = _run(model, tok, 4096, prompts)
    chunked, chunks, engine = _run(model, tok, 7, prompts)
    assert max(whole_chunks) > 40  # the long prompts went in one piece
    assert max(chunks) <= 7 and len(chunks) > len(whole_chunks)  # ... and here in pieces of <= 7
    assert engine.blocks.hits > 0  # the shared prefix was served from the cache
    assert chunked == whole


def test_long_prompt_never_stalls_running_decodes(tiny_model):
    """While a 60-token prompt is prefilled 8 tokens at a time, the running request decodes in
    every step; and a step never computes more than 8 prompt tokens."""
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(max_batch=4, kv_memory_gb=0.02, block_size=8, max_prefill_tokens=8))
    short = engine.add(tok.encode("hi", add_bos=True), SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()  # its prompt
    long = engine.add([tok.bos_id] + [2000 + i for i in range(59)], SamplingParams(max_tokens=2, ignore_eos=True))
    steps = 0
    while long.num_output == 0:
        batch = engine.scheduler.schedule()
        assert sum(c.length for c in batch.prefill) <= 8
        assert short in batch.decode
        engine.execute(batch)
        steps += 1
    assert steps == -(-60 // 8)


def test_decode_graph_sizes_and_padding(tiny_model):
    assert capture_sizes(1) == [1]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="--max-batch"):
        capture_sizes(0)
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(max_batch=48, kv_memory_gb=0.01, block_size=8))
    assert engine.graph_report is None  # the CPU runs decode eagerly
    graphs = DecodeGraphs(model, engine.cache, 4, buckets=capture_sizes(48))
    assert [graphs.bucket(n) for n in (1, 3, 5, 16, 17, 33, 48)] == [1, 4, 8, 16, 32, 48, 48]
    assert graphs.bucket(49) is None


def test_kv_budget_from_free_memory():
    gib = 2**30
    assert kv_budget(40 * gib, 3 * gib, 1 * gib, fraction=0.9) == int(36 * gib * 0.9)
    with pytest.raises(ValueError, match="--kv-memory-gb"):
        kv_budget(2 * gib, 3 * gib, 1 * gib)


def test_kv_plan_defaults_on_cpu(tiny_model):
    model, _ = tiny_model
    assert plan_kv(model, 0.5, 2048, 1.0).kv_bytes == 2**29
    assert plan_kv(model, None, 2048, 1.0).kv_bytes == 2**30  # the CPU's explicit default
