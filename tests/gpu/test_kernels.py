"""Kernel unit tests: each GPU kernel against a float64 reference on random inputs, odd sizes
included; plus CPU checks that each kernel's pure-PyTorch path computes the defined function."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model_host.engine.paged_cache import PagedLatentCache
from model_host.fp8 import block_dequantize, block_quantize
from model_host.kernels.backend import TritonOps
from model_host.kernels.fp8_linear import (
    act_dequant,
    act_quant,
    act_quant_reference,
    act_quant_split_reference,
    gemm_config,
    num_sms,
    scaled_mm_linear,
    w8a8_linear,
    w8a8_reference,
)
from model_host.kernels.mla_decode import mla_decode, mla_decode_reference
from model_host.kernels.moe_grouped import grouped_w8a8, tile_schedule
from model_host.kernels.tuning import load_tuning
from model_host.mla import build_attention_batch
from model_host.ops import TorchOps

from .conftest import rel, requires_gpu

NO_GEMV = dataclasses.replace(load_tuning("NVIDIA H200"), gemv={"max_m": 0})

gpu = pytest.mark.gpu


def w8a8_f64(x, w, w_s, split=False):
    """float64 oracle: the quantized activation (one FP8 term, or two with ``split``) times the
    dequantized weight."""
    k = x.shape[1]

    def deq(q, s):
        return (F.pad(q.double(), (0, -k % 128)).view(x.shape[0], -1, 128) * s.double().unsqueeze(-1)).view(x.shape[0], -1)[:, :k]

    if split:
        q, s, q2, s2 = act_quant_split_reference(x.cpu())
        xd = deq(q, s) + deq(q2, s2)
    else:
        xd = deq(*act_quant_reference(x.cpu()))
    return xd @ block_dequantize(w.cpu(), w_s.cpu(), dtype=torch.float64).T


def w8a16_f64(x, w, w_s):
    """float64 oracle of the W8A16 mode: the unquantized activation times the dequantized weight."""
    return x.double().cpu() @ block_dequantize(w.cpu(), w_s.cpu(), dtype=torch.float64).T


def rand_fp8(*shape, device="cpu"):
    return block_quantize(torch.randn(*shape, device=device) / math.sqrt(shape[-1]))


# ---------------------------------------------------------------------------- CPU references
def test_act_quant_reference_is_blockwise_amax_scaling():
    x = torch.randn(5, 300)
    q, s = act_quant_reference(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    assert torch.allclose(s[:, 0], x[:, :128].abs().amax(1) / 448)
    deq = q.float() * s.repeat_interleave(128, 1)[:, :300]
    assert rel(deq, x) < 0.04  # e4m3: 3 mantissa bits


def test_two_term_fp8_activations_have_bf16_precision():
    """The residual term takes FP8 activations from e4m3's ~1/16 to bf16's ~1/256 rounding."""
    x = torch.randn(9, 1000) * torch.logspace(-3, 2, 1000)  # values across five decades
    one = rel(act_dequant(*act_quant_reference(x)), x)
    q, s, q2, s2 = act_quant_split_reference(x)
    two = rel(act_dequant(q, s) + act_dequant(q2, s2), x)
    bf16 = rel(x.bfloat16().float(), x)
    assert one > 1e-2 and two < bf16 < 5e-3, (one, two, bf16)
    assert q2.dtype == torch.float8_e4m3fn and s2.shape == s.shape
    w, ws = rand_fp8(64, 1000)
    assert rel(w8a8_reference(x, w, ws, torch.float32, split=True), w8a16_f64(x, w, ws)) < 5e-3


def test_w8a8_reference_matches_float64():
    x = torch.randn(7, 300)
    w, s = rand_fp8(200, 300)
    assert rel(w8a8_reference(x, w, s, torch.float32), w8a8_f64(x, w, s)) < 1e-6


def test_mla_decode_reference_matches_torch_ops():
    """The paged decode reference equals the model's absorbed attention (TorchOps.mla_decode,
    identity W_uk / W_uv: attention in latent space) on the same paged cache."""
    b, h, r, dr, page = 2, 4, 32, 8, 4
    cache = PagedLatentCache(1, 10, page, r, dr, dtype=torch.float32)
    cache.c_kv.normal_()
    cache.k_pe.normal_()
    tables = torch.tensor([[3, 1, 7, 0], [5, 2, 9, 8]])
    lens = torch.tensor([13, 6])
    q = torch.randn(b, h, r + dr)
    out = mla_decode_reference(q, cache.c_kv[0], cache.k_pe[0], tables, lens, page, 0.3)
    cache.bind(tables)
    ones = torch.ones(b, 1, dr // 2)  # rope by angle 0: q_pe as it is
    batch = build_attention_batch((lens - 1).view(b, 1), ones, torch.zeros_like(ones), cache)
    got = TorchOps().mla_decode(q[:, None, :, :r], q[:, None, :, r:], batch, 0, 0.3)
    assert rel(got[:, 0], out) < 1e-5


def test_grouped_reference_on_cpu_matches_per_expert_loop():
    e, t, k, n, kd = 4, 5, 2, 64, 256
    x = torch.randn(t, kd)
    w, s = rand_fp8(e, n, kd)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    order = torch.argsort(idx.reshape(-1), stable=True)
    token = order // k
    counts = torch.bincount(idx.reshape(-1), minlength=e)
    out = grouped_w8a8(x, w, s, counts, num_rows=t * k, mode="store", rows=token, out_dtype=torch.float32,
                       config=dict(BLOCK_M=16, a_mode=0))
    expert = idx.reshape(-1)[order]
    ref = torch.stack([w8a8_f64(x[token[i], None], w[expert[i]], s[expert[i]])[0] for i in range(t * k)])
    assert rel(out, ref) < 1e-6


def test_gemm_config_splits_k_for_small_decode_shapes():
    tuning = load_tuning("NVIDIA H200")
    cfg = gemm_config(8, 576, 7168, 132, tuning)
    assert cfg["a_mode"] == 2 and cfg["split"] > 1 and cfg["k_split"] % 128 == 0
    assert gemm_config(1, 576, 7168, 132, tuning)["gemv"]  # one row: the CUDA-core GEMV
    assert gemm_config(2048, 7168, 2048, 132, tuning)["split"] == 1


@pytest.mark.parametrize("m", [1, 8, 200, 895, 2048])
@pytest.mark.parametrize("k", [64, 320, 7168])
def test_gemm_config_covers_every_k_block(m, k):
    """The kernels run ``k_split // (128 * KB)`` K steps per split: a k_split that is not a whole
    number of blocks dropped the last partial block (K = 64 at prefill sizes gave zeros)."""
    cfg = gemm_config(m, 256, k, 132, load_tuning("NVIDIA H200"))
    step = 128 * cfg.get("KB", 1)
    assert cfg["k_split"] % step == 0 and cfg["split"] * cfg["k_split"] >= k


# ---------------------------------------------------------------------------------- GPU kernels
@gpu
@requires_gpu
@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (3, 200, 300), (17, 1536, 7168), (64, 7168, 2048),
                                   (130, 384, 1024), (300, 576, 512), (1000, 2000, 1536),
                                   (895, 256, 64), (600, 256, 320)])
def test_w8a8_linear_vs_float64(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w, s = rand_fp8(n, k, device="cuda")
    cfg = gemm_config(m, n, k, num_sms(), NO_GEMV)  # tensor-core tiles at M=1 too
    out = w8a8_linear(x, w, s, dict(cfg, a_mode=0), out_dtype=torch.float32)
    assert out.isfinite().all()
    # Same quantized operands; what remains is the FP8 tensor core's reduced-precision
    # accumulation inside each 128-wide K chunk (measured ~1.3e-4 on H100) before the fp32
    # promotion: the reason K chunks are promoted at all.
    assert rel(out, w8a8_f64(x, w, s)) < 5e-4
    # W8A16 (decode mode): bf16 activations times exactly widened FP8 weights.
    if m <= 256:  # larger M is always W8A8
        out16 = w8a8_linear(x, w, s, dict(cfg, a_mode=2), out_dtype=torch.float32)
        assert rel(out16, w8a16_f64(x, w, s)) < 1e-5


@gpu
@requires_gpu
def test_act_quant_matches_reference_bitwise():
    x = torch.randn(33, 7168 + 64, device="cuda", dtype=torch.bfloat16)
    q, s = act_quant(x)
    qr, sr = act_quant_reference(x.cpu())  # CPU: IEEE division (CUDA torch multiplies by 1/448)
    assert torch.equal(s.contiguous().cpu(), sr) and torch.equal(q.cpu().float(), qr.float())
    q1, s1, q2, s2 = act_quant(x, split=True)
    assert torch.equal(s1.contiguous().cpu(), sr) and torch.equal(q1.cpu().float(), qr.float())
    # The residual may differ from the CPU's in its last bit (the GPU fuses multiply and
    # subtract), which can move a second-term value by one FP8 step: compare the values.
    two = act_dequant(q1.cpu(), s1.cpu()) + act_dequant(q2.cpu(), s2.contiguous().cpu())
    qr1, sr1, qr2, sr2 = act_quant_split_reference(x.cpu())
    ref = act_dequant(qr1, sr1) + act_dequant(qr2, sr2)
    assert rel(two, ref) < 1e-4 and rel(two, x.float().cpu()) < 5e-3


@gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 32, 2048])
def test_scaled_mm_blockwise_vs_float64(m):
    x = torch.randn(m, 7168, device="cuda", dtype=torch.bfloat16)
    w, s = rand_fp8(1536, 7168, device="cuda")
    try:
        out = scaled_mm_linear(x, w, s, torch.float32)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        pytest.skip(f"blockwise _scaled_mm unsupported here: {e}")
    assert rel(out, w8a8_f64(x, w, s)) < 1e-3


@pytest.mark.parametrize("n,k", [(256, 64), (256, 128), (256, 256), (2112, 7168), (1536, 320)])
def test_scaled_mm_refuses_shapes_cublaslt_gets_wrong(n, k):
    """cuBLASLt returned garbage for these shapes (tiny models' kv_b / o / MLP, V3's fused
    q_a + kv_a): they are refused before it is called, so TritonOps keeps its own kernel."""
    w, s = rand_fp8(n, k)
    with pytest.raises(ValueError, match="multiples of 512"):
        scaled_mm_linear(torch.randn(64, k, dtype=torch.bfloat16), w, s)


@gpu
@requires_gpu
def test_dense_mlp_quantizes_activations_only_for_gemms_that_read_them():
    """Regression: past the dense switch, swiglu quantized its input for gate and up even where
    both take the Triton W8A16 configs (bf16 activations: widths cuBLASLt refuses, such as a TP8
    shard's 2,304 or a small model's 256), a wasted launch per MLP per step."""
    ops = TritonOps()
    x = torch.randn(96, 7168, device="cuda", dtype=torch.bfloat16)
    v3_gate, _ = rand_fp8(18432, 7168, device="cuda")  # V3's dense gate: cuBLASLt, one FP8 term
    tp8_gate, _ = rand_fp8(2304, 7168, device="cuda")  # one TP8 rank's shard: Triton W8A16
    assert ops._reads_act_quant(x, v3_gate) and not ops._reads_act_quant(x, tp8_gate)
    assert ops._reads_act_quant(x[:8].repeat(64, 1), tp8_gate)  # 512 rows: Triton's W8A8 config


@gpu
@requires_gpu
@pytest.mark.parametrize("m,n,k", [(895, 256, 64), (600, 256, 320), (220, 256, 128), (64, 256, 256),
                                   (220, 2112, 256), (300, 2112, 7168), (300, 1536, 7168)])
def test_fp8_mm_at_prefill_sizes_vs_float64(m, n, k):
    """The backend's dense FP8 GEMM where prefill calls it (cuBLASLt where the shape allows,
    else Triton): W8A8 from 32 rows through cuBLASLt or 257 through Triton, W8A16 between."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w, s = rand_fp8(n, k, device="cuda")
    out = TritonOps().fp8_mm(x, w, s).float()
    assert min(rel(out, w8a8_f64(x, w, s)), rel(out, w8a16_f64(x, w, s))) < 1e-2


@gpu
@requires_gpu
@pytest.mark.parametrize("launch", [dict(order="n"), dict(order="tile"), dict(order="expert", fuse=True),
                                    dict(order="expert", tma=True)], ids=["n", "tile", "expert-fuse", "expert-tma"])
@pytest.mark.parametrize("t,e,k,quant", [(1, 256, 8, True), (5, 16, 4, True), (40, 16, 4, False), (300, 64, 8, False)])
def test_grouped_moe_kernels_vs_float64(t, e, k, quant, launch):
    kd, n = 7168 if t == 1 else 384, 256
    x = torch.randn(t, kd, device="cuda", dtype=torch.bfloat16)
    wg, sg = rand_fp8(e, n, kd, device="cuda")
    wu, su = rand_fp8(e, n, kd, device="cuda")
    wd, sd = rand_fp8(e, 192, n, device="cuda")
    idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = (order // k).int()
    counts = torch.bincount(flat, minlength=e).int()
    wt = torch.rand(t * k, device="cuda")
    # quant: the decode mode (two-term FP8 activations: bf16 precision on FP8 MMAs), else prefill's one term.
    cfg = dict(BLOCK_M=16 if quant else 64, BLOCK_N=64, a_mode=3 if quant else 0, num_warps=4, num_stages=3, **launch)
    h = grouped_w8a8(x, wg, sg, counts, num_rows=t * k, mode="gated", rows=token, w2=wu, w2_s=su,
                     config=cfg, out_dtype=torch.float32)
    out = grouped_w8a8(h.bfloat16(), wd, sd, counts, num_rows=t * k, mode="scatter", config=cfg,
                       out=torch.zeros(t, 192, device="cuda"), scatter=token, weight=wt)
    ex = flat[order]
    split = cfg["a_mode"] == 3
    h_ref = torch.stack([F.silu(w8a8_f64(x[token[i], None], wg[ex[i]], sg[ex[i]], split)[0])
                         * w8a8_f64(x[token[i], None], wu[ex[i]], su[ex[i]], split)[0] for i in range(t * k)])
    assert rel(h, h_ref) < 5e-4  # FP8 MMA chunk accumulation, see test_w8a8_linear_vs_float64
    y = torch.stack([w8a8_f64(h.bfloat16()[i, None], wd[ex[i]], sd[ex[i]], split)[0] for i in range(t * k)])
    ref = torch.zeros(t, 192, dtype=torch.float64).index_add_(0, token.long().cpu(), y * wt.double().cpu()[:, None])
    # Two-term activations (decode) feed each FP8 MMA twice: the tensor cores keep ~14 bits of
    # the running sum (DeepSeek-V3 report, sec. 3.3.2), so the error bound doubles (measured
    # 5.7e-4 on an H100 at t=1, e=256; one-term 64-row prefill tiles stay under 5e-4).
    assert rel(out, ref) < (1e-3 if split else 5e-4)
    if quant:  # two terms: bf16-level error against the unquantized activations
        xd = x.double().cpu()
        deq = lambda w_, s_: block_dequantize(w_.cpu(), s_.cpu(), dtype=torch.float64)  # noqa: E731
        ref16 = torch.stack([F.silu(xd[token[i]] @ deq(wg[ex[i]], sg[ex[i]]).T)
                             * (xd[token[i]] @ deq(wu[ex[i]], su[ex[i]]).T) for i in range(t * k)])
        assert rel(h, ref16) < 5e-3
    offsets, tile_end = tile_schedule(counts, cfg["BLOCK_M"])
    assert int(offsets[-1]) == t * k


@gpu
@requires_gpu
@pytest.mark.parametrize("b,h,page,splits,block_h,warps,block_n", [
    (1, 128, 64, None, 16, 4, 32), (3, 20, 16, 4, 16, 4, 32), (8, 128, 64, 1, 16, 4, 32), (2, 16, 1, 2, 16, 4, 32),
    (8, 128, 64, 1, 32, 8, 32), (3, 20, 16, 2, 64, 8, 32),  # wider head blocks: bench/mla_rows_bench.py
    (8, 128, 64, None, 64, 8, 64), (3, 20, 16, 2, 64, 8, 64)])  # the tables' wide setting (64-key blocks)
def test_mla_decode_kernel_vs_float64(b, h, page, splits, block_h, warps, block_n):
    r, dr = 512, 64
    lens = torch.randint(1, 300, (b,), device="cuda")
    nb = -(-300 // page)
    perm = torch.randperm(b * nb + 5, device="cuda")[: b * nb].view(b, nb)
    c_kv = torch.randn((b * nb + 5) * page, r, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn((b * nb + 5) * page, dr, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b, h, r + dr, device="cuda", dtype=torch.bfloat16)
    out = mla_decode(q, c_kv, k_pe, perm, lens, page, 0.04, num_splits=splits, block_h=block_h, num_warps=warps,
                     block_n=block_n)
    ref = mla_decode_reference(q.double(), c_kv.double(), k_pe.double(), perm, lens, page, 0.04)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2  # bf16 P and output
