"""CUDA-graph capture of the decode step (one graph per batch-size bucket) and of whole-prompt
prefills (one graph per token-count bucket).

A decode step of the truncated V3 model is ~200 small kernels; launched from Python each costs
more host time than its GPU time, so the step is captured once per bucket and replayed.  What a
captured step needs, and how it gets it:

* static inputs - ids / positions / block tables live in persistent buffers sized for the
  largest bucket; ``run`` copies the live rows in and points padding rows at the cache's
  ``scratch_block`` (position 0), so their writes and reads never touch a real sequence;
* static shapes - the paged MLA kernel reads lengths from ``positions`` on the device, so the
  graph is independent of the context length (``kv_len`` is passed as 1 and unused);
* no host syncs - TritonOps' decode path (MoE, routing, paged MLA) is sync-free; Triton kernels are
  compiled (and ``kv_b`` dequantized) by two warm-up steps before capture.

Graphs share one memory pool (the runner's decode and prefill graphs too: they replay on one
stream); outputs are copied out before the next replay can reuse it.

Riding steps (prompt chunks as rows of the decode step, past the decode sizes) take row buckets
of their own (:func:`riding_buckets`, none spanning a precision switch of the kernels): there a
step's rows outnumber its sequences, so those
graphs compute logits only for a static index of kept rows (one per sequence, at most the widest
decode bucket's) into one buffer shared by all of them, not [rows, vocab] fp32 per graph.

With ``mtp=True`` the captured step is the MTP layer's (:meth:`DecodeGraphs.run` then also takes
the main model's hidden states), for speculative decoding's drafts.

:class:`PrefillGraphs` captures the prefill of one prompt with nothing cached (positions 0..n-1,
the cold prompt of an idle server, or the first chunk of a long one), padded to the next bucket:
a prefill of 2,048 tokens is ~230 launches, ~1.8 ms of host gaps on a fast host and more on a
slow one. Padding tokens come after the real ones, so causal attention keeps them out of every
real row, and every other op is row-wise. Only prompts over 256 tokens take a graph: the
kernels' activation precision changes at 256 rows (``gemm_config``, ``grouped_config``), so a
shorter prompt padded past it would round differently from the same prompt run eagerly.
"""

from __future__ import annotations

import torch

from model_host.transfer import upload

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL_MIN_TOKENS = 257  # above the kernels' 256-row precision switch (module doc)
PREFILL_STEP = 128  # bucket spacing: at most 127 padding tokens (12% at 1,024, 6% at 2,048)
# Riding-step buckets: a wave of arrivals at high load makes steps just past the decode sizes
# (c=128: ~142 rows on average with 16-token blocks), and padded rows cost there: a captured
# 192-row step takes 8.87 ms against 9.44 ms at 256 (H100, sixteenth session).
RIDING_STEP = 64


def prefill_buckets(max_tokens: int, max_positions: int, step: int = PREFILL_STEP) -> list[int]:
    """Token counts to capture prompts at: multiples of ``step`` from the first above
    :data:`PREFILL_MIN_TOKENS` through the first at or above ``max_tokens`` (the longest chunk
    the scheduler forms), none past the model's positions."""
    top = min(-(-max_tokens // step) * step, max_positions // step * step)
    return list(range(-(-PREFILL_MIN_TOKENS // step) * step, top + 1, step))


def riding_buckets(decode_rows: int, max_rows: int, switches: tuple[int, ...]) -> list[int]:
    """Row counts to capture riding steps at, past the widest decode bucket ``decode_rows``
    through the first at or above ``max_rows``: multiples of :data:`RIDING_STEP` and every
    precision switch of the ops (``Ops.precision_switches``) among them, so that no bucket spans a switch
    and a padded step rounds as the same step run eagerly."""
    top = -(-max_rows // RIDING_STEP) * RIDING_STEP
    marks = {*range(RIDING_STEP, top + 1, RIDING_STEP), *(s for s in switches if s <= top)}
    return sorted(b for b in marks if b > decode_rows) if max_rows > decode_rows else []


def capture(step, pool):
    """Run ``step`` twice on a side stream (compiles the kernels, fills the ops' weight caches),
    then capture it into ``pool`` (None: a new one) -> (the graph, the outputs it writes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class DecodeGraphs:
    """Captured decode steps over a :class:`~model_host.engine.paged_cache.PagedLatentCache`."""

    def __init__(self, model, cache, max_blocks_per_seq: int, buckets=BUCKETS, mtp: bool = False,
                 pool=None, riding: list[int] = ()) -> None:
        """``riding``: row buckets past ``buckets`` whose steps compute logits only for kept rows
        (at most ``max(buckets)``: one per sequence), see :func:`riding_buckets`."""
        self.model, self.cache, self.mtp = model, cache, mtp
        self.buckets = sorted([*buckets, *riding])
        self.kept = max(buckets) if riding else None  # buckets above this keep rows `keep` only
        bmax, dev = self.buckets[-1], model.device
        self.ids = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.tables = torch.full((bmax, max_blocks_per_seq), cache.scratch_block, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(bmax, 1, model.cfg.hidden_size, dtype=model.dtype, device=dev) if mtp else None
        if riding:  # filled inside the riding graphs, outside their pool: one buffer for all of them
            self.keep = torch.zeros(self.kept, dtype=torch.long, device=dev)
            self.kept_logits = torch.zeros(self.kept, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = pool  # a graph pool to share (the runner's prefill graphs'), or None

    def bucket(self, n: int) -> int | None:
        """Smallest captured batch size >= n (None: run eagerly)."""
        return next((b for b in self.buckets if b >= n), None)

    def _riding(self, b: int) -> bool:
        return self.kept is not None and b > self.kept

    def _step(self, b: int, kv_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.bind(self.tables[:b])
        if self.mtp:
            out = self.model.mtp_forward(self.ids[:b], self.hidden[:b], self.pos[:b], self.cache, kv_len=kv_len)
        elif self._riding(b):  # nothing reads its hidden states: none kept in the pool
            out = self.model(self.ids[:b], self.pos[:b], self.cache, kv_len=kv_len, logits_at=self.keep)
            self.kept_logits.copy_(out.logits[0])
            return self.kept_logits, None
        else:
            out = self.model(self.ids[:b], self.pos[:b], self.cache, kv_len=kv_len, last_only=True)
        return out.logits[:, -1], out.hidden[:, -1]

    def capture(self, b: int) -> None:
        self.graphs[b], self.outputs[b] = capture(lambda: self._step(b), self.pool)
        self.pool = self.graphs[b].pool()

    def load(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
             hidden: torch.Tensor | None = None, at: torch.Tensor | None = None) -> int | None:
        """Copy n live rows (and, for a riding bucket, the kept rows ``at``) into the static
        buffers; returns the bucket (None if it cannot)."""
        n = ids.shape[0]
        b = self.bucket(n)
        if b is None or tables.shape[1] > self.tables.shape[1]:
            return None
        if self._riding(b):
            if at is None or at.numel() > self.kept:
                return None
            self.keep[: at.numel()].copy_(at)
            self.keep[at.numel() :].zero_()  # row 0's logits again, dropped
        if self.mtp:
            self.hidden[:n].copy_(hidden.view(n, 1, -1))
        self.ids[:n].copy_(ids.view(n, 1))
        self.pos[:n].copy_(positions.view(n, 1))
        self.tables[:n, : tables.shape[1]].copy_(tables)
        if b > n:  # padding rows: token 0 at position 0 of the scratch block
            self.ids[n:b].zero_()
            self.pos[n:b].zero_()
            self.tables[n:b, 0] = self.cache.scratch_block
        return b

    def run(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
            at: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [n, V] (a fresh tensor) for n rows, or [m, V] for the m rows ``at`` (device
        indices); None when no bucket fits."""
        n = ids.shape[0]
        b = self.load(ids, positions, tables, at=at)
        if b is None:
            return None
        logits = self._replay(b)[0]
        if self._riding(b):
            return logits[: at.numel()].clone()
        return logits[:n][at] if at is not None else logits[:n].clone()

    def _replay(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ids.is_cuda:  # no graphs off the GPU: the same padded step, eagerly (CPU tests),
            return self._step(b, int(self.pos[:b].max()) + 1)  # where attention reads kv_len keys
        if b not in self.graphs:
            self.capture(b)
        self.graphs[b].replay()
        return self.outputs[b]

    def run_hidden(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                   hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [n, V], final-normed hidden [n, D]) (fresh tensors) for n rows, or None when no
        bucket fits; ``hidden`` [n, D] is the MTP step's input (``mtp=True`` only)."""
        n = ids.shape[0]
        b = self.load(ids, positions, tables, hidden)  # None for a riding bucket: no kept rows given
        if b is None:
            return None
        logits, out_hidden = self._replay(b)
        return logits[:n].clone(), out_hidden[:n].clone()


class PrefillGraphs:
    """Captured prefills of one prompt with nothing cached, one graph per token bucket.

    A prompt of n tokens runs as the bucket's b >= n: token ids 0 at positions n..b-1. Their
    latents land in the rest of the prompt's last block (its own, never shared: nothing of the
    prompt was cached, and a block is published only when full; decode overwrites those slots,
    in order, before any row reads them) and past it in the cache's ``scratch_block``.
    ``hidden=True`` also keeps the final-normed hidden states (the MTP layer drafts from them).
    """

    def __init__(self, model, cache, buckets, hidden: bool = False, pool=None) -> None:
        self.model, self.cache = model, cache
        self.buckets = sorted(buckets)
        top, dev, bs = self.buckets[-1], model.device, cache.block_size
        self.ids = torch.zeros(1, top, dtype=torch.long, device=dev)
        self.pos = torch.arange(top, device=dev).view(1, top)
        self.tables = torch.full((1, -(-top // bs)), cache.scratch_block, dtype=torch.long, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        # Filled inside the graph, outside its pool: one buffer for every bucket.
        self.hidden = torch.zeros(1, top, model.cfg.hidden_size, dtype=model.dtype, device=dev) if hidden else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = pool

    def bucket(self, n: int) -> int | None:
        """Smallest captured token count >= n (None: too short or too long, run eagerly)."""
        return next((b for b in self.buckets if b >= n), None) if n >= PREFILL_MIN_TOKENS else None

    def _step(self, b: int) -> torch.Tensor:
        self.cache.bind(self.tables[:, : -(-b // self.cache.block_size)])
        out = self.model(self.ids[:, :b], self.pos[:, :b], self.cache, kv_len=b, logits_at=self.last)
        if self.hidden is not None:
            self.hidden[:, :b].copy_(out.hidden)
        return out.logits[0]

    def capture(self, b: int) -> None:
        self.graphs[b], self.logits[b] = capture(lambda: self._step(b), self.pool)
        self.pool = self.graphs[b].pool()

    def run(self, ids: list[int], table: list[int]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Prefill ``ids`` (positions 0..n-1) into the blocks of ``table``: (the last token's
        logits [1, V], hidden states [n, D] or None), fresh tensors; None when no bucket fits."""
        n = len(ids)
        b = self.bucket(n)
        if b is None:
            return None
        used = -(-n // self.cache.block_size)
        flat = upload([*ids, *table[:used], n - 1], torch.long, self.ids.device)  # one copy in
        self.ids[0, :n].copy_(flat[:n])
        self.ids[0, n:b].zero_()
        self.tables[0, :used].copy_(flat[n : n + used])
        self.tables[0, used:].fill_(self.cache.scratch_block)
        self.last.copy_(flat[-1:])
        if self.ids.is_cuda:
            if b not in self.graphs:
                self.capture(b)
            self.graphs[b].replay()
            logits = self.logits[b]
        else:  # no graphs off the GPU: the same padded forward, eagerly (what the CPU tests check)
            logits = self._step(b)
        hidden = self.hidden[0, :n].clone() if self.hidden is not None else None
        return logits.clone(), hidden
