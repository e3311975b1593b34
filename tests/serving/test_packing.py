"""Packed prefill: every prefill chunk of a step in one varlen forward."""

from __future__ import annotations

import torch

from model_host.checkpoint import make_config
from model_host.engine.block_manager import BlockManager
from model_host.engine.engine import Engine, EngineConfig
from model_host.engine.memory import absorbed_bytes, expansion_bytes
from model_host.engine.packing import pack_chunks
from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.runner import ModelRunner
from model_host.engine.scheduler import PrefillChunk
from model_host.engine.sequence import Sequence
from model_host.generate import generate
from model_host.mla import absorb_is_cheaper
from model_host.sampler import SamplingParams


def _seq(tokens: list[int], table: list[int]) -> Sequence:
    seq = Sequence(tokens, SamplingParams(), decoder=None, generator=None)
    seq.block_table = table
    return seq


def _generate_recording_widths(model, engine: Engine, prompts: list[list[int]], params: SamplingParams):
    """engine.generate(prompts), and the width (tokens per row) of every model forward it ran."""
    widths: list[int] = []
    hook = model.register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    try:
        return engine.generate(prompts, params), widths
    finally:
        hook.remove()


def test_pack_chunks_layout():
    """Sequence a: 6 tokens, a cached prefix of 4, its last 2 now (ends it); sequence b: 7
    tokens, its first chunk of 5 (does not end it). Block size 4."""
    a = _seq(list(range(100, 106)), [7, 2])
    b = _seq(list(range(200, 207)), [5, 9])
    p = pack_chunks([PrefillChunk(a, 4, 2), PrefillChunk(b, 0, 5)], block_size=4, device="cpu")
    assert p.ids.tolist() == [[104, 105, 200, 201, 202, 203, 204]]
    assert p.positions.tolist() == [[4, 5, 0, 1, 2, 3, 4]]
    v = p.varlen
    assert v.slots.tolist() == [8, 9, 20, 21, 22, 23, 36]  # block * 4 + offset
    assert v.key_slots.tolist() == [28, 29, 30, 31, 8, 9, 20, 21, 22, 23, 36]
    assert v.cu_seqlens_q.tolist() == [0, 2, 7] and v.cu_seqlens_k.tolist() == [0, 6, 11]
    assert p.last.tolist() == [1]  # only a's chunk ends its sequence


def _setup(model, num_blocks=40, block_size=8):
    cfg = model.cfg
    cache = PagedLatentCache(model.num_cache_layers, num_blocks, block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                             dtype=torch.float32)
    return cache, BlockManager(num_blocks, block_size), ModelRunner(model, cache, cuda_graphs=False)


def test_packed_prefill_equals_per_sequence_prefill(tiny_model):
    """One step of mixed chunks (a prefix-cache hit, a whole short prompt, the first and the
    second chunk of a long prompt) packed into one forward gives each sequence the logits and
    the cached latents of its own forward."""
    model, tok = tiny_model
    prefix = [tok.bos_id] + [3000 + i for i in range(31)]
    prompts = [prefix + [4000 + i for i in range(9)], prefix + [5000 + i for i in range(5)],
               [tok.bos_id] + [6000 + i for i in range(12)], [tok.bos_id] + [7000 + i for i in range(40)]]
    results = {}
    for packed in (True, False):
        cache, blocks, runner = _setup(model)
        first = _seq(prompts[0], [])
        blocks.allocate(first)
        runner.prefill([PrefillChunk(first, 0, len(first))])  # fills and publishes the prefix
        blocks.register_full_blocks(first)
        hit, short, long = (_seq(p, []) for p in prompts[1:])
        for s in (hit, short, long):
            blocks.allocate(s)
        assert hit.num_computed == 32 and short.num_computed == 0  # the prefix came from the cache
        step1 = [PrefillChunk(hit, 32, 5), PrefillChunk(short, 0, 13), PrefillChunk(long, 0, 17)]
        step2 = [PrefillChunk(long, 17, 24)]
        calls = []
        hook = model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        try:
            if packed:
                logits = [runner.prefill(step1), runner.prefill(step2)]
            else:
                logits = [torch.cat([runner.prefill([c]) for c in step]) for step in (step1, step2)]
        finally:
            hook.remove()
        assert len(calls) == (2 if packed else 4)  # one forward per step when packed
        assert [lg.shape[0] for lg in logits] == [2, 1]  # hit and short end in step 1, long in step 2
        slots = torch.tensor([b * 8 + i for s in (hit, short, long) for b in s.block_table for i in range(8)])
        results[packed] = (torch.cat(logits), cache.c_kv[:, slots], cache.k_pe[:, slots])
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_prefill_gives_solo_greedy_tokens(tiny_model):
    """Mixed-length prompts admitted together (one packed prefill per step), two of them hitting
    the prefix cache: the greedy tokens of each equal its solo generate()."""
    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(max_batch=8, kv_memory_gb=0.02, block_size=8, max_prefill_tokens=96,
                                             row_prefill_tokens=0))  # every chunk through the packed forward
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    shared = tok.encode("retrieved context about sealed segments and index building " * 4, add_bos=True)
    engine.generate([shared + tok.encode(" warm the cache")], params)
    prompts = [shared + tok.encode(" question one?"), tok.encode("hello", add_bos=True),
               shared + tok.encode(" a longer second question about compaction and deletes?"),
               tok.encode("vector " * 70, add_bos=True), tok.encode("short one", add_bos=True)]
    seqs, steps = _generate_recording_widths(model, engine, prompts, params)
    assert max(steps) > 80  # several prompts' chunks went through one forward
    assert seqs[0].prompt_cached_tokens > 0 and seqs[2].prompt_cached_tokens > 0
    for p, s in zip(prompts, seqs, strict=True):
        assert s.output_ids == generate(model, tok, p, params).token_ids


def test_prefill_groups_bound_the_attended_keys():
    """Regression (H100 serve_bench, concurrency 128): one packed step of prefix-hit chunks
    expanded 100k+ cached keys at once and ran out of memory. Chunks go in consecutive groups of
    at most max_keys attended keys; a longer chunk goes alone; order is kept."""
    from types import SimpleNamespace

    from model_host.checkpoint import make_config
    from model_host.engine.runner import context_groups

    chunks = [SimpleNamespace(end=e, name=i) for i, e in enumerate((2000, 1900, 30000, 100, 5000, 9000))]
    groups = context_groups(chunks, 16384)
    assert [[c.name for c in g] for g in groups] == [[0, 1], [2], [3, 4, 5]]
    assert all(sum(c.end for c in g) <= 16384 for g in groups if len(g) > 1)
    assert expansion_bytes(make_config("v3"), 1, torch.bfloat16) == 128 * (128 + 64 + 128) * 2  # 80 KiB a key


def test_short_chunks_riding_the_decode_step_equal_the_packed_prefill(tiny_model):
    """Prompt chunks run as single-token rows of a decode step (a prefix hit's tail, a whole
    short prompt, the first chunk of a longer one) next to a decode row: each chunk's last-row
    logits and every cached latent equal the packed prefill's."""
    model, tok = tiny_model
    prefix = [tok.bos_id] + [3000 + i for i in range(31)]
    prompts = [prefix + [4000 + i for i in range(9)], prefix + [5000 + i for i in range(5)],
               [tok.bos_id] + [6000 + i for i in range(12)], [tok.bos_id] + [7000 + i for i in range(20)],
               [tok.bos_id] + [8000 + i for i in range(6)]]
    results = {}
    for riding in (True, False):
        cache, blocks, runner = _setup(model)
        first = _seq(prompts[0], [])
        blocks.allocate(first)
        runner.prefill([PrefillChunk(first, 0, len(prompts[0]))])
        blocks.register_full_blocks(first)
        hit, short, long, dec = (_seq(p, []) for p in prompts[1:])
        for s in (hit, short, long, dec):
            blocks.allocate(s)
        runner.prefill([PrefillChunk(dec, 0, len(dec) - 1)])  # dec owes its last token: a decode row
        blocks.append_slot(dec)
        chunks = [PrefillChunk(hit, 32, 5), PrefillChunk(short, 0, 13), PrefillChunk(long, 0, 9)]
        if riding:
            logits = runner.decode([dec], chunks)
        else:
            logits = torch.cat([runner.prefill(chunks), runner.decode([dec])])
        assert logits.shape[0] == 3  # hit and short end their sequences, long does not; then dec
        assert [s.num_computed for s in (hit, short, long, dec)] == [37, 13, 9, len(dec)]
        slots = torch.tensor([b * 8 + i for s in (hit, short, long, dec) for b in s.block_table for i in range(8)])
        results[riding] = (logits, cache.c_kv[:, slots], cache.k_pe[:, slots])
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_prefix_hits_ride_the_decode_step_and_keep_solo_greedy_tokens(tiny_model):
    """With --row-prefill-tokens, requests whose prompt is mostly a cached prefix never run a
    multi-token forward, and every request's greedy tokens equal its solo generate()."""
    model, tok = tiny_model
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    shared = tok.encode("retrieved context about sealed segments and index building " * 4, add_bos=True)
    prompts = [shared + tok.encode(" question one?"), shared + tok.encode(" what about compaction and deletes?"),
               tok.encode("hello", add_bos=True), tok.encode("vector " * 70, add_bos=True)]
    outputs = {}
    for rows in (64, 0):
        engine = Engine(model, tok, EngineConfig(max_batch=8, kv_memory_gb=0.02, block_size=8, max_prefill_tokens=96,
                                                 row_prefill_tokens=rows))
        engine.generate([shared + tok.encode(" warm the cache")], params)
        seqs, widths = _generate_recording_widths(model, engine, prompts, params)
        assert seqs[0].prompt_cached_tokens > 0 and seqs[1].prompt_cached_tokens > 0
        multi = [w for w in widths if w > 1]
        if rows:  # the 72-token prompt is over the row budget and goes packed; the rest ride
            assert multi == [len(prompts[3])], widths
        else:  # one packed forward of all four prompts' uncached tokens
            assert len(multi) == 1 and multi[0] > len(prompts[3]), widths
        outputs[rows] = [s.output_ids for s in seqs]
    assert outputs[64] == outputs[0] == [generate(model, tok, p, params).token_ids for p in prompts]


def test_absorb_cost_model_sends_cache_hits_to_rows_and_fresh_prompts_to_the_packed_forward():
    """At V3's widths: a RAG request owing 30 tokens after a 2,000-token cache hit is cheaper as
    latent-space rows; a fresh 2,000-token prompt, or a 4,096-token chunk of a long one, expanded."""
    cfg = make_config("v3")
    assert absorb_is_cheaper(cfg, 30, 2030) and absorb_is_cheaper(cfg, 150, 2150)
    assert not absorb_is_cheaper(cfg, 2000, 2000) and not absorb_is_cheaper(cfg, 4096, 8192)
    # The widest such step (128 decode rows + a 4,096-token budget of riding rows) needs more
    # attention memory than the packed forward's extra key expansion: the KV plan reserves it.
    rows = absorbed_bytes(cfg, 128 + 4096)
    assert rows == 4224 * 128 * (4 * 513 + 2 * 576 + 2 * 512)  # ~2.1 GiB
    assert rows > expansion_bytes(cfg, 16384 - 4096, torch.bfloat16)


def test_cache_hits_ride_past_the_row_budget_with_solo_greedy_tokens(tiny_model):
    """Regression: at a 1-row budget (as at concurrency 128, where the decode rows fill the
    budget), prefix hits went to the packed forward, which expands every chunk's whole cached
    context. Now a chunk cheaper absorbed rides whatever the budget; a fresh prompt still goes
    packed, and every request's greedy tokens equal its solo generate()."""
    model, tok = tiny_model
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    shared = tok.encode("retrieved context about sealed segments and index building " * 4, add_bos=True)
    prompts = [shared + tok.encode(" question one?"), shared + tok.encode(" and compaction?"),
               tok.encode("vector " * 70, add_bos=True)]
    engine = Engine(model, tok, EngineConfig(max_batch=8, kv_memory_gb=0.02, block_size=8, max_prefill_tokens=96,
                                             row_prefill_tokens=1))
    engine.generate([shared + tok.encode(" warm the cache")], params)
    seqs, widths = _generate_recording_widths(model, engine, prompts, params)
    assert seqs[0].prompt_cached_tokens > 0 and seqs[1].prompt_cached_tokens > 0
    assert [w for w in widths if w > 1] == [len(prompts[2])], widths  # only the fresh prompt went packed
    assert [s.output_ids for s in seqs] == [generate(model, tok, p, params).token_ids for p in prompts]


def test_each_step_is_timed_by_what_it_ran(tiny_model):
    """/metrics' model_host_step_seconds: a prefix hit rides its first step as rows ("riding"), a
    fresh prompt runs the packed forward ("prefill"), then decode steps; each read step timed."""
    model, tok = tiny_model
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    shared = tok.encode("retrieved context about sealed segments and index building " * 4, add_bos=True)
    engine = Engine(model, tok, EngineConfig(max_batch=8, kv_memory_gb=0.02, block_size=8, row_prefill_tokens=64))
    engine.generate([shared + tok.encode(" warm the cache")], params)
    engine.take_timings()
    prompt = shared + tok.encode(" question one?")
    (seq,) = engine.generate([prompt], params)
    timings = engine.take_timings()
    assert [t.kind for t in timings] == ["riding", "decode", "decode"]
    # each step's query rows: the uncached tail rides as rows, then one row a decode step
    assert [t.rows for t in timings] == [len(prompt) - seq.prompt_cached_tokens, 1, 1]
    fresh = tok.encode("vector " * 70, add_bos=True)
    engine.generate([fresh], params)
    timings = engine.take_timings()
    assert [t.kind for t in timings] == ["prefill", "decode", "decode"]
    assert [t.rows for t in timings] == [len(fresh), 1, 1]
    assert all(0 < t.seconds < 60 for t in timings) and engine.take_timings() == []
