"""W8A8 block-scaled FP8 linear: ``y = x @ W^T`` with FP8 activations and FP8 weights.

Numerics (DeepSeek-V3's recipe):

* activations are quantized per token and per 128-channel group: ``s = amax(|x_g|) / 448``,
  ``q = fp8(x_g / s)`` (round to nearest even, the same as ``tensor.to(float8_e4m3fn)``);
* weights keep the checkpoint's ``float8_e4m3fn`` values and one fp32 ``scale_inv`` per
  128x128 block;
* each 128-wide K slice is one FP8 tensor-core product whose fp32 result is scaled by
  ``s_x * s_w`` and added to an fp32 accumulator.  Promoting every 128 K bounds the error of
  Hopper's reduced-precision FP8 accumulation, which is why the K tile is exactly 128.

Two GPU implementations, picked per shape by :mod:`.backend`:

* Triton (:func:`w8a8_linear`).  Small M (decode) splits K across programs so that even a
  576-row ``kv_a`` projection puts enough loads in flight; the program finishing a tile last
  sums the fp32 partials in split order (deterministic, unlike atomics).  Its activations keep
  16-bit precision (W8A16: bf16 MMAs on weights widened in registers; the GEMM is bound by
  weight bytes, so FP8 activations would buy nothing but quantization error).  Large M
  (prefill) quantizes once with :func:`act_quant` and runs 128x128 tiles.  One bf16 row
  (decode at batch 1) goes to the CUDA-core GEMV of :mod:`.fp8_gemv` instead.  Launch shapes
  come from the :class:`~.tuning.Tuning` table.
* ``torch._scaled_mm`` with 1x128 / 128x128 block scales (cuBLASLt >= 12.9 on sm_90):
  :func:`scaled_mm_linear`.

:func:`w8a8_reference` is the CPU / fallback path and the definition the kernels are tested
against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import HAS_TRITON, use_triton
from .tuning import Tuning

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128  # activation group = weight block edge = K tile

if HAS_TRITON:
    import triton
    import triton.language as tl


    @triton.jit
    def quant_tile(x):
        """Per-row FP8 quantization of an fp32 [R, 128] tile -> (q, s): IEEE divisions, so the
        result is bitwise what :func:`act_quant_reference` computes on the CPU."""
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        q = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape)).to(tl.float8e4nv)
        return q, s

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, q2_ptr, s2_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                          SPLIT: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        q, s = quant_tile(x)
        q_offs = rows.to(tl.int64)[:, None] * stride_qm + cols[None, :]
        s_offs = rows * stride_sm + tl.program_id(1) * stride_sk
        tl.store(q_ptr + q_offs, q, mask=mask)
        tl.store(s_ptr + s_offs, s, mask=rows < M)
        if SPLIT:  # second term: the rounding residual, quantized with its own block scale
            q2, s2 = quant_tile(x - q.to(tl.float32) * s[:, None])
            tl.store(q2_ptr + q_offs, q2, mask=mask)
            tl.store(s2_ptr + s_offs, s2, mask=rows < M)

    @triton.jit
    def _w8a8_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                     stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_cs, stride_cm,
                     k_split, out_ptr, cnt_ptr, A_MODE: tl.constexpr, LAST_REDUCES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Axis 0 walks M fastest: neighbouring programs share one weight tile, so the (large)
        # weight streams from HBM once while the (small) activation rows stay in L2.
        pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
        bs_rows = bs_ptr + (offs_n // BLOCK_K) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_s * k_split
        # Uniform trip count per split (the last split's tail is fully masked: no traffic).
        for i in range(0, k_split // BLOCK_K):
            k0 = k_lo + i * BLOCK_K
            kk = k0 + offs_k
            mask_k = kk < K
            in_k = tl.full((1,), k0, tl.int32) < K  # a [1] block: the interpreter rejects scalar masks
            a = tl.load(a_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_rows + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            b_s = tl.load(bs_rows + k0 // BLOCK_K, mask=mask_n & in_k, other=0.0)
            if A_MODE == 2:  # W8A16: bf16 activations, FP8 weights widened exactly in registers
                acc += tl.dot(a, tl.trans(b.to(a.dtype))) * b_s[None, :]
            else:  # pre-quantized FP8 activations, per-token x 128-channel scales
                a_s = tl.load(as_ptr + offs_m * stride_asm + (k0 // BLOCK_K) * stride_ask,
                              mask=mask_m & in_k, other=0.0)
                acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s[None, :])
        mask_c = mask_m[:, None] & mask_n[None, :]
        tile = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        splitk_store(acc, c_ptr, out_ptr, cnt_ptr + pid_m * tl.num_programs(1) + pid_n, tile, mask_c, pid_s,
                     stride_cs, tl.num_programs(2), LAST_REDUCES)

    @triton.jit
    def splitk_store(acc, c_ptr, out_ptr, counter, tile, mask_c, pid_s, stride_cs, n_split,
                     LAST_REDUCES: tl.constexpr):
        """Store a split-K partial tile; with ``LAST_REDUCES`` the program that finishes the tile
        last sums all partials into ``out`` (no second launch)."""
        tl.store(c_ptr + pid_s * stride_cs + tile, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
        if LAST_REDUCES:
            # The last program of a tile (a counter per tile) sums the partials in split order, so
            # the result is still bitwise reproducible, and resets the counter for the next launch
            # or graph replay.
            tl.debug_barrier()  # every thread's partial is stored before the release below
            if tl.atomic_add(counter, 1, sem="acq_rel") == n_split - 1:
                tl.debug_barrier()
                total = tl.zeros_like(acc)
                for sp in range(0, n_split):
                    total += tl.load(c_ptr + sp * stride_cs + tile, mask=mask_c, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=mask_c)
                tl.atomic_xchg(counter, 0)

    @triton.jit
    def _splitk_reduce_kernel(ws_ptr, c_ptr, MN, S, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(S):  # fixed order: the result is bitwise reproducible
            acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- references
def act_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-128-column FP8 quantization of ``x`` [M, K] -> (q [M, K], s [M, ceil(K/128)])."""
    m, k = x.shape
    pad = -k % BLOCK
    xf = F.pad(x.float(), (0, pad)).view(m, -1, BLOCK)
    amax = xf.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / s.unsqueeze(-1)).to(FP8).view(m, -1)[:, :k]
    return q.contiguous(), s


def act_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp32 values of an :func:`act_quant_reference` pair (q [M, K], s [M, ceil(K/128)])."""
    m, k = q.shape
    xd = F.pad(q.float(), (0, -k % BLOCK)).view(m, -1, BLOCK) * s.unsqueeze(-1)
    return xd.view(m, -1)[:, :k]


def act_quant_split_reference(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two-term FP8 activations ``x ~ q*s + q2*s2`` -> (q, s, q2, s2): the second term is the
    first one's rounding residual, quantized with its own per-row x 128-channel scale.  e4m3
    keeps 3 mantissa bits, so one term is off by up to 1/16 of a value and two terms by about
    1/256: bf16 precision, with FP8 tensor-core products and no widening of the weights."""
    q, s = act_quant_reference(x)
    q2, s2 = act_quant_reference(x.float() - act_dequant(q, s))
    return q, s, q2, s2


def w8a8_reference(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out_dtype=None,
                   split: bool = False) -> torch.Tensor:
    """The function the kernels compute, in fp32: quantize ``x`` [M, K] (one FP8 term, or two
    with ``split``), dequantize activations and weights, matmul."""
    from ..fp8 import block_dequantize

    terms = act_quant_split_reference(x) if split else act_quant_reference(x)
    xd = sum(act_dequant(terms[i], terms[i + 1]) for i in range(0, len(terms), 2))
    return (xd @ block_dequantize(w, w_s).T).to(out_dtype or x.dtype)


# ------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=8)
def num_sms(device_index: int = 0) -> int:
    if not torch.cuda.is_available():
        return 132  # interpreter runs: pretend H100 so the same configs get exercised
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def act_quant(x: torch.Tensor, split: bool = False) -> tuple[torch.Tensor, ...]:
    """(q [M, K] fp8, s [M, ceil(K/128)] fp32 **column-major**, the layout cuBLASLt wants);
    with ``split`` also the residual term (q2, s2) of :func:`act_quant_split_reference`."""
    if not use_triton(x):
        terms = act_quant_split_reference(x) if split else act_quant_reference(x)
        return tuple(t.t().contiguous().t() if t.dtype == torch.float32 else t for t in terms)
    m, k = x.shape
    nkb = triton.cdiv(k, BLOCK)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s_t = torch.empty(nkb, m, dtype=torch.float32, device=x.device)
    q2, s2_t = (torch.empty_like(q), torch.empty_like(s_t)) if split else (q, s_t)
    rows = 16
    _act_quant_kernel[(triton.cdiv(m, rows), nkb)](
        x, q, s_t, q2, s2_t, m, k, x.stride(0), q.stride(0), 1, m, SPLIT=split, ROWS=rows, BLOCK_K=BLOCK,
        num_warps=4)
    return (q, s_t.t(), q2, s2_t.t()) if split else (q, s_t.t())


def gemm_config(m: int, n: int, k: int, sms: int, tuning: Tuning) -> dict:
    """Tile shape, split-K and activation handling for an (M, N, K) problem; see module doc.

    ``a_mode``: 0 pre-quantized FP8 activations (large M), 2 bf16 activations (W8A16, the
    small-M decode path, where the GEMM is bound by weight bytes and activation quantization
    would only add error).  Rows up to ``tuning.gemv["max_m"]`` take the CUDA-core GEMV.
    """
    if m <= tuning.gemv["max_m"]:
        from .fp8_gemv import gemv_config

        return gemv_config(m, n, k, sms, tuning.gemv)
    if m <= 256:  # decode-like: bandwidth bound, maximise loads in flight
        t = tuning.small_m
        bm = _pow2_at_least(m, 16) if m <= 64 else 64
        bn = t["BLOCK_N"] if m <= 64 else 128
        tiles = -(-m // bm) * -(-n // bn)
        nkb = -(-k // BLOCK)
        split = 1
        want = t["waves"] * sms
        if tiles < want:
            split = max(1, min(-(-want // tiles), nkb // 4))
        k_split = -(-nkb // split) * BLOCK
        split = -(-k // k_split)
        return dict(BLOCK_M=bm, BLOCK_N=bn, split=split, k_split=k_split, a_mode=2,
                    num_warps=t["num_warps"], num_stages=t["num_stages"])
    # The kernel runs k_split // BLOCK_K steps: round up, so a partial last K block (K = 64 in
    # tiny models) is computed (masked) instead of dropped.
    return dict(BLOCK_M=128, BLOCK_N=128, split=1, k_split=-(-k // BLOCK) * BLOCK, a_mode=0, num_warps=8,
                num_stages=3)


def w8a16_reference(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """The W8A16 mode: activations unquantized, weights dequantized (the TorchOps function)."""
    from ..fp8 import block_dequantize

    return (x.float() @ block_dequantize(w, w_s).T).to(out_dtype or x.dtype)


def linear_reference(a_mode: int):
    """The reference function of a kernel ``a_mode`` (see :func:`gemm_config`)."""
    if a_mode == 2:
        return w8a16_reference
    return functools.partial(w8a8_reference, split=a_mode == 3)


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, config: dict,
                a_quant: tuple[torch.Tensor, torch.Tensor] | None = None, out_dtype=None) -> torch.Tensor:
    """``x`` [M, K] (bf16/fp32) times FP8 ``w`` [N, K] with block scales ``w_s`` -> [M, N], launched
    with ``config`` from :func:`gemm_config`.  ``a_quant``: the :func:`act_quant` of ``x``
    (a_mode 0) when the caller already has it."""
    out_dtype = out_dtype or x.dtype
    m, k = x.shape
    n = w.shape[0]
    cfg = config
    if not use_triton(x, w):
        return linear_reference(cfg["a_mode"])(x, w, w_s, out_dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    if cfg.get("gemv"):
        from .fp8_gemv import gemv_w8a16

        return gemv_w8a16(x, w, w_s, out, cfg)
    a, a_s = (x, x) if cfg["a_mode"] == 2 else (a_quant if a_quant is not None else act_quant(x))
    sam, sak = (a_s.stride(0), a_s.stride(1)) if cfg["a_mode"] == 0 else (0, 0)
    split = cfg["split"]
    c = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    counters = _tile_counters(x.device, grid[0] * grid[1]) if split > 1 else None
    _w8a8_kernel[grid](
        a, a_s, w, w_s, c, m, n, k, a.stride(0), sam, sak, w.stride(0), w_s.stride(0),
        m * n, n, cfg["k_split"], out, counters if counters is not None else out,
        A_MODE=cfg["a_mode"], LAST_REDUCES=counters is not None, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1 and counters is None:
        _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](c, out, m * n, split, BLOCK=1024, num_warps=4)
    return out


_COUNTERS: dict[str, torch.Tensor] = {}
MAX_TILE_COUNTERS = 1 << 14


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """Zeroed int32 counters for the last-program split-K reduction, one buffer per device
    (kernels leave them zeroed; launches on one stream never overlap).  None where a launch has
    more tiles than the buffer: it then uses the separate reduce kernel."""
    if tiles > MAX_TILE_COUNTERS:
        return None
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_TILE_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def scaled_mm_takes(n: int, k: int) -> bool:
    """Whether :func:`scaled_mm_linear` takes an [N, K] weight (it raises on the rest)."""
    # cuBLASLt takes other shapes and returns garbage (H200 and H100, torch 2.11: 1e33 at
    # K = 64 or 128, wrong columns past N = 2048 of N = 2112, a tiny model's 256 x 256 MLP).
    # Measured correct: whole groups of four 128-blocks in K and N, which every large V3 GEMM
    # has (q_b, kv_b, o, the MLPs); the fused q_a / kv_a (N = 2112) stays on Triton.
    return k % 512 == 0 and n % 512 == 0


def scaled_mm_linear(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor, out_dtype=None,
                     a_quant: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Same function through ``torch._scaled_mm`` (1x128 activation, 128x128 weight scales).

    Raises (RuntimeError / NotImplementedError / ValueError) where the torch build, cuBLASLt or
    the shape does not support blockwise scaling; the backend then keeps Triton for that shape.
    """
    k, n = x.shape[-1], w.shape[0]
    if not scaled_mm_takes(n, k):
        raise ValueError(f"blockwise _scaled_mm is used only for K and N multiples of 512; got K={k}, N={n}")
    q, s = a_quant if a_quant is not None else act_quant(x)
    return torch._scaled_mm(q, w.t(), scale_a=s, scale_b=w_s.t(), out_dtype=out_dtype or x.dtype)
