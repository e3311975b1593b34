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
    def _mla_split_kernel(q_ptr, qpe_ptr, ckv_ptr, kpe_ptr, bt_ptr, len_ptr, po_ptr, plse_ptr, cos_ptr, sin_ptr,
                          H, sm_scale, stride_qb, stride_qh, stride_rb, stride_rh, stride_ckv, stride_kpe, stride_bt,
                          stride_pb, stride_ph, stride_ps, stride_cs,
                          PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, DL: tl.constexpr,
                          DR: tl.constexpr, ROPE: tl.constexpr, LEN_FROM_POS: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_h, b, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq_len = tl.load(len_ptr + b).to(tl.int32)
        if LEN_FROM_POS:  # the decode token's position: it attends to positions 0..pos
            seq_len += 1
        chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = sp * chunk
        end = tl.minimum(seq_len, start + chunk)
        heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = heads < H
        offs_l = tl.arange(0, DL)
        # The rope part as even / odd channels: two 32-wide products score the same as one
        # 64-wide one, and the query can be rotated here (interleaved pairs) instead of by a
        # chain of PyTorch kernels before the launch.
        half = tl.arange(0, DR // 2)
        q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
        q_l = tl.load(q_row + offs_l[None, :], mask=mask_h[:, None], other=0.0)
        r_row = qpe_ptr + b.to(tl.int64) * stride_rb + heads[:, None] * stride_rh
        q_e = tl.load(r_row + 2 * half[None, :], mask=mask_h[:, None], other=0.0)
        q_o = tl.load(r_row + 2 * half[None, :] + 1, mask=mask_h[:, None], other=0.0)
        if ROPE:
            cs = tl.load(cos_ptr + b.to(tl.int64) * stride_cs + half)[None, :]
            sn = tl.load(sin_ptr + b.to(tl.int64) * stride_cs + half)[None, :]
            qe32, qo32 = q_e.to(tl.float32), q_o.to(tl.float32)
            q_e = (qe32 * cs - qo32 * sn).to(q_l.dtype)
            q_o = (qe32 * sn + qo32 * cs).to(q_l.dtype)
        m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, DL), tl.float32)
        for n0 in range(0, chunk, BLOCK_N):
            offs_n = start + n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + offs_n // PAGE, mask=mask_n, other=0)
            slot = page.to(tl.int64) * PAGE + offs_n % PAGE
            kv = tl.load(ckv_ptr + slot[:, None] * stride_ckv + offs_l[None, :], mask=mask_n[:, None], other=0.0)
            k_row = kpe_ptr + slot[:, None] * stride_kpe + 2 * half[None, :]
            k_e = tl.load(k_row, mask=mask_n[:, None], other=0.0)
            k_o = tl.load(k_row + 1, mask=mask_n[:, None], other=0.0)
            s = tl.dot(q_l, tl.trans(kv))
            if DR // 2 >= 16:
                s += tl.dot(q_e, tl.trans(k_e)) + tl.dot(q_o, tl.trans(k_o))
            else:  # small test models: tensor-core products need K >= 16
                s += tl.sum(q_e.to(tl.float32)[:, None, :] * k_e.to(tl.float32)[None, :, :], axis=2)
                s += tl.sum(q_o.to(tl.float32)[:, None, :] * k_o.to(tl.float32)[None, :, :], axis=2)
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
                         scale: float, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                         lens_from_positions: bool = False, q_pe: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 definition: gather every row's table (static width, so no host sync), mask by length.

    q [B, H, R+dr] (or [B, H, R] with the rope part apart in ``q_pe`` [B, H, dr], which saves
    the caller a concatenation); c_kv [slots, R]; k_pe [slots, dr]; block_tables [B, nb];
    seq_lens [B].
    ``rope`` = (cos, sin) [B, dr/2]: rotate q's last dr channels first (the kernel does it in
    its prologue).  ``lens_from_positions``: ``seq_lens`` holds the decode positions (length - 1).
    Returns [B, H, R] in q's dtype.
    """
    b, nb = block_tables.shape
    r = c_kv.shape[-1]
    if q_pe is not None:
        q = torch.cat((q, q_pe), dim=-1)
    if rope is not None:
        from ..rope import apply_rope

        cos, sin = rope
        q = torch.cat((q[..., :r], apply_rope(q[..., r:].unsqueeze(1), cos.unsqueeze(1), sin.unsqueeze(1))
                       .squeeze(1)), dim=-1)
    if lens_from_positions:
        seq_lens = seq_lens + 1
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
               block_n: int = 32, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
               lens_from_positions: bool = False, q_pe: torch.Tensor | None = None,
               block_h: int = 16, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Attention output in latent space ``[B, H, R]``; shapes and options as in
    :func:`mla_decode_reference`. ``block_h`` heads share a program's reads of the row's keys:
    16 serves few rows (more programs); wider blocks serve many rows, with ``block_n`` keys an
    iteration (fewer rescales of the [block_h, 512] accumulator) and ``num_stages`` loads in
    flight. The tables' values: ``tuning.mla_config``; bench/mla_rows_bench.py sweeps them."""
    if not use_triton(q, c_kv):
        return mla_decode_reference(q, c_kv, k_pe, block_tables, seq_lens, page, scale, rope,
                                    lens_from_positions, q_pe)
    r, dr = c_kv.shape[-1], k_pe.shape[-1]
    if q_pe is None:
        q, q_pe = q[..., :r], q[..., r:]
    bsz, h, _ = q.shape
    assert q.shape[-1] == r and q_pe.shape[-1] == dr and q.stride(-1) == 1 and q_pe.stride(-1) == 1
    assert c_kv.stride(-1) == 1 and k_pe.stride(-1) == 1
    out_dtype = q.dtype
    if INTERPRET:  # the CPU interpreter mis-evaluates bf16 tl.dot; check the indexing in fp32
        q, q_pe, c_kv, k_pe = q.float(), q_pe.float(), c_kv.float(), k_pe.float()
    splits = num_splits or num_splits_for(bsz, h, block_h=block_h)
    part_o = torch.empty(bsz, h, splits, r, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(bsz, h, splits, dtype=torch.float32, device=q.device)
    seq_lens = seq_lens.reshape(-1)
    cos, sin = (rope[0].reshape(bsz, -1), rope[1].reshape(bsz, -1)) if rope is not None else (q, q)
    _mla_split_kernel[(triton.cdiv(h, block_h), bsz, splits)](
        q, q_pe, c_kv, k_pe, block_tables, seq_lens, part_o, part_lse, cos, sin, h, scale,
        q.stride(0), q.stride(1), q_pe.stride(0), q_pe.stride(1), c_kv.stride(0), k_pe.stride(0),
        block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), cos.stride(0),
        PAGE=page, NUM_SPLITS=splits, DL=r, DR=dr, ROPE=rope is not None,
        LEN_FROM_POS=lens_from_positions, BLOCK_H=block_h, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(bsz, h, r, dtype=out_dtype, device=q.device)
    _mla_merge_kernel[(h, bsz)](
        part_o, part_lse, out, h, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        out.stride(0), out.stride(1), NUM_SPLITS=splits, DL=r, num_warps=4)
    return out
