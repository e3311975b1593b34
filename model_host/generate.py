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
from .sampler import Sampler, SamplingParams
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
    if not prompt_ids:
        raise ValueError("prompt is empty")
    max_len = len(prompt_ids) + params.max_tokens
    if max_len > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_tokens = {max_len} exceeds max_position_embeddings")
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
    for step in range(params.max_tokens):
        tok = int(sampler(logits, [params], [gen])[0])
        if tok == tokenizer.eos_id and not params.ignore_eos:
            finish = "eos"
            break
        out.append(tok)
        emit(matcher.feed(decoder.push(tok)))
        if matcher.stopped:
            finish = "stop"
            break
        if step == params.max_tokens - 1:
            break  # no forward for a token we will not sample from
        nxt = torch.tensor([[tok]], dtype=torch.long, device=device)
        positions = torch.tensor([[pos]], dtype=torch.long, device=device)
        logits = model(nxt, positions, cache, kv_len=pos + 1).logits[:, -1]
        pos += 1
    if not matcher.stopped:
        emit(matcher.flush())
    t2 = time.perf_counter()
    return GenerationResult(out, matcher.text, finish, len(prompt_ids), t1 - t0, t2 - t1)
