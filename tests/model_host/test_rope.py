"""YaRN frequencies and the interleaved rotary layout."""

from __future__ import annotations

import pytest
import torch

from model_host.config import ModelConfig, YarnScaling
from model_host.rope import RotaryEmbedding, apply_rope, inv_frequencies, yarn_correction_range


def test_yarn_frequencies_match_deepseek_reference_formula():
    cfg = ModelConfig()
    low, high = yarn_correction_range(cfg)
    assert (low, high) == (10, 23)
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    freqs = inv_frequencies(cfg)
    # Below the ramp unchanged, above it divided by the factor 40, linear blend in between.
    assert torch.equal(freqs[:low], base[:low])
    assert torch.allclose(freqs[high:], base[high:] / 40, rtol=1e-6)
    ramp = ((torch.arange(32, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    assert torch.allclose(freqs, base / 40 * ramp + base * (1 - ramp), rtol=1e-6)


def test_yarn_matches_transformers_rope_init():
    tf = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig()
    hf_cfg = tf.DeepseekV3Config(**{k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    assert torch.allclose(inv_frequencies(cfg), inv, rtol=1e-6)
    assert attention_factor == pytest.approx(RotaryEmbedding(cfg).attention_factor)


def test_plain_rope_without_scaling():
    cfg = ModelConfig(rope_scaling=None)
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert torch.equal(inv_frequencies(cfg), base)
    short = ModelConfig(rope_scaling=YarnScaling(), max_position_embeddings=4096)  # not extended
    assert torch.equal(inv_frequencies(short), base)


def test_apply_rope_is_the_reference_complex_rotation_of_interleaved_pairs():
    cfg = ModelConfig()
    rot = RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 7, 4095, 100_000]])
    x = torch.randn(1, 5, 3, 64)  # [B, S, H, D]
    cos, sin = rot(pos)
    # DeepSeek inference/model.py: view_as_complex over (x[2i], x[2i+1]) times e^{i*pos*freq}
    freqs_cis = torch.polar(torch.ones(1, 5, 32), pos.float().unsqueeze(-1) * rot.inv_freq)
    ref = torch.view_as_real(torch.view_as_complex(x.view(1, 5, 3, 32, 2)) * freqs_cis.unsqueeze(2)).flatten(
        3
    )
    assert torch.allclose(apply_rope(x, cos, sin), ref, atol=1e-6)
    k = torch.randn(1, 5, 64)  # the shared rope key has no head dim
    ref_k = torch.view_as_real(torch.view_as_complex(k.view(1, 5, 32, 2)) * freqs_cis).flatten(2)
    assert torch.allclose(apply_rope(k, cos, sin), ref_k, atol=1e-6)


def test_scores_equal_transformers_deinterleaved_layout():
    """transformers' interleave variant permutes q and k identically, so q.k is unchanged."""
    tf = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    rot = RotaryEmbedding(ModelConfig())
    pos = torch.arange(6).unsqueeze(0)
    cos, sin = rot(pos)
    q, k = torch.randn(1, 6, 2, 64), torch.randn(1, 6, 64)
    ours = torch.einsum("bshd,btd->bhst", apply_rope(q, cos, sin), apply_rope(k, cos, sin))
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    hq, hk = apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.unsqueeze(1), full_cos, full_sin)
    theirs = hq @ hk.transpose(-1, -2)
    assert tf is not None and torch.allclose(ours, theirs, atol=1e-5)
