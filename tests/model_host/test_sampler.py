"""The sampler's tie rule and parameter checks."""

from __future__ import annotations

import pytest
import torch

from model_host.sampler import Sampler, SamplingParams, sample


def _tied(vocab: int, tied: list[int]) -> torch.Tensor:
    """One row of logits whose maximum is shared by the indices in `tied`."""
    logits = torch.zeros(1, vocab)
    logits[0, tied] = 5.0
    return logits


@pytest.mark.parametrize("vocab", [64, 1024, 129_280])
@pytest.mark.parametrize(("top_k", "top_p"), [(1, 1.0), (0, 1e-6), (1, 1e-6)], ids=["top_k=1", "tiny top_p", "both"])
def test_top_k_1_and_tiny_top_p_reproduce_greedy_under_ties(vocab, top_k, top_p):
    """Greedy takes the first of tied maxima; sampling restricted to one token must take the same.

    Equal logits everywhere (and a tied maximum) are where an unstable sort reorders indices.
    """
    for tied in ([0, vocab // 2, vocab - 1], [vocab - 1, vocab // 3], list(range(vocab))):
        logits = _tied(vocab, tied)
        greedy = int(sample(logits, torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1)))
        assert greedy == min(tied)
        for seed in range(3):
            params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, seed=seed)
            tok = int(Sampler()(logits, [params], [params.generator()]))
            assert tok == greedy, (tied[:3], seed, tok)


def test_seed_outside_the_generator_range_is_refused():
    SamplingParams(seed=0)
    SamplingParams(seed=2**64 - 1).generator()
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=bad)
