"""DeepSeek-V3 model configuration: read ``config.json``, validate it, expose derived sizes.

The dataclass mirrors the Hugging Face ``config.json`` of deepseek-ai/DeepSeek-V3 (and the
V2-style variant with ``q_lora_rank: null``).  Anything the runtime does not implement is
rejected up front with a one-line :class:`ConfigError` that names the offending field, so a
bad checkpoint fails at load time instead of producing silently wrong logits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
# noaux_tc: V3 (bias-corrected group top-2 sums); group_limited_greedy: V2 (group max);
# greedy: plain top-k over all experts.
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """A config.json field is missing, malformed or unsupported (message names the field)."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling parameters (``rope_scaling`` with type ``yarn``)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class Fp8Quantization:
    """``quantization_config`` of an FP8 block-quantized checkpoint."""

    block_size: tuple[int, int] = (128, 128)
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class ModelConfig:
    """Immutable, validated model configuration (defaults are DeepSeek-V3's)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    n_routed_experts: int | None = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = field(default_factory=YarnScaling)
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_nextn_predict_layers: int = 1
    quantization: Fp8Quantization | None = field(default_factory=Fp8Quantization)

    def __post_init__(self) -> None:
        _validate(self)

    # ----------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_active(self) -> bool:
        """YaRN (frequency correction + mscale) applies only when the context was extended."""
        rs = self.rope_scaling
        return rs is not None and self.max_position_embeddings > rs.original_max_position_embeddings

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` when YaRN is active."""
        scale = self.qk_head_dim**-0.5
        if self.yarn_active and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers ``>= first_k_dense_replace`` are MoE (the MTP layer counts as MoE too)."""
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    @property
    def latent_dim(self) -> int:
        """Per-token, per-layer cache width: normalized latent + shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ------------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face style ``config.json`` dict (unknown keys are ignored)."""
        mt = d.get("model_type")
        if mt is not None and mt not in MODEL_TYPES:
            raise ConfigError(f"model_type={mt!r} is not supported (expected one of {MODEL_TYPES})")
        _require_equal(d, "hidden_act", "silu")
        _require_equal(d, "attention_bias", False)
        _require_equal(d, "tie_word_embeddings", False)
        _require_equal(d, "moe_layer_freq", 1)
        if d.get("num_key_value_heads") not in (None, d.get("num_attention_heads")):
            raise ConfigError("num_key_value_heads must equal num_attention_heads for MLA")

        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "quantization"}
        kwargs: dict[str, Any] = {k: d[k] for k in names if k in d}
        for k in ("eos_token_id", "bos_token_id"):
            if isinstance(kwargs.get(k), list):  # HF allows a list; we stop on the first
                kwargs[k] = kwargs[k][0]
        if "n_routed_experts" in d and d["n_routed_experts"] is None:
            kwargs["n_routed_experts"] = None
        rope = _parse_rope(d)
        if "rope_theta" not in kwargs and rope[1] is not None:
            kwargs["rope_theta"] = rope[1]
        kwargs["rope_scaling"] = rope[0]
        kwargs["quantization"] = _parse_quant(d.get("quantization_config"))
        try:
            return cls(**kwargs)
        except TypeError as e:  # wrong value type surfacing from arithmetic in validation
            raise ConfigError(str(e)) from e

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (a file, or a checkpoint directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config.json not found at {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict (loadable by transformers' DeepseekV3Config)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "moe_layer_freq": 1,
            "num_key_value_heads": self.num_attention_heads,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }
        for f in dataclasses.fields(self):
            if f.name not in ("rope_scaling", "quantization"):
                d[f.name] = getattr(self, f.name)
        rs = self.rope_scaling
        d["rope_scaling"] = None if rs is None else {"type": "yarn", **dataclasses.asdict(rs)}
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": q.fmt,
                "activation_scheme": q.activation_scheme,
                "weight_block_size": list(q.block_size),
            }
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: ``0.1 * mscale * ln(scale) + 1`` (1 when not scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- validation
def _require_equal(d: dict[str, Any], key: str, expected: Any) -> None:
    if key in d and d[key] is not None and d[key] != expected:
        raise ConfigError(f"{key}={d[key]!r} is not supported (expected {expected!r})")


def _parse_rope(d: dict[str, Any]) -> tuple[YarnScaling | None, float | None]:
    """Accept the legacy ``rope_scaling`` key and transformers v5's ``rope_parameters``."""
    rs = d.get("rope_scaling")
    theta = None
    if rs is None and isinstance(d.get("rope_parameters"), dict):
        rs = dict(d["rope_parameters"])
        theta = rs.pop("rope_theta", None)
    if rs is None:
        return None, theta
    if not isinstance(rs, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {type(rs).__name__}")
    kind = rs.get("type", rs.get("rope_type", "default"))
    if kind == "default":
        return None, theta
    if kind not in ("yarn", "deepseek_yarn"):
        raise ConfigError(f"rope_scaling.type={kind!r} is not supported (expected 'yarn' or null)")
    if rs.get("factor") is None:
        raise ConfigError("rope_scaling.factor is required for yarn")
    if rs.get("original_max_position_embeddings") is None:
        raise ConfigError("rope_scaling.original_max_position_embeddings is required for yarn")
    kw = {f.name: rs[f.name] for f in dataclasses.fields(YarnScaling) if rs.get(f.name) is not None}
    return YarnScaling(**kw), theta


def _parse_quant(q: Any) -> Fp8Quantization | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("quantization_config must be an object or null")
    if q.get("quant_method") != "fp8":
        raise ConfigError(
            f"quantization_config.quant_method={q.get('quant_method')!r} is not supported (expected 'fp8')"
        )
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"quantization_config.fmt={q.get('fmt')!r} is not supported (expected 'e4m3')")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(
            f"quantization_config.activation_scheme={q.get('activation_scheme')!r} is not supported (expected 'dynamic')"
        )
    bs = q.get("weight_block_size")
    if not (isinstance(bs, list | tuple) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
        raise ConfigError(f"quantization_config.weight_block_size={bs!r} must be two positive ints")
    return Fp8Quantization(block_size=(bs[0], bs[1]))


def _validate(c: ModelConfig) -> None:
    positive = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
    ]  # fmt: skip
    for name in positive:
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name}={v!r} must be a positive integer")
    if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank <= 0):
        raise ConfigError(f"q_lora_rank={c.q_lora_rank!r} must be a positive integer or null")
    if c.qk_rope_head_dim % 2:
        raise ConfigError(f"qk_rope_head_dim={c.qk_rope_head_dim} must be even (rope rotates pairs)")
    if c.first_k_dense_replace < 0:
        raise ConfigError(f"first_k_dense_replace={c.first_k_dense_replace} must be >= 0")
    if not 0 <= c.num_nextn_predict_layers <= 1:
        raise ConfigError(
            f"num_nextn_predict_layers={c.num_nextn_predict_layers} is not supported (expected 0 or 1)"
        )
    if not (c.rms_norm_eps > 0):
        raise ConfigError(f"rms_norm_eps={c.rms_norm_eps} must be > 0")
    if c.rope_theta <= 0:
        raise ConfigError(f"rope_theta={c.rope_theta} must be > 0")
    if c.rope_scaling is not None and c.rope_scaling.factor < 1:
        raise ConfigError(f"rope_scaling.factor={c.rope_scaling.factor} must be >= 1")
    if not (0 <= c.bos_token_id < c.vocab_size and 0 <= c.eos_token_id < c.vocab_size):
        raise ConfigError(f"bos_token_id/eos_token_id must be < vocab_size={c.vocab_size}")
    if not c.is_moe:
        return
    e = c.n_routed_experts
    if not isinstance(e, int) or e <= 0:
        raise ConfigError(f"n_routed_experts={e!r} must be a positive integer or null")
    if c.moe_intermediate_size <= 0:
        raise ConfigError(f"moe_intermediate_size={c.moe_intermediate_size} must be > 0")
    if c.n_shared_experts < 0:
        raise ConfigError(f"n_shared_experts={c.n_shared_experts} must be >= 0")
    if c.scoring_func not in SCORING_FUNCS:
        raise ConfigError(
            f"scoring_func={c.scoring_func!r} is not supported (expected one of {SCORING_FUNCS})"
        )
    if c.topk_method not in TOPK_METHODS:
        raise ConfigError(f"topk_method={c.topk_method!r} is not supported (expected one of {TOPK_METHODS})")
    if c.topk_method == "noaux_tc" and c.scoring_func != "sigmoid":
        raise ConfigError(
            f"scoring_func={c.scoring_func!r} is not supported with topk_method='noaux_tc' (expected 'sigmoid')"
        )
    if not 1 <= c.num_experts_per_tok <= e:
        raise ConfigError(f"num_experts_per_tok={c.num_experts_per_tok} must be in [1, n_routed_experts={e}]")
    if c.n_group < 1 or e % c.n_group:
        raise ConfigError(f"n_group={c.n_group} must divide n_routed_experts={e}")
    grouped = c.topk_method != "greedy" and c.n_group > 1
    if c.topk_method != "greedy" and not 1 <= c.topk_group <= c.n_group:
        raise ConfigError(f"topk_group={c.topk_group} must be in [1, n_group={c.n_group}]")
    if grouped and c.topk_group * (e // c.n_group) < c.num_experts_per_tok:
        raise ConfigError(
            f"topk_group={c.topk_group} keeps fewer than num_experts_per_tok={c.num_experts_per_tok} experts"
        )
    if c.topk_method == "noaux_tc" and grouped and e // c.n_group < 2:
        raise ConfigError(f"n_group={c.n_group} leaves < 2 experts per group (noaux_tc sums the top-2)")
