"""Fused decode-step kernels (RMSNorm, add + RMSNorm, MLA latent store, rope inside the MLA
decode kernel, noaux_tc routing, sort by expert, single-expert grouped launches): each against
its PyTorch reference (or float64), odd sizes and ties included.  The CPU tests check that the
references are the model's own math, so a kernel that matches them matches the model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model_host.engine.paged_cache import PagedLatentCache
from model_host.fp8 import block_quantize
from model_host.kernels.mla_decode import mla_decode, mla_decode_reference
from model_host.kernels.moe_grouped import grouped_config, grouped_w8a8
from model_host.kernels.norm_rope import (
    concat_heads,
    concat_heads_reference,
    latent_store,
    latent_store_reference,
    rms_norm,
    rms_norm_reference,
    rms_norm_split_quant,
)
from model_host.kernels.routing import (
    combine,
    combine_reference,
    route_noaux_tc,
    sort_by_expert,
    sort_by_expert_reference,
)
from model_host.kernels.tuning import load_tuning
from model_host.moe import route
from model_host.ops import TorchOps
from model_host.rope import apply_rope

from .conftest import rel, requires_gpu, route_config, triton_only

gpu = pytest.mark.gpu


def test_latent_store_reference_is_the_mla_cache_write():
    """The reference equals MLA's own path: split, RMSNorm, rope, cache.write at the slots."""
    from model_host.layers import RMSNorm

    b, s, r, p = 2, 3, 16, 8
    kv_a = torch.randn(b, s, r + p)
    norm = RMSNorm(r, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    ang = pos.float().unsqueeze(-1) * torch.linspace(0.1, 1.0, p // 2)
    cos, sin = ang.cos(), ang.sin()
    want = PagedLatentCache(1, 4, 4, r, p, dtype=torch.float32)
    got = PagedLatentCache(1, 4, 4, r, p, dtype=torch.float32)
    tables = torch.tensor([[2, 0], [3, 1]])
    want.bind(tables)
    got.bind(tables)
    c, pe = kv_a.split([r, p], dim=-1)
    want.write(0, pos, TorchOps().rms_norm(c, norm).out, apply_rope(pe, cos, sin))
    latent_store_reference(kv_a.view(-1, r + p), norm.weight, norm.eps, cos.view(-1, p // 2),
                           sin.view(-1, p // 2), got.slot_mapping(pos), *got.flat(0))
    assert torch.equal(want.c_kv, got.c_kv) and torch.equal(want.k_pe, got.k_pe)


def test_sort_by_expert_reference_groups_rows_stably():
    idx = torch.tensor([[3, 1], [1, 0], [3, 2]])
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    offsets, tile_end, token, ws = sort_by_expert_reference(idx, w, 5, block_m=2)
    assert offsets.tolist() == [1, 3, 4, 6, 6]
    assert tile_end.tolist() == [1, 2, 3, 4, 4]
    assert token.tolist() == [1, 0, 1, 2, 0, 2]  # expert 0: t1; 1: t0, t1; 2: t2; 3: t0, t2
    assert torch.allclose(ws, torch.tensor([0.4, 0.2, 0.3, 0.6, 0.1, 0.5]))


@gpu
@requires_gpu
@pytest.mark.parametrize("rows,d", [(1, 7168), (3, 1536), (2048, 7168), (5, 100)])
def test_rms_norm_kernel_vs_float64(rows, d):
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) * 3
    delta = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    y, h = rms_norm(x, w, 1e-6)
    assert h is None and rel(y, F.rms_norm(x.double(), (d,), w.double(), 1e-6)) < 5e-3
    y, h = rms_norm(x, w, 1e-6, residual=delta)
    want_y, want_h = rms_norm_reference(x, w, 1e-6, residual=delta)
    assert torch.equal(h, want_h)  # the sum is rounded to bf16 exactly as x + delta is
    assert rel(y, F.rms_norm(h.double(), (d,), w.double(), 1e-6)) < 5e-3
    assert (y.float() - want_y.float()).abs().max() <= 0.02 * want_y.float().abs().max()


@gpu
@requires_gpu
@pytest.mark.parametrize("rows,d,res", [(1, 7168, True), (3, 1536, False), (200, 7168, True), (5, 100, True)])
def test_norm_writes_the_two_term_quantization_that_act_quant_makes_of_its_output(rows, d, res):
    from model_host.kernels.fp8_linear import act_dequant, act_quant, act_quant_split_reference

    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) * 3
    delta = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16) if res else None
    w = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    y, h, terms = rms_norm_split_quant(x, w, 1e-6, residual=delta)
    plain_y, plain_h = rms_norm(x, w, 1e-6, residual=delta)
    assert (h is None) == (not res) and (h is None or torch.equal(h, plain_h))
    # Same normalized output up to the reduction order the compiler picks per variant.
    assert (y.float() - plain_y.float()).abs().max() <= 0.01 * plain_y.float().abs().max()
    want = act_quant(y, split=True)  # the separate launch it replaces, on the same y
    ref = act_quant_split_reference(y.cpu())
    names = ("q", "s", "q2", "s2")
    for name, got, kernel, cpu in zip(names, terms, want, ref, strict=True):
        assert got.shape == kernel.shape and got.stride() == kernel.stride(), name  # scales column-major
        differ = (got.float() != kernel.float()).sum().item()
        assert differ == 0, f"{name}: {differ} of {got.numel()} differ from act_quant"
        if name in ("q", "s"):  # the residual term: the GPU's fused multiply-add differs in rare ulps
            assert torch.equal(got.cpu().float(), cpu.float()), name
    two = act_dequant(terms[0], terms[1]) + act_dequant(terms[2], terms[3])
    assert rel(two, y.double()) < 1e-3  # bf16-level precision of the two terms


@gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 8, 300])
def test_concatenated_q_a_kv_a_gemm_equals_the_two_linears(m):
    """MLA's two down projections as one GEMM (backend.linears): the same function as the two
    separate linears, and an in-place weight change rebuilds the concatenated copy."""
    from model_host.fp8 import Linear
    from model_host.kernels.fp8_linear import w8a8_reference, w8a16_reference

    be = triton_only()
    layers = []
    for n in (1536, 576):
        lin = Linear(7168, n, fp8_block=(128, 128), device="cuda")
        w, ws = block_quantize(torch.randn(n, 7168, device="cuda") / math.sqrt(7168))
        lin.weight.data.copy_(w)
        lin.weight_scale_inv.data.copy_(ws)
        layers.append(lin)
    x = torch.randn(1, m, 7168, device="cuda", dtype=torch.bfloat16)
    # Decode sizes keep bf16 activations (W8A16); 300 rows quantize them (W8A8, ~2.5% error).
    oracle = w8a16_reference if m <= 256 else w8a8_reference
    kv_as = []
    for _ in range(2):
        q_a, kv_a = be.linears(x, tuple(layers))
        assert q_a.shape == (1, m, 1536) and kv_a.shape == (1, m, 576)
        for got, lin in zip((q_a, kv_a), layers, strict=True):
            want = be.linear(x, lin)
            exact = oracle(x[0].double(), lin.weight, lin.weight_scale_inv, torch.float64)
            assert rel(got[0], exact) < 1e-2 and rel(got, want) < 1e-3
        kv_as.append(kv_a)
        layers[1].weight_scale_inv.mul_(2)  # in place: the cached concatenation is stale now
    assert rel(kv_as[1], 2 * kv_as[0]) < 1e-3


@gpu
@requires_gpu
@pytest.mark.parametrize("t", [1, 7, 300])
def test_latent_store_kernel_matches_reference(t):
    r, p, nslots = 512, 64, 1024
    kv_a = torch.randn(t, r + p, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(r, device="cuda", dtype=torch.bfloat16) + 0.5
    ang = torch.rand(t, p // 2, device="cuda") * 6
    slots = torch.randperm(nslots, device="cuda")[:t]
    caches = [torch.full((nslots, r), 7.0, device="cuda", dtype=torch.bfloat16),
              torch.full((nslots, p), 7.0, device="cuda", dtype=torch.bfloat16)]
    want = [c.clone() for c in caches]
    latent_store(kv_a, w, 1e-6, ang.cos(), ang.sin(), slots, *caches)
    latent_store_reference(kv_a, w, 1e-6, ang.cos(), ang.sin(), slots, *want)
    untouched = torch.ones(nslots, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    for got, ref in zip(caches, want, strict=True):
        assert (got[untouched] == 7.0).all()
        diff = (got.float() - ref.float()).abs().max().item()
        assert diff <= 0.01 * ref.float().abs().max().item(), diff  # one bf16 rounding apart at most


@gpu
@requires_gpu
@pytest.mark.parametrize("t,e,g,tg,k", [(1, 256, 8, 4, 8), (33, 256, 8, 4, 8), (2048, 256, 8, 4, 8),
                                        (5, 16, 4, 2, 6), (4, 64, 1, 1, 6)])
def test_route_kernel_matches_torch_route(t, e, g, tg, k):
    logits = torch.randn(t, e, device="cuda")
    bias = torch.rand(e, device="cuda") * 0.25
    kw = dict(top_k=k, n_group=g, topk_group=tg, norm_topk_prob=True, routed_scaling_factor=2.5)
    w, idx = route_noaux_tc(logits, bias, route_config(e, **kw))
    ref_w, ref_idx = route(logits, bias, topk_method="noaux_tc", scoring_func="sigmoid", **kw)
    assert torch.equal(idx.long(), ref_idx)
    assert torch.allclose(w, ref_w, rtol=1e-5, atol=1e-6)


@gpu
@requires_gpu
def test_route_kernel_breaks_ties_like_a_stable_sort():
    logits = torch.zeros(3, 256, device="cuda")  # every expert and every group tied
    logits[1, 200:] = 1.0  # ties inside the best groups
    bias = torch.zeros(256, device="cuda")
    kw = dict(top_k=8, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=1.0)
    w, idx = route_noaux_tc(logits, bias, route_config(256, **kw))
    ref_w, ref_idx = route(logits, bias, topk_method="noaux_tc", scoring_func="sigmoid", **kw)
    assert torch.equal(idx.long(), ref_idx) and torch.allclose(w, ref_w)
    assert idx[0].tolist() == list(range(8))


@gpu
@requires_gpu
@pytest.mark.parametrize("t,e,k,bm", [(1, 256, 8, 16), (5, 16, 4, 16), (32, 256, 8, 16), (9, 8, 2, 4)])
def test_sort_by_expert_kernel_equals_reference(t, e, k, bm):
    idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)]).to(torch.int32)
    w = torch.rand(t, k, device="cuda")
    got = sort_by_expert(idx, w, e, bm)
    want = sort_by_expert_reference(idx, w, e, bm)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@gpu
@requires_gpu
@pytest.mark.parametrize("b,h,r,dr", [(1, 128, 512, 64), (5, 128, 512, 64), (3, 16, 32, 8)])
def test_mla_decode_rotates_q_in_kernel(b, h, r, dr):
    page, nb = 64, 4
    slots = (b * nb + 1) * page
    c_kv = torch.randn(slots, r, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn(slots, dr, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(b * nb + 1, device="cuda")[: b * nb].view(b, nb)
    pos = torch.randint(0, nb * page, (b,), device="cuda")
    q = torch.randn(b, h, r + dr, device="cuda", dtype=torch.bfloat16)
    ang = pos.float().unsqueeze(-1) * torch.linspace(1e-3, 1.0, dr // 2, device="cuda")
    rope = (ang.cos(), ang.sin())
    out = mla_decode(q, c_kv, k_pe, tables, pos, page, 0.07, rope=rope, lens_from_positions=True)
    ref = mla_decode_reference(q.double(), c_kv.double(), k_pe.double(), tables, pos, page, 0.07,
                               rope=(rope[0].double(), rope[1].double()), lens_from_positions=True)
    assert rel(out, ref) < 1e-2


@gpu
@requires_gpu
@pytest.mark.parametrize("t", [1, 19])
def test_single_expert_grouped_launch_equals_counted_one(t):
    d, inter = 7168, 2048
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    wg, sg = block_quantize(torch.randn(1, inter, d, device="cuda") / math.sqrt(d))
    wu, su = block_quantize(torch.randn(1, inter, d, device="cuda") / math.sqrt(d))
    one = torch.full((1,), t, dtype=torch.int32, device="cuda")
    kw = dict(num_rows=t, mode="gated", w2=wu, w2_s=su, config=grouped_config(t, inter, 1, load_tuning()))
    assert torch.equal(grouped_w8a8(x, wg, sg, None, **kw), grouped_w8a8(x, wg, sg, one, **kw))


@gpu
@requires_gpu
@pytest.mark.parametrize("b,t,h,dn,dr", [(1, 300, 128, 128, 64), (2, 17, 20, 16, 8)])
def test_concat_heads_kernel_matches_reference(b, t, h, dn, dr):
    q = torch.randn(b, t, h, dn + dr, device="cuda", dtype=torch.bfloat16)
    ang = torch.rand(b, t, dr // 2, device="cuda") * 6
    rope = (ang.cos(), ang.sin())
    got = concat_heads(q[..., :dn], q[..., dn:], rope)
    want = concat_heads_reference(q[..., :dn], q[..., dn:], rope)
    assert got.shape == (b, t, h, dn + dr) and torch.equal(got[..., :dn], want[..., :dn])
    assert (got.float() - want.float()).abs().max() <= 0.01 * want.float().abs().max()
    kv = torch.randn(b, t, h, 2 * dn, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn(b, t, dr, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(concat_heads(kv[..., :dn], k_pe.unsqueeze(2)),
                       concat_heads_reference(kv[..., :dn], k_pe.unsqueeze(2)))


@gpu
@requires_gpu
@pytest.mark.parametrize("t,k,d,shared", [(2048, 8, 7168, True), (5, 3, 1000, False)])
def test_combine_kernel_vs_float64(t, k, d, shared):
    y = torch.randn(t * k, d, device="cuda", dtype=torch.bfloat16)
    inv = torch.randperm(t * k, device="cuda")
    w = torch.rand(t, k, device="cuda")
    sh = torch.randn(t, d, device="cuda", dtype=torch.bfloat16) if shared else None
    got = combine(y, inv, w, sh)
    want = combine_reference(y.double(), inv, w.double(), None if sh is None else sh.double())
    assert got.dtype == torch.bfloat16 and rel(got, want) < 5e-3


@gpu
@requires_gpu
@pytest.mark.parametrize("m,n,k", [(1, 1536, 7168), (1, 576, 7168), (5, 7168, 16384)])
def test_split_k_reduced_by_the_last_program_is_exact_and_leaves_counters_zeroed(m, n, k):
    from model_host.kernels.fp8_linear import _COUNTERS, gemm_config, num_sms, w8a8_linear, w8a16_reference

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w, ws = block_quantize(torch.randn(n, k, device="cuda") / math.sqrt(k))
    cfg = gemm_config(m, n, k, num_sms(), load_tuning())
    assert cfg["split"] > 1  # m = 1: the GEMV's split-K, else the tensor-core tiles'
    first = w8a8_linear(x, w, ws, cfg)
    assert torch.equal(first, w8a8_linear(x, w, ws, cfg))  # fixed summation order
    assert rel(first, w8a16_reference(x.double(), w, ws, torch.float64)) < 1e-2
    assert int(_COUNTERS["cuda:0"].abs().sum()) == 0


@gpu
@requires_gpu
@pytest.mark.parametrize("n,k,bn,kb", [(2112, 7168, 32, 2), (24576, 1536, 64, 1), (7168, 16384, 16, 4), (100, 300, 32, 2)])
def test_batch_one_gemv_vs_float64_and_reproducible(n, k, bn, kb):
    """The CUDA-core GEMV (one activation row, FP8 weights widened in registers), odd sizes
    included: the W8A16 function, split-K reduced in a fixed order, counters left zeroed."""
    from model_host.kernels import fp8_linear as fl

    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w, ws = block_quantize(torch.randn(n, k, device="cuda") / math.sqrt(k))
    tuning = dataclasses.replace(load_tuning(), gemv=dict(max_m=1, BLOCK_N=bn, KB=kb, num_warps=4, waves=4))
    cfg = fl.gemm_config(1, n, k, fl.num_sms(), tuning)
    assert cfg.get("gemv") and (cfg["split"] > 1 or k <= kb * 128)
    first = fl.w8a8_linear(x, w, ws, cfg)
    assert torch.equal(first, fl.w8a8_linear(x, w, ws, cfg))
    assert not fl.gemm_config(2, n, k, fl.num_sms(), tuning).get("gemv")  # one row only
    assert rel(first, fl.w8a16_reference(x.double(), w, ws, torch.float64)) < 1e-2
    assert int(fl._COUNTERS["cuda:0"].abs().sum()) == 0
