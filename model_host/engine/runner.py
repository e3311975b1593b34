"""Turns scheduled sequences into model forwards over the paged latent cache.

On CUDA with the model on the GPU kernels (``model.ops`` a ``TritonOps``), decode steps
run through the paged MLA kernel and are replayed from CUDA graphs captured per batch-size
bucket (:class:`model_host.kernels.graphs.DecodeGraphs`); everything else runs eagerly.
"""

from __future__ import annotations

import os

import torch

from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.sequence import Sequence
from model_host.engine.speculative import SpeculativeDecoder
from model_host.model import DeepseekV3


def _graphs_supported(model: DeepseekV3) -> bool:
    """CUDA + Triton + the sync-free kernel ops; MODEL_HOST_CUDA_GRAPHS=0 opts out."""
    if model.device.type != "cuda" or os.environ.get("MODEL_HOST_CUDA_GRAPHS", "1") == "0":
        return False
    from model_host.kernels import HAS_TRITON

    if not HAS_TRITON:
        return False
    from model_host.kernels.backend import TritonOps

    return isinstance(model.ops, TritonOps)


class ModelRunner:
    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, cuda_graphs: bool | None = None,
                 spec: SpeculativeDecoder | None = None):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.spec = spec  # MTP speculative decoding (--speculative-tokens), or None
        self.mtp_graphs = None
        if cuda_graphs is None:
            cuda_graphs = _graphs_supported(model)
        self.graphs = None
        if cuda_graphs:
            from model_host.kernels.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, cache, max_blocks_per_seq=cache.num_blocks)
            if spec is not None:  # the MTP layer's single-token steps (drafts), captured the same way
                self.mtp_graphs = DecodeGraphs(model, cache, max_blocks_per_seq=cache.num_blocks, mtp=True)

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
        if self.spec is not None:
            self.spec.prefill_chunk(seq, start, len(seq), out.hidden[0])
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One batched step: each row feeds its last token at its own position. Returns [B, V]."""
        ids = torch.tensor([[s.token_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(s) - 1] for s in seqs], dtype=torch.long, device=self.device)
        tables = self._tables(seqs)
        logits = self.graphs.run(ids, positions, tables) if self.graphs is not None else None
        if logits is None:  # no graphs, or no bucket large enough: eager step
            self.cache.bind(tables)
            out = self.model(ids, positions, self.cache, kv_len=max(len(s) for s in seqs), last_only=True)
            logits = out.logits[:, -1]
        for s in seqs:
            s.num_computed = len(s)
        return logits

    def speculate(self, seqs: list[Sequence]) -> tuple[list[list[int]], torch.Tensor]:
        """One speculative round for decode rows (each with slots for its drafts): the tokens
        each sequence emits (1 .. k+1), and the verify logits [B, k+1, V]."""
        return self.spec.step(seqs, self._tables(seqs), self.graphs, self.mtp_graphs)
