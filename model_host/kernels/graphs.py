"""CUDA-graph capture of the decode step, one graph per batch-size bucket.

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

Graphs share one memory pool; outputs are copied out before the next replay can reuse it.

With ``mtp=True`` the captured step is the MTP layer's (:meth:`DecodeGraphs.run` then also takes
the main model's hidden states), for speculative decoding's drafts.
"""

from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DecodeGraphs:
    """Captured decode steps over a :class:`~model_host.engine.paged_cache.PagedLatentCache`."""

    def __init__(self, model, cache, max_blocks_per_seq: int, buckets=BUCKETS, mtp: bool = False) -> None:
        self.model, self.cache, self.mtp = model, cache, mtp
        self.buckets = sorted(buckets)
        bmax, dev = self.buckets[-1], model.device
        self.ids = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.tables = torch.full((bmax, max_blocks_per_seq), cache.scratch_block, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(bmax, 1, model.cfg.hidden_size, dtype=model.dtype, device=dev) if mtp else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, n: int) -> int | None:
        """Smallest captured batch size >= n (None: run eagerly)."""
        return next((b for b in self.buckets if b >= n), None)

    def _step(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.bind(self.tables[:b])
        if self.mtp:
            out = self.model.mtp_forward(self.ids[:b], self.hidden[:b], self.pos[:b], self.cache, kv_len=1)
        else:
            out = self.model(self.ids[:b], self.pos[:b], self.cache, kv_len=1, last_only=True)
        return out.logits[:, -1], out.hidden[:, -1]

    def capture(self, b: int) -> None:
        """Warm up (compiles kernels, fills weight caches) on a side stream, then capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[b] = self._step(b)
        self.pool = graph.pool()
        self.graphs[b] = graph

    def load(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
             hidden: torch.Tensor | None = None) -> int | None:
        """Copy n live rows into the static buffers; returns the bucket (None if it cannot)."""
        n = ids.shape[0]
        b = self.bucket(n)
        if b is None or tables.shape[1] > self.tables.shape[1]:
            return None
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

    def run(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor | None:
        """Logits [n, V] (a fresh tensor) for n rows, or None when no bucket fits."""
        out = self.run_hidden(ids, positions, tables)
        return None if out is None else out[0]

    def run_hidden(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                   hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [n, V], final-normed hidden [n, D]) (fresh tensors) for n rows, or None when no
        bucket fits; ``hidden`` [n, D] is the MTP step's input (``mtp=True`` only)."""
        n = ids.shape[0]
        b = self.load(ids, positions, tables, hidden)
        if b is None:
            return None
        if b not in self.graphs:
            self.capture(b)
        self.graphs[b].replay()
        logits, out_hidden = self.outputs[b]
        return logits[:n].clone(), out_hidden[:n].clone()
