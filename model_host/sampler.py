"""Token sampling: greedy, temperature, top-k, top-p, with per-row seeds.

:func:`sample` is batched and takes per-row parameters, so a continuous-batching engine can mix
greedy and sampled requests in one step.  Randomness comes from the exponential-race trick
(``argmax(p / E)`` with ``E ~ Exp(1)`` samples from ``p``) drawn from a per-row
``torch.Generator``: a request's tokens depend only on its own seed, not on batch composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .transfer import upload

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters.  ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's logprob and the n most likely

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed} must be in [0, 2**64)")  # torch.Generator's range
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, {MAX_TOP_LOGPROBS}]")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` (None -> nondeterministic sampling)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) logits outside each row's top-k and top-p nucleus.

    logits [B, V] fp32; top_k [B] int (0 = off); top_p [B] float (1 = off).  The most likely
    token always survives.  Ties keep greedy's rule (``argmax`` returns the first of equal
    maxima): the sort is stable, so among equal logits the lowest index ranks first, and
    ``top_k=1`` or a tiny ``top_p`` picks exactly the token greedy picks.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)
    drop = ranks.unsqueeze(0) >= k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, masked)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
    all_greedy: bool | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V].  Rows with temperature 0 are greedy.

    ``all_greedy``: whether every row is greedy, when the caller knows it on the host; None reads
    it from ``temperature``, which waits for the GPU's queue (the engine's overlapped step must not).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if all_greedy if all_greedy is not None else bool((temperature == 0).all()):
        return greedy
    t = temperature.clamp(min=1e-5).unsqueeze(1)
    probs = apply_top_k_top_p(logits / t, top_k, top_p).softmax(dim=-1)
    noise = torch.empty_like(probs)
    for row in range(probs.shape[0]):
        g = generators[row] if generators is not None else None
        noise[row].exponential_(generator=g)
    # exponential_ can return exactly 0 (u == 0); 0/0 would be NaN and win the argmax.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperature == 0, greedy, sampled)


class Sampler:
    """Convenience wrapper: sample rows with one :class:`SamplingParams` each."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        if all(p.temperature == 0 for p in params):
            return logits.float().argmax(dim=-1)  # no per-row parameters to upload
        return sample(logits, *sampling_tensors(params, logits.device), generators, all_greedy=False)


def sampling_tensors(params: Sequence[SamplingParams], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k, top_p) per row on ``device``, in one copy that does not wait for the
    GPU (top_k is exact in fp32: vocabularies are far below 2**24)."""
    flat = upload([[p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params]],
                  torch.float32, device)
    return flat[0], flat[1].long(), flat[2]
