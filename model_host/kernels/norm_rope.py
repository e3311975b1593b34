"""Fused elementwise kernels of the decoder layer: RMSNorm (optionally after the residual add),
MLA's latent store (RMSNorm of ``c_kv`` + RoPE of ``k_pe`` + the write into cache slots), and
prefill's per-head ``[nope | rope]`` concatenation of queries and keys.

Why they pay: in eager PyTorch an RMSNorm with fp32 statistics is a cast, the norm's own
kernels and a cast back, and storing MLA's latents is a split, that norm, a rope of ~8 kernels
and two scatter copies.  At decode batch 1 each of those kernels moves a few KB and costs its
launch (or, under a CUDA graph, its ~1-2 us gap): together several hundred per step, about a
third of the step.  Here each is one launch.

Numerics match the PyTorch path: fp32 statistics and rotation, one rounding to the activation
(or cache) dtype at the end; the residual sum is rounded to the activation dtype before it is
normalized, as ``x + a`` followed by ``RMSNorm`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import HAS_TRITON, use_triton
from .fp8_linear import act_quant

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .fp8_linear import quant_tile

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, q_ptr, s_ptr, q2_ptr, s2_ptr, D, eps,
                         stride_x, stride_r, stride_y, stride_h, stride_q, stride_s,
                         HAS_RES: tl.constexpr, QUANT: tl.constexpr, BLOCK_D: tl.constexpr,
                         CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        # Every program reduces the whole row (the same sum in the same order everywhere), then
        # writes only its CHUNK of columns: a decode row is spread over several SMs instead of
        # one program doing all of the (quantization) work.
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
            x = x.to(h_ptr.dtype.element_ty)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)  # reloaded: the row is in L1 / L2
        cmask = cols < D
        xc = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0)
        if HAS_RES:
            xc = (xc.to(tl.float32) + tl.load(r_ptr + row * stride_r + cols, mask=cmask, other=0.0).to(tl.float32))
            xc = xc.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * stride_h + cols, xc, mask=cmask)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = (xc.to(tl.float32) * inv * w).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride_y + cols, y, mask=cmask)
        if QUANT:
            # Two-term FP8 of the rounded output, 128 channels per group: bitwise what
            # act_quant(y, split=True) computes, without its launch and its re-read of y.
            yg = tl.reshape(y.to(tl.float32), (CHUNK // 128, 128))
            og = tl.reshape(cols, (CHUNK // 128, 128))
            groups = tl.program_id(1) * (CHUNK // 128) + tl.arange(0, CHUNK // 128)
            gmask = groups * 128 < D
            q, sc = quant_tile(yg)
            q2, sc2 = quant_tile(yg - q.to(tl.float32) * sc[:, None])
            tl.store(q_ptr + row * stride_q + og, q, mask=og < D)
            tl.store(q2_ptr + row * stride_q + og, q2, mask=og < D)
            tl.store(s_ptr + groups * stride_s + row, sc, mask=gmask)  # scales column-major, as act_quant
            tl.store(s2_ptr + groups * stride_s + row, sc2, mask=gmask)

    @triton.jit
    def _latent_store_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, ckv_ptr, kpe_ptr, eps,
                             stride_kv, stride_cs, stride_ckv, stride_kpe,
                             R: tl.constexpr, P: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, R)
        c = tl.load(kv_ptr + t * stride_kv + offs).to(tl.float32)
        inv = tl.rsqrt(tl.sum(c * c, axis=0) / R + eps)
        c = c * inv * tl.load(w_ptr + offs).to(tl.float32)
        # DeepSeek rotates interleaved pairs (x[2i], x[2i+1]) by angle i.
        half = tl.arange(0, P // 2)
        x0 = tl.load(kv_ptr + t * stride_kv + R + 2 * half).to(tl.float32)
        x1 = tl.load(kv_ptr + t * stride_kv + R + 2 * half + 1).to(tl.float32)
        cs = tl.load(cos_ptr + t * stride_cs + half)
        sn = tl.load(sin_ptr + t * stride_cs + half)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        tl.store(ckv_ptr + slot * stride_ckv + offs, c.to(ckv_ptr.dtype.element_ty))
        kdt = kpe_ptr.dtype.element_ty
        tl.store(kpe_ptr + slot * stride_kpe + 2 * half, (x0 * cs - x1 * sn).to(kdt))
        tl.store(kpe_ptr + slot * stride_kpe + 2 * half + 1, (x0 * sn + x1 * cs).to(kdt))


    @triton.jit
    def _concat_heads_kernel(nope_ptr, pe_ptr, cos_ptr, sin_ptr, out_ptr, H,
                             s_nt, s_nh, s_pt, s_ph, s_cs, s_ot, s_oh,
                             DN: tl.constexpr, DR: tl.constexpr, ROPE: tl.constexpr,
                             BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mh = (heads < H)[:, None]
        dn = tl.arange(0, DN)
        half = tl.arange(0, DR // 2)
        x = tl.load(nope_ptr + t * s_nt + heads[:, None] * s_nh + dn[None, :], mask=mh, other=0.0)
        o = out_ptr + t * s_ot + heads[:, None] * s_oh
        tl.store(o + dn[None, :], x, mask=mh)
        dr = tl.arange(0, DR)
        # Contiguous loads and stores of the rope part (stride-2 accesses ran at a third of the
        # bandwidth); pairs are split and re-joined in registers.  s_ph = 0: one shared head.
        pe = tl.load(pe_ptr + t * s_pt + heads[:, None] * s_ph + dr[None, :], mask=mh, other=0.0)
        if ROPE:  # interleaved pairs, fp32, one rounding (as apply_rope)
            x0, x1 = tl.split(tl.reshape(pe.to(tl.float32), (BLOCK_H, DR // 2, 2)))
            cs = tl.load(cos_ptr + t * s_cs + half)[None, :]
            sn = tl.load(sin_ptr + t * s_cs + half)[None, :]
            pe = tl.reshape(tl.join(x0 * cs - x1 * sn, x0 * sn + x1 * cs), (BLOCK_H, DR)).to(x.dtype)
        tl.store(o + DN + dr[None, :], pe, mask=mh)


# Columns per program for decode-sized norms (a multiple of the 128-channel quantization group).
NORM_CHUNK, NORM_CHUNK_MAX_ROWS = 1024, 16


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(h), h) with ``h = x + residual`` rounded to x's dtype (h is None without a residual)."""
    h = x if residual is None else x + residual
    y = F.rms_norm(h.float(), (h.shape[-1],), weight.float(), eps).to(x.dtype)
    return y, (None if residual is None else h)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of ``x`` [..., D]; with ``residual`` the sum is normalized and
    returned too (one read of each input, one write of each output)."""
    y, h, _ = _rms_norm(x, weight, eps, residual, quant=False)
    return y, h


def rms_norm_split_quant(x: torch.Tensor, weight: torch.Tensor, eps: float,
                         residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """:func:`rms_norm` plus ``act_quant(y, split=True)`` of its output (q, s, q2, s2, scales
    column-major) from the same launch: the decode input of the FP8 MoE / MLP launches."""
    return _rms_norm(x, weight, eps, residual, quant=True)


def _rms_norm(x, weight, eps, residual, quant: bool):
    d = x.shape[-1]
    if not use_triton(x) or d > 16384:
        y, h = rms_norm_reference(x, weight, eps, residual)
        return y, h, (act_quant(y.reshape(-1, d), split=True) if quant else None)
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = None
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, d)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        h = torch.empty_like(y)
    rows = x2.shape[0]
    terms = None
    q = s = y
    if quant:  # the layout act_quant returns: q [M, D], s [M, D/128] column-major
        q = torch.empty(rows, d, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty(-(-d // 128), rows, dtype=torch.float32, device=x.device)
        q2, s2 = torch.empty_like(q), torch.empty_like(s)
        terms = (q, s.t(), q2, s2.t())
    if rows:
        block = max(triton.next_power_of_2(d), 128 if quant else 1)  # whole 128-wide groups
        # Few rows (decode): chunks of the row on separate programs; many rows: one per row.
        chunk = NORM_CHUNK if rows <= NORM_CHUNK_MAX_ROWS and block > NORM_CHUNK else block
        hh = h if h is not None else y
        _rms_norm_kernel[(rows, triton.cdiv(d, chunk))](
            x2, r2, weight, y, hh, q, s, terms[2] if quant else q, terms[3].t() if quant else s, d, eps,
            x2.stride(0), r2.stride(0), y.stride(0), hh.stride(0), q.stride(0), rows,
            HAS_RES=residual is not None, QUANT=quant, BLOCK_D=block, CHUNK=chunk,
            num_warps=8 if block >= 4096 else 4)
    return y.view(x.shape), (None if h is None else h.view(x.shape)), terms


def latent_store_reference(kv_a: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                           sin: torch.Tensor, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Store ``norm(kv_a[:, :R])`` into ``c_kv[slots]`` and ``rope(kv_a[:, R:])`` into ``k_pe[slots]``.

    kv_a [T, R+P] (the kv_a_proj_with_mqa output, flattened over batch and sequence);
    cos/sin [T, P/2] fp32; slots [T]; c_kv [N, R] and k_pe [N, P] are the cache's flat rows.
    """
    from ..rope import apply_rope

    r = c_kv.shape[-1]
    c, pe = kv_a.split([r, kv_a.shape[-1] - r], dim=-1)
    c = F.rms_norm(c.float(), (r,), weight.float(), eps).to(kv_a.dtype)
    pe = apply_rope(pe.unsqueeze(1), cos.unsqueeze(1), sin.unsqueeze(1)).squeeze(1)
    c_kv.index_copy_(0, slots, c.to(c_kv.dtype))
    k_pe.index_copy_(0, slots, pe.to(k_pe.dtype))


def latent_store(kv_a: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """One launch for MLA's cache write; shapes as in :func:`latent_store_reference`."""
    r, p = c_kv.shape[-1], k_pe.shape[-1]
    pow2 = r & (r - 1) == 0 and p & (p - 1) == 0 and p >= 2
    if not (use_triton(kv_a, c_kv) and pow2 and c_kv.stride(-1) == 1 and k_pe.stride(-1) == 1):
        return latent_store_reference(kv_a, weight, eps, cos, sin, slots, c_kv, k_pe)
    t = kv_a.shape[0]
    if t == 0:
        return None
    kv_a = kv_a if kv_a.stride(-1) == 1 else kv_a.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    _latent_store_kernel[(t,)](
        kv_a, weight, cos, sin, slots, c_kv, k_pe, eps, kv_a.stride(0), cos.stride(0),
        c_kv.stride(0), k_pe.stride(0), R=r, P=p, num_warps=4)
    return None


def concat_heads_reference(nope: torch.Tensor, pe: torch.Tensor,
                           rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[nope | rope(pe)]`` per head: nope [B, T, H, dn], pe [B, T, H or 1, dr] (one head is
    shared by all, as MLA's k_pe), rope = (cos, sin) [B, T, dr/2] or None (already rotated)."""
    from ..rope import apply_rope

    if rope is not None:
        pe = apply_rope(pe, *rope)
    return torch.cat((nope, pe.expand(*nope.shape[:-1], pe.shape[-1])), dim=-1)


def concat_heads(nope: torch.Tensor, pe: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Prefill's attention operands in one launch each: the query (rope applied here) and the
    key (the shared rope head broadcast), instead of a rope chain and a concatenation."""
    b, t, h, dn = nope.shape
    dr = pe.shape[-1]
    pow2 = dn & (dn - 1) == 0 and dr & (dr - 1) == 0 and dr >= 2
    if not (use_triton(nope) and pow2 and nope.stride(-1) == 1 and pe.stride(-1) == 1):
        return concat_heads_reference(nope, pe, rope)
    nope2 = nope.reshape(b * t, h, dn)  # views: batch and sequence dims of a projection output merge
    pe2 = pe.reshape(b * t, pe.shape[2], dr)
    out = torch.empty(b, t, h, dn + dr, dtype=nope.dtype, device=nope.device)
    out2 = out.view(b * t, h, dn + dr)
    cos, sin = (rope[0].reshape(b * t, -1).contiguous(), rope[1].reshape(b * t, -1).contiguous()) if rope else (pe2, pe2)
    if b * t:
        block_h = 32
        _concat_heads_kernel[(b * t, triton.cdiv(h, block_h))](
            nope2, pe2, cos, sin, out2, h, nope2.stride(0), nope2.stride(1), pe2.stride(0),
            pe2.stride(1) if pe.shape[2] > 1 else 0, cos.stride(0), out2.stride(0), out2.stride(1),
            DN=dn, DR=dr, ROPE=rope is not None, BLOCK_H=block_h, num_warps=4)
    return out
