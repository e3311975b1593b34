"""The engine's configuration: one frozen dataclass, filled by ``model-host serve``'s flags
(model_host/server/cli.py) or directly by tests and benchmarks."""

from __future__ import annotations

import dataclasses

import torch

from model_host.kernels.graphs import PREFILL_MIN_TOKENS

ROW_PREFILL_TOKENS = 64  # EngineConfig.row_prefill_tokens where decode steps are graph-captured
PREFILL_GRAPH_TOKENS = 4096  # EngineConfig.prefill_graph_tokens by default (at most max_prefill_tokens)
RIDING_GRAPH_ROWS = 1024  # EngineConfig.riding_graph_rows by default


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16
    kv_memory_gb: float | None = None  # default: measured on a GPU (engine/memory.py), 1 GiB on the CPU
    block_size: int = 16
    max_prefill_tokens: int = 4096  # prompt tokens per step; running decodes wait for at most this many
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    cache_dtype: torch.dtype | None = None  # default: the model's dtype
    # Most GPU memory the CUDA graphs (decode, riding and prefill, one pool) may take. None: 4 GiB
    # with prefill or riding graphs (1.85 GiB measured at V3's widths with prefill graphs to 4,096
    # tokens, docs/benchmarks.md), else 1.
    graph_memory_gb: float | None = None
    # Steps that prompt chunks ride as rows (see row_prefill_tokens) past the decode batch sizes,
    # up to this many rows, replay CUDA graphs captured at start-up for every 64 rows (0: off;
    # None: RIDING_GRAPH_ROWS, at most max_batch + max_prefill_tokens, the widest step there is).
    # Eagerly, such a step's launches cost the host more time than the GPU needs to run them.
    riding_graph_rows: int | None = None
    # Whole-prompt prefills (nothing cached) of 257 up to this many tokens replay CUDA graphs
    # captured at start-up by length bucket where decode steps are captured (0: off; None:
    # max_prefill_tokens, at most PREFILL_GRAPH_TOKENS: the graphs' memory grows with it).
    prefill_graph_tokens: int | None = None
    speculative_tokens: int = 0  # MTP drafts verified per decode step (0 = off; needs the MTP layer)
    # A step of at most this many rows in all (its decode rows plus one row per prompt token)
    # runs its prompt chunks as rows of the decode step instead of a separate eager prefill
    # forward: a RAG prompt whose prefix is cached owes a few dozen tokens, and the decode step
    # is a replayed CUDA graph. Capped by rows, not prompt tokens: at 128 decode rows, 64 more
    # rows made every step dearer than the prefill forward they saved (docs/benchmarks.md).
    # None: 64 where decode steps are graph-captured, else 0 (eagerly a row costs an LM-head row).
    row_prefill_tokens: int | None = None
    # Overlapped steps: step n+1 is scheduled and queued on the GPU (its decode rows read step
    # n's tokens there) before the host reads step n's tokens, detokenizes and streams them, so
    # that host work hides behind the GPU's. The price: a request that stops on a token (EOS, a
    # stop string) has one more row computed and dropped. None: on where decode steps are
    # graph-captured (on the CPU nothing runs asynchronously) and speculation is off.
    overlap: bool | None = None

    def prefill_graph_limit(self) -> int:
        """The longest prompt chunk a prefill graph is captured for (0: none)."""
        n = self.prefill_graph_tokens
        return min(n if n is not None else PREFILL_GRAPH_TOKENS, self.max_prefill_tokens)

    def riding_graph_limit(self) -> int:
        """The most rows a riding step is captured for (0: none)."""
        n = self.riding_graph_rows
        return min(n if n is not None else RIDING_GRAPH_ROWS, self.max_batch + self.max_prefill_tokens)

    def riding_graphs(self) -> bool:
        """Whether riding steps may be captured: prompt chunks ride decode steps (not with
        speculation, nor with --row-prefill-tokens 0) and riding graphs are on."""
        return self.riding_graph_limit() > 0 and not self.speculative_tokens and self.row_prefill_tokens != 0

    def graph_budget_gb(self) -> float:
        if self.graph_memory_gb is not None:
            return self.graph_memory_gb
        return 4.0 if self.prefill_graph_limit() >= PREFILL_MIN_TOKENS or self.riding_graphs() else 1.0
