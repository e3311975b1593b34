"""Every op the model calls, in one interface, and its PyTorch reference.

The model (:mod:`.model`, :mod:`.mla`, :mod:`.moe`) owns its math and its parameters and calls
the ops of the :class:`Ops` it was built with (``DeepseekV3(cfg, ops=...)``, ``model.ops``).
A backend owns only kernels and its own prepared-weight state (dequantized or concatenated
copies), kept in the backend and keyed by module, never written onto the modules.  Calls go
one way: model -> ops.  Backends:

* :class:`TorchOps` (here) - the reference, plain PyTorch on any device;
* :class:`model_host.kernels.backend.TritonOps` - FP8 / grouped GEMMs, fused norms, routing and
  the paged MLA decode kernel on CUDA; every op falls back to the reference for CPU tensors.

Ops (shapes per method):

* linears:   ``dense_weight``, ``linear``, ``linears`` (several of one input), ``swiglu``;
* MoE:       ``route`` -> :class:`Routing`, then ``moe`` (routed experts + shared expert);
* norms:     ``rms_norm`` (+ residual add, + FP8 quantization of its output) -> :class:`Normed`;
* attention: ``store_latents`` (norm + rope + cache write), ``concat_heads`` ([nope | rope]),
  ``mla_decode`` (absorbed, over the cache) and ``mla_prefill`` (expanded, packed sequences).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .fp8 import Linear, StackedLinear, block_dequantize, grouped_mm
from .rope import apply_rope

if TYPE_CHECKING:
    from .layers import RMSNorm
    from .mla import AttentionBatch
    from .moe import MLP, Experts, Gate


@dataclass(frozen=True)
class Routing:
    """Experts chosen per token: ``weights`` [N, k] fp32 (normalized and scaled), ``indices`` [N, k]."""

    weights: torch.Tensor
    indices: torch.Tensor


class Normed(NamedTuple):
    """Result of :meth:`Ops.rms_norm`: ``out = norm(h)``, ``residual = h`` (``x + residual``, or
    ``x``), ``quant``: the backend's FP8 form of ``out`` when asked for and made in the same pass
    (opaque; hand it to ``moe`` / ``swiglu`` as ``x_quant``), else None."""

    out: torch.Tensor
    residual: torch.Tensor
    quant: tuple | None = None


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [N*k], counts [E] int32): the flat (token, slot) pairs in stable expert order, and
    rows per expert.  Sorted row ``i`` is token ``order[i] // k``.  No bincount: it syncs on CUDA."""
    flat = indices.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int32, device=indices.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return torch.argsort(flat, stable=True), counts


class Ops(ABC):
    """The op interface; a backend implements all of it (see the module doc)."""

    @abstractmethod
    def precision_switches(self, cfg) -> tuple[int, ...]:
        """Row counts of a step of single-token rows past which this backend's kernels round
        activations differently (CUDA graphs pad a step only within two switches, so a padded
        step rounds as the same step run eagerly); () where nothing switches."""

    @abstractmethod
    def dense_weight(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        """``layer``'s weight as a dense ``dtype`` tensor (dequantized if FP8)."""

    @abstractmethod
    def linear(self, x: torch.Tensor, layer: Linear) -> torch.Tensor:
        """``x [..., in] @ W^T -> [..., out]``."""

    @abstractmethod
    def linears(self, x: torch.Tensor, layers: tuple[Linear, ...]) -> tuple[torch.Tensor, ...]:
        """``linear(x, l)`` for each of ``layers`` (one GEMM over their concatenation where it can)."""

    @abstractmethod
    def swiglu(self, x: torch.Tensor, mlp: MLP, x_quant: tuple | None = None) -> torch.Tensor:
        """``down(silu(gate(x)) * up(x))``; ``x_quant``: :attr:`Normed.quant` of ``x``."""

    @abstractmethod
    def route(self, x: torch.Tensor, gate: Gate) -> Routing:
        """Expert choice of tokens ``x`` [N, D] from fp32 router logits (see :mod:`.moe`)."""

    @abstractmethod
    def moe(self, x: torch.Tensor, experts: Experts, routing: Routing, shared: MLP | None,
            x_quant: tuple | None = None) -> torch.Tensor:
        """``sum_k w_k * expert_k(x) + shared(x)`` for ``x`` [N, D] -> [N, D]."""

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor | None = None,
                 quantize: bool = False) -> Normed:
        """RMSNorm (fp32 statistics) of ``h = x + residual`` (``h`` rounded to x's dtype first);
        ``quantize``: the output feeds FP8 GEMMs, so the backend may quantize it in the same pass."""

    @abstractmethod
    def store_latents(self, kv_a: torch.Tensor, norm: RMSNorm, batch: AttentionBatch, layer: int) -> None:
        """Write ``(norm(c_kv), rope(k_pe))`` of ``kv_a`` [B, S, R+dr] to ``batch.cache`` at
        ``batch.positions``, cache layer ``layer``."""

    @abstractmethod
    def concat_heads(self, nope: torch.Tensor, pe: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``[nope | rope(pe)]`` per head: nope [B, T, H, dn], pe [B, T, H or 1, dr] (one head
        shared by all), rope = (cos, sin) [B, T, dr/2] or None (pe already rotated)."""

    @abstractmethod
    def mla_decode(self, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: AttentionBatch, layer: int,
                   scale: float) -> torch.Tensor:
        """Absorbed MLA over the cached latents of ``layer``: q_lat [B, S, H, R] (W_UK folded in),
        q_pe [B, S, H, dr] not rotated yet; queries at ``batch.positions`` see keys at positions
        <= theirs.  Returns the latent output [B, S, H, R] (W_UV not applied)."""

    @abstractmethod
    def mla_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
        """Expanded attention over packed sequences: q [Tq, H, D], k [Tk, H, D], v [Tk, H, dv];
        sequence i owns rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q and likewise of k / v
        (int32 [n+1]).  Its queries are the last of its keys (a cached prefix comes first), and
        each attends causally: query j of ``lq`` sees keys ``0 .. lk - lq + j``.  -> [Tq, H, dv]."""


class TorchOps(Ops):
    """The reference: dequantize FP8 weights to the activation dtype and use plain torch ops.

    ``cache_dequantized=False`` (default) dequantizes on every call, so memory stays at the FP8
    size; ``True`` keeps one dense copy per layer here (fast, ~2-4x the FP8 weight memory).
    """

    def __init__(self, cache_dequantized: bool = False) -> None:
        self.cache_dequantized = cache_dequantized
        self._dense: weakref.WeakKeyDictionary[Linear, torch.Tensor] = weakref.WeakKeyDictionary()

    def precision_switches(self, cfg) -> tuple[int, ...]:
        return ()  # one path at every row count

    def dense_weight(self, layer: Linear, dtype: torch.dtype) -> torch.Tensor:
        w = layer.weight
        if not layer.is_fp8:
            return w if w.dtype == dtype else w.to(dtype)
        cached = self._dense.get(layer)
        if cached is not None and cached.dtype == dtype and cached.device == w.device:
            return cached
        dense = block_dequantize(w, layer.weight_scale_inv, layer.block, dtype)
        if self.cache_dequantized:
            self._dense[layer] = dense
        return dense

    def linear(self, x: torch.Tensor, layer: Linear) -> torch.Tensor:
        return F.linear(x, self.dense_weight(layer, x.dtype))

    def linears(self, x: torch.Tensor, layers: tuple[Linear, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(self.linear(x, lin) for lin in layers)

    def swiglu(self, x: torch.Tensor, mlp: MLP, x_quant: tuple | None = None) -> torch.Tensor:
        return self.linear(F.silu(self.linear(x, mlp.gate_proj)) * self.linear(x, mlp.up_proj), mlp.down_proj)

    def route(self, x: torch.Tensor, gate: Gate) -> Routing:
        # Router logits in fp32: near-ties between experts are common and bf16 would flip them.
        return gate.choose(F.linear(x.float(), gate.weight.float()))

    def grouped_linear(self, x: torch.Tensor, layer: StackedLinear, offsets: torch.Tensor) -> torch.Tensor:
        """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times expert ``e``'s weight (reference helper)."""
        if layer.is_fp8 and not self.cache_dequantized:
            # Dequantizing all 256 experts per call would need ~45 GB at V3 widths; dequantize
            # only experts that received tokens (one host sync on CUDA: fine for the reference).
            active = torch.nonzero(torch.diff(offsets, prepend=offsets.new_zeros(1))).squeeze(1)
            w = block_dequantize(layer.weight[active], layer.weight_scale_inv[active], layer.block, x.dtype)
            return grouped_mm(x, w, offsets[active])
        return grouped_mm(x, self.dense_weight(layer, x.dtype), offsets)

    def moe(self, x: torch.Tensor, experts: Experts, routing: Routing, shared: MLP | None,
            x_quant: tuple | None = None) -> torch.Tensor:
        order, counts = sort_by_expert(routing.indices, experts.num_experts)
        token = order // routing.indices.shape[1]
        offsets = counts.cumsum(0, dtype=torch.int32)
        xs = x[token]
        h = F.silu(self.grouped_linear(xs, experts.gate_proj, offsets)) * self.grouped_linear(
            xs, experts.up_proj, offsets)
        y = self.grouped_linear(h, experts.down_proj, offsets).float() * routing.weights.reshape(-1)[order, None]
        # Accumulate the k contributions per token in fp32, then return in activation dtype.
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, y).to(x.dtype)
        return out if shared is None else out + self.swiglu(x, shared)

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor | None = None,
                 quantize: bool = False) -> Normed:
        h = x if residual is None else x + residual
        # fp32 statistics: bf16 sum-of-squares over 7168 channels loses ~3 significant bits.
        return Normed(F.rms_norm(h.float(), (norm.dim,), norm.weight.float(), norm.eps).to(h.dtype), h)

    def store_latents(self, kv_a: torch.Tensor, norm: RMSNorm, batch: AttentionBatch, layer: int) -> None:
        c_kv, k_pe = kv_a.split([norm.dim, kv_a.shape[-1] - norm.dim], dim=-1)
        c_kv, k_pe = self.rms_norm(c_kv, norm).out, apply_rope(k_pe, batch.cos, batch.sin)
        if batch.varlen is None:
            batch.cache.write(layer, batch.positions, c_kv, k_pe)
            return
        # Packed sequences have no per-row block table to write through: their flat slots.
        c_all, pe_all = batch.cache.flat(layer)
        c_all.index_copy_(0, batch.slots, c_kv.reshape(-1, c_all.shape[-1]).to(c_all.dtype))
        pe_all.index_copy_(0, batch.slots, k_pe.reshape(-1, pe_all.shape[-1]).to(pe_all.dtype))

    def concat_heads(self, nope: torch.Tensor, pe: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if rope is not None:
            pe = apply_rope(pe, *rope)
        return torch.cat((nope, pe.expand(*nope.shape[:-1], pe.shape[-1])), dim=-1)

    def mla_decode(self, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: AttentionBatch, layer: int,
                   scale: float) -> torch.Tensor:
        c_kv, k_pe = (t.to(q_lat.dtype) for t in batch.cache.read(layer, batch.kv_len))
        q = torch.cat((q_lat, apply_rope(q_pe, batch.cos, batch.sin)), dim=-1).transpose(1, 2)  # [B,H,S,R+dr]
        k = torch.cat((c_kv, k_pe), dim=-1).unsqueeze(1)  # [B,1,T,R+dr]: one shared "head" (MQA)
        mask = None if batch.causal else batch.mask
        out = F.scaled_dot_product_attention(q, k, c_kv.unsqueeze(1), attn_mask=mask, is_causal=mask is None,
                                             scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    def mla_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True):
            out[q0:q1] = causal_attention(q[q0:q1], k[k0:k1], v[k0:k1], scale)
        return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence of :meth:`Ops.mla_prefill`: q [lq, H, D], k [lk, H, D], v [lk, H, dv], the
    queries being the last ``lq`` of the ``lk`` positions.  ``is_causal`` (flash kernels) when
    there is no cached prefix, else a bottom-right aligned mask."""
    lq, lk = q.shape[0], k.shape[0]
    # A lower-right causal bias, not a materialized [lq, lk] bool mask: with a mask SDPA falls
    # back to kernels that build the full score matrix (the prefix-hit tail of a RAG prompt:
    # 40 queries over 2,000 keys, every step at high load).
    mask = causal_lower_right(lq, lk) if lq != lk else None
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # 4-D: flash kernels want it
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)[0].transpose(0, 1)
