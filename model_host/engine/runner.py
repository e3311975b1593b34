"""Turns scheduled sequences into model forwards over the paged latent cache."""

from __future__ import annotations

import torch

from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.sequence import Sequence
from model_host.model import DeepseekV3


class ModelRunner:
    def __init__(self, model: DeepseekV3, cache: PagedLatentCache):
        self.model = model
        self.cache = cache
        self.device = model.device

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]  # pads are masked
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Compute the uncached suffix of `seq`; return the last position's logits [V]."""
        start = seq.num_computed
        ids = torch.tensor([seq.token_ids[start:]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, len(seq), device=self.device).unsqueeze(0)
        self.cache.bind(self._tables([seq]))
        out = self.model(ids, positions, self.cache, kv_len=len(seq), last_only=True)
        seq.num_computed = len(seq)
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One batched step: each row feeds its last token at its own position. Returns [B, V]."""
        ids = torch.tensor([[s.token_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(s) - 1] for s in seqs], dtype=torch.long, device=self.device)
        self.cache.bind(self._tables(seqs))
        out = self.model(ids, positions, self.cache, kv_len=max(len(s) for s in seqs), last_only=True)
        for s in seqs:
            s.num_computed = len(s)
        return out.logits[:, -1]
