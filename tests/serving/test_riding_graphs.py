"""Riding-step graphs: steps where prompt chunks ride the decode step as rows, past the decode
batch sizes, padded to a row bucket and computing logits only for the rows kept. The padded
step runs eagerly here on the CPU (the same forward the GPU captures); tests/gpu replays it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_host.checkpoint import make_config
from model_host.engine.engine import Engine, EngineConfig
from model_host.engine.runner import ModelRunner
from model_host.engine.scheduler import PrefillChunk
from model_host.kernels.backend import TritonOps
from model_host.kernels.graphs import DecodeGraphs, riding_buckets
from model_host.kernels.tuning import load_tuning
from model_host.ops import TorchOps

from .test_prefill_graphs import _cache, _seq  # a float32 cache of 100 blocks of 8; a sequence on blocks


def test_riding_buckets_never_span_a_precision_switch_and_cover_the_widest_step():
    v3 = TritonOps().precision_switches(make_config("v3"))
    assert v3 == (256, 32)  # dense GEMMs at 256 rows; the MoE at 256 routed rows = 32 tokens of top 8
    # A dense model: the Triton GEMM's 256 rows, and the shipped tables' dense MLP switch at 32.
    assert TritonOps().precision_switches(make_config("tiny", n_routed_experts=None)) == (256, 32)
    assert TorchOps().precision_switches(make_config("v3")) == ()  # the reference never switches
    # A table whose dense MLPs leave the grouped two-term launch earlier still: one more switch,
    # and a bucket of its own past decode sizes to 8.
    early = TritonOps(dataclasses.replace(load_tuning(), swiglu_grouped_max_rows=16))
    assert early.precision_switches(make_config("v3")) == (256, 32, 16)
    assert riding_buckets(8, 200, early.precision_switches(make_config("v3"))) == [16, 32, 64, 128, 192, 256]
    assert riding_buckets(16, 200, v3) == [32, 64, 128, 192, 256]  # the MoE's and the tables' 32
    for bad in (100, 512, 8):  # not a power of two, or past the prefill graphs' first size
        with pytest.raises(ValueError, match="swiglu_grouped_max_rows"):
            dataclasses.replace(load_tuning(), swiglu_grouped_max_rows=bad)
    assert riding_buckets(128, 1024, v3) == list(range(192, 1025, 64))  # every 64 rows past the decode sizes
    assert riding_buckets(192, 1000, v3) == list(range(256, 1025, 64))  # 1,000 rows still fit
    assert riding_buckets(64, 200, v3) == [128, 192, 256]
    assert riding_buckets(256, 1024, v3)[0] == 320 and riding_buckets(300, 1024, v3)[0] == 320
    # Decode sizes to 8 rows, an MoE switching at 16 tokens: 9..16 rows pad to 16, never past it.
    assert riding_buckets(8, 72, (256, 16)) == [16, 64, 128]
    assert riding_buckets(128, 128, v3) == [] and riding_buckets(128, 0, v3) == []


def _step(model, cache, graphs: bool):
    """Two decode rows and two prompt chunks riding as rows (the first ends its prompt, the
    second does not): 2 + 9 + 6 = 17 rows, 3 kept. With ``graphs`` the runner pads the step to
    a 32-row riding bucket of a DecodeGraphs with decode sizes up to 4."""
    g = torch.Generator().manual_seed(3)
    toks = lambda n: torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    runner = ModelRunner(model, cache, cuda_graphs=False)
    if graphs:  # as capture_graphs() sets them on a GPU
        runner.graphs = DecodeGraphs(model, cache, runner.block_tables.width, buckets=[1, 2, 4], riding=[32])
    a, b = _seq(toks(20), [0, 1, 2]), _seq(toks(11), [3, 4])
    c, d = _seq(toks(30), [5, 6, 7, 8]), _seq(toks(40), [9, 10, 11, 12, 13])
    runner.prefill([PrefillChunk(a, 0, 19), PrefillChunk(b, 0, 10), PrefillChunk(c, 0, 21), PrefillChunk(d, 0, 28)])
    logits = runner.decode([a, b], [PrefillChunk(c, 21, 9), PrefillChunk(d, 28, 6)])
    return logits, runner


def test_a_padded_riding_step_keeps_the_eager_steps_logits_and_cache(tiny_model):
    """The riding bucket's forward (17 live rows of 32, logits at a static index of 4 kept rows,
    the padding at position 0 of the scratch block) gives the kept rows the eager step's logits,
    in the same order, and writes the same latents into every sequence's blocks."""
    model, _ = tiny_model
    eager_cache, padded_cache = _cache(model), _cache(model)
    want, _ = _step(model, eager_cache, graphs=False)
    got, runner = _step(model, padded_cache, graphs=True)
    assert want.shape == got.shape == (3, model.cfg.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    slots = torch.arange(14 * 8)  # blocks 0..13: every real sequence's
    for a, b in zip((eager_cache.c_kv, eager_cache.k_pe), (padded_cache.c_kv, padded_cache.k_pe), strict=True):
        torch.testing.assert_close(b[:, slots], a[:, slots], rtol=1e-5, atol=1e-5)
    assert runner.graphs.bucket(17) == 32 and runner.graphs.kept == 4


def test_a_riding_bucket_without_kept_rows_or_with_too_many_runs_eagerly(tiny_model):
    """Kept rows are at most the decode buckets' width (one per sequence): a riding bucket
    cannot answer a step without a kept-row index or with more kept rows than that."""
    model, _ = tiny_model
    cache = _cache(model)
    graphs = DecodeGraphs(model, cache, 4, buckets=[1, 2], riding=[16])
    ids, pos = torch.zeros(10, 1, dtype=torch.long), torch.zeros(10, 1, dtype=torch.long)
    tables = torch.full((10, 4), cache.scratch_block)
    assert graphs.run(ids, pos, tables) is None
    assert graphs.run(ids, pos, tables, at=torch.tensor([1, 2, 3])) is None
    assert graphs.run(ids, pos, tables, at=torch.tensor([3, 9])).shape == (2, model.cfg.vocab_size)
    assert graphs.run_hidden(ids, pos, tables) is None  # speculation's full-row path never rides


def test_riding_graph_rows_defaults_and_a_negative_value_is_refused_with_the_flag_named(tiny_model):
    assert EngineConfig().riding_graph_limit() == 1024
    assert EngineConfig(max_batch=16, max_prefill_tokens=512).riding_graph_limit() == 528  # the widest step
    assert EngineConfig(riding_graph_rows=2048, max_prefill_tokens=4096).riding_graph_limit() == 2048
    off = EngineConfig(riding_graph_rows=0, prefill_graph_tokens=0)
    assert off.riding_graph_limit() == 0 and off.graph_budget_gb() == 1.0
    assert EngineConfig(prefill_graph_tokens=0).graph_budget_gb() == 4.0  # riding graphs still on
    # ... unless no chunk rides: with speculation, or with --row-prefill-tokens 0
    assert EngineConfig(prefill_graph_tokens=0, speculative_tokens=1).graph_budget_gb() == 1.0
    assert EngineConfig(prefill_graph_tokens=0, row_prefill_tokens=0).graph_budget_gb() == 1.0
    model, tok = tiny_model
    # The engine buckets by its model's ops: with a table switching at 16 rows, 9..16-row steps
    # get a bucket of their own past decode sizes to 8 (the tiny MoE's own switch: 256 // 4 = 64).
    prev, model.ops = model.ops, TritonOps(dataclasses.replace(load_tuning(), swiglu_grouped_max_rows=16))
    try:
        eng = Engine(model, tok, EngineConfig(kv_memory_gb=0.01, max_batch=8, row_prefill_tokens=8,
                                              max_prefill_tokens=120))
        assert eng.riding_rows == [16, 64, 128]
    finally:
        model.ops = prev
    with pytest.raises(ValueError, match=r"--riding-graph-rows must be >= 0 \(0 = off\), got -2"):
        Engine(model, tok, EngineConfig(kv_memory_gb=0.01, riding_graph_rows=-2))
