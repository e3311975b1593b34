"""The server on the GPU as `model-host serve --device cuda` runs it (FP8 kernels, decode CUDA
graphs captured at start-up, chunked prefill, prefix cache): 8 concurrent greedy requests of
mixed lengths over HTTP give the text `generate()` gives for each prompt alone."""

from __future__ import annotations

import asyncio
import gc

import openai
import pytest
import torch

from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.engine.engine import Engine, EngineConfig
from model_host.engine.runner import capture_sizes
from model_host.generate import generate
from model_host.kernels.backend import TritonOps
from model_host.loader import load_model
from model_host.sampler import SamplingParams
from model_host.tokenizer import Tokenizer
from tests.serving.conftest import MODEL, Served

from .conftest import requires_gpu
from .test_model_gpu import NEAR_TIE

pytestmark = [pytest.mark.gpu, requires_gpu]

MAX_TOKENS = 12
# The first token comes from a prefill, and a prefill's MoE activation precision follows the
# number of rows in its step: up to 256 rows two-term FP8 (bf16-level), beyond that one-term FP8.
# generate() prefills one prompt alone, the server packs eight, so the two can run different
# regimes; one-term FP8 moves a small model's logits by up to 7.9% relative (docs/gpu_notes.md,
# run 1), i.e. ~0.08 sd per logit, and a top-2 swap across that needs a gap under ~3x it.
# Decoded tokens run the same regime both ways and keep NEAR_TIE. A paging, masking or graph
# bug moves the top logits by order 1 sd and still fails.
PREFILL_NEAR_TIE = 0.25


def _chats() -> list[list[dict]]:
    shared = "Context passages:\n\n" + "[1] Milvus stores vectors in segments that are sealed and indexed. " * 12
    questions = ["Where is data stored?", "How do I build an index on a sealed segment with many vectors?",
                 "Hi", "Explain compaction.", "What limits apply to the collection?", "Why?",
                 "How are deletes handled and when are they applied to sealed segments?", "Which index is best?"]
    return [[{"role": "system", "content": "You answer from context."},
             {"role": "user", "content": (shared if i % 2 else "") + q}] for i, q in enumerate(questions)]


def _first_divergence(tok: Tokenizer, ref_ids: list[int], served: str) -> int:
    """Index of the first reference token whose text the served text does not continue with."""
    for i in range(len(ref_ids)):
        if not served.startswith(tok.decode(ref_ids[: i + 1], skip_special_tokens=True)):
            return i
    return len(ref_ids)


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-fp8")
    # Every expert selected (16 of 16, all groups), as test_model_gpu's smooth models: a random
    # 4-of-16 router has near-tied experts, and the server's other batching and precision regime
    # would pick another one, an order-1 jump (seen: gaps of 0.9 sd on an H100) that no kernel
    # bound covers. Routing weights, grouped GEMMs and the combine still run as served.
    cfg = make_config("tiny", mtp=False, hidden_size=256, num_experts_per_tok=16, topk_group=4)
    write_random_checkpoint(path, cfg, dtype="fp8", seed=11)
    # The ops `model-host serve --device cuda` loads the model with.
    return load_model(path, device="cuda", dtype=torch.bfloat16, ops=TritonOps()), Tokenizer(path)


def test_default_kv_budget_comes_from_free_gpu_memory(tiny_fp8):
    model, tok = tiny_fp8
    try:
        engine = Engine(model, tok, EngineConfig(max_batch=2))
        plan = engine.kv_plan
        print(f"KV plan: {plan}; graphs {engine.graph_report}")
        assert plan.activation_bytes > 0 and plan.graph_bytes == 4 * 2**30  # the default budget
        assert 0 < plan.free_bytes <= torch.cuda.get_device_properties(0).total_memory
        assert 0 < plan.kv_bytes < plan.free_bytes - plan.activation_bytes - plan.graph_bytes
        assert plan.kv_bytes - engine.cache.nbytes() < 2 * engine.cache.nbytes() / engine.blocks.num_blocks
        # steps of up to 64 rows run short prompt chunks as decode rows (row prefill is on with graphs)
        assert engine.graph_report.sizes == capture_sizes(engine.max_rows) == [1, 2, 4, 8, 16, 32, 64]
        assert engine.graph_report.prefill_sizes == list(range(384, 4097, 128))  # up to --max-prefill-tokens
    finally:
        engine = None
        gc.collect()
        torch.cuda.empty_cache()


def _unexplained_flips(model, prompt: list[int], ref: list[int], out: list[int]) -> list[tuple[int, float]]:
    """Where ``out`` leaves ``ref``: (position, the reference's top-2 gap in sd) unless that gap
    is a near-tie (the prefill's regime allows more, as in the test below)."""
    i = next((j for j, (a, b) in enumerate(zip(ref, out, strict=True)) if a != b), len(ref))
    if i == len(ref):
        return []
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:i]], device="cuda")).logits[0, -1].float()
    top = logits.topk(2).values
    gap = ((top[0] - top[1]) / logits.std()).item()
    return [(i, round(gap, 4))] if gap >= (PREFILL_NEAR_TIE if i == 0 else NEAR_TIE) else []


def test_cold_long_prompts_prefill_from_graphs_as_generate_does(tiny_fp8, monkeypatch):
    """Prompts over 256 tokens with nothing cached replay the prefill graph of their length
    bucket (a 1,500-token prompt: its first 1,024-token chunk, the rest eagerly after it), and
    greedy decoding continues as generate() does for each prompt alone."""
    model, tok = tiny_fp8
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (300, 900, 1500)]
    engine = Engine(model, tok, EngineConfig(max_batch=4, kv_memory_gb=0.05, max_prefill_tokens=1024,
                                             max_model_len=4096))
    try:
        assert engine.graph_report.prefill_sizes == list(range(384, 1025, 128))
        graphs, replayed = engine.runner.prefill_graphs, []
        run = graphs.run
        monkeypatch.setattr(graphs, "run", lambda ids, table: replayed.append(len(ids)) or run(ids, table))
        outs = [engine.generate([p], params)[0].output_ids for p in prompts]
    finally:
        engine = None
        gc.collect()
        torch.cuda.empty_cache()
    assert replayed == [300, 900, 1024]
    refs = [generate(model, tok, p, params).token_ids for p in prompts]
    print(f"{sum(r == o for r, o in zip(refs, outs, strict=True))}/3 equal generate()")
    assert all(not _unexplained_flips(model, p, r, o) for p, r, o in zip(prompts, refs, outs, strict=True))


# rows=1: the decode rows fill the row budget (as at concurrency 128), so the prefix hits ride
# only because they are cheaper absorbed, in steps larger than the 8 decode rows: they replay
# riding graphs (8 + --max-prefill-tokens 64 = 72 rows at most: buckets 16, at this model's MoE
# precision switch of 256 // 16 experts a token, 32, the tables' dense switch, then 64 and
# 128), and with riding_graph_rows=0 run eagerly. api-process: the routes reach the engine over the hub's socket, as under
# --api-processes.
@pytest.mark.parametrize(("rows", "handle", "riding"), [(None, "thread", None), (1, "thread", None),
                                                        (1, "thread", 0), (None, "api-process", None)])
def test_served_greedy_equals_generate_for_8_concurrent_requests(tiny_fp8, rows, handle, riding, monkeypatch):
    model, tok = tiny_fp8
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [tok.encode_chat(c) for c in _chats()]
    refs = [generate(model, tok, p, params).token_ids for p in prompts]
    cfg = EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=64, max_model_len=4096,
                       row_prefill_tokens=rows, riding_graph_rows=riding)
    with Served(model, tok, cfg, handle=handle) as s:
        report = s.engine.graph_report
        # at start-up: 8 rows, or 64 with prompt rows; riding steps to 72 rows
        assert report is not None and report.sizes == capture_sizes(8 if rows else 64)
        assert report.riding_sizes == ([] if riding == 0 else [16, 32, 64, 128] if rows else [128])
        graphs, replayed = s.engine.runner.graphs, []
        replay = graphs._replay
        monkeypatch.setattr(graphs, "_replay", lambda b: replayed.append(b) or replay(b))

        async def one(client, chat):
            r = await client.chat.completions.create(model=MODEL, messages=chat, max_tokens=MAX_TOKENS,
                                                     temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].message.content, r.usage

        async def main():
            async with openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0, timeout=300) as c:
                return await asyncio.gather(*(one(c, chat) for chat in _chats()))

        served = asyncio.run(main())
        cached = sum(u.prompt_tokens_details.cached_tokens for _, u in served)
    assert cached > 0  # the shared context came from the prefix cache for some requests
    if rows == 1:  # prefix hits rode past the 8 decode rows: in riding graphs, or eagerly with them off
        assert (max(replayed) > 8) == (riding != 0)
    exact, unexplained = 0, []
    for p, ref, (text, usage) in zip(prompts, refs, served, strict=True):
        assert usage.prompt_tokens == len(p) and usage.completion_tokens == MAX_TOKENS
        i = _first_divergence(tok, ref, text)
        if i == len(ref) and text == tok.decode(ref, skip_special_tokens=True):
            exact += 1
            continue
        # Batched FP8 GEMMs round differently from batch 1: a flip is allowed only at a
        # near-tie of the reference's top two logits (a paging or graph bug moves them by ~1 sd).
        with torch.no_grad():
            logits = model(torch.tensor([p + ref[:i]], device="cuda")).logits[0, -1].float()
        top = logits.topk(2).values
        gap = ((top[0] - top[1]) / logits.std()).item()  # in sd of the step's logits, as test_model_gpu
        if gap >= (PREFILL_NEAR_TIE if i == 0 else NEAR_TIE):
            unexplained.append((i, round(gap, 4)))
    print(f"{exact}/8 served texts equal generate(); divergences at near-ties only: {not unexplained}")
    # The H100 gave 3/8 exact with every other text diverging at a near-tie (2 of them in the
    # prefill regime above): the count of exact texts is printed, not bounded.
    assert not unexplained, f"divergences beyond a near-tie (position, gap in sd): {unexplained}"


def test_overlapped_decode_steps_never_wait_for_the_gpu(tiny_fp8):
    """Steady decode steps queue step n+1 before reading step n's tokens: inside `step()` no
    PyTorch call may synchronize (a hidden sync, e.g. a pageable copy or `.tolist()` of a device
    tensor, serializes host and GPU again); only the explicit wait on step n's event remains.
    The greedy tokens equal the synchronous engine's."""
    model, tok = tiny_fp8
    prompts = [tok.encode_chat(c) for c in _chats()]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outputs = {}
    for overlap in (False, True):
        engine = Engine(model, tok, EngineConfig(max_batch=8, kv_memory_gb=0.05, max_model_len=4096, overlap=overlap))
        assert engine.overlap is overlap
        seqs = [engine.add(p, params) for p in prompts]
        while any(s.num_computed < s.prompt_len for s in seqs):
            engine.step()
        engine.step()  # the first step with every row decoding
        if overlap:
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(8):
                    assert engine.step()  # each returns the previous step's tokens
            finally:
                torch.cuda.set_sync_debug_mode("default")
        while engine.has_work:
            engine.step()
        outputs[overlap] = [s.output_ids for s in seqs]
        del engine
        gc.collect()
    assert outputs[True] == outputs[False]
