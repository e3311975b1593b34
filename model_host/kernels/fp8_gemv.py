"""FP8-weight GEMV for decode at batch 1: ``y = x @ W^T`` with one bf16 activation row.

The tensor-core tiles of :func:`~.fp8_linear.w8a8_linear` spend a 16-row MMA on one real row
and stage every weight tile through shared memory; at batch 1 the product is pure weight
streaming, so here each program loads its ``[BLOCK_N, KB*128]`` FP8 weight tile straight into
registers (16-byte loads, no shared memory), widens it to fp32, multiplies by the activation
row and reduces each 128-wide K block before applying its 128x128 block scale, as the W8A16
reference does (fp32 sums per block, scaled, accumulated in fp32).  Split-K spreads a launch
over ``waves`` x SMs programs, and the last program of each N tile sums the partials
(:func:`~.fp8_linear.splitk_store`), so it is still one launch and bitwise reproducible.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON
from .fp8_linear import BLOCK, _tile_counters

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .fp8_linear import splitk_store

    @triton.jit
    def _gemv_kernel(a_ptr, b_ptr, bs_ptr, c_ptr, N, K, stride_bn, stride_bsn, stride_cs, k_split,
                     out_ptr, cnt_ptr, LAST_REDUCES: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr):
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, KB * 128)
        b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
        bs_rows = bs_ptr + (offs_n // 128)[:, None] * stride_bsn
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_lo = pid_s * k_split
        for i in range(0, k_split // (KB * 128)):
            k0 = k_lo + i * (KB * 128)
            kk = k0 + offs_k
            mask_k = kk < K
            a = tl.load(a_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
            b = tl.load(b_rows + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            part = tl.sum(tl.reshape(b * a[None, :], (BLOCK_N, KB, 128)), axis=2)  # per 128-wide block
            kb = k0 // 128 + tl.arange(0, KB)
            scale = tl.load(bs_rows + kb[None, :], mask=mask_n[:, None] & (kb * 128 < K)[None, :], other=0.0)
            acc += tl.sum(part * scale, axis=1)
        tile = offs_n[None, :]
        splitk_store(acc[None, :], c_ptr, out_ptr, cnt_ptr + pid_n, tile, mask_n[None, :], pid_s, stride_cs,
                     tl.num_programs(1), LAST_REDUCES)


def gemv_config(m: int, n: int, k: int, sms: int, t: dict) -> dict:
    """Launch shape for one row: N tiles x K splits of whole ``KB``-block steps, ~``waves`` x SMs
    programs (a_mode 2: the W8A16 function, bf16 activations); ``t``: ``Tuning.gemv``."""
    kb, bn = t["KB"], t["BLOCK_N"]
    tiles = -(-n // bn)
    steps = -(-k // (kb * BLOCK))  # K iterations of one unsplit program
    split = max(1, min(-(-t["waves"] * sms // tiles), steps))
    k_split = -(-steps // split) * kb * BLOCK
    return dict(gemv=True, a_mode=2, BLOCK_N=bn, KB=kb, split=-(-k // k_split), k_split=k_split,
                num_warps=t["num_warps"])


def gemv_w8a16(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out: torch.Tensor, cfg: dict) -> torch.Tensor:
    """``out[0] = x[0] @ dequant(w)^T`` (x [1, K] contiguous bf16, w [N, K] FP8) with ``cfg`` from
    :func:`gemv_config`; returns ``out``."""
    m, k = x.shape
    n = w.shape[0]
    assert m == 1, "the GEMV path takes one row"
    split = cfg["split"]
    c = out if split == 1 else torch.empty(split, 1, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    counters = _tile_counters(x.device, grid[0]) if split > 1 else None
    if split > 1 and counters is None:
        raise ValueError(f"GEMV with {grid[0]} N tiles exceeds the split-K counters: raise BLOCK_N")
    _gemv_kernel[grid](
        x, w, w_s, c, n, k, w.stride(0), w_s.stride(0), n, cfg["k_split"], out,
        counters if counters is not None else out, LAST_REDUCES=split > 1, BLOCK_N=cfg["BLOCK_N"],
        KB=cfg["KB"], num_warps=cfg["num_warps"])
    return out
