"""Whole-prompt prefill graphs: the length buckets, and the padded forward they capture, which
must give a prompt's real positions exactly what the eager prefill gives them (run eagerly here
on the CPU; tests/gpu/test_model_gpu.py replays the captured graphs)."""

from __future__ import annotations

import pytest
import torch

from model_host.engine.engine import Engine, EngineConfig
from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.runner import ModelRunner
from model_host.engine.scheduler import PrefillChunk
from model_host.engine.sequence import Sequence
from model_host.kernels.graphs import PREFILL_MIN_TOKENS, PrefillGraphs, prefill_buckets
from model_host.sampler import SamplingParams


def test_prefill_buckets_start_past_the_precision_switch_and_cover_the_longest_chunk():
    b = prefill_buckets(4096, 163840)
    assert b[0] == 384 and b[-1] == 4096 and len(b) == 30
    assert b == list(range(384, 4097, 128))
    assert prefill_buckets(1000, 163840)[-1] == 1024  # a 1,000-token chunk still has a bucket
    assert prefill_buckets(4096, 1000)[-1] == 896  # never past the model's positions
    assert prefill_buckets(256, 163840) == []  # nothing over 256 tokens to capture
    assert PREFILL_MIN_TOKENS == 257


def _cache(model):
    cfg = model.cfg
    return PagedLatentCache(model.num_cache_layers, 100, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=torch.float32)


def _seq(tokens: list[int], table: list[int]) -> Sequence:
    seq = Sequence(tokens, SamplingParams(), decoder=None, generator=None)
    seq.block_table = table
    return seq


def test_padded_prefill_equals_the_eager_prefill_at_every_real_position(tiny_model):
    """A 300-token prompt padded to the 384 bucket: the same last-token logits and hidden states
    and the same latents in its blocks as the runner's eager prefill; then one decode step over
    each cache gives the same logits, so the padding's writes reached nothing a row reads."""
    model, _ = tiny_model
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.cfg.vocab_size, (300,), generator=g).tolist()
    table = [9 + 2 * i for i in range(38)]  # 38 blocks of 8: 304 slots, scattered over the cache
    eager_cache, padded_cache = _cache(model), _cache(model)
    runner = ModelRunner(model, eager_cache, cuda_graphs=False)
    eager_seq = _seq(ids, table)
    want = runner.prefill([PrefillChunk(eager_seq, 0, 300)])

    graphs = PrefillGraphs(model, padded_cache, [384], hidden=True)
    assert graphs.bucket(256) is None and graphs.bucket(300) == 384 and graphs.bucket(385) is None
    logits, hidden = graphs.run(ids, table)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(torch.tensor([ids])).hidden[0]
    torch.testing.assert_close(hidden, plain, rtol=1e-4, atol=1e-4)
    slots = torch.tensor([b * 8 + o for b in table for o in range(8)])[:300]
    for a, b in zip((eager_cache.c_kv, eager_cache.k_pe), (padded_cache.c_kv, padded_cache.k_pe), strict=True):
        torch.testing.assert_close(b[:, slots], a[:, slots], rtol=1e-5, atol=1e-5)
    assert padded_cache.c_kv[:, padded_cache.scratch_block * 8:].abs().sum() > 0  # the padding went there

    steps = []
    for cache in (eager_cache, padded_cache):
        seq = _seq([*ids, int(want.argmax())], table)
        seq.num_computed = 300
        steps.append(ModelRunner(model, cache, cuda_graphs=False).decode([seq]))
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-4)


def test_a_negative_prefill_graph_budget_is_refused_with_the_flag_named(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match=r"--prefill-graph-tokens must be >= 0 \(0 = off\), got -1"):
        Engine(model, tok, EngineConfig(kv_memory_gb=0.01, prefill_graph_tokens=-1))


def test_prefill_graph_limit_and_graph_budget_defaults():
    """Prefill graphs to --max-prefill-tokens, at most 4,096 (their pool grows with the length);
    the graph budget is 4 GiB with them (or riding graphs) and the old 1 GiB without, unless given."""
    assert EngineConfig().prefill_graph_limit() == 4096 and EngineConfig().graph_budget_gb() == 4.0
    assert EngineConfig(max_prefill_tokens=16384).prefill_graph_limit() == 4096
    assert EngineConfig(max_prefill_tokens=2048).prefill_graph_limit() == 2048
    assert EngineConfig(max_prefill_tokens=2048, prefill_graph_tokens=8192).prefill_graph_limit() == 2048
    assert EngineConfig(max_prefill_tokens=16384, prefill_graph_tokens=8192).prefill_graph_limit() == 8192
    off = EngineConfig(prefill_graph_tokens=0, riding_graph_rows=0)  # riding graphs take the 4 GiB too
    assert off.prefill_graph_limit() == 0 and off.graph_budget_gb() == 1.0
    # nothing over 256 tokens to capture
    assert EngineConfig(max_prefill_tokens=256, riding_graph_rows=0).graph_budget_gb() == 1.0
    assert EngineConfig(graph_memory_gb=2.5).graph_budget_gb() == 2.5


def test_warm_up_runs_the_eager_packed_path_and_serving_the_graphs(tiny_model, monkeypatch):
    """Start-up warm-up exists to compile the eager packed prefill (which still serves chunks
    after a cached prefix and several prompts packed together): it must not be answered by the
    prefill graphs, which requests of the same length do replay."""
    model, _ = tiny_model
    cache = _cache(model)
    runner = ModelRunner(model, cache, cuda_graphs=False)
    runner.prefill_graphs = PrefillGraphs(model, cache, [384])  # as capture_graphs() sets it on a GPU
    replayed = []
    run = runner.prefill_graphs.run
    monkeypatch.setattr(runner.prefill_graphs, "run", lambda ids, table: replayed.append(len(ids)) or run(ids, table))
    runner.warm_up([300])
    assert replayed == []
    runner.prefill([PrefillChunk(_seq(list(range(3, 303)), list(range(38))), 0, 300)])
    assert replayed == [300]
