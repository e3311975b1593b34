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

``auto`` picks whichever costs fewer FLOPs for the (queries, keys) shape at hand (without a
cache, always expand).  The attention itself is an op: :meth:`~model_host.ops.Ops.mla_decode`
(absorbed) and :meth:`~model_host.ops.Ops.mla_prefill` (expanded, rows as packed sequences).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from .cache import LatentCache
from .config import ModelConfig
from .fp8 import Linear
from .layers import RMSNorm
from .ops import Ops
from .rope import apply_rope

MLA_MODES = ("auto", "absorb", "expand")


@dataclass(frozen=True)
class Varlen:
    """Several sequences packed into one row of queries (a serving step's prefill chunks).

    Sequence i owns queries ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of the row and keys
    ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of ``key_slots``: its whole context (cached prefix,
    earlier chunks, this chunk), so its queries are the last of its keys.  The cache is paged:
    ``slots`` [Tq] are the flat rows the new latents go to, ``key_slots`` [Tk] the rows read.
    ``cu_seqlens_*``: int32 [n + 1] host tensors.
    """

    slots: torch.Tensor
    key_slots: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor


@dataclass
class AttentionBatch:
    """Everything attention needs about the batch, built once per forward and shared by layers.

    positions: [B, S] absolute position of each query token (increasing by one along a row).
    cos, sin:  [B, S, rope_dim/2] rotary tables for those positions.
    cache:     latent cache, or None to attend only within this chunk.
    kv_len:    number of cache positions to read (max over rows of last position + 1).
    mask:      [B, 1, S, T] bool, True where query may attend key (causal by position).
    mode:      "auto" | "absorb" | "expand".
    slots:     [B*S] flat cache rows of the new tokens, where the cache offers them (paged).
    causal:    the mask is exactly lower-triangular (keys = these tokens, in order), so
               attention may use ``is_causal`` kernels that skip the masked half.
    varlen:    the one row holds packed sequences (no mask: each sequence is masked by
               :meth:`~model_host.ops.Ops.mla_prefill` on its own).
    """

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: LatentCache | None
    kv_len: int
    mask: torch.Tensor | None
    mode: str = "auto"
    slots: torch.Tensor | None = None
    causal: bool = False
    varlen: Varlen | None = None

    def seqlens(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(key lengths, cu_seqlens_q, cu_seqlens_k) of the rows as packed sequences for
        :meth:`~model_host.ops.Ops.mla_prefill`: row b's S queries are the last of its keys
        ``0 .. positions[b, -1]``.  Host-side; reads positions back only for several cached rows."""
        if self.varlen is not None:
            cu_q, cu_k = self.varlen.cu_seqlens_q, self.varlen.cu_seqlens_k
            return cu_k.diff().tolist(), cu_q, cu_k
        b, s = self.positions.shape
        if self.cache is None:
            k_lens = [s] * b
        elif b == 1:
            k_lens = [self.kv_len]
        else:
            k_lens = (self.positions[:, -1] + 1).tolist()
        cu_q = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
        return k_lens, cu_q, torch.tensor([0, *itertools.accumulate(k_lens)], dtype=torch.int32)


def build_attention_batch(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None,
                          kv_len: int | None = None, mode: str = "auto", varlen: Varlen | None = None
                          ) -> AttentionBatch:
    """Causal mask by absolute position: a query at p sees keys at positions <= p.

    With a cache, key t is cache position t (rows are left-aligned: row b's token at position p
    lives at index p), so ragged batches need no padding mask.  Without a cache, the keys are
    this chunk's own tokens at ``positions``.
    """
    if mode not in MLA_MODES:
        raise ValueError(f"mla mode {mode!r} not in {MLA_MODES}")
    if varlen is not None:  # packed prefill chunks: expanded attention per sequence
        return AttentionBatch(positions, cos, sin, cache, 0, None, "expand", varlen.slots, varlen=varlen)
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
    slots = cache.slot_mapping(positions) if cache is not None else None
    return AttentionBatch(positions, cos, sin, cache, kv_len, mask.unsqueeze(1), mode, slots, causal)


def absorb_is_cheaper(cfg: ModelConfig, s: int, t: int) -> bool:
    """Whether ``s`` query tokens attending to ``t`` keys cost fewer FLOPs absorbed (in latent
    space, as decode rows) than expanded (K/V projected out of the latents first). Per head the
    expansion costs ``r * (dn + dv)`` per key, the latent attention ``2r + dr`` per (query, key)
    pair instead of ``dn + dr + dv``: a few new tokens after a long cached prefix (a RAG prompt
    that hits the prefix cache) are far cheaper absorbed, a fresh prompt expanded."""
    r, dr, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    expand = t * (dn + dv) * r + s * t * (dn + dr + dv)  # per head: expand K/V, then attend
    absorb = s * (dn + dv) * r + s * t * (2 * r + dr)  # per head: project q/out, attend in latent
    return absorb <= expand


class MLA(nn.Module):
    """MLA block; submodule names match the checkpoint's ``self_attn.*`` tensors."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cfg = cfg
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
        if s == 1:  # decode: cheaper from t = 2 on, and the paged kernel ignores kv_len (graphs pass 1)
            return True
        return absorb_is_cheaper(self.cfg, s, t)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: AttentionBatch, ops: Ops) -> torch.Tensor:
        """Attention in latent space: W_UK folded into the query, W_UV into the output."""
        w = ops.dense_weight(self.kv_b_proj, q_nope.dtype).view(self.n_heads, self.nope + self.v_dim, -1)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # [H, dn, R], [H, dv, R]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        o_lat = ops.mla_decode(q_lat, q_pe, batch, self.layer_idx, self.scale)
        return torch.einsum("bshc,hdc->bshd", o_lat, w_uv)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                  batch: AttentionBatch, ops: Ops) -> torch.Tensor:
        """Standard attention on K/V expanded from the latents, the rows packed as sequences."""
        b, s = q_nope.shape[:2]
        k_lens, cu_q, cu_k = batch.seqlens()
        if batch.varlen is None and (b > 1 or c_kv.shape[1] != k_lens[0]):  # each row's own keys, packed
            c_kv = torch.cat([c_kv[i, :n] for i, n in enumerate(k_lens)])
            k_pe = torch.cat([k_pe[i, :n] for i, n in enumerate(k_lens)])
        else:
            c_kv, k_pe = c_kv[0], k_pe[0]
        kv = ops.linear(c_kv, self.kv_b_proj).view(-1, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = ops.concat_heads(q_nope, q_pe, (batch.cos, batch.sin)).flatten(0, 1)
        k = ops.concat_heads(k_nope.unsqueeze(0), k_pe[None, :, None])[0]
        return ops.mla_prefill(q, k, v, cu_q, cu_k, self.scale).view(b, s, self.n_heads, self.v_dim)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, ops: Ops) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; writes this chunk's latents to ``batch.cache`` first."""
        b, s, _ = x.shape
        # V2-style configs (q_lora_rank null) project the query directly.
        if self.q_lora:
            q_a, kv_a = ops.linears(x, (self.q_a_proj, self.kv_a_proj_with_mqa))
            q = ops.linear(ops.rms_norm(q_a, self.q_a_layernorm).out, self.q_b_proj)
        else:
            q, kv_a = ops.linears(x, (self.q_proj, self.kv_a_proj_with_mqa))
        q_nope, q_pe = q.view(b, s, self.n_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)

        if batch.cache is None:  # the chunk attends itself: S == T, where expanding is cheaper
            c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
            c_kv = ops.rms_norm(c_kv, self.kv_a_layernorm).out
            out = self._expanded(q_nope, q_pe, c_kv, apply_rope(k_pe, batch.cos, batch.sin), batch, ops)
        else:
            ops.store_latents(kv_a, self.kv_a_layernorm, batch, self.layer_idx)
            if batch.varlen is not None:  # each packed sequence's keys, gathered from the paged cache
                c_all, pe_all = batch.cache.flat(self.layer_idx)
                keys = batch.varlen.key_slots
                out = self._expanded(q_nope, q_pe, c_all[keys][None].to(x.dtype), pe_all[keys][None].to(x.dtype),
                                     batch, ops)
            elif self._use_absorb(s, batch.kv_len, batch.mode):
                out = self._absorbed(q_nope, q_pe, batch, ops)
            else:
                c_kv, k_pe = (t.to(x.dtype) for t in batch.cache.read(self.layer_idx, batch.kv_len))
                out = self._expanded(q_nope, q_pe, c_kv, k_pe, batch, ops)
        return ops.linear(out.reshape(b, s, self.n_heads * self.v_dim), self.o_proj)
