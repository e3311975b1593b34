"""DeepSeek-V3 routing on the GPU: the noaux_tc expert choice and the sort of rows by expert.

* :func:`route_noaux_tc` - one program per token does sigmoid, the bias, the top-2 group scores,
  the top ``topk_group`` groups, the top-k experts of those groups and the normalized, scaled
  weights.  PyTorch spends ~20 launches on this (sort, top-k, masks, gathers); here it is one,
  with the same tie rule as :func:`model_host.moe.stable_topk` (equal values: lower index first).
* :func:`sort_by_expert` - the (token, slot) rows grouped by expert, as the grouped GEMM wants
  them: per-expert end offsets, the tile schedule, the source token of every sorted row and its
  routing weight.  One program for a decode batch (<= 256 rows) ranks every row against all
  others (a stable counting sort), so the argsort / bincount / cumsum chain (a dozen launches,
  again) becomes one; larger batches use PyTorch, where those launches are amortized.
* :func:`combine` - the way back for prefill: expert outputs un-sorted, weighted, summed over
  the k choices and added to the shared expert's output in one pass.

Both are free of host synchronisation and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from ..ops import sort_by_expert as sort_by_expert_order
from . import HAS_TRITON, use_triton
from .moe_grouped import tile_schedule

SORT_MAX_ROWS = 256

if HAS_TRITON:
    import triton
    import triton.language as tl


    @triton.jit
    def _noaux_tc_kernel(logit_ptr, bias_ptr, w_ptr, idx_ptr, stride_l, scale,
                         G: tl.constexpr, EG: tl.constexpr, TG: tl.constexpr, K: tl.constexpr,
                         KP: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, G)
        j = tl.arange(0, EG)
        e = g[:, None] * EG + j[None, :]  # [G, EG] expert ids
        s = tl.sigmoid(tl.load(logit_ptr + t * stride_l + e).to(tl.float32))
        c = s + tl.load(bias_ptr + e).to(tl.float32)
        if G > 1:
            top1 = tl.max(c, axis=1)
            first = tl.min(tl.where(c == top1[:, None], j[None, :], EG), axis=1)
            top2 = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), c), axis=1)
            gs = top1 + top2
            keep = g < 0
            for _ in tl.static_range(TG):
                best = tl.max(gs, axis=0)
                pick = tl.min(tl.where(gs == best, g, G), axis=0)
                keep = keep | (g == pick)
                gs = tl.where(g == pick, float("-inf"), gs)
            c = tl.where(keep[:, None], c, float("-inf"))
        ks = tl.arange(0, KP)
        out_i = tl.zeros((KP,), tl.int32)
        out_w = tl.zeros((KP,), tl.float32)
        for i in tl.static_range(K):
            best = tl.max(tl.max(c, axis=1), axis=0)
            pick = tl.min(tl.min(tl.where(c == best, e, G * EG), axis=1), axis=0)
            val = tl.sum(tl.sum(tl.where(e == pick, s, 0.0), axis=1), axis=0)
            out_i = tl.where(ks == i, pick, out_i)
            out_w = tl.where(ks == i, val, out_w)
            c = tl.where(e == pick, float("-inf"), c)
        if NORM:
            out_w = out_w / (tl.sum(out_w, axis=0) + 1e-20)
        tl.store(idx_ptr + t * K + ks, out_i, mask=ks < K)
        tl.store(w_ptr + t * K + ks, out_w * scale, mask=ks < K)

    @triton.jit
    def _sort_by_expert_kernel(idx_ptr, w_ptr, offsets_ptr, tile_end_ptr, token_ptr, w_sorted_ptr,
                               R, E, K: tl.constexpr, BLOCK_M: tl.constexpr, RP: tl.constexpr,
                               EP: tl.constexpr):
        r = tl.arange(0, RP)
        valid = r < R
        ex = tl.load(idx_ptr + r, mask=valid, other=E).to(tl.int32)  # padding rows sort last
        # Stable counting sort: a row's rank = rows of lower experts + earlier rows of its own.
        before = (ex[None, :] < ex[:, None]) | ((ex[None, :] == ex[:, None]) & (r[None, :] < r[:, None]))
        rank = tl.sum(before.to(tl.int32), axis=1)
        experts = tl.arange(0, EP)
        counts = tl.sum((ex[None, :] == experts[:, None]).to(tl.int32), axis=1)
        offsets = tl.cumsum(counts, axis=0)
        tiles = tl.cumsum((counts + BLOCK_M - 1) // BLOCK_M, axis=0)
        tl.store(offsets_ptr + experts, offsets, mask=experts < E)
        tl.store(tile_end_ptr + experts, tiles, mask=experts < E)
        tl.store(token_ptr + rank, (r // K).to(tl.int32), mask=valid)
        tl.store(w_sorted_ptr + rank, tl.load(w_ptr + r, mask=valid, other=0.0), mask=valid)


    @triton.jit
    def _combine_kernel(y_ptr, inv_ptr, w_ptr, sh_ptr, out_ptr, D, stride_y, stride_sh, stride_o,
                        K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for j in tl.static_range(K):
            row = tl.load(inv_ptr + t * K + j).to(tl.int64)
            acc += tl.load(w_ptr + t * K + j) * tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SHARED:
            acc += tl.load(sh_ptr + t * stride_sh + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def route_noaux_tc(logits: torch.Tensor, bias: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights [T, k] fp32, indices [T, k] int32) from fp32 router logits [T, E], as
    :func:`model_host.moe.route` with sigmoid scoring and ``noaux_tc`` under ``cfg`` (a
    ModelConfig); None where the kernel does not apply (CPU tensors, other routing methods,
    non-power-of-two group shapes)."""
    t, e = logits.shape
    top_k, n_group, topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    if cfg.topk_method != "noaux_tc" or cfg.scoring_func != "sigmoid":
        return None
    if not (use_triton(logits) and _pow2(n_group) and e % n_group == 0 and _pow2(e // n_group)
            and e // n_group >= 2 and top_k <= topk_group * (e // n_group)):
        return None
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t:
        _noaux_tc_kernel[(t,)](
            logits, bias, weights, idx, logits.stride(0), float(cfg.routed_scaling_factor),
            G=n_group, EG=e // n_group, TG=topk_group, K=top_k, KP=triton.next_power_of_2(top_k),
            NORM=cfg.norm_topk_prob and top_k > 1, num_warps=4 if e <= 512 else 8)
    return weights, idx


def sort_by_expert_reference(idx: torch.Tensor, weights: torch.Tensor, num_experts: int, block_m: int):
    """(offsets [E], tile_end [E], token [R], weight [R]) with rows in stable expert order.

    idx / weights: [T, k].  offsets[e] is the end row of expert e; tile_end the running count of
    ``block_m``-row tiles; token[i] the source token of sorted row i; weight its routing weight.
    """
    order, counts = sort_by_expert_order(idx, num_experts)
    offsets, tile_end = tile_schedule(counts, block_m)
    token = (order // idx.shape[1]).to(torch.int32)
    return offsets, tile_end, token, weights.reshape(-1)[order].float().contiguous()


def sort_by_expert(idx: torch.Tensor, weights: torch.Tensor, num_experts: int, block_m: int):
    """:func:`sort_by_expert_reference` in one launch for up to ``SORT_MAX_ROWS`` rows."""
    t, k = idx.shape
    rows = t * k
    if not use_triton(idx) or rows > SORT_MAX_ROWS or num_experts > 1024 or rows == 0:
        return sort_by_expert_reference(idx, weights, num_experts, block_m)
    dev = idx.device
    offsets = torch.empty(num_experts, dtype=torch.int32, device=dev)
    tile_end = torch.empty(num_experts, dtype=torch.int32, device=dev)
    token = torch.empty(rows, dtype=torch.int32, device=dev)
    w_sorted = torch.empty(rows, dtype=torch.float32, device=dev)
    rp = max(16, triton.next_power_of_2(rows))
    _sort_by_expert_kernel[(1,)](
        idx.contiguous(), weights.float().contiguous(), offsets, tile_end, token, w_sorted, rows, num_experts,
        K=k, BLOCK_M=block_m, RP=rp, EP=max(16, triton.next_power_of_2(num_experts)),
        num_warps=8 if rp * rp >= 65536 else 4)
    return offsets, tile_end, token, w_sorted


def combine_reference(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor,
                      shared: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y[inv[t*k + j]] (+ shared[t])`` in fp32, in y's dtype.

    y [R, D]: expert outputs in sorted-row order; inv [T*k]: the sorted row of pair (t, j).
    """
    t, k = weights.shape
    out = (weights.float().unsqueeze(-1) * y[inv.long()].float().view(t, k, -1)).sum(1)
    if shared is not None:
        out = out + shared.float()
    return out.to(y.dtype)


def combine(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor,
            shared: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill's un-sort of the routed experts' outputs, weighted sum over k, plus the shared
    expert, in one pass (a gather, a batched matmul and two adds in PyTorch)."""
    if not use_triton(y):
        return combine_reference(y, inv, weights, shared)
    t, k = weights.shape
    d = y.shape[1]
    out = torch.empty(t, d, dtype=y.dtype, device=y.device)
    if t:
        sh = shared if shared is not None else out
        _combine_kernel[(t, triton.cdiv(d, 1024))](
            y, inv, weights.float().contiguous(), sh, out, d, y.stride(0), sh.stride(0), out.stride(0),
            K=k, HAS_SHARED=shared is not None, BLOCK_D=1024, num_warps=4)
    return out
