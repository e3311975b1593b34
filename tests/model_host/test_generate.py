"""Sampler, stop strings and the generation loop (greedy, seeded sampling, EOS, stop)."""

from __future__ import annotations

import pytest
import torch

from model_host.generate import generate
from model_host.sampler import Sampler, SamplingParams, apply_top_k_top_p, sample
from model_host.stop import StopMatcher

PROMPT = [{"role": "user", "content": "Write a haiku about the sea."}]


# ---------------------------------------------------------------------------------- sampler
def test_greedy_rows_and_top_k_one_are_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 1.0, 0.0, 2.0])
    out = sample(logits, t, torch.tensor([0, 1, 0, 1]), torch.ones(4))
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def keep(k, p):
        return apply_top_k_top_p(logits, torch.tensor([k]), torch.tensor([p])).isfinite()[0].tolist()

    assert keep(2, 1.0) == [True, True, False, False]
    assert keep(0, 0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert keep(0, 0.81) == [True, True, True, False]
    assert keep(0, 0.1) == [True, False, False, False]  # the top token always survives
    assert keep(3, 0.7) == [True, True, False, False]


def test_sampling_follows_distribution_and_seed():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    gens = [g] * 4000
    out = sample(logits, torch.ones(4000), torch.zeros(4000, dtype=torch.long), torch.ones(4000), gens)
    freq = torch.bincount(out, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03) and freq[3] == 0
    params = SamplingParams(temperature=1.0, seed=123)
    a = Sampler()(logits[:1], [params], [params.generator()])
    b = Sampler()(logits[:1], [params], [params.generator()])
    assert torch.equal(a, b)


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ----------------------------------------------------------------------------- stop strings
def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["</end>", "STOP"])
    out = [m.feed(p) for p in ["Hello ", "wor", "ld </e", "nd> tail"]]
    assert out == ["Hello ", "wor", "ld ", ""] and m.stopped and m.text == "Hello world "
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == "abc " and m.feed("ART") == "START" and not m.stopped
    assert m.feed("S") == "" and m.flush() == "S"


# --------------------------------------------------------------------------------- generate
def test_greedy_is_deterministic_and_equals_recompute(tiny_model, tokenizer):
    ids = tokenizer.encode_chat(PROMPT)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a = generate(tiny_model, tokenizer, ids, params)
    b = generate(tiny_model, tokenizer, ids, params)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12 and a.finish_reason == "length"
    seq = list(ids)
    for _ in range(12):  # argmax of a full no-cache forward at every step
        seq.append(int(tiny_model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert a.token_ids == seq[len(ids) :]
    assert a.text == tokenizer.decode(a.token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(tiny_model, tokenizer):
    ids = tokenizer.encode_chat(PROMPT)

    def run(seed):
        return generate(
            tiny_model,
            tokenizer,
            ids,
            SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=seed, max_tokens=10),
        ).token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_truncates_and_streams(tiny_model, tokenizer):
    ids = tokenizer.encode_chat(PROMPT)
    full = generate(tiny_model, tokenizer, ids, SamplingParams(max_tokens=16, ignore_eos=True)).text
    assert len(full) > 10
    stop = full[6:9]
    first = full.index(stop)
    chunks: list[str] = []
    res = generate(
        tiny_model, tokenizer, ids, SamplingParams(max_tokens=16, stop=(stop,)), on_text=chunks.append
    )
    assert res.finish_reason == "stop" and res.text == full[:first]
    assert "".join(chunks) == res.text


def test_eos_stops_generation(tiny_model, tokenizer):
    class EosAtStep3:
        """Wraps the model; forces EOS to be the argmax on the 4th sampled token."""

        def __init__(self, model):
            self.model, self.cfg, self.device, self.calls = model, model.cfg, model.device, 0

        def new_cache(self, *a, **k):
            return self.model.new_cache(*a, **k)

        def __call__(self, *a, **k):
            out = self.model(*a, **k)
            self.calls += 1
            if self.calls == 4:
                out.logits[..., tokenizer.eos_id] = 1e4
            return out

    res = generate(
        EosAtStep3(tiny_model), tokenizer, tokenizer.encode("Hi", add_bos=True), SamplingParams(max_tokens=10)
    )
    assert res.finish_reason == "eos" and len(res.token_ids) == 3 and tokenizer.eos_id not in res.token_ids
