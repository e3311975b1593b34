"""Memory planner: does a model fit on N GPUs of M GiB each, and how many KV tokens remain?

Pure functions of a :class:`~model_host.config.ModelConfig`; no GPU, no checkpoint data.  Per
rank, under the layout of :mod:`model_host.sharding`:

* **weights**: every tensor's local part, as the loader keeps it in memory: FP8 projections one
  byte per value plus their fp32 ``weight_scale_inv`` blocks, the routing bias in fp32, all
  else in the activation dtype (BF16 on GPUs).  Replicated parts (q_a / kv_a, norms, router)
  count on every rank.  The MTP layer counts only when it is loaded (``serve`` does not).
* **latent KV cache**: ``(kv_lora_rank + qk_rope_head_dim) * layers * itemsize`` per token,
  on every rank, because the latent is replicated (each rank's heads read all of it): 70,272 B
  per token for V3 in BF16.
* **reserve**: a fixed 2 GiB for the CUDA context, NCCL buffers and CUDA-graph pools, plus the
  largest activations of one prefill of ``max_prefill_tokens`` (stated term by term in
  :func:`activation_bytes`).

What is left after weights and reserve becomes KV cache; the model fits when that is > 0 on
each rank.  1 GiB = 2**30 bytes (an "80 GB" H100 reports 79.6 GiB: pass what
``nvidia-smi`` shows, in GiB).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .sharding import Layout, ShardError
from .spec import checkpoint_layout

GiB = 2**30
FIXED_RESERVE = 2 * GiB  # CUDA context + NCCL buffers + CUDA-graph memory pools


@dataclass(frozen=True)
class Plan:
    """The memory plan of one model on ``gpus`` devices of ``gpu_bytes`` each."""

    gpus: int
    gpu_bytes: int
    weight_bytes: int  # per rank (all ranks hold the same amount)
    reserve_bytes: int
    kv_bytes_per_token: int
    fp8: bool
    error: str | None = None  # the layout itself is impossible (e.g. heads % gpus)
    enough_gpus: int | None = None  # when it does not fit: the fewest GPUs of this size that do

    @property
    def kv_bytes(self) -> int:
        """Bytes left for the latent KV cache on each rank (negative: does not fit)."""
        return self.gpu_bytes - self.weight_bytes - self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.error is None and self.kv_bytes >= self.kv_bytes_per_token

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_bytes, 0) // self.kv_bytes_per_token if self.fits else 0

    def sentence(self) -> str:
        """One sentence: fits or not, with the numbers that decide it."""
        where = f"{self.gpus} x {self.gpu_bytes / GiB:g} GiB"
        if self.error:
            return f"does not fit on {where}: {self.error}"
        need = (self.weight_bytes + self.reserve_bytes) / GiB
        head = (
            f"{self.weight_bytes / GiB:.1f} GiB of {'FP8 ' if self.fp8 else ''}weights per GPU + "
            f"{self.reserve_bytes / GiB:.1f} GiB reserved for activations and CUDA graphs"
        )
        if not self.fits:
            fix = (f"{self.enough_gpus} x {self.gpu_bytes / GiB:g} GiB would fit" if self.enough_gpus
                   else "use larger GPUs")
            return f"does not fit on {where}: {head} = {need:.1f} GiB per GPU; {fix}"
        return (
            f"fits on {where}: {head} leaves {self.kv_bytes / GiB:.1f} GiB per GPU for the latent KV "
            f"cache = {self.kv_tokens:,} tokens at {self.kv_bytes_per_token:,} B/token"
        )


def kv_bytes_per_token(cfg: ModelConfig, *, mtp: bool = False, dtype: torch.dtype = torch.bfloat16) -> int:
    """Latent cache bytes per token on each rank: (kv_lora_rank + rope dim) * layers * itemsize."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return cfg.latent_dim * layers * dtype.itemsize


def activation_bytes(cfg: ModelConfig, gpus: int, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Largest activations alive at once in one prefill of ``tokens`` tokens (an estimate).

    The MoE layer dominates: the (token, expert) rows gathered by expert (``tokens * k * D``),
    their gate / up / product (``3 * tokens * k * moe_inter``) and the fp32 weighted expert
    outputs (``tokens * k * D * 4``), plus the residual stream and the expanded K/V of this
    rank's heads.  Each rank computes all the batch's rows (the batch is replicated).
    """
    t, d, a = tokens, cfg.hidden_size, dtype.itemsize
    k = cfg.num_experts_per_tok if cfg.is_moe else 0
    moe = t * k * (d * a + 3 * cfg.moe_intermediate_size * a + d * 4)
    dense = 3 * t * cfg.intermediate_size // gpus * a
    heads = cfg.num_attention_heads // max(gpus, 1)
    attn = t * heads * (cfg.qk_head_dim * 2 + cfg.v_head_dim * 2) * a
    stream = 4 * t * d * 4  # residual, delta, normed, fp32 accumulators
    return max(moe, dense) + attn + stream


def weight_bytes(cfg: ModelConfig, gpus: int, *, mtp: bool = False, dtype: torch.dtype = torch.bfloat16) -> int:
    """In-memory weight bytes of one of ``gpus`` ranks (raises ShardError if it cannot split).

    Every split is even (heads, vocab, widths, experts all divide), so all ranks hold the same
    number of bytes; rank 0 stands for each of them.
    """
    lay = Layout(cfg, 0, gpus)
    total = 0
    for spec in checkpoint_layout(cfg, include_mtp=mtp):
        item = 1 if spec.fp8 else 4 if spec.kind in ("scale", "bias") else dtype.itemsize
        shape = lay.local_shape(spec)
        total += math.prod(shape) * item if shape is not None else 0
    return total


def smallest_fit(cfg: ModelConfig, gpu_mem_gib: float, **kw) -> int | None:
    """The fewest GPUs (a power of two up to 64) of this size that hold the model, if any."""
    for n in (1, 2, 4, 8, 16, 32, 64):
        if plan(cfg, n, gpu_mem_gib, suggest=False, **kw).fits:
            return n
    return None


def plan(
    cfg: ModelConfig,
    gpus: int,
    gpu_mem_gib: float,
    *,
    mtp: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_prefill_tokens: int = 8192,
    suggest: bool = True,
) -> Plan:
    """The memory plan of ``cfg`` split over ``gpus`` ranks of ``gpu_mem_gib`` GiB each.

    ``suggest``: when it does not fit, also find the fewest GPUs of this size that would.
    """
    gpu_bytes = int(gpu_mem_gib * GiB)
    kv = kv_bytes_per_token(cfg, mtp=mtp, dtype=dtype)
    reserve = FIXED_RESERVE + activation_bytes(cfg, gpus, max_prefill_tokens, dtype)
    fp8 = cfg.quantization is not None
    try:
        weights = weight_bytes(cfg, gpus, mtp=mtp, dtype=dtype)
    except ShardError as e:
        return Plan(gpus, gpu_bytes, 0, reserve, kv, fp8, error=str(e))
    p = Plan(gpus, gpu_bytes, weights, reserve, kv, fp8)
    if suggest and not p.fits:
        kw = dict(mtp=mtp, dtype=dtype, max_prefill_tokens=max_prefill_tokens)
        p = dataclasses.replace(p, enough_gpus=smallest_fit(cfg, gpu_mem_gib, **kw))
    return p
