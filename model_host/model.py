"""DeepSeek-V3: decoder layers, the full model, and the multi-token-prediction (MTP) module.

Module names mirror the checkpoint with the ``model.`` prefix dropped (``layers.3.mlp.gate``),
except routed experts, which are stacked (``layers.3.mlp.experts.gate_proj.weight`` [E, ...]),
and the MTP layer ``model.layers.{num_hidden_layers}.*``, which lives at ``mtp.0.*``.

Forward contract (what a serving engine calls)::

    out = model(input_ids [B, S], positions [B, S], cache)      # prefill or decode alike
    out.logits  # [B, S, V] fp32 (or [B, 1, V] with last_only=True)
    out.hidden  # [B, S, D] final-normed hidden states (input to lm_head and to MTP), all positions

Positions are absolute per row; the cache holds row b's token at position p in slot p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import ContiguousLatentCache, LatentCache
from .config import ModelConfig
from .fp8 import Linear
from .layers import Embedding, RMSNorm
from .mla import MLA, AttentionBatch, Varlen, build_attention_batch
from .moe import MLP, MoE
from .ops import Ops, TorchOps
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """logits: [B, S', V] float32 (S' = 1 if last_only); hidden: [B, S, D] after the final norm
    (every position: the MTP layer drafts from a whole prefill chunk's hidden states)."""

    logits: torch.Tensor
    hidden: torch.Tensor


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + ffn(norm(h))`` (dense MLP or MoE)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        fp8 = cfg.quantization.block_size if cfg.quantization else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = MLA(cfg, layer_idx, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(cfg, dtype=dtype, device=device)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fp8_block=fp8, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, ops: Ops) -> torch.Tensor:
        delta, h = self.residual_forward(x, None, batch, ops)
        return h + delta

    def residual_forward(self, delta: torch.Tensor, residual: torch.Tensor | None,
                         batch: AttentionBatch, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on a residual stream carried as ``residual + delta`` (``delta`` alone when
        ``residual`` is None) -> (this layer's ffn output, the stream before it is added).

        Leaving each add to the next norm fuses it there (one launch for add + RMSNorm, as
        vLLM does) instead of a separate elementwise add per layer; the sums are the same.
        """
        if residual is None:
            normed = ops.rms_norm(delta, self.input_layernorm)
        else:
            normed = ops.rms_norm(residual, self.input_layernorm, residual=delta)
        attn = self.self_attn(normed.out, batch, ops)
        # The post-attention norm feeds the FP8 MoE / MLP: the backend may quantize it in the same pass.
        normed = ops.rms_norm(normed.residual, self.post_attention_layernorm, residual=attn, quantize=True)
        return self.mlp(normed.out, ops, normed.quant), normed.residual


class LMHead(Linear):
    """The vocabulary projection (``lm_head``, the MTP ``shared_head.head``): fp32 logits.

    A module call rather than a bare ``ops.linear`` so that tensor parallelism can gather the
    vocabulary shards of the logits in one place (:class:`model_host.parallel.VocabParallelHead`).
    """

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.linear(x, self).float()


class SharedHead(nn.Module):
    """MTP output head: ``head(norm(h))`` (``shared_head.norm`` / ``shared_head.head``)."""

    def __init__(self, cfg: ModelConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.head = LMHead(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module (checkpoint layer ``num_hidden_layers``).

    Given the main model's final-normed hidden state h_i at position i and the embedding of the
    *next* token t_{i+1}, it predicts t_{i+2}:
        h' = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])    (embedding first, as vLLM/SGLang)
        h'' = decoder_block(h')  at rope position i, with its own latent-cache layer
        logits = shared_head.head(shared_head.norm(h''))
    """

    def __init__(self, cfg: ModelConfig, *, dtype=None, device=None) -> None:
        super().__init__(cfg, cfg.num_hidden_layers, dtype=dtype, device=device)
        d = cfg.hidden_size
        self.embed_tokens = Embedding(cfg.vocab_size, d, dtype=dtype, device=device)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.eh_proj = Linear(2 * d, d, dtype=dtype, device=device)  # bf16 in V3, never FP8
        self.shared_head = SharedHead(cfg, dtype=dtype, device=device)

    def forward(self, next_ids: torch.Tensor, prev_hidden: torch.Tensor, batch: AttentionBatch,
                ops: Ops) -> torch.Tensor:  # type: ignore[override]
        e = ops.rms_norm(self.embed_tokens(next_ids), self.enorm).out
        h = torch.cat((e, ops.rms_norm(prev_hidden.to(e.dtype), self.hnorm).out), dim=-1)
        h = super().forward(ops.linear(h, self.eh_proj), batch, ops)
        return ops.rms_norm(h, self.shared_head.norm).out


class DeepseekV3(nn.Module):
    """The DeepSeek-V3 decoder (plus optional MTP).  Build on ``meta`` and fill with the loader."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        with_mtp: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        # The kernels every layer calls (model_host.ops); assign another backend to switch.
        self.ops: Ops = ops if ops is not None else TorchOps()
        d = cfg.hidden_size
        self.embed_tokens = Embedding(cfg.vocab_size, d, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype=dtype, device=device) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = LMHead(d, cfg.vocab_size, dtype=dtype, device=device)
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        if with_mtp and not n_mtp:
            raise ValueError("with_mtp=True but config.num_nextn_predict_layers is 0")
        self.mtp = nn.ModuleList(MTPLayer(cfg, dtype=dtype, device=device) for _ in range(n_mtp))
        self.rotary = RotaryEmbedding(cfg, device=None if str(device) == "meta" else device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def num_cache_layers(self) -> int:
        """Cache layers needed: decoder layers, plus one for the MTP layer when present."""
        return self.cfg.num_hidden_layers + len(self.mtp)

    def new_cache(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None
                  ) -> ContiguousLatentCache:
        """A contiguous latent cache sized for this model (MTP layer included if loaded)."""
        return ContiguousLatentCache.for_config(self.cfg, batch_size, max_seq_len, include_mtp=len(self.mtp) > 0,
                                                dtype=dtype or self.dtype, device=self.device)

    def attention_batch(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                        cache: LatentCache | None = None, kv_len: int | None = None,
                        mla_mode: str = "auto", varlen: Varlen | None = None) -> AttentionBatch:
        """Rotary tables + causal mask for one forward, shared by every layer."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin = self.rotary(positions)
        return build_attention_batch(positions, cos, sin, cache, kv_len, mla_mode, varlen)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: LatentCache | None = None,
                *, kv_len: int | None = None, last_only: bool = False, mla_mode: str = "auto",
                varlen: Varlen | None = None, logits_at: torch.Tensor | None = None) -> ModelOutput:
        """Run ``input_ids`` [B, S] at absolute ``positions`` [B, S] (default 0..S-1).

        With a ``cache`` the new latents are written at ``positions`` and attention reads cache
        positions ``0..kv_len-1`` (default ``max(positions) + 1``), so the same call serves a
        prompt prefill, a chunked prefill and a batched decode step.  Without a cache the
        tokens attend only to each other.  ``last_only`` computes logits for the last column only.

        ``varlen``: the one row holds several sequences packed (a serving step's prefill chunks,
        see :class:`~model_host.mla.Varlen`); ``logits_at`` [m] picks the positions whose logits are
        computed, as indices into the flattened [B * S] (a packed row's columns, or a decode step's
        rows: each finished prompt's last token) -> logits [1, m, V].
        """
        batch = self.attention_batch(input_ids, positions, cache, kv_len, mla_mode, varlen)
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer.residual_forward(x, residual, batch, self.ops)
        hidden = (self.ops.rms_norm(x, self.norm) if residual is None
                  else self.ops.rms_norm(residual, self.norm, residual=x)).out
        # Logits only where asked; the hidden states of every position stay (the MTP layer drafts
        # from a whole prefill chunk's).
        shown = (hidden[:, -1:] if last_only else hidden if logits_at is None
                 else hidden.flatten(0, 1)[logits_at].unsqueeze(0))
        return ModelOutput(self.lm_head(shown, self.ops), hidden)

    @torch.no_grad()
    def mtp_forward(
        self,
        next_ids: torch.Tensor,
        prev_hidden: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        kv_len: int | None = None,
        mla_mode: str = "auto",
    ) -> ModelOutput:
        """Draft the token after next: logits for t_{i+2} from (t_{i+1}, hidden_i) at position i.

        ``prev_hidden`` is ``ModelOutput.hidden`` of the main model at the same positions; the
        MTP layer uses cache layer ``num_hidden_layers``.
        """
        if not len(self.mtp):
            raise RuntimeError("model was built without the MTP module (load with load_mtp=True)")
        batch = self.attention_batch(next_ids, positions, cache, kv_len, mla_mode)
        mtp = self.mtp[0]
        h = mtp(next_ids, prev_hidden, batch, self.ops)
        return ModelOutput(mtp.shared_head.head(h, self.ops), h)
