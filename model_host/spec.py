"""The checkpoint layout: every tensor a DeepSeek-V3 checkpoint holds, with shape and storage kind.

One source of truth for both the random-checkpoint writer and the loader's validation, so the
two cannot drift apart.  Each :class:`TensorSpec` also says where the tensor goes in
:class:`~model_host.model.DeepseekV3` (``target``, plus ``expert`` for stacked expert slots).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .config import ModelConfig
from .fp8 import scale_shape

# Kinds: "proj" = projection weight (FP8 in quantized checkpoints), "scale" = its scale_inv,
# "embed" / "head" / "norm" / "gate" / "bias" / "eh_proj" = never quantized.
FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPE_NAME = "F8_E4M3"


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its name, shape, kind, storage and destination in the model."""

    name: str
    shape: tuple[int, ...]
    kind: str
    fp8: bool  # stored as float8_e4m3fn
    target: str  # parameter name in DeepseekV3
    expert: int | None = None  # slot in a stacked [E, ...] parameter

    @property
    def allowed_dtypes(self) -> tuple[str, ...]:
        """safetensors dtype names accepted for this tensor."""
        if self.fp8:
            return (FP8_DTYPE_NAME,)
        if self.kind == "scale":
            return ("F32",)
        return FLOAT_DTYPES


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(.*)$")


def target_of(cfg: ModelConfig, name: str) -> tuple[str, int | None]:
    """Map a checkpoint tensor name to (model parameter name, expert slot or None)."""
    n = cfg.num_hidden_layers
    if name.startswith("model."):
        name = name[len("model.") :]
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= n:  # MTP layer(s) follow the decoder layers
        name = f"mtp.{int(m.group(1)) - n}.{m.group(2)}"
    m = _EXPERT.match(name)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return name, None


@functools.lru_cache(maxsize=8)
def checkpoint_layout(cfg: ModelConfig, *, include_mtp: bool = True) -> tuple[TensorSpec, ...]:
    """All tensors of a checkpoint for ``cfg`` in a stable order (globals, layers, MTP).

    Cached: the full V3 layout has ~92k entries and the writer, loader and tests all ask for it.
    """
    specs: list[TensorSpec] = []
    quant = cfg.quantization

    def add(name: str, shape: tuple[int, ...], kind: str) -> None:
        fp8 = kind == "proj" and quant is not None
        target, expert = target_of(cfg, name)
        specs.append(TensorSpec(name, shape, kind, fp8, target, expert))
        if fp8:
            target, expert = target_of(cfg, name + "_scale_inv")
            specs.append(
                TensorSpec(
                    name + "_scale_inv", scale_shape(shape, quant.block_size), "scale", False, target, expert
                )
            )

    d, v = cfg.hidden_size, cfg.vocab_size
    add("model.embed_tokens.weight", (v, d), "embed")
    for i in range(cfg.num_hidden_layers):
        _layer(add, cfg, i)
    add("model.norm.weight", (d,), "norm")
    add("lm_head.weight", (v, d), "head")
    if include_mtp:
        for j in range(cfg.num_nextn_predict_layers):
            i = cfg.num_hidden_layers + j
            p = f"model.layers.{i}."
            add(p + "embed_tokens.weight", (v, d), "embed")
            add(p + "enorm.weight", (d,), "norm")
            add(p + "hnorm.weight", (d,), "norm")
            add(p + "eh_proj.weight", (d, 2 * d), "eh_proj")
            _layer(add, cfg, i)
            add(p + "shared_head.norm.weight", (d,), "norm")
            add(p + "shared_head.head.weight", (v, d), "head")
    return tuple(specs)


def _layer(add, cfg: ModelConfig, i: int) -> None:
    p = f"model.layers.{i}."
    d, h = cfg.hidden_size, cfg.num_attention_heads
    add(p + "input_layernorm.weight", (d,), "norm")
    add(p + "post_attention_layernorm.weight", (d,), "norm")
    a = p + "self_attn."
    if cfg.q_lora_rank is None:
        add(a + "q_proj.weight", (h * cfg.qk_head_dim, d), "proj")
    else:
        add(a + "q_a_proj.weight", (cfg.q_lora_rank, d), "proj")
        add(a + "q_a_layernorm.weight", (cfg.q_lora_rank,), "norm")
        add(a + "q_b_proj.weight", (h * cfg.qk_head_dim, cfg.q_lora_rank), "proj")
    add(a + "kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d), "proj")
    add(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), "norm")
    add(a + "kv_b_proj.weight", (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), "proj")
    add(a + "o_proj.weight", (d, h * cfg.v_head_dim), "proj")
    m = p + "mlp."
    if not cfg.is_moe_layer(i):
        _mlp(add, m, d, cfg.intermediate_size)
        return
    add(m + "gate.weight", (cfg.n_routed_experts, d), "gate")
    if cfg.topk_method == "noaux_tc":
        add(m + "gate.e_score_correction_bias", (cfg.n_routed_experts,), "bias")
    if cfg.n_shared_experts:
        _mlp(add, m + "shared_experts.", d, cfg.moe_intermediate_size * cfg.n_shared_experts)
    for e in range(cfg.n_routed_experts):
        _mlp(add, f"{m}experts.{e}.", d, cfg.moe_intermediate_size)


def _mlp(add, p: str, d: int, inter: int) -> None:
    add(p + "gate_proj.weight", (inter, d), "proj")
    add(p + "up_proj.weight", (inter, d), "proj")
    add(p + "down_proj.weight", (d, inter), "proj")
