"""MTP speculative decoding: the acceptance rules (exact and statistical), drafting, and the
single-request loop (lossless at temperature 0, cache equal to a non-speculative run)."""

from __future__ import annotations

import pytest
import torch

from model_host.generate import generate, generate_speculative
from model_host.sampler import SamplingParams
from model_host.speculative import Drafts, greedy_verify, mtp_draft, sampled_verify, verify

from .conftest import rel_err


def test_greedy_verify_keeps_drafts_up_to_the_first_miss():
    v = 5
    best = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    logits = torch.nn.functional.one_hot(best, v).float()
    drafts = torch.tensor([[1, 2, 3], [1, 0, 3], [0, 2, 3], [1, 2, 3]])
    out = greedy_verify(drafts, logits, num_drafts=torch.tensor([3, 3, 3, 1]))
    assert out.accepted.tolist() == [3, 1, 0, 1]  # row 1 stops at its miss; row 3 at its limit
    # emitted tokens are the target's argmax: accepted drafts, then the correction / bonus
    assert out.tokens.tolist() == best.tolist()


def test_verify_mixes_greedy_and_sampled_rows():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 7)
    drafts = target[:, :2].argmax(-1)
    out = verify(drafts, torch.randn(2, 2, 7), target, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]),
                 torch.tensor([1.0, 1.0]))
    assert out.accepted[0] == 2 and out.tokens[0].tolist() == target[0].argmax(-1).tolist()
    assert out.tokens.shape == (2, 3)


# --- the sampling rule, statistically -------------------------------------------------------
#
# A toy "model" on V = 5 tokens: the target is a Markov chain P[prev] and the drafter another
# chain Q[prev] (deliberately different, so rejections and residual draws are frequent).  N
# independent sequences start at token 0 and run speculative rounds (k = 2, each sequence with
# a random 0..2 drafts per round, so the bonus path is covered too) until each has 3 tokens.
# Non-speculative sampling gives the first 3 tokens with probability P[0,a] P[a,b] P[b,c]
# exactly, so a chi-square goodness-of-fit test compares the 125 cells to that.
#
# Threshold: p-value > 0.001.  With the seed fixed the test is deterministic; a correct rule
# would fail it for about 1 seed in 1000.  Power: every entry of P is >= 0.05, so each cell
# expects >= 0.05^3 * N = 7.5 counts (the chi-square approximation holds); the same N rejects a
# rule with the classic bug (resample from p, not the residual, after a rejection) at p < 1e-12.

V, K, N, LENGTH = 5, 2, 60_000, 3


def _chains(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(V, V, generator=g) + 0.35
    q = torch.rand(V, V, generator=g) ** 3 + 0.02
    return p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)


def _wrong_rule(drafts, q, p, generators=None, num_drafts=None):
    """Accept with min(1, p/q) but resample from p itself on rejection: biased toward drafts."""
    right = sampled_verify(drafts, q, p, generators, num_drafts)
    rows = torch.arange(drafts.shape[0])
    resample = torch.multinomial(p[rows, right.accepted], 1).squeeze(1)
    tokens = right.tokens.clone()
    tokens[rows, right.accepted] = resample
    return type(right)(tokens, right.accepted)


def _speculative_counts(rule) -> torch.Tensor:
    P, Q = _chains()
    torch.manual_seed(1234)
    out = torch.full((N, LENGTH + K + 1), -1)
    have = torch.zeros(N, dtype=torch.long)
    prev = torch.zeros(N, dtype=torch.long)
    rows = torch.arange(N)
    while bool((have < LENGTH).any()):
        d1 = torch.multinomial(Q[prev], 1).squeeze(1)
        d2 = torch.multinomial(Q[d1], 1).squeeze(1)
        drafts = torch.stack((d1, d2), 1)
        q = torch.stack((Q[prev], Q[d1]), 1)
        p = torch.stack((P[prev], P[d1], P[d2]), 1)
        verdict = rule(drafts, q, p, None, torch.randint(0, K + 1, (N,)))
        active = have < LENGTH
        for j in range(K + 1):
            emit = (j <= verdict.accepted) & active
            out[rows[emit], have[emit] + j] = verdict.tokens[emit, j]
        have += torch.where(active, verdict.accepted + 1, 0)
        prev = verdict.tokens[rows, verdict.accepted]
    cells = out[:, 0] * V * V + out[:, 1] * V + out[:, 2]
    return torch.bincount(cells, minlength=V**LENGTH).double()


def _chi_square_p_value(counts: torch.Tensor) -> tuple[float, float]:
    P, _ = _chains()
    a, b, c = torch.meshgrid(torch.arange(V), torch.arange(V), torch.arange(V), indexing="ij")
    expected = (P[0, a] * P[a, b] * P[b, c]).reshape(-1).double() * N
    assert expected.min() >= 5
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    # chi-square survival function: the regularized upper incomplete gamma Q(df/2, stat/2)
    return stat, float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def test_speculative_sampling_matches_the_target_distribution():
    stat, p_value = _chi_square_p_value(_speculative_counts(sampled_verify))
    assert p_value > 1e-3, f"chi-square {stat:.1f} (p = {p_value:.2e}) on {V**LENGTH - 1} df"


def test_the_chi_square_test_rejects_a_wrong_rule():
    stat, p_value = _chi_square_p_value(_speculative_counts(_wrong_rule))
    assert p_value < 1e-12, f"a biased rule passed: chi-square {stat:.1f} (p = {p_value:.2e})"


# --- the model: drafting and the single-request loop ----------------------------------------


def _reference_drafter(reference: list[int], prompt_len: int, miss_every: int = 0, extended=None):
    """Drafts from the greedy continuation itself (accepted unless corrupted), after running the
    real MTP drafter so its cache work is the same.  With ``miss_every`` m, draft j of the round
    at output offset o is wrong when (o + j) % m == 0: every accept length 0..k occurs.
    ``extended`` collects the last position each call filled in the MTP cache for real."""

    def draft(fw, pending, k, temperature, top_k, top_p, generators, all_greedy=None):
        real = mtp_draft(fw, pending, k, temperature, top_k, top_p, generators, all_greedy=all_greedy)
        if extended is not None:
            extended.append(int(pending.positions[-1]))
        start = int(pending.positions[-1]) + 2 - prompt_len  # output index of the first draft
        toks = [reference[min(start + j, len(reference) - 1)] for j in range(k)]
        if miss_every:
            toks = [t if (start + j) % miss_every else (t + 1) % 1000 for j, t in enumerate(toks)]
        return Drafts(torch.tensor([toks]), real.logits)

    return draft


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_generation_is_lossless_at_temperature_zero(tiny_model, tokenizer, k):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    for prompt in ([0, 15, 300, 7], list(range(100, 123))):
        ref = generate(tiny_model, tokenizer, prompt, params).token_ids
        assert generate_speculative(tiny_model, tokenizer, prompt, params, k).token_ids == ref
        for miss in (0, 2, 3):
            rounds: list[int] = []
            drafter = _reference_drafter(ref, len(prompt), miss, rounds)
            got = generate_speculative(tiny_model, tokenizer, prompt, params, k, drafter=drafter)
            assert got.token_ids == ref, f"k={k} miss_every={miss}"
            if miss == 0:  # every draft accepted: k + 1 tokens per round after the first token
                assert len(rounds) == -(-(params.max_tokens - 1) // (k + 1))


def test_cache_after_rejections_equals_a_non_speculative_run(tiny_model, tokenizer):
    """After rounds with rejections, the main layers' and the MTP layer's latents of every
    accepted position equal a single forward over the final sequence (positions past it are
    rejected drafts: never read)."""
    prompt, params, k = list(range(200, 211)), SamplingParams(max_tokens=9, ignore_eos=True), 3
    ref = generate(tiny_model, tokenizer, prompt, params).token_ids
    caches = []
    orig = tiny_model.new_cache

    class Recorder:  # keeps the loop's cache for inspection (wraps, does not patch, the model)
        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def new_cache(self, *a, **kw):
            caches.append(orig(*a, **kw))
            return caches[-1]

        def __call__(self, *a, **kw):
            return tiny_model(*a, **kw)

    extended: list[int] = []
    drafter = _reference_drafter(ref, len(prompt), 3, extended)
    out = generate_speculative(Recorder(), tokenizer, prompt, params, k, drafter=drafter)
    assert out.token_ids == ref
    seq = torch.tensor([prompt + ref[:-1]])  # the last token is emitted, never fed back
    n = seq.shape[1]
    fresh = tiny_model.new_cache(1, n)
    hidden = tiny_model(seq, cache=fresh).hidden
    tiny_model.mtp_forward(seq[:, 1:], hidden[:, :-1], cache=fresh)
    got = caches[0]
    layers = tiny_model.cfg.num_hidden_layers
    for layer in range(layers + 1):
        # The MTP layer is filled up to the last round's pending entries (the next round would
        # extend over the rest); past that it holds the drafting chain's speculative latents.
        upto = n if layer < layers else extended[-1] + 1
        assert upto > len(prompt)
        assert rel_err(got.c_kv[layer, 0, :upto], fresh.c_kv[layer, 0, :upto]) < 1e-5, layer
        assert rel_err(got.k_pe[layer, 0, :upto], fresh.k_pe[layer, 0, :upto]) < 1e-5, layer


def test_generate_cli_with_speculative_tokens_prints_the_same_text(tiny_ckpt, capsys):
    from model_host.cli import main

    args = ["generate", "--checkpoint", str(tiny_ckpt), "--prompt", "milvus index", "--raw", "--max-tokens", "6"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative-tokens", "2"]) == 0
    assert capsys.readouterr().out == plain and plain.strip()


def test_spec_bench_plumbing_forces_acceptance(tiny_model):
    """bench/spec_bench.py on the CPU: its continuation drafter makes every draft accepted
    (k + 1 tokens per round), and every number of the report is there."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench import spec_bench
    from model_host.engine.paged_cache import PagedLatentCache

    cfg, ctx, ks = tiny_model.cfg, 10, [2]
    per_row = spec_bench.rows_blocks(ctx, 8, 4, ks)
    cache = PagedLatentCache(tiny_model.num_cache_layers, 2 * per_row, 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                             dtype=torch.float32)
    cache.c_kv.normal_()
    cache.k_pe.normal_()
    with torch.inference_mode():
        res = spec_bench.run_batch(tiny_model, cache, 2, ks, 4, ctx, None, None, lambda: None, lambda *a: None, iters=1)
    assert res["tokens_per_round2_k2"] == 3
    for key in ("decode2", "verify2_k2", "draft2_k2", "round2_k2", "forced2_k2", "projected2_k2_a0.85"):
        assert res[key] > 0, key


def test_speculative_tokens_on_a_checkpoint_without_mtp_is_one_clear_error(small_ckpt, capsys):
    from model_host.cli import main

    assert main(["generate", "--checkpoint", str(small_ckpt), "--prompt", "x", "--speculative-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_nextn_predict_layers = 0" in err[0] and "drop the flag" in err[0]
