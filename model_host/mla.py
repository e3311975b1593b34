"""Multi-head Latent Attention (MLA) over a latent KV cache.

Per token MLA projects the hidden state to a latent ``c_kv`` (kv_lora_rank, RMS-normalized)
plus one rope key ``k_pe`` shared by all heads; only those two go to the cache.  Keys and values
are ``kv_b_proj(c_kv)`` split per head into ``k_nope`` and ``v``.

Two mathematically equal ways to attend:

* **expand** (prefill): materialise k_nope / v for the attended positions and run ordinary
  attention with q = [q_nope | q_pe], k = [k_nope | k_pe].
* **absorb** (decode): fold W_UK into the query (q_nope @ W_UK -> a query in latent space) and
  W_UV into the output, so attention runs directly on the cached latents as multi-query
  attention with 576-dim keys (c_kv | k_pe) and 512-dim values (c_kv).  K/V are never expanded.

``auto`` picks whichever costs fewer FLOPs for the (queries, keys) shape at hand.  The attention
math lives in :func:`attend_expanded` / :func:`attend_absorbed`; storage lives in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import LatentCache
from .config import ModelConfig
from .fp8 import Linear, get_backend
from .layers import RMSNorm
from .rope import apply_rope

MLA_MODES = ("auto", "absorb", "expand")


@dataclass
class AttentionBatch:
    """Everything attention needs about the batch, built once per forward and shared by layers.

    positions: [B, S] absolute position of each query token.
    cos, sin:  [B, S, rope_dim/2] rotary tables for those positions.
    cache:     latent cache, or None to attend only within this chunk.
    kv_len:    number of cache positions to read (max over rows of last position + 1).
    mask:      [B, 1, S, T] bool, True where query may attend key (causal by position).
    mode:      "auto" | "absorb" | "expand".
    slots:     [B*S] flat cache rows of the new tokens, where the cache offers them (paged).
    causal:    the mask is exactly lower-triangular (keys = these tokens, in order), so
               attention may use ``is_causal`` kernels that skip the masked half.
    """

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: LatentCache | None
    kv_len: int
    mask: torch.Tensor
    mode: str = "auto"
    slots: torch.Tensor | None = None
    causal: bool = False


def build_attention_batch(
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: LatentCache | None,
    kv_len: int | None = None,
    mode: str = "auto",
) -> AttentionBatch:
    """Causal mask by absolute position: a query at p sees keys at positions <= p.

    With a cache, key t is cache position t (rows are left-aligned: row b's token at position p
    lives at index p), so ragged batches need no padding mask.  Without a cache, the keys are
    this chunk's own tokens at ``positions``.
    """
    if mode not in MLA_MODES:
        raise ValueError(f"mla mode {mode!r} not in {MLA_MODES}")
    # Lower-triangular without looking at the values (no host sync): a chunk's positions
    # increase along each row, so with no cache its keys are its own tokens in order; with a
    # cache, one row whose chunk is its whole context holds exactly positions 0..S-1.
    if cache is None:
        key_pos = positions
        kv_len = positions.shape[1]
    else:
        if kv_len is None:
            kv_len = int(positions.max()) + 1  # one host sync per forward, not per layer
        key_pos = torch.arange(kv_len, device=positions.device).expand(positions.shape[0], kv_len)
    b, s = positions.shape
    causal = cache is None or (b == 1 and kv_len == s)
    mask = key_pos.unsqueeze(1) <= positions.unsqueeze(2)  # [B, S, T]
    slot_mapping = getattr(cache, "slot_mapping", None)
    slots = slot_mapping(positions) if slot_mapping is not None else None
    return AttentionBatch(positions, cos, sin, cache, kv_len, mask.unsqueeze(1), mode, slots, causal)


def attend_expanded(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Standard attention on expanded heads.

    q_nope [B,S,H,dn], q_pe [B,S,H,dr], k_nope [B,T,H,dn], k_pe [B,T,dr], v [B,T,H,dv],
    mask [B,1,S,T] (None: causal with S == T) -> [B,S,H,dv].  ``rope`` = (cos, sin) of the
    queries when q_pe is not rotated yet (it is rotated while the query is assembled).
    """
    q = concat_heads(q_nope, q_pe, rope).transpose(1, 2)
    k = concat_heads(k_nope, k_pe.unsqueeze(2)).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
                                         scale=scale)
    return out.transpose(1, 2)


def concat_heads(nope: torch.Tensor, pe: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[nope | rope(pe)]`` per head (pe [B, T, H or 1, dr]; rope None: already rotated)."""
    fused = getattr(get_backend(), "concat_heads", None)
    if fused is not None and (out := fused(nope, pe, rope)) is not None:
        return out
    if rope is not None:
        pe = apply_rope(pe, *rope)
    return torch.cat((nope, pe.expand(*nope.shape[:-1], pe.shape[-1])), dim=-1)


def attend_absorbed(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention in latent space (weights absorbed), as MQA over the cached latents.

    q_nope [B,S,H,dn], q_pe [B,S,H,dr], c_kv [B,T,R], k_pe [B,T,dr],
    w_uk [H,dn,R], w_uv [H,dv,R], mask [B,1,S,T] (None: causal with S == T) -> [B,S,H,dv].
    score = (q_nope W_uk) . c_kv + q_pe . k_pe ;  out = (softmax . c_kv) W_uv^T
    """
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
    q = torch.cat((q_lat, q_pe), dim=-1).transpose(1, 2)  # [B,H,S,R+dr]
    k = torch.cat((c_kv, k_pe), dim=-1).unsqueeze(1)  # [B,1,T,R+dr]: one shared "head"
    o_lat = F.scaled_dot_product_attention(
        q, k, c_kv.unsqueeze(1), attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return torch.einsum("bhsc,hdc->bshd", o_lat, w_uv)


class MLA(nn.Module):
    """MLA block; submodule names match the checkpoint's ``self_attn.*`` tensors."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        fp8 = cfg.quantization.block_size if cfg.quantization else None
        kw = dict(fp8_block=fp8, dtype=dtype, device=device)
        d, h, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        self.q_lora = cfg.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = Linear(d, h * qk, **kw)
        else:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype=dtype, device=device)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * qk, **kw)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), **kw)
        self.o_proj = Linear(h * cfg.v_head_dim, d, **kw)

    def _use_absorb(self, s: int, t: int, mode: str) -> bool:
        if mode != "auto":
            return mode == "absorb"
        h, r, dr, dn, dv = self.n_heads, self.kv_lora_rank, self.rope, self.nope, self.v_dim
        expand = t * h * (dn + dv) * r + s * h * t * (dn + dr + dv)  # expand K/V, then attend
        absorb = s * h * (dn + dv) * r + s * h * t * (2 * r + dr)  # project q/out, attend in latent
        return absorb <= expand

    def _absorb_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, dn, R], W_UV [H, dv, R]) views of the dense kv_b_proj weight."""
        w = self.kv_b_proj.dense_weight(dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)
        return w_uk, w_uv

    def _decode_paged(self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """One decode token per row, attended by the cache's paged latent kernel (absorbed form).

        ``q_pe`` is not rotated yet: the kernel applies RoPE in its prologue.  It reads each
        row's length from ``positions`` (on the device) and walks the block table itself, so
        nothing depends on ``kv_len`` or the mask: the step can be replayed from a CUDA graph
        at any context length.
        """
        w_uk, w_uv = self._absorb_weights(q_nope.dtype)
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)[:, 0]  # [B, H, R]
        o_lat = batch.cache.attend_decode(self.layer_idx, q_lat, batch.positions[:, 0], self.scale,
                                          rope=(batch.cos[:, 0], batch.sin[:, 0]), q_pe=q_pe[:, 0])
        return torch.einsum("bhc,hdc->bhd", o_lat, w_uv).unsqueeze(1)

    def _down_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_a_proj(x), kv_a_proj_with_mqa(x)): both read the same input, so a backend may run
        them as one GEMM over the concatenated weights (one launch and one pass over x)."""
        fused = getattr(get_backend(), "linears", None)
        if fused is not None and (out := fused(x, (self.q_a_proj, self.kv_a_proj_with_mqa))) is not None:
            return out
        return self.q_a_proj(x), self.kv_a_proj_with_mqa(x)

    def _latents(self, kv_a: torch.Tensor, batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized c_kv [B, S, R], rotated k_pe [B, S, dr]) of this chunk's tokens."""
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, batch.cos, batch.sin)

    def _store_latents(self, kv_a: torch.Tensor, batch: AttentionBatch) -> None:
        """Write this chunk's latents to the cache: one fused launch (norm + rope + slot write)
        where the backend has it and the cache exposes flat slots, else the PyTorch path."""
        store = getattr(get_backend(), "store_latents", None)
        if store is not None and batch.slots is not None:
            c_kv, k_pe = batch.cache.flat(self.layer_idx)
            norm = self.kv_a_layernorm
            if store(kv_a.reshape(-1, kv_a.shape[-1]), norm.weight, norm.eps, batch.cos, batch.sin,
                     batch.slots, c_kv, k_pe):
                return
        batch.cache.write(self.layer_idx, batch.positions, *self._latents(kv_a, batch))

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; writes this chunk's latents to ``batch.cache`` first."""
        b, s, _ = x.shape
        # V2-style configs (q_lora_rank null) project the query directly.
        if self.q_lora:
            q_a, kv_a = self._down_projections(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        q = q.view(b, s, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)

        if batch.cache is None:
            c_kv, k_pe = self._latents(kv_a, batch)
        else:
            self._store_latents(kv_a, batch)
            if s == 1 and getattr(batch.cache, "decode_kernel", False):
                out = self._decode_paged(q_nope, q_pe, batch)
                return self.o_proj(out.reshape(b, s, self.n_heads * self.v_dim))
            c_kv, k_pe = batch.cache.read(self.layer_idx, batch.kv_len)
            c_kv, k_pe = c_kv.to(x.dtype), k_pe.to(x.dtype)

        mask = None if batch.causal else batch.mask
        if self._use_absorb(s, c_kv.shape[1], batch.mode):
            w_uk, w_uv = self._absorb_weights(x.dtype)
            q_pe = apply_rope(q_pe, batch.cos, batch.sin)
            out = attend_absorbed(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, self.scale)
        else:
            kv = self.kv_b_proj(c_kv).view(b, c_kv.shape[1], self.n_heads, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            out = attend_expanded(q_nope, q_pe, k_nope, k_pe, v, mask, self.scale, rope=(batch.cos, batch.sin))
        return self.o_proj(out.reshape(b, s, self.n_heads * self.v_dim))
