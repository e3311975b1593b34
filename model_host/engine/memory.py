"""How much memory the paged KV cache gets when ``--kv-memory-gb`` is not given.

On a GPU: a fraction of what is free once the weights are loaded, after setting aside the
activation peak of the largest prefill step (measured by running one) and the stated CUDA-graph
budget. The rest of the fraction's complement is headroom for the allocator and kernels'
workspaces. The CPU has no such measurement to make and keeps an explicit default.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

log = logging.getLogger(__name__)

CPU_KV_GB = 1.0
# A packed prefill expands each chunk's whole context (cached prefix included) into per-head K/V,
# 80 KiB a key at V3's widths. With prefix-cache hits, 2048 new tokens can attend 100k+ cached keys
# (an 8.8 GiB allocation and an OOM at 128 concurrent RAG requests on an H100), so the runner packs
# a step's chunks in groups of at most this many keys, and the plan sets their expansion aside.
PREFILL_CONTEXT_KEYS = 16384
GPU_KV_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class KVPlan:
    kv_bytes: int
    free_bytes: int = 0  # free device memory when measured (0: not measured)
    activation_bytes: int = 0  # peak of one prefill step of max_prefill_tokens
    graph_bytes: int = 0  # the --graph-memory-gb budget set aside


def kv_budget(free_bytes: int, activation_bytes: int, graph_bytes: int, fraction: float = GPU_KV_FRACTION) -> int:
    """KV bytes from free memory minus the activation peak and the graph budget."""
    spare = free_bytes - activation_bytes - graph_bytes
    if spare <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {free_bytes / 2**30:.2f} GiB free after the weights, "
            f"{activation_bytes / 2**30:.2f} GiB for a prefill step, {graph_bytes / 2**30:.2f} GiB for CUDA graphs; "
            f"lower --max-prefill-tokens or --graph-memory-gb, or set --kv-memory-gb")
    return int(spare * fraction)


@torch.inference_mode()
def prefill_peak_bytes(model, tokens: int) -> int:
    """Peak memory of one forward over ``tokens`` prompt tokens (no cache: the activations are
    what is measured). Also compiles the prefill kernels before the first request needs them."""
    dev = model.device
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    ids = torch.zeros(1, tokens, dtype=torch.long, device=dev)
    model(ids, last_only=True)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    torch.cuda.empty_cache()
    return peak


def expansion_bytes(cfg, keys: int, dtype: torch.dtype) -> int:
    """Per-head K and V of ``keys`` attended positions, beyond what the measured step expanded."""
    per_key = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return keys * per_key * torch.empty((), dtype=dtype).element_size()


def absorbed_bytes(cfg, rows: int) -> int:
    """The paged decode attention's buffers for one layer of ``rows`` rows beyond what a prefill
    of as many tokens holds: per head, the fp32 partial output and log-sum-exp of one KV split
    (a step this wide fills the machine with one split per row), the latent query and the
    latent output. A decode step carries up to max_batch + max_prefill_tokens rows when prompt
    chunks that hit the prefix cache ride it (Engine._split)."""
    h, r, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    return rows * h * (4 * (r + 1) + 2 * (r + dr) + 2 * r)


def plan_kv(model, kv_memory_gb: float | None, max_prefill_tokens: int, graph_memory_gb: float,
            max_batch: int = 0) -> KVPlan:
    """The KV budget: explicit, the CPU default, or measured on the GPU. On top of the measured
    prefill step: the larger of the packed forward's key expansion beyond that step and the
    widest decode step's attention buffers."""
    if kv_memory_gb is not None:
        return KVPlan(int(kv_memory_gb * 2**30))
    if model.device.type != "cuda":
        return KVPlan(int(CPU_KV_GB * 2**30))
    cfg = model.cfg
    activation = prefill_peak_bytes(model, max_prefill_tokens) + max(
        expansion_bytes(cfg, max(0, PREFILL_CONTEXT_KEYS - max_prefill_tokens), model.dtype),
        absorbed_bytes(cfg, max_batch + max_prefill_tokens))
    free = torch.cuda.mem_get_info(model.device)[0]
    graphs = int(graph_memory_gb * 2**30)
    plan = KVPlan(kv_budget(free, activation, graphs), free, activation, graphs)
    log.info("KV budget %.2f GiB = %.0f%% of (%.2f GiB free - %.2f GiB prefill peak - %.2f GiB graphs)",
             plan.kv_bytes / 2**30, 100 * GPU_KV_FRACTION, free / 2**30, activation / 2**30, graphs / 2**30)
    return plan
