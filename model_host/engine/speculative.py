"""MTP speculative decoding inside continuous batching (``--speculative-tokens K``).

Each decode step runs one :func:`~model_host.speculative.speculative_round` over every decoding
sequence: the MTP layer drafts K tokens per sequence, the main model verifies all of them in one
packed forward, and each sequence keeps its own number of accepted tokens (1 .. K+1 emitted).

Packed forwards: every entry (a verify position, or an MTP input) is its own single-token row
carrying its sequence's block table and its absolute position, so a query attends exactly its
sequence's cache up to itself (the causal mask of a varlen batch), and the step has the shape of
a plain decode step of ``sum(counts)`` rows: the paged decode kernel and the decode CUDA graphs
serve it unchanged.

Bookkeeping per sequence: ``seq.draft_input`` is its :class:`~model_host.speculative.Pending`
(the MTP inputs it still owes: the accepted tokens with the main model's hidden states before
them); ``num_computed`` counts the positions whose main-model latents are final; after a round
:meth:`BlockManager.truncate` frees the blocks that only rejected drafts touched.
"""

from __future__ import annotations

import dataclasses

import torch

from model_host.engine.block_manager import BlockManager
from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.sequence import Sequence
from model_host.model import DeepseekV3
from model_host.sampler import sampling_tensors
from model_host.speculative import Pending, mtp_draft, speculative_round
from model_host.transfer import upload


@dataclasses.dataclass
class SpecStats:
    """Totals since start: rounds (one per sequence per step), drafts verified, drafts accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per sequence per round (accepted drafts + the verified token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


class PagedForwards:
    """:class:`~model_host.speculative.Forwards` over the paged cache for a list of sequences
    (``tables`` [B, W], one row per sequence).  ``graphs`` / ``mtp_graphs`` replay captured
    single-token steps (:class:`~model_host.kernels.graphs.DecodeGraphs`) when a bucket fits."""

    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, tables: torch.Tensor, graphs=None,
                 mtp_graphs=None):
        self.model, self.cache, self.tables = model, cache, tables
        self.graphs, self.mtp_graphs = graphs, mtp_graphs

    def _rows(self, counts: list[int]) -> torch.Tensor:
        idx = [b for b, n in enumerate(counts) for _ in range(n)]  # on the host: no wait for the GPU
        return self.tables[upload(idx, torch.long, self.tables.device)]

    def main(self, ids, positions, counts):
        tables = self._rows(counts)
        if self.graphs is not None and (out := self.graphs.run_hidden(ids, positions, tables)) is not None:
            return out
        self.cache.bind(tables)
        out = self.model(ids.unsqueeze(1), positions.unsqueeze(1), self.cache, kv_len=int(positions.max()) + 1)
        return out.logits[:, 0], out.hidden[:, 0]

    def mtp(self, ids, hidden, positions, counts):
        tables = self._rows(counts)
        if self.mtp_graphs is not None and (out := self.mtp_graphs.run_hidden(ids, positions, tables, hidden)) is not None:
            return out
        self.cache.bind(tables)
        out = self.model.mtp_forward(ids.unsqueeze(1), hidden.unsqueeze(1), positions.unsqueeze(1), self.cache,
                                     kv_len=int(positions.max()) + 1)
        return out.logits[:, 0], out.hidden[:, 0]


class SpeculativeDecoder:
    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, blocks: BlockManager, k: int,
                 drafter=mtp_draft):
        if k < 1:
            raise ValueError(f"--speculative-tokens must be >= 1 here, got {k}")
        if not len(model.mtp):
            raise ValueError("--speculative-tokens needs the checkpoint's MTP layer (num_nextn_predict_layers = 1)")
        self.model, self.cache, self.blocks, self.k = model, cache, blocks, k
        self.drafter = drafter  # mtp_draft; benchmarks and tests pass an oracle (never the server)
        self.stats = SpecStats()

    @torch.inference_mode()
    def prefill_chunk(self, seq: Sequence, start: int, end: int, hidden: torch.Tensor) -> None:
        """After the main model computed positions ``start .. end-1`` of ``seq`` (final-normed
        hidden states [end - start, D]): fill the MTP layer's cache where the next token is known
        (position i needs token i+1); the last position of a prompt waits for its sampled token."""
        last = end == len(seq)
        seq.draft_input = None  # (re)computing the prompt, e.g. after a preemption
        n = end - start - (1 if last else 0)
        if n > 0:
            dev = hidden.device
            ids = upload(seq.token_ids[start + 1 : start + 1 + n], torch.long, dev)
            table = upload([seq.block_table], torch.long, dev)
            self.cache.bind(table)
            self.model.mtp_forward(ids.unsqueeze(0), hidden[:n].unsqueeze(0),
                                   torch.arange(start, start + n, device=dev).unsqueeze(0), self.cache, kv_len=start + n)
        if last:
            seq.draft_hidden = hidden[-1:]

    def first_token(self, seq: Sequence, token: int) -> None:
        """The prompt's first sampled token: the sequence's first pending MTP input."""
        h = seq.draft_hidden
        seq.draft_hidden = None
        dev = h.device
        t = upload([token, len(seq) - 2], torch.long, dev)
        seq.draft_input = Pending(t[:1], h, t[1:], [1])

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], tables: torch.Tensor, graphs=None,
             mtp_graphs=None) -> tuple[list[list[int]], torch.Tensor]:
        """One round for ``seqs`` (each with slots up to ``len - 1 + k``): the tokens each emits,
        and the verify logits [B, k+1, V] they were judged by (for logprobs)."""
        dev = tables.device
        pending = Pending.cat([s.draft_input for s in seqs])
        temperature, top_k, top_p = sampling_tensors([s.params for s in seqs], dev)
        # No drafts past max_tokens: a sequence one token from its end verifies just that token.
        num_drafts = [max(0, min(self.k, s.params.max_tokens - s.num_output - 1)) for s in seqs]
        gens = [s.generator for s in seqs]
        fw = PagedForwards(self.model, self.cache, tables, graphs, mtp_graphs)
        step = speculative_round(fw, pending, self.k, temperature, top_k, top_p, gens, num_drafts, self.drafter,
                                 all_greedy=all(s.params.temperature == 0 for s in seqs))
        tokens = step.verdict.tokens.tolist()
        out = []
        for s, p, nd in zip(seqs, step.pending.split(), num_drafts, strict=True):
            n = p.counts[0] - 1
            s.draft_input = p
            s.num_computed = len(s) + n  # t[L-1] and the n accepted drafts are now in the cache
            self.stats.rounds += 1
            self.stats.drafted += nd
            self.stats.accepted += n
            out.append(tokens[len(out)][: n + 1])
        return out, step.target

    def settle(self, seq: Sequence) -> None:
        """After the round's tokens were appended to an unfinished ``seq``: free the blocks of
        rejected drafts and publish the blocks complete in every layer."""
        self.blocks.truncate(seq)
        self.blocks.register_full_blocks(seq, self.filled(seq))

    @staticmethod
    def filled(seq: Sequence) -> int:
        """Positions final in every cache layer: the MTP layer still owes its pending inputs
        (or, after a prompt's last chunk, that chunk's last position)."""
        if seq.draft_hidden is not None:
            return seq.num_computed - 1
        return seq.num_computed - (seq.draft_input.counts[0] if seq.draft_input is not None else 0)
