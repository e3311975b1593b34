"""config.json parsing and validation."""

from __future__ import annotations

import json
import math

import pytest

from model_host.config import ConfigError, ModelConfig
from model_host.rope import yarn_correction_range

# The public deepseek-ai/DeepSeek-V3 config.json (fields that matter to inference).
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_v3_config_parses_and_derives():
    cfg = ModelConfig.from_dict(V3_CONFIG)
    assert cfg == ModelConfig()  # our defaults are V3's
    assert cfg.qk_head_dim == 192 and cfg.latent_dim == 576
    assert cfg.yarn_active
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert round(cfg.softmax_scale, 7) == 0.1352338
    assert yarn_correction_range(cfg) == (10, 23)
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]
    assert cfg.quantization.block_size == (128, 128)


def test_round_trip_through_json(tmp_path):
    cfg = ModelConfig.from_dict(V3_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_json(tmp_path) == cfg


def test_v2_style_q_lora_null_and_no_rope_scaling():
    d = {**V3_CONFIG, "q_lora_rank": None, "rope_scaling": None, "quantization_config": None}
    cfg = ModelConfig.from_dict(d)
    assert cfg.q_lora_rank is None and cfg.rope_scaling is None and cfg.quantization is None
    assert not cfg.yarn_active and cfg.softmax_scale == 192**-0.5


def test_transformers_v5_rope_parameters_key():
    d = {k: v for k, v in V3_CONFIG.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**V3_CONFIG["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(V3_CONFIG)


def test_yarn_inactive_when_context_not_extended():
    cfg = ModelConfig.from_dict({**V3_CONFIG, "max_position_embeddings": 4096})
    assert not cfg.yarn_active and cfg.softmax_scale == 192**-0.5


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"scoring_func": "tanh"}, "scoring_func"),
        ({"topk_method": "random"}, "topk_method"),
        ({"scoring_func": "softmax"}, "scoring_func"),  # softmax + noaux_tc
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"model_type": "llama"}, "model_type"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ],
)
def test_unsupported_fields_fail_with_one_line_naming_the_field(patch, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**V3_CONFIG, **patch})
    msg = str(err.value)
    assert field in msg and "\n" not in msg


def test_v2_routing_methods_accepted():
    cfg = ModelConfig.from_dict(
        {**V3_CONFIG, "scoring_func": "softmax", "topk_method": "group_limited_greedy"}
    )
    assert cfg.topk_method == "group_limited_greedy"
    cfg = ModelConfig.from_dict(
        {**V3_CONFIG, "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1}
    )
    assert cfg.topk_method == "greedy"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_json(tmp_path)
