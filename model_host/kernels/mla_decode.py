"""Absorbed MLA decode attention read straight from the paged latent cache.

After absorbing W_UK into the query, MLA decode is multi-query attention: every head of a row
attends over the same cached 576-dim keys ``[c_kv | k_pe]`` and 512-dim values ``c_kv``.
FlashMLA's design, in Triton:

* a program owns BLOCK_H heads of one row and one KV split; it walks its split page by page
  through the block table (no gather of the cache into a contiguous copy), loading each latent
  once for all BLOCK_H heads and using it as both K and V;
* online softmax in fp32 (scores from two tensor-core products: 512-dim latent + 64-dim rope);
* stage 2 merges the splits with their log-sum-exp (flash-decoding), so a batch of one still
  spreads over the machine; the split count is a host constant per batch size and each split's
  range is derived on the device from the row's length, so the launch is CUDA-graph safe.

``seq_lens[b]`` (device) is the number of cached positions row ``b`` attends to (its decode
position + 1); keys are the row's cache positions ``0..seq_lens[b]-1``.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON, INTERPRET, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mla_split_kernel(q_ptr, ckv_ptr, kpe_ptr, bt_ptr, len_ptr, po_ptr, plse_ptr, H, sm_scale,
                          stride_qb, stride_qh, stride_ckv, stride_kpe, stride_bt,
                          stride_pb, stride_ph, stride_ps,
                          PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, DL: tl.constexpr,
                          DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_h, b, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq_len = tl.load(len_ptr + b)
        chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = sp * chunk
        end = tl.minimum(seq_len, start + chunk)
        heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = heads < H
        offs_l = tl.arange(0, DL)
        offs_r = tl.arange(0, DR)
        q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
        q_l = tl.load(q_row + offs_l[None, :], mask=mask_h[:, None], other=0.0)
        q_r = tl.load(q_row + DL + offs_r[None, :], mask=mask_h[:, None], other=0.0)
        m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, DL), tl.float32)
        for n0 in range(0, chunk, BLOCK_N):
            offs_n = start + n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + offs_n // PAGE, mask=mask_n, other=0)
            slot = page.to(tl.int64) * PAGE + offs_n % PAGE
            kv = tl.load(ckv_ptr + slot[:, None] * stride_ckv + offs_l[None, :], mask=mask_n[:, None], other=0.0)
            kr = tl.load(kpe_ptr + slot[:, None] * stride_kpe + offs_r[None, :], mask=mask_n[:, None], other=0.0)
            s = tl.dot(q_l, tl.trans(kv)) + tl.dot(q_r, tl.trans(kr))
            s = tl.where(mask_n[None, :], s * sm_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked block: no NaN
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
            m = m_new
        ok = l_sum > 0
        out = acc / tl.where(ok, l_sum, 1.0)[:, None]
        lse = tl.where(ok, m + tl.log(tl.where(ok, l_sum, 1.0)), float("-inf"))
        po = po_ptr + b.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + sp * stride_ps
        tl.store(po + offs_l[None, :], out, mask=mask_h[:, None])
        tl.store(plse_ptr + (b * H + heads) * NUM_SPLITS + sp, lse, mask=mask_h)

    @triton.jit
    def _mla_merge_kernel(po_ptr, plse_ptr, o_ptr, H, stride_pb, stride_ph, stride_ps,
                          stride_ob, stride_oh, NUM_SPLITS: tl.constexpr, DL: tl.constexpr):
        h, b = tl.program_id(0), tl.program_id(1)
        offs_s = tl.arange(0, NUM_SPLITS)
        lse = tl.load(plse_ptr + (b * H + h) * NUM_SPLITS + offs_s)
        m = tl.max(lse, axis=0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
        w = w / tl.sum(w, axis=0)
        offs_l = tl.arange(0, DL)
        po = po_ptr + b.to(tl.int64) * stride_pb + h * stride_ph
        parts = tl.load(po + offs_s[:, None] * stride_ps + offs_l[None, :])
        out = tl.sum(parts * w[:, None], axis=0)
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_l, out.to(o_ptr.dtype.element_ty))


def mla_decode_reference(q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, page: int,
                         scale: float) -> torch.Tensor:
    """fp32 definition: gather every row's table (static width, so no host sync), mask by length.

    q [B, H, R+dr]; c_kv [slots, R]; k_pe [slots, dr]; block_tables [B, nb]; seq_lens [B].
    Returns [B, H, R] in q's dtype.
    """
    b, nb = block_tables.shape
    r = c_kv.shape[-1]
    pos = torch.arange(nb * page, device=q.device)
    slots = block_tables.long()[:, pos // page] * page + pos % page  # [B, T]
    kv = c_kv[slots].float()  # [B, T, R]
    k = torch.cat((kv, k_pe[slots].float()), dim=-1)  # [B, T, R+dr]
    s = torch.einsum("bhd,btd->bht", q.float(), k) * scale
    s = s.masked_fill((pos.unsqueeze(0) >= seq_lens.unsqueeze(1)).unsqueeze(1), float("-inf"))
    o = torch.einsum("bht,btr->bhr", s.softmax(-1), kv)
    return o[..., :r].to(q.dtype)


def num_splits_for(batch: int, heads: int, sms: int = 132, block_h: int = 16) -> int:
    """KV splits so that heads/BLOCK_H x batch x splits covers ~2 waves; a power of two <= 16."""
    want = -(-2 * sms // (batch * -(-heads // block_h)))
    s = 1
    while s < min(want, 16):
        s *= 2
    return s


def mla_decode(q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, page: int, scale: float, num_splits: int | None = None,
               block_n: int = 32) -> torch.Tensor:
    """Attention output in latent space ``[B, H, R]`` (see module doc for shapes)."""
    if not use_triton(q, c_kv):
        return mla_decode_reference(q, c_kv, k_pe, block_tables, seq_lens, page, scale)
    bsz, h, d = q.shape
    r, dr = c_kv.shape[-1], k_pe.shape[-1]
    assert d == r + dr and c_kv.stride(-1) == 1 and k_pe.stride(-1) == 1 and q.stride(-1) == 1
    out_dtype = q.dtype
    if INTERPRET:  # the CPU interpreter mis-evaluates bf16 tl.dot; check the indexing in fp32
        q, c_kv, k_pe = q.float(), c_kv.float(), k_pe.float()
    block_h = 16
    splits = num_splits or num_splits_for(bsz, h, block_h=block_h)
    part_o = torch.empty(bsz, h, splits, r, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(bsz, h, splits, dtype=torch.float32, device=q.device)
    seq_lens = seq_lens.to(torch.int32)
    _mla_split_kernel[(triton.cdiv(h, block_h), bsz, splits)](
        q, c_kv, k_pe, block_tables, seq_lens, part_o, part_lse, h, scale,
        q.stride(0), q.stride(1), c_kv.stride(0), k_pe.stride(0), block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        PAGE=page, NUM_SPLITS=splits, DL=r, DR=dr, BLOCK_H=block_h, BLOCK_N=block_n,
        num_warps=4, num_stages=2)
    out = torch.empty(bsz, h, r, dtype=out_dtype, device=q.device)
    _mla_merge_kernel[(h, bsz)](
        part_o, part_lse, out, h, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        out.stride(0), out.stride(1), NUM_SPLITS=splits, DL=r, num_warps=4)
    return out
