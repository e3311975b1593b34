"""noaux_tc routing against a direct re-implementation, and grouped expert execution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_host.fp8 import StackedLinear, block_quantize
from model_host.moe import Experts, route
from model_host.ops import Routing, TorchOps

ROUTE = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def reference_route(
    logits, bias, top_k, n_group, topk_group, routed_scaling_factor, mask_value=float("-inf")
):
    """The rule written out per token with plain Python lists (fp32 arithmetic via numpy).

    Ties are broken toward the lower index.  ``mask_value`` is what dropped groups' experts get:
    -inf is the rule; 0.0 reproduces the older transformers convention.
    """
    out_idx, out_w = [], []
    s_all = torch.sigmoid(logits.float()).numpy()
    for row in range(logits.shape[0]):
        s = [np.float32(v) for v in s_all[row]]
        b = [np.float32(s[e] + np.float32(bias[e])) for e in range(len(s))]
        per = len(s) // n_group
        group_score = []
        for g in range(n_group):
            top2 = sorted(b[g * per : (g + 1) * per], reverse=True)[:2]
            group_score.append(np.float32(top2[0] + top2[1]))
        kept = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        masked = [b[e] if e // per in kept else np.float32(mask_value) for e in range(len(s))]
        chosen = sorted(range(len(s)), key=lambda e: (-masked[e], e))[:top_k]
        w = [s[e] for e in chosen]
        total = sum(w, np.float32(0))
        out_idx.append(chosen)
        out_w.append([float(x / total * routed_scaling_factor) for x in w])
    return out_idx, out_w


@pytest.mark.parametrize("ties", [False, True])
def test_routing_matches_direct_reimplementation(ties):
    g = torch.Generator().manual_seed(5 + ties)
    n, e = 256, 16
    if ties:  # coarse values: many exactly equal scores, biases and group sums
        logits = torch.randint(-2, 3, (n, e), generator=g).float() * 0.5
        bias = torch.randint(0, 3, (e,), generator=g).float() * 0.125
    else:
        logits = torch.randn(n, e, generator=g)
        bias = torch.rand(e, generator=g) * 0.25
    weights, idx = route(logits, bias, **ROUTE)
    ref_idx, ref_w = reference_route(logits, bias.tolist(), **ROUTE)
    assert idx.tolist() == ref_idx
    assert torch.allclose(weights, torch.tensor(ref_w), rtol=1e-6)
    # selected experts only come from the kept groups; weights sum to the scaling factor
    assert torch.allclose(weights.sum(-1), torch.full((n,), 2.5), rtol=1e-5)


def test_dropped_groups_are_minus_inf_not_zero():
    """When kept experts' biased scores are negative, a 0.0 mask would pick dropped experts."""
    e, per = 16, 4
    logits = torch.zeros(1, e)
    bias = torch.full((e,), -1.0)  # every biased score is 0.5 - 1 < 0 ...
    bias[0:4] = torch.tensor([-0.6, -0.6, -2.0, -2.0])  # ... group 0 best (top-2 sum -0.2)
    bias[4:8] = torch.tensor([-0.7, -0.7, -3.0, -3.0])  # group 1 second (-0.4)
    _, idx = route(logits, bias, **ROUTE)
    ref_idx, _ = reference_route(logits, bias.tolist(), **ROUTE)
    zero_rule_idx, _ = reference_route(logits, bias.tolist(), **ROUTE, mask_value=0.0)
    assert idx.tolist() == ref_idx == [[0, 1, 4, 5]]
    assert zero_rule_idx != ref_idx  # the case really discriminates the two rules
    assert all(i // per in (0, 1) for i in idx[0].tolist())


def test_softmax_and_v2_methods():
    logits = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    w, idx = route(logits, None, top_k=3, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                   norm_topk_prob=False, routed_scaling_factor=1.0)  # fmt: skip
    probs = logits.softmax(-1)
    assert torch.equal(idx, probs.sort(dim=-1, descending=True, stable=True).indices[:, :3])
    assert torch.allclose(w, probs.gather(1, idx))
    w, idx = route(logits, None, top_k=2, n_group=4, topk_group=1, topk_method="group_limited_greedy",
                   scoring_func="softmax", norm_topk_prob=False)  # fmt: skip
    best_group = probs.view(32, 4, 4).amax(-1).argmax(-1)
    assert torch.equal(idx // 4, best_group.unsqueeze(1).expand(-1, 2))


def _reference_experts(x, weights, idx, wg, wu, wd):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            out[t] += weights[t, j] * (F.silu(x[t] @ wg[e].T) * (x[t] @ wu[e].T)) @ wd[e].T
    return out


def test_grouped_experts_equal_per_expert_loop():
    g = torch.Generator().manual_seed(0)
    e, d, inter, n, k = 8, 32, 24, 20, 3
    ex = Experts(e, d, inter, dtype=torch.float32)
    ws = [
        torch.randn(e, inter, d, generator=g),
        torch.randn(e, inter, d, generator=g),
        torch.randn(e, d, inter, generator=g),
    ]
    for lin, w in zip((ex.gate_proj, ex.up_proj, ex.down_proj), ws, strict=True):
        lin.weight.data = w / 5
    x = torch.randn(n, d, generator=g)
    idx = torch.stack([torch.randperm(e - 2, generator=g)[:k] for _ in range(n)])  # experts 6, 7 unused
    weights = torch.rand(n, k, generator=g)
    ref = _reference_experts(x, weights, idx, *(w / 5 for w in ws))
    out = TorchOps().moe(x, ex, Routing(weights, idx), None)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_grouped_mm_fallback_without_torch_kernel(monkeypatch):
    from model_host import fp8

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(10, 16, generator=g), torch.randn(4, 8, 16, generator=g)
    offsets = torch.tensor([2, 5, 5, 10], dtype=torch.int32)
    fast = fp8.grouped_mm(x, w, offsets)
    monkeypatch.setattr(fp8, "_GROUPED_MM", fp8._no_grouped_mm)
    assert torch.allclose(fp8.grouped_mm(x, w, offsets), fast, atol=1e-5)
    assert torch.allclose(fast[2:5], x[2:5] @ w[1].T, atol=1e-5)


def test_fp8_stacked_only_dequantizes_active_experts_but_matches_dense():
    g = torch.Generator().manual_seed(1)
    e, d, out = 6, 200, 136  # non-multiples of 128
    w = torch.randn(e, out, d, generator=g)
    q, s = block_quantize(w)
    lin = StackedLinear(e, d, out, fp8_block=(128, 128))
    lin.weight.data, lin.weight_scale_inv.data = q, s
    x = torch.randn(9, d, generator=g)
    offsets = torch.tensor([2, 2, 5, 5, 5, 9], dtype=torch.int32)  # experts 1, 3, 4 empty
    sparse = TorchOps().grouped_linear(x, lin, offsets)
    assert torch.equal(sparse, TorchOps(cache_dequantized=True).grouped_linear(x, lin, offsets))


def test_random_checkpoint_routes_across_experts(small_model):
    """The writer's init spreads tokens over experts (bias spread + unit router logits)."""
    moe = small_model.layers[1].mlp
    ops = small_model.ops
    x = ops.rms_norm(small_model.embed_tokens(torch.arange(1024)), small_model.layers[1].post_attention_layernorm).out
    idx = ops.route(x, moe.gate).indices
    load = torch.bincount(idx.flatten(), minlength=moe.experts.num_experts).float() / idx.numel()
    assert (load > 0).all(), load
    assert load.max() < 0.25
