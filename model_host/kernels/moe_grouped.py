"""Grouped W8A8 FP8 GEMM over expert-sorted rows: one launch per projection, no expert loop.

Rows (token, expert) pairs are sorted by expert; ``offsets[e]`` is the end row of expert ``e``.
Each expert's rows are cut into BLOCK_M tiles and the tiles of all experts are numbered
consecutively (``tile_end = cumsum(ceil(count / BLOCK_M))``, computed on the device).  The
launch grid is ``(max_tiles, N / BLOCK_N)`` with ``max_tiles`` a static bound that depends only
on the number of rows, so there is no host synchronisation and the launch can be captured in a
CUDA graph; a program finds its expert by binary search over ``tile_end`` and programs past the
real tile count exit at once.  Inactive experts cost nothing (no tiles).

Epilogues (``MODE``):

* 0 ``store``   - ``c[row] = a[row] @ W_e^T`` (generic :class:`StackedLinear` forward);
* 1 ``gated``   - gate and up weights in the same program: ``c[row] = silu(a W_g^T) * (a W_u^T)``
  (one read of the activations, no bf16 round trip between the two GEMMs and the SiLU-mul);
* 2 ``scatter`` - ``out[token[row]] += weight[row] * (a[row] @ W_e^T)`` with fp32 atomics (the
  down projection fused with the routing-weighted combine; like ``index_add_`` on CUDA the
  summation order of a token's k contributions is not fixed).

Launch options (the tables' prefill entries): ``order`` "n" (2-D grid, each N block's tiles
together), "tile" (a row tile's N blocks together) or "expert" (an expert's N blocks, each with
all of its tiles: tiles that read the same weight slice run side by side, so it crosses HBM
once); ``fuse`` (gated: gate and up rows in one [2*BLOCK_N, 128] weight tile, one MMA per K
step instead of two); ``tma`` (weights through host TMA descriptors instead of pointer loads).

Activations are quantized per row and 128 channels by :func:`~.fp8_linear.act_quant` (or by
the norm before, in the same pass): two FP8 terms for few rows (decode: bf16 precision on FP8
MMAs), one for many (prefill); the first projection gathers its rows from the unsorted tokens
through ``rows`` (no sorted copy of x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import HAS_TRITON, use_triton
from .fp8_linear import BLOCK, act_quant, linear_reference
from .tuning import Tuning

MODES = {"store": 0, "gated": 1, "scatter": 2}
ORDERS = {"n": 0, "tile": 1, "expert": 2}

if HAS_TRITON:
    import triton
    import triton.language as tl

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # older Triton: pointer loads only
        TensorDescriptor = None

    @triton.jit
    def _find_expert(tile_end_ptr, key, E, SCALE, SEARCH_STEPS: tl.constexpr):
        """Smallest e with tile_end[e] * SCALE > key (binary search; E <= 2**SEARCH_STEPS)."""
        lo = key * 0
        hi = lo + E - 1
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            left = tl.load(tile_end_ptr + mid) * SCALE > key
            hi = tl.where(left, mid, hi)
            lo = tl.where(left, lo, mid + 1)
        return lo


    @triton.jit
    def _grouped_kernel(a_ptr, as_ptr, a2_ptr, as2_ptr, rows_ptr, b_ptr, bs_ptr, b2_ptr, b2s_ptr, c_ptr,
                        scat_ptr, wt_ptr, offsets_ptr, tile_end_ptr, b_desc, b2_desc, N, K, E, single_rows,
                        stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
                        stride_bsn, stride_cm,
                        MODE: tl.constexpr, A_MODE: tl.constexpr, HAS_ROWS: tl.constexpr,
                        HAS_SCAT: tl.constexpr, HAS_WT: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                        SINGLE: tl.constexpr, ORDER: tl.constexpr, FUSE: tl.constexpr, TMA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n_blocks = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        if ORDER == 0:  # 2-D grid: see grouped_w8a8 for the orders
            tile = pid
            pid_n = tl.program_id(1)
        else:
            tile = pid // n_blocks
            pid_n = pid % n_blocks
        if SINGLE:  # one expert (dense MLP / shared expert): rows 0..single_rows, no schedule
            if tile >= tl.cdiv(single_rows, BLOCK_M):
                return
            e = tile * 0
            tiles_before = e
            row_lo = e
            row_hi = e + single_rows
        else:
            if ORDER == 2:  # expert-major: its programs are (N block, tile), the tiles fastest
                if pid >= tl.load(tile_end_ptr + E - 1) * n_blocks:
                    return
                e = _find_expert(tile_end_ptr, pid, E, n_blocks, SEARCH_STEPS)
            else:
                if tile >= tl.load(tile_end_ptr + E - 1):
                    return
                e = _find_expert(tile_end_ptr, tile, E, 1, SEARCH_STEPS)
            prev = tl.maximum(e - 1, 0)
            tiles_before = tl.where(e > 0, tl.load(tile_end_ptr + prev), 0)
            if ORDER == 2:
                tiles_e = tl.load(tile_end_ptr + e) - tiles_before
                local = pid - tiles_before * n_blocks
                pid_n = local // tiles_e
                tile = tiles_before + local % tiles_e
            row_lo = tl.where(e > 0, tl.load(offsets_ptr + prev), 0)
            row_hi = tl.load(offsets_ptr + e)
        rows = row_lo + (tile - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < row_hi
        src = tl.load(rows_ptr + rows, mask=mask_m, other=0) if HAS_ROWS else rows
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + src.to(tl.int64)[:, None] * stride_am
        a2_rows = a2_ptr + src.to(tl.int64)[:, None] * stride_am  # A_MODE 3: same layout as a
        e64 = e.to(tl.int64)
        if FUSE:  # B tile columns [0, BLOCK_N): gate rows, [BLOCK_N, 2 BLOCK_N): the same up rows
            j = tl.arange(0, 2 * BLOCK_N)
            offs_n = pid_n * BLOCK_N + tl.where(j >= BLOCK_N, j - BLOCK_N, j)
            off_b = e64 * stride_be + offs_n.to(tl.int64) * stride_bn
            b_rows = tl.where(j >= BLOCK_N, b2_ptr + off_b, b_ptr + off_b)[:, None]
            off_s = e64 * stride_bse + (offs_n // BLOCK_K) * stride_bsn
            bs_rows = tl.where(j >= BLOCK_N, b2s_ptr + off_s, bs_ptr + off_s)
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            b_rows = b_ptr + e64 * stride_be + offs_n.to(tl.int64)[:, None] * stride_bn
            bs_rows = bs_ptr + e64 * stride_bse + (offs_n // BLOCK_K) * stride_bsn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        mask_n = offs_n < N
        b2_rows = b2_ptr + e64 * stride_be + offs_n.to(tl.int64)[:, None] * stride_bn
        b2s_rows = b2s_ptr + e64 * stride_bse + (offs_n // BLOCK_K) * stride_bsn
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # TMA: rows past this expert's N read the next expert's (their columns are never
        # stored), K past the end reads zeros.
        b_row0 = (e * N + pid_n * BLOCK_N).to(tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            a_mask = mask_m[:, None] & mask_k[None, :]
            a = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0)
            bmask = mask_n[:, None] & mask_k[None, :]
            if TMA:  # noqa: SIM108 - a constexpr branch: the other side does not compile
                b = b_desc.load([b_row0, k0])
            else:
                b = tl.load(b_rows + kk[None, :], mask=bmask, other=0.0)
            b_s = tl.load(bs_rows + k0 // BLOCK_K, mask=mask_n, other=0.0)
            if MODE == 1 and not FUSE:
                if TMA:
                    b2 = b2_desc.load([b_row0, k0])
                else:
                    b2 = tl.load(b2_rows + kk[None, :], mask=bmask, other=0.0)
                b2_s = tl.load(b2s_rows + k0 // BLOCK_K, mask=mask_n, other=0.0)
            if A_MODE == 3:  # two-term FP8 activations (decode), see fp8_linear.act_quant_split_reference
                s_offs = src * stride_asm + (k0 // BLOCK_K) * stride_ask
                a_s = tl.load(as_ptr + s_offs, mask=mask_m, other=0.0)[:, None]
                a2 = tl.load(a2_rows + kk[None, :], mask=a_mask, other=0.0)
                a2_s = tl.load(as2_ptr + s_offs, mask=mask_m, other=0.0)[:, None]
                bt = tl.trans(b)
                acc += (tl.dot(a, bt) * a_s + tl.dot(a2, bt) * a2_s) * b_s[None, :]
                if MODE == 1 and not FUSE:
                    b2t = tl.trans(b2)
                    acc2 += (tl.dot(a, b2t) * a_s + tl.dot(a2, b2t) * a2_s) * b2_s[None, :]
            else:  # one pre-quantized FP8 term (prefill)
                a_s = tl.load(as_ptr + src * stride_asm + (k0 // BLOCK_K) * stride_ask, mask=mask_m, other=0.0)
                acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s[None, :])
                if MODE == 1 and not FUSE:
                    acc2 += tl.dot(a, tl.trans(b2)) * (a_s[:, None] * b2_s[None, :])
        if FUSE:  # [M, 2 BN] -> gate [M, BN], up [M, BN]
            acc, acc2 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
        cmask = mask_m[:, None] & mask_n[None, :]
        if MODE == 2:
            if HAS_WT:
                acc = acc * tl.load(wt_ptr + rows, mask=mask_m, other=0.0)[:, None]
            dst = tl.load(scat_ptr + rows, mask=mask_m, other=0) if HAS_SCAT else rows
            tl.atomic_add(c_ptr + dst.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc, mask=cmask)
        else:
            if MODE == 1:
                acc = acc / (1.0 + tl.exp(-acc)) * acc2
            c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def tile_schedule(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets, tile_end) int32 [E] from per-expert row ``counts``; device ops only, no sync."""
    counts = counts.to(torch.int32)
    offsets = counts.cumsum(0, dtype=torch.int32)
    tile_end = ((counts + block_m - 1) // block_m).cumsum(0, dtype=torch.int32)
    return offsets, tile_end


def max_tiles(rows: int, experts: int, block_m: int) -> int:
    """Static upper bound on the tile count: each tile holds >= 1 row, each expert wastes < 1."""
    return max(1, min(rows, -(-rows // block_m) + min(experts, rows)))


def grouped_config(rows: int, n: int, experts: int, tuning: Tuning, down: bool = False) -> dict:
    """Decode (<= 256 rows): 16-row tiles on two-term FP8 activations (a_mode 3: bf16 precision
    on FP8 MMAs), the widest N tile in ``block_ns`` that still yields ``min_programs`` programs
    (16 if none does), so one-row launches spread over the whole GPU.  Prefill: wide tiles on
    one pre-quantized FP8 term (a_mode 0; ``down``: the down projection's own tuning, K = 2048)."""
    if rows <= 256:
        t = tuning.grouped_decode
        groups = min(max_tiles(rows, experts, 16), experts)
        bn = next((bn for bn in t["block_ns"] if groups * -(-n // bn) >= t["min_programs"]), 16)
        return dict(BLOCK_M=16, BLOCK_N=bn, a_mode=3, num_warps=t["num_warps"], num_stages=t["num_stages"])
    return dict(a_mode=0, **(tuning.grouped_prefill_down if down else tuning.grouped_prefill))


def grouped_reference(a, w, w_s, offsets, *, mode="store", rows=None, w2=None, w2_s=None,
                      out=None, scatter=None, weight=None, out_dtype=None, a_mode=0) -> torch.Tensor:
    """Loop-over-experts definition of :func:`grouped_w8a8` (CPU path and test oracle)."""
    lin = linear_reference(a_mode)
    mode_id = MODES[mode]
    total = int(offsets[-1]) if offsets.numel() else 0
    src = rows.long() if rows is not None else torch.arange(total, device=a.device)
    n = w.shape[1]
    res = torch.zeros(total, n, dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            xa = a[src[start:end]]
            y = lin(xa, w[e], w_s[e], torch.float32)
            if mode_id == 1:
                y = F.silu(y) * lin(xa, w2[e], w2_s[e], torch.float32)
            res[start:end] = y
        start = end
    if mode_id == 2:
        if weight is not None:
            res = res * weight.float().unsqueeze(-1)
        dst = scatter.long() if scatter is not None else torch.arange(total, device=a.device)
        return out.index_add_(0, dst, res)
    return res.to(out_dtype or a.dtype)


def grouped_w8a8(a: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, counts: torch.Tensor | None, *,
                 num_rows: int, mode: str = "store", rows: torch.Tensor | None = None,
                 w2: torch.Tensor | None = None, w2_s: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, scatter: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, config: dict,
                 a_quant: tuple[torch.Tensor, ...] | None = None,
                 schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
                 out_dtype=None) -> torch.Tensor:
    """Grouped FP8 GEMM; see the module doc.

    a:        [T, K] activations (bf16); row ``i`` of the sorted problem reads ``a[rows[i]]``
              (or ``a[i]`` without ``rows``).
    w, w_s:   [E, N, K] fp8 weights, [E, N/128, K/128] scales (``w2``/``w2_s``: up proj, gated).
    counts:   [E] rows per expert (device); ``num_rows`` = their sum, known on the host.
              None with E == 1: all ``num_rows`` rows belong to the one expert (no schedule).
    schedule: (offsets, tile_end) already computed for ``config["BLOCK_M"]`` (e.g. by
              :func:`~.routing.sort_by_expert`), instead of ``counts``.
    out:      mode "scatter": fp32 [T', N] accumulated into (``scatter`` rows, ``weight``).
    a_quant:  pre-quantized (q, s) of ``a`` for the many-rows path, or its two-term
              (q, s, q2, s2) for a_mode 3 (computed if needed).
    config:   launch shape and a_mode from :func:`grouped_config`.
    Returns [num_rows, N] (modes store/gated) or ``out`` (scatter).
    """
    e_count, n, k = w.shape
    cfg = config
    mode_id = MODES[mode]
    single = counts is None and schedule is None
    if single:
        assert e_count == 1, "counts or schedule needed with more than one expert"
        if not use_triton(a, w):
            counts = torch.full((1,), num_rows, dtype=torch.int32, device=a.device)
    if schedule is not None:
        offsets, tile_end = schedule
    elif counts is not None:
        offsets, tile_end = tile_schedule(counts, cfg["BLOCK_M"])
    if not use_triton(a, w):
        return grouped_reference(a, w, w_s, offsets, mode=mode, rows=rows, w2=w2, w2_s=w2_s, out=out,
                                 scatter=scatter, weight=weight, out_dtype=out_dtype,
                                 a_mode=cfg["a_mode"])
    c = out if mode_id == 2 else torch.empty(num_rows, n, dtype=out_dtype or a.dtype, device=a.device)
    if num_rows == 0:
        return c
    terms = a_quant if a_quant is not None else act_quant(a, split=cfg["a_mode"] == 3)
    aa, a_s, a2, a2_s = terms if cfg["a_mode"] == 3 else (*terms, *terms)
    sam, sak = a_s.stride(0), a_s.stride(1)
    b2, b2s = (w2, w2_s) if w2 is not None else (w, w_s)
    # Launch order: programs start in grid order, first dimension fastest. "tile" (every N
    # block of a row tile, then the next tile) keeps a tile's activations in L2 while its N
    # blocks read them; "expert" also puts the tiles of one expert that read the same weight
    # slice side by side. The 2-D grid ("n") sweeps all tiles per N block and reads the
    # activations once per N block from memory (at prefill 2,048 tokens x 8 experts: 117 MB per
    # N block for gate/up). One expert (dense MLP, shared expert): every tile reads the whole
    # weight, which L2 cannot hold, so there the N-block-major order stays.
    order = 0 if single else ORDERS[cfg.get("order", "n")]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles, n_blocks = max_tiles(num_rows, e_count, bm), triton.cdiv(n, bn)
    grid = (tiles * n_blocks,) if order else (tiles, n_blocks)
    fuse = bool(cfg.get("fuse")) and mode_id == 1
    # TMA needs 16-byte row strides and [E, N, K] weights it can view as [E*N, K].
    tma = (bool(cfg.get("tma")) and TensorDescriptor is not None and not fuse and k % 16 == 0
           and w.is_contiguous() and b2.is_contiguous())
    b_desc = TensorDescriptor.from_tensor(w.view(e_count * n, k), [bn, BLOCK]) if tma else None
    b2_desc = TensorDescriptor.from_tensor(b2.view(e_count * n, k), [bn, BLOCK]) if tma and mode_id == 1 else None
    if single:
        offsets = tile_end = w_s  # unused by the SINGLE kernel; any valid device pointer
    dummy = tile_end
    _grouped_kernel[grid](
        aa, a_s, a2, a2_s, rows if rows is not None else dummy, w, w_s, b2, b2s, c,
        scatter if scatter is not None else dummy, weight if weight is not None else dummy,
        offsets, tile_end, b_desc, b2_desc, n, k, e_count, num_rows,
        aa.stride(0), sam, sak, w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1), c.stride(0),
        MODE=mode_id, A_MODE=cfg["a_mode"], HAS_ROWS=rows is not None,
        HAS_SCAT=scatter is not None, HAS_WT=weight is not None,
        SEARCH_STEPS=max(1, math.ceil(math.log2(max(e_count, 2)))), SINGLE=single, ORDER=order, FUSE=fuse, TMA=tma,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return c
