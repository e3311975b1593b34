"""MTP speculative decoding inside the serving engine and over HTTP: lossless at temperature 0
with mixed-length batches and continuous arrivals (k = 1, 2, 3), the paged cache after
rejections (main and MTP layers, freed blocks), prefix caching, and the /metrics counters."""

from __future__ import annotations

import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.engine.engine import Engine, EngineConfig
from model_host.generate import generate
from model_host.loader import load_model
from model_host.sampler import SamplingParams
from model_host.tokenizer import Tokenizer
from tests.serving.conftest import MODEL, Served

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.spec_bench import oracle_drafter  # noqa: E402


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / MODEL
    write_random_checkpoint(out, make_config("tiny"), dtype="bf16", seed=0)
    return load_model(out, dtype=torch.float32, load_mtp=True), Tokenizer(out)


def _prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    words = ["milvus", "vector", "index", "latent", "cache", "expert", "router", "token", "block", "prefix"]
    return [tok.encode(" ".join(rnd.choice(words) for _ in range(rnd.randint(2, 25))), add_bos=True)
            for _ in range(n)]


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Two new requests per step while the others decode (continuous batching)."""
    seqs, step = [], 0
    while len(seqs) < len(prompts) or engine.has_work:
        for p in prompts[2 * step : 2 * step + 2]:
            seqs.append(engine.add(p, params))
        engine.step()
        step += 1
    return [s.output_ids for s in seqs]


def _engine(model, tok, k: int, drafter=None, **cfg) -> Engine:
    cfg.setdefault("max_batch", 4)
    cfg.setdefault("block_size", 8)
    return Engine(model, tok, EngineConfig(kv_memory_gb=0.02, speculative_tokens=k, **cfg), drafter=drafter)


@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_speculative_engine_is_lossless_with_mixed_batches(mtp_model, k):
    model, tok = mtp_model
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = _prompts(tok, 5)
    solo = [generate(model, tok, p, params).token_ids for p in prompts]
    for drafter in (None, oracle_drafter(), oracle_drafter(miss_every=3)):
        engine = _engine(model, tok, k, drafter)
        assert _run(engine, prompts, params) == solo, f"k={k} drafter={drafter}"
        assert engine.blocks.num_free == engine.blocks.num_blocks
        stats = engine.spec.stats
        assert stats.rounds > 0 and 0 <= stats.accepted <= stats.drafted
        if drafter is not None:  # the oracle's drafts are accepted (all, or up to each planted miss)
            assert stats.mean_accepted_length > 1.4


def test_paged_cache_after_rejections_equals_a_non_speculative_run(mtp_model):
    """Mid-generation, after rounds with rejections: the block table holds exactly the computed
    positions, and their latents in every main layer (and the MTP layer, up to what it has been
    given) equal one forward over the sequence without speculation."""
    model, tok = mtp_model
    engine = _engine(model, tok, 3, oracle_drafter(miss_every=3), max_batch=2)
    seq = engine.add(_prompts(tok, 1, seed=3)[0], SamplingParams(max_tokens=40, ignore_eos=True))
    other = engine.add(_prompts(tok, 1, seed=4)[0], SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(5):
        engine.step()
    stats = engine.spec.stats
    assert stats.accepted < stats.drafted and stats.accepted > 0  # rejections and acceptances
    n = seq.num_computed
    assert n == len(seq) - 1 and len(seq.block_table) == engine.blocks.blocks_needed(n)
    used = len(seq.block_table) + len(other.block_table)
    assert engine.blocks.num_free == engine.blocks.num_blocks - used  # rejected-draft blocks came back

    _assert_cache_matches_plain_run(engine, model, seq, int(seq.draft_input.positions[0]))


def _assert_cache_matches_plain_run(engine: Engine, model, seq, mtp_done: int) -> None:
    """The latents of ``seq``'s computed positions (every main layer; the MTP layer up to
    ``mtp_done``) equal one forward over its tokens without speculation or prefix sharing."""
    n = seq.num_computed
    ids = torch.tensor([seq.token_ids[:n]])
    fresh = model.new_cache(1, n)
    hidden = model(ids, cache=fresh).hidden
    model.mtp_forward(ids[:, 1:], hidden[:, :-1], cache=fresh)
    bs = engine.blocks.block_size
    slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(n)])
    layers = model.cfg.num_hidden_layers
    for layer in range(layers + 1):
        upto = n if layer < layers else mtp_done
        for got, want in ((engine.cache.c_kv, fresh.c_kv), (engine.cache.k_pe, fresh.k_pe)):
            err = (got[layer, slots[:upto]] - want[layer, 0, :upto]).abs().max() / want[layer, 0, :upto].abs().max()
            assert err < 1e-5, f"layer {layer}: rel err {err:.2e}"


def test_prefix_hit_never_shares_an_mtp_latent_of_another_continuation(mtp_model):
    """The MTP latent at a block's last position depends on the next token: a request whose
    prompt equals a cached one up to a block boundary and differs right after it must not reuse
    that block (its hash covers the next token), or its MTP cache would hold the other's latent."""
    model, tok = mtp_model
    engine = _engine(model, tok, 2)
    bs = engine.blocks.block_size
    first = [tok.bos_id] + [300 + i for i in range(3 * bs + 4)]
    second = first[: 2 * bs] + [900 + i for i in range(bs + 5)]  # differs from position 2 * bs on
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.generate([first], params)
    seq = engine.add(second, params)
    engine.step()  # prefill with prefix hits; the first token is sampled
    _assert_cache_matches_plain_run(engine, model, seq, seq.num_computed - 1)
    assert seq.prompt_cached_tokens == bs  # block 1 ends where the prompts diverge: not shared


def test_prefix_cache_with_speculation_keeps_output(mtp_model):
    model, tok = mtp_model
    engine = _engine(model, tok, 2, oracle_drafter(miss_every=2))
    shared = tok.encode("system prompt with retrieved context " * 6, add_bos=True)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt = shared + tok.encode(" question")
    first = engine.generate([prompt], params)[0]
    second = engine.generate([prompt], params)[0]
    assert second.prompt_cached_tokens >= len(shared) - 2 * engine.blocks.block_size
    assert first.output_ids == second.output_ids == generate(model, tok, prompt, params).token_ids


def test_speculative_server_matches_plain_server_and_reports_acceptance(mtp_model):
    model, tok = mtp_model
    prompts = ["where is the index stored", "milvus", "how are expert routers trained on latent caches"]

    def completions(k: int) -> tuple[list[str], str]:
        with Served(model, tok, EngineConfig(max_batch=4, kv_memory_gb=0.02, max_model_len=4096,
                                             speculative_tokens=k)) as s:
            client = openai.OpenAI(base_url=s.base_url, api_key="x")

            def one(p: str) -> str:
                return client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text

            with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: one mixed-length batch
                texts = list(pool.map(one, prompts))
            return texts, httpx.get(s.base_url.removesuffix("/v1") + "/metrics").text

    plain, _ = completions(0)
    for k in (1, 2, 3):
        spec, metrics = completions(k)
        assert spec == plain, f"k={k}"
        assert "model_host_spec_acceptance_rate" in metrics and "model_host_spec_mean_accepted_length" in metrics
        assert "model_host_spec_draft_tokens" in metrics and "model_host_spec_accepted_tokens" in metrics


def test_sampled_request_with_speculation_depends_only_on_its_seed(mtp_model):
    """Temperature > 0: draft draws, acceptance uniforms and residual draws all come from the
    request's own generator, so a seeded request gives the same tokens alone or in a batch."""
    model, tok = mtp_model
    prompts = _prompts(tok, 3, seed=7)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=6, ignore_eos=True)
    alone = _engine(model, tok, 2).generate([prompts[0]], params)[0].output_ids
    others = SamplingParams(temperature=1.0, seed=9, max_tokens=6, ignore_eos=True)
    engine = _engine(model, tok, 2)
    seqs = [engine.add(prompts[0], params), engine.add(prompts[1], others), engine.add(prompts[2], others)]
    while engine.has_work:
        engine.step()
    assert seqs[0].output_ids == alone and len(alone) == 6
    assert engine.spec.stats.drafted > 0


def test_logprobs_with_speculation_equal_plain_decoding(mtp_model):
    """Each emitted token's logprobs come from the verify logits at its position: the numbers
    plain decoding reports (rounds emit several tokens, after accepted drafts too)."""
    model, tok = mtp_model
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    prompt = _prompts(tok, 1, seed=11)[0]

    def logprobs(k: int, drafter=None) -> list[tuple[int, float, list[int]]]:
        engine = _engine(model, tok, k, drafter)
        engine.add(prompt, params)
        got = []
        while engine.has_work:
            got += [(o.token, o.logprob.logprob, [t for t, _ in o.logprob.top]) for o in engine.step()]
        return got

    plain = logprobs(0)
    spec = logprobs(2, oracle_drafter(miss_every=4))
    assert [(t, top) for t, _, top in spec] == [(t, top) for t, _, top in plain] and len(plain) == 6
    assert [lp for _, lp, _ in spec] == pytest.approx([lp for _, lp, _ in plain], abs=1e-4)


def test_tokens_of_one_round_stream_as_one_event(mtp_model):
    """A round emits up to k+1 tokens of a request at once; the server hands a step's outputs to
    the event loop together (server/mailbox.py) and a stream sends what is queued as one event.
    With forced acceptance at k = 3 (4 tokens a round) the stream needs far fewer events than
    tokens, and its text and logprobs equal the non-streamed answer's."""
    model, tok = mtp_model
    cfg = EngineConfig(max_batch=4, kv_memory_gb=0.02, max_model_len=4096, speculative_tokens=3)
    with Served(model, tok, cfg, drafter=oracle_drafter()) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="x")
        kw = dict(model=MODEL, prompt="where is the index stored", max_tokens=16, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True})
        whole = client.completions.create(**kw).choices[0]
        events = [c.choices[0] for c in client.completions.create(stream=True, **kw)
                  if c.choices and (c.choices[0].text or c.choices[0].logprobs)]
    assert "".join(e.text for e in events) == whole.text
    assert sum(len(e.logprobs.tokens) for e in events) == len(whole.logprobs.tokens) == 16
    sizes = [len(e.logprobs.tokens) for e in events]
    assert len(events) <= 8, f"events of {sizes} tokens: a round's tokens were not streamed together"
