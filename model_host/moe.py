"""Feed-forward blocks: dense SwiGLU MLP, the expert router, and the routed-expert MoE.

Routing (DeepSeek-V3 ``noaux_tc``), per token, in fp32:
  1. s = sigmoid(x @ W_gate^T)
  2. b = s + e_score_correction_bias            (bias steers *selection* only)
  3. group score = sum of the top-2 b in each of n_group groups; keep the topk_group best
     groups, set every other expert's b to -inf
  4. idx = top-k of b; weights = s[idx] / sum(s[idx]) (norm_topk_prob) * routed_scaling_factor
  5. out = sum_k w_k * expert_k(x) + shared_expert(x)
Ties are broken toward the lower expert / group index (stable sort), so routing is a
deterministic function of the scores on every device.

Expert execution is an op (:meth:`model_host.ops.Ops.moe`): the N*k (token, expert) pairs are
sorted by expert and run through one grouped GEMM per projection over stacked ``[E, out, in]``
weights; no Python loop over experts and no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .fp8 import Linear, StackedLinear
from .ops import Ops, Routing


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; also used for the shared experts."""

    def __init__(self, dim: int, inter: int, *, fp8_block=None, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(fp8_block=fp8_block, dtype=dtype, device=device)
        self.gate_proj = Linear(dim, inter, **kw)
        self.up_proj = Linear(dim, inter, **kw)
        self.down_proj = Linear(inter, dim, **kw)

    def forward(self, x: torch.Tensor, ops: Ops, x_quant: tuple | None = None) -> torch.Tensor:
        return ops.swiglu(x, self, x_quant)


def stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; equal values -> lower index first."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str = "noaux_tc",
    scoring_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select experts from router ``logits`` [N, E].  Returns (weights [N, k] fp32, indices [N, k])."""
    logits = logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    n, e = choice.shape
    if topk_method != "greedy" and n_group > 1:
        grouped = choice.view(n, n_group, e // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:  # group_limited_greedy (V2): a group is as good as its best expert
            group_scores = grouped.amax(dim=-1)
        keep = stable_topk(group_scores, topk_group)
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        # -inf (not 0): a dropped group's expert must never beat a kept one, even when the
        # kept experts' biased scores are negative.
        # expand + reshape (not repeat_interleave): never a host sync, so routing can be
        # captured in a CUDA graph.
        dropped = dropped.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
        choice = choice.masked_fill(dropped, float("-inf"))
    idx = stable_topk(choice, top_k)
    weights = scores.gather(1, idx)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, idx


class Gate(nn.Module):
    """Router: ``weight`` [E, D] (bf16 in checkpoints) and fp32 ``e_score_correction_bias`` [E]."""

    def __init__(self, cfg: ModelConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.n_routed_experts
        self.weight = nn.Parameter(
            torch.empty(e, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        if cfg.topk_method == "noaux_tc":
            bias = torch.zeros(e, dtype=torch.float32, device=device)
            self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def choose(self, logits: torch.Tensor) -> Routing:
        """The experts of fp32 router ``logits`` [N, E] under this layer's routing config."""
        c = self.cfg
        weights, indices = route(
            logits, self.e_score_correction_bias, top_k=c.num_experts_per_tok, n_group=c.n_group,
            topk_group=c.topk_group, topk_method=c.topk_method, scoring_func=c.scoring_func,
            norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor)
        return Routing(weights, indices)


class Experts(nn.Module):
    """All routed experts as stacked weights ``gate_proj/up_proj/down_proj.weight`` [E, out, in]."""

    def __init__(
        self, num_experts: int, dim: int, inter: int, *, fp8_block=None, dtype=None, device=None
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        kw = dict(fp8_block=fp8_block, dtype=dtype, device=device)
        self.gate_proj = StackedLinear(num_experts, dim, inter, **kw)
        self.up_proj = StackedLinear(num_experts, dim, inter, **kw)
        self.down_proj = StackedLinear(num_experts, inter, dim, **kw)


class MoE(nn.Module):
    """Routed experts + shared experts; names match ``mlp.{gate,experts,shared_experts}``."""

    def __init__(self, cfg: ModelConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        fp8 = cfg.quantization.block_size if cfg.quantization else None
        self.gate = Gate(cfg, dtype=dtype, device=device)
        self.experts = Experts(
            cfg.n_routed_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            fp8_block=fp8,
            dtype=dtype,
            device=device,
        )
        self.shared_experts = None
        if cfg.n_shared_experts:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = MLP(cfg.hidden_size, inter, fp8_block=fp8, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, ops: Ops, x_quant: tuple | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = ops.route(flat, self.gate)
        return ops.moe(flat, self.experts, routing, self.shared_experts, x_quant).view(x.shape)
