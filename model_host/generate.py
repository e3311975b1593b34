"""Single-request generation loop: prefill, then one-token decode steps over the latent cache.

Stops at EOS, at a stop string (the stop string itself is not returned), or after
``max_tokens``.  Text is streamed through ``on_text`` as soon as it is certain: complete UTF-8
characters only, and never a prefix of a stop string that might still complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .model import DeepseekV3
from .sampler import Sampler, SamplingParams, sample
from .stop import StopMatcher
from .tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """Output of :func:`generate`.  ``finish_reason`` is "eos", "stop" or "length"."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@torch.no_grad()
def generate(
    model: DeepseekV3,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    on_text: Callable[[str], None] | None = None,
    cache_dtype: torch.dtype | None = None,
) -> GenerationResult:
    """Generate a completion of ``prompt_ids`` with ``params`` (greedy when temperature is 0)."""
    max_len = _max_len(model, prompt_ids, params)
    device = model.device
    cache = model.new_cache(1, max_len, dtype=cache_dtype)
    sampler, gen = Sampler(), params.generator(device)
    decoder, matcher = tokenizer.stream_decoder(), StopMatcher(params.stop)
    emit = on_text or (lambda _text: None)

    t0 = time.perf_counter()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    logits = model(ids, cache=cache, last_only=True).logits[:, -1]
    t1 = time.perf_counter()

    out: list[int] = []
    finish = "length"
    pos = len(prompt_ids)
    for _ in range(params.max_tokens):
        tok = int(sampler(logits, [params], [gen])[0])
        if done := _take(tok, out, tokenizer, params, matcher, decoder, emit):
            finish = done  # no forward for a token we will not sample from
            break
        nxt = torch.tensor([[tok]], dtype=torch.long, device=device)
        positions = torch.tensor([[pos]], dtype=torch.long, device=device)
        logits = model(nxt, positions, cache, kv_len=pos + 1).logits[:, -1]
        pos += 1
    if not matcher.stopped:
        emit(matcher.flush())
    t2 = time.perf_counter()
    return GenerationResult(out, matcher.text, finish, len(prompt_ids), t1 - t0, t2 - t1)


@torch.no_grad()
def generate_speculative(
    model: DeepseekV3,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    k: int,
    *,
    on_text: Callable[[str], None] | None = None,
    cache_dtype: torch.dtype | None = None,
    drafter=None,
) -> GenerationResult:
    """:func:`generate` with MTP speculative decoding, k drafts per round (the model must be
    loaded with its MTP layer).  Greedy output equals :func:`generate`'s token for token; sampled
    output has the same distribution.  ``drafter`` replaces the MTP drafter (tests, benchmarks)."""
    from .speculative import OneRowForwards, Pending, mtp_draft, speculative_round

    if k < 1:
        raise ValueError(f"speculative tokens k={k} must be >= 1 (use generate() for k = 0)")
    if not len(model.mtp):
        raise ValueError("speculative decoding needs the MTP layer: load the model with load_mtp=True")
    max_len = _max_len(model, prompt_ids, params)
    device = model.device
    # Verify writes up to k positions past the last emitted token before it is cut.
    cache = model.new_cache(1, max_len + k, dtype=cache_dtype)
    fw = OneRowForwards(model, cache)
    gen = params.generator(device)
    gens = None if gen is None else [gen]
    temperature, top_k, top_p = (torch.tensor([v], device=device) for v in
                                 (params.temperature, params.top_k, params.top_p))
    decoder, matcher = tokenizer.stream_decoder(), StopMatcher(params.stop)
    emit = on_text or (lambda _text: None)

    t0 = time.perf_counter()
    n = len(prompt_ids)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    positions = torch.arange(n, device=device)
    logits, hidden = fw.main(ids, positions, [n])
    tok = sample(logits[-1:], temperature, top_k, top_p, gens)
    if n > 1:  # the MTP layer's cache for the prompt: (t[i+1], h[i]) at i = 0 .. n-2
        fw.mtp(ids[1:], hidden[:-1], positions[:-1], [n - 1])
    pending = Pending(tok, hidden[-1:], positions[-1:], [1])
    t1 = time.perf_counter()

    out: list[int] = []
    finish = "length"
    new_tokens = tok.tolist()
    while True:
        done = None
        for t in new_tokens:
            if done := _take(t, out, tokenizer, params, matcher, decoder, emit):
                break
        if done:
            finish = done
            break
        # No drafts past max_tokens: the last round verifies only what can still be emitted.
        step = speculative_round(fw, pending, k, temperature, top_k, top_p, gens,
                                 [min(k, params.max_tokens - len(out) - 1)], drafter=drafter or mtp_draft)
        pending = step.pending
        new_tokens = step.verdict.tokens[0, : pending.counts[0]].tolist()
    if not matcher.stopped:
        emit(matcher.flush())
    t2 = time.perf_counter()
    return GenerationResult(out, matcher.text, finish, len(prompt_ids), t1 - t0, t2 - t1)


def _take(tok: int, out: list[int], tokenizer: Tokenizer, params: SamplingParams, matcher: StopMatcher,
          decoder, emit: Callable[[str], None]) -> str | None:
    """Emit one sampled token; the finish reason when generation ends with it, else None."""
    if tok == tokenizer.eos_id and not params.ignore_eos:
        return "eos"
    out.append(tok)
    emit(matcher.feed(decoder.push(tok)))
    if matcher.stopped:
        return "stop"
    return "length" if len(out) == params.max_tokens else None


def _max_len(model: DeepseekV3, prompt_ids: Sequence[int], params: SamplingParams) -> int:
    """Positions the generation needs; ValueError for an empty or too long request."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    max_len = len(prompt_ids) + params.max_tokens
    if max_len > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_tokens = {max_len} exceeds max_position_embeddings")
    return max_len
