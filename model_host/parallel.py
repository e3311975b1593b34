"""Tensor- and expert-parallel versions of the model's blocks, and :func:`parallelize`.

Each parallel block is the single-GPU block built at its local size, plus the one collective
that makes its output whole again, applied to the block's *output*.  The math inside stays the
model's own calls to its :class:`~model_host.ops.Ops`, so the same kernels (reference or
Triton) run a rank's share; no op knows about parallelism:

========================  =========================================  ==================
block                     local part (rank r of W)                   combine
========================  =========================================  ==================
attention (MLA)           H/W heads: q_b / kv_b rows, o_proj columns all-reduce (sum)
dense MLP                 intermediate/W: gate / up rows, down cols  all-reduce
MoE                       E/W whole routed experts + shared expert/W all-reduce (one)
embedding                 vocab rows [r*V/W, (r+1)*V/W)              all-reduce
lm_head                   the same vocab rows                        all-gather
========================  =========================================  ==================

The latent cache is replicated: ``q_a`` / ``kv_a`` and their norms are replicated, so every
rank computes and stores the full 576-wide latent of every token (the same 70,272 B/token for
V3 on each rank as on one GPU) and its heads read all of it.  Splitting it would need the
latents exchanged every layer; replicated is correct and simpler.  The router is replicated
too, so every rank makes the same expert choices; a rank zeroes the weights of (token, expert)
pairs it does not own and its experts run the rest.

Which checkpoint slice fills which parameter is :mod:`model_host.sharding`'s business; this
module only builds the shapes that slice fills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dist import DistContext
from .layers import Embedding
from .mla import MLA, AttentionBatch
from .model import DecoderLayer, DeepseekV3, LMHead
from .moe import MLP, Experts, Gate, MoE
from .ops import Ops, Routing
from .sharding import Layout


class ParallelMLA(MLA):
    """MLA over this rank's heads; the row-parallel ``o_proj`` partial sums are all-reduced."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, layout: Layout, ctx: DistContext, **kw) -> None:
        super().__init__(cfg.replace(num_attention_heads=layout.heads), layer_idx, **kw)
        self.ctx = ctx

    def forward(self, x: torch.Tensor, batch: AttentionBatch, ops: Ops) -> torch.Tensor:
        return self.ctx.all_reduce(super().forward(x, batch, ops))


class ParallelMLP(MLP):
    """SwiGLU over intermediate/W channels (column- then row-parallel), all-reduced."""

    def __init__(self, dim: int, inter: int, layout: Layout, ctx: DistContext, **kw) -> None:
        super().__init__(dim, inter // layout.world, **kw)
        self.ctx = ctx

    def forward(self, x: torch.Tensor, ops: Ops, x_quant: tuple | None = None) -> torch.Tensor:
        return self.ctx.all_reduce(super().forward(x, ops, x_quant))


class ParallelMoE(MoE):
    """This rank's routed experts plus its slice of the shared expert, one all-reduce in all."""

    def __init__(self, cfg: ModelConfig, layout: Layout, ctx: DistContext, *, dtype=None, device=None) -> None:
        nn.Module.__init__(self)
        fp8 = cfg.quantization.block_size if cfg.quantization else None
        kw = dict(fp8_block=fp8, dtype=dtype, device=device)
        self.gate = Gate(cfg, dtype=dtype, device=device)
        self.experts = Experts(layout.experts, cfg.hidden_size, cfg.moe_intermediate_size, **kw)
        self.shared_experts = None
        if cfg.n_shared_experts:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts // layout.world
            self.shared_experts = MLP(cfg.hidden_size, inter, **kw)
        self.expert_start, self.ctx = layout.expert_start, ctx

    def forward(self, x: torch.Tensor, ops: Ops, x_quant: tuple | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = ops.route(flat, self.gate)  # the full router: every rank picks the same experts
        local = routing.indices - self.expert_start
        mine = (local >= 0) & (local < self.experts.num_experts)
        # Foreign pairs go to local expert 0 with weight 0: shapes stay static (no host sync,
        # graph-capturable) at the cost of k rows per token instead of k/W on average, and of
        # reading at most one expert's weights that the step would not have needed.
        local_routing = Routing(routing.weights.masked_fill(~mine, 0.0), local.masked_fill(~mine, 0))
        out = ops.moe(flat, self.experts, local_routing, self.shared_experts, x_quant)
        return self.ctx.all_reduce(out).view(x.shape)


class VocabParallelEmbedding(Embedding):
    """Rows ``[start, start + V/W)`` of the table; other ids give zeros, summed over ranks."""

    def __init__(self, layout: Layout, dim: int, ctx: DistContext, **kw) -> None:
        super().__init__(layout.vocab, dim, **kw)
        self.start, self.ctx = layout.vocab_start, ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        foreign = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(foreign, 0), self.weight)
        return self.ctx.all_reduce(out.masked_fill_(foreign.unsqueeze(-1), 0.0))


class VocabParallelHead(LMHead):
    """``lm_head`` over this rank's vocabulary rows; the logits are gathered to full width."""

    def __init__(self, dim: int, layout: Layout, ctx: DistContext, **kw) -> None:
        super().__init__(dim, layout.vocab, **kw)
        self.ctx = ctx

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return self.ctx.all_gather_last(super().forward(x, ops))


def _parallel_layer(layer: DecoderLayer, cfg: ModelConfig, layout: Layout, ctx: DistContext, kw: dict) -> None:
    fp8 = cfg.quantization.block_size if cfg.quantization else None
    layer.self_attn = ParallelMLA(cfg, layer.layer_idx, layout, ctx, **kw)
    if cfg.is_moe_layer(layer.layer_idx):
        layer.mlp = ParallelMoE(cfg, layout, ctx, **kw)
    else:
        layer.mlp = ParallelMLP(cfg.hidden_size, cfg.intermediate_size, layout, ctx, fp8_block=fp8, **kw)


def parallelize(model: DeepseekV3, ctx: DistContext) -> DeepseekV3:
    """Swap ``model``'s blocks (built on ``meta``, before loading) for this rank's parallel ones.

    Parameter names stay those of the single-GPU model, so the loader fills them by name with
    the slices :class:`~model_host.sharding.Layout` picks.  A world of one returns ``model``
    untouched: TP1 runs exactly the single-GPU code.
    """
    if ctx.world == 1:
        return model
    cfg = model.cfg
    layout = Layout(cfg, ctx.rank, ctx.world)
    kw = dict(dtype=model.dtype, device="meta")
    d = cfg.hidden_size
    model.embed_tokens = VocabParallelEmbedding(layout, d, ctx, **kw)
    model.lm_head = VocabParallelHead(d, layout, ctx, **kw)
    for layer in model.layers:
        _parallel_layer(layer, cfg, layout, ctx, kw)
    for mtp in model.mtp:
        _parallel_layer(mtp, cfg, layout, ctx, kw)
        mtp.embed_tokens = VocabParallelEmbedding(layout, d, ctx, **kw)
        mtp.shared_head.head = VocabParallelHead(d, layout, ctx, **kw)
    return model
