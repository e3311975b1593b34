"""Turns scheduled work into model forwards over the paged latent cache.

On CUDA with the model on the GPU kernels (``model.ops`` a ``TritonOps``), decode steps
run through the paged MLA kernel and are replayed from CUDA graphs captured at start-up for
every batch size the scheduler can produce (:meth:`ModelRunner.capture_graphs`); a batch is
padded up to the next captured size. So are steps that prompt chunks ride as rows, up to
``--riding-graph-rows`` rows (those graphs compute logits only for the rows kept). All prefill
chunks of a step run as one packed (varlen) forward, eagerly (:mod:`model_host.engine.packing`),
except a step whose one chunk starts a prompt with nothing cached: that one replays a prefill
graph of its length bucket (:class:`~model_host.kernels.graphs.PrefillGraphs`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from model_host.engine.block_tables import DeviceBlockTables
from model_host.engine.memory import PREFILL_CONTEXT_KEYS
from model_host.engine.packing import pack_chunks
from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.scheduler import PrefillChunk
from model_host.engine.sequence import Sequence
from model_host.engine.speculative import SpeculativeDecoder
from model_host.model import DeepseekV3
from model_host.sampler import SamplingParams
from model_host.transfer import upload

log = logging.getLogger(__name__)
_WARM_UP = SamplingParams(max_tokens=1)


def graphs_supported(model: DeepseekV3) -> bool:
    """CUDA + Triton + the sync-free kernel ops; MODEL_HOST_CUDA_GRAPHS=0 opts out."""
    if model.device.type != "cuda" or os.environ.get("MODEL_HOST_CUDA_GRAPHS", "1") == "0":
        return False
    from model_host.kernels import HAS_TRITON

    if not HAS_TRITON:
        return False
    from model_host.kernels.backend import TritonOps

    return isinstance(model.ops, TritonOps)


def capture_sizes(max_batch: int) -> list[int]:
    """Decode batch sizes to capture: powers of two below ``max_batch``, and ``max_batch`` itself,
    so any batch the scheduler forms (1..max_batch rows) pads by less than 2x."""
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def context_groups(chunks: list[PrefillChunk], max_keys: int) -> list[list[PrefillChunk]]:
    """Consecutive groups of chunks whose attended keys (each chunk's whole context, cached
    prefix included: ``c.end``) sum to at most ``max_keys``; a longer chunk goes alone."""
    groups: list[list[PrefillChunk]] = []
    keys = 0
    for c in chunks:
        if groups and keys + c.end <= max_keys:
            groups[-1].append(c)
            keys += c.end
        else:
            groups.append([c])
            keys = c.end
    return groups


@dataclasses.dataclass(frozen=True)
class GraphReport:
    sizes: list[int]
    seconds: float
    nbytes: int
    prefill_sizes: list[int] = dataclasses.field(default_factory=list)
    riding_sizes: list[int] = dataclasses.field(default_factory=list)


class ModelRunner:
    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, cuda_graphs: bool | None = None,
                 spec: SpeculativeDecoder | None = None):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.spec = spec  # MTP speculative decoding (--speculative-tokens), or None
        self.mtp_graphs = None
        self.prefill_graphs = None  # whole-prompt prefills by length, from capture_graphs()
        use_graphs = graphs_supported(model) if cuda_graphs is None else cuda_graphs
        self.graphs = None
        # Block tables as wide as the longest sequence the model allows, not the whole cache:
        # a cache sized from free GPU memory holds millions of blocks (128 x that = GiBs).
        # capture_graphs() narrows both to the engine's limit.
        widest = min(cache.num_blocks, -(-model.cfg.max_position_embeddings // cache.block_size))
        self.block_tables = DeviceBlockTables(widest, self.device)
        if use_graphs:
            from model_host.kernels.graphs import DecodeGraphs

            # Captures a batch size on its first use unless capture_graphs() did it at start-up.
            self.graphs = DecodeGraphs(model, cache, widest)
            if spec is not None:  # the MTP layer's single-token steps (drafts), captured the same way
                self.mtp_graphs = DecodeGraphs(model, cache, widest, mtp=True)

    @property
    def graphs_enabled(self) -> bool:
        return self.graphs is not None

    def capture_graphs(self, sizes: list[int], budget_bytes: int, max_blocks_per_seq: int,
                       prefill_tokens: int = 0, riding: list[int] = ()) -> GraphReport | None:
        """Capture whole-prompt prefills up to ``prefill_tokens`` tokens (0: none) by length
        bucket, then the decode step (and, with speculation, the MTP layer's step) for each batch
        size and riding steps of ``riding`` rows (prompt chunks as decode rows, past ``sizes``),
        for block tables up to ``max_blocks_per_seq`` wide. Largest first, all into one
        memory pool: each graph reuses what the larger ones took. Raises if the graphs take more
        than ``budget_bytes`` of GPU memory. Under tensor parallelism every rank builds the same
        engine, so every rank captures the same sizes in the same order."""
        if self.graphs is None:
            return None
        from model_host.kernels.graphs import DecodeGraphs, PrefillGraphs, prefill_buckets

        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # measured against the driver's free memory on both sides
        free_before = torch.cuda.mem_get_info(self.device)[0]
        t0 = time.perf_counter()
        lengths = prefill_buckets(prefill_tokens, self.model.cfg.max_position_embeddings) if prefill_tokens else []
        self.prefill_graphs = (PrefillGraphs(self.model, self.cache, lengths, hidden=self.spec is not None)
                               if lengths else None)
        with torch.inference_mode():
            for n in reversed(lengths):
                self.prefill_graphs.capture(n)
        pool = self.prefill_graphs.pool if self.prefill_graphs is not None else None
        self.graphs = DecodeGraphs(self.model, self.cache, max_blocks_per_seq, buckets=sizes, pool=pool,
                                   riding=riding)
        self.block_tables = DeviceBlockTables(max_blocks_per_seq, self.device)  # the graphs' width
        if self.spec is not None:
            self.mtp_graphs = DecodeGraphs(self.model, self.cache, max_blocks_per_seq, buckets=sizes, mtp=True)
        with torch.inference_mode():
            for graphs in (self.graphs, self.mtp_graphs):
                for b in reversed(graphs.buckets) if graphs is not None else ():
                    graphs.capture(b)
        torch.cuda.synchronize()
        # The warm-ups before each capture ran outside the pools: hand their cached blocks back,
        # so that what is measured is what the graphs keep.
        torch.cuda.empty_cache()
        report = GraphReport(sorted(sizes), time.perf_counter() - t0,
                             free_before - torch.cuda.mem_get_info(self.device)[0], lengths, list(riding))
        if report.nbytes > budget_bytes:
            raise ValueError(
                f"CUDA graphs for decode batch sizes {report.sizes}, riding steps up to {max(riding, default=0)} "
                f"rows and prefill lengths up to {prefill_tokens} tokens took {report.nbytes / 2**30:.2f} GiB, "
                f"over --graph-memory-gb {budget_bytes / 2**30:.2f}; raise --graph-memory-gb, or lower "
                "--max-batch, --riding-graph-rows or --prefill-graph-tokens")
        prefill = f"{len(lengths)} prefill lengths ({lengths[0]}..{lengths[-1]} tokens)" if lengths else "no prefill"
        rows = f"riding steps of {riding[0]}..{riding[-1]} rows" if riding else "no riding steps"
        log.info("captured CUDA graphs for decode batch sizes %s, %s and %s in %.1f s (%.2f GiB)",
                 report.sizes, rows, prefill, report.seconds, report.nbytes / 2**30)
        return report

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        return self.block_tables.gather(seqs)

    def release(self, seq: Sequence) -> None:
        """``seq`` has ended: forget its device-side block table."""
        self.block_tables.forget(seq.id)

    # Whether decode() can take tokens still on the device (``fill``): the engine overlaps its
    # steps only then (a tensor-parallel driver sends its followers host tokens).
    device_tokens = True

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Compute every chunk's tokens into the cache in packed (varlen) forwards, one per group
        of at most ``PREFILL_CONTEXT_KEYS`` attended keys (one forward in the common case); return
        the last-position logits [m, V] of the chunks that end their sequence, in chunk order."""
        return self._prefill(chunks)

    def warm_up(self, lengths: list[int]) -> None:
        """Run one packed prefill of each length in ``lengths`` over blocks 0.. (before any
        request holds one), so that Triton compiles its kernels for those shapes now. It runs
        on this rank alone: under tensor parallelism every rank calls it at start-up with the
        same lengths, so the collectives inside line up (as graph capture does)."""
        for n in lengths:
            self._prefill([self._scratch(n)], graphs=False)  # the eager packed path is what compiles
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warm_up_rows(self, lengths: list[int], max_len: int) -> None:
        """Run one eager decode step of each length in ``lengths`` rows, fresh prompts of at most
        ``max_len`` tokens riding as rows (the shape of a wave of prefix-hit chunks past the
        captured graphs), so that the decode-layout kernels (paged latent attention over many
        rows) compile now too. The prompts share blocks 0.. (nothing is published); a table
        never outgrows ``max_len``, so the graphs' block-table width stays. Same rules as
        :meth:`warm_up`; on this rank alone (a driver's decode would broadcast the step)."""
        for n in lengths:
            chunks = [self._scratch(k) for k in [max_len] * (n // max_len) + [n % max_len] if k]
            ModelRunner.decode(self, [], chunks)
            for c in chunks:
                self.release(c.seq)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _scratch(self, n: int) -> PrefillChunk:
        """A warm-up prompt of ``n`` tokens over blocks 0.., as one whole chunk."""
        seq = Sequence([0] * n, _WARM_UP, decoder=None, generator=None)
        seq.block_table = list(range(-(-n // self.cache.block_size)))
        return PrefillChunk(seq, 0, n)

    def _captured(self, group: list[PrefillChunk]) -> torch.Tensor | None:
        """A group that is one chunk starting a prompt with nothing cached, through a prefill
        graph: the last token's logits [1, V] (empty [0, V] when the chunk does not end the
        prompt); None where no graph applies."""
        c = group[0]
        if self.prefill_graphs is None or len(group) > 1 or c.start > 0:
            return None
        out = self.prefill_graphs.run(c.seq.token_ids[: c.end], c.seq.block_table)
        if out is None:
            return None
        logits, hidden = out
        c.seq.num_computed = c.end
        if self.spec is not None:
            self.spec.prefill_chunk(c.seq, 0, c.end, hidden)
        return logits if c.last else logits[:0]

    @torch.inference_mode()
    def _prefill(self, chunks: list[PrefillChunk], graphs: bool = True) -> torch.Tensor:
        logits = []
        for group in context_groups(chunks, PREFILL_CONTEXT_KEYS):
            captured = self._captured(group) if graphs else None
            if captured is not None:
                logits.append(captured)
                continue
            packed = pack_chunks(group, self.cache.block_size, self.device)
            out = self.model(packed.ids, packed.positions, self.cache, varlen=packed.varlen, logits_at=packed.last)
            for i, c in enumerate(group):
                c.seq.num_computed = c.end
                if self.spec is not None:
                    q = packed.varlen.cu_seqlens_q
                    self.spec.prefill_chunk(c.seq, c.start, c.end, out.hidden[0, int(q[i]) : int(q[i + 1])])
            logits.append(out.logits[0])
        return torch.cat(logits)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], chunks: list[PrefillChunk] = (),
               fill: tuple[list[int], list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """One batched step of single-token rows: each decode row feeds its last token at its own
        position, and each of ``chunks`` rides along as one row per prompt token (rows of one
        sequence see each other: every layer stores all rows' latents before attending, and the
        paged kernel reads each row's keys up to its own position). Returns logits [m + B, V]:
        the last row of each chunk that ends its sequence, then the decode rows.

        ``fill`` = (indices into ``seqs``, indices into ``tokens``, ``tokens`` on the device): those
        decode rows' last tokens were sampled by the previous step and are still on the device
        (the engine's overlapped step); they are copied in on the device, in stream order."""
        row_seqs: list[Sequence] = []
        ids: list[int] = []
        pos: list[int] = []
        keep: list[int] = []
        for c in chunks:
            row_seqs += [c.seq] * c.length
            ids += c.seq.token_ids[c.start : c.end]
            pos += range(c.start, c.end)
            if c.last:
                keep.append(len(ids) - 1)
        for s in seqs:
            row_seqs.append(s)
            ids.append(s.token_ids[-1])
            pos.append(len(s) - 1)
            keep.append(len(ids) - 1)
        n, first = len(ids), len(ids) - len(seqs)
        into, src = fill[:2] if fill is not None else ([], [])
        picked = keep if len(keep) < n else []
        # One host-to-device copy for the step's small inputs (each copy costs host time).
        flat = upload(ids + pos + [first + i for i in into] + src + picked, torch.long, self.device)
        ids_t, pos_t = flat[:n].view(-1, 1), flat[n : 2 * n].view(-1, 1)
        f = 2 * n + len(into)
        if fill is not None:
            ids_t.view(-1).index_copy_(0, flat[2 * n : f], fill[2][flat[f : f + len(src)]])
        tables = self._tables(row_seqs)
        at = flat[f + len(src) :] if picked else None
        logits = self.graphs.run(ids_t, pos_t, tables, at) if self.graphs is not None else None
        if logits is None:  # no graphs (CPU, or MODEL_HOST_CUDA_GRAPHS=0), or no bucket fits: eager, logits of kept rows only
            self.cache.bind(tables)
            out = self.model(ids_t, pos_t, self.cache, kv_len=max(pos) + 1, last_only=not picked, logits_at=at)
            logits = out.logits[0] if picked else out.logits[:, -1]
        for c in chunks:
            c.seq.num_computed = c.end
        for s in seqs:
            s.num_computed = len(s)
        return logits

    def speculate(self, seqs: list[Sequence]) -> tuple[list[list[int]], torch.Tensor]:
        """One speculative round for decode rows (each with slots for its drafts): the tokens
        each sequence emits (1 .. k+1), and the verify logits [B, k+1, V]."""
        return self.spec.step(seqs, self._tables(seqs), self.graphs, self.mtp_graphs)
