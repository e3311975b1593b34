"""Logit parity with transformers' DeepseekV3ForCausalLM on the same checkpoint files.

Both models read one random BF16 checkpoint written by our writer, run in float32, and must agree
to < 1e-4 relative error for a 32-token prefill and each of 16 cached decode steps (transformers
with its own past_key_values; ours with the latent cache: prefill takes the expand path, decode
the absorbed path).  transformers is a test-only dependency.

Semantics notes handled here, not by bending the runtime:
* transformers rotates the same interleaved rope pairs but emits them de-interleaved for q and k
  alike, so scores (and logits) are identical.
* transformers applies YaRN whenever rope_scaling is yarn; our YaRN configs use
  max_position_embeddings > original_max_position_embeddings, where both apply it.
* routing bias is non-negative (writer's U[0, 0.25)), so group masking by -inf or 0.0 agrees.
"""

from __future__ import annotations

import pytest
import torch

from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.config import YarnScaling
from model_host.loader import load_model

from .conftest import rel_err

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # q LoRA, YaRN (V3 values), grouped routing 4 groups keep 2, layer 0 dense + 2 MoE layers.
    "v3-like": dict(),
    # V2-style query (q_lora_rank null), plain RoPE, ungrouped noaux_tc routing.
    "q_lora-null": dict(
        q_lora_rank=None, rope_scaling=None, max_position_embeddings=4096, n_group=1, topk_group=1
    ),
    # Strong YaRN inside the tested positions, mscale != mscale_all_dim (cos/sin scaled too).
    "yarn-strong": dict(
        rope_scaling=YarnScaling(
            factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.5
        ),
        max_position_embeddings=64,
        n_group=8,
        topk_group=3,
        n_routed_experts=16,
        num_experts_per_tok=3,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_prefill_and_cached_decode(name, tmp_path):
    cfg = make_config("tiny", vocab_size=1024, mtp=False, **CONFIGS[name])
    write_random_checkpoint(tmp_path, cfg, dtype="bf16", seed=7, tokenizer=False)
    transformers.logging.set_verbosity_error()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path, dtype=torch.float32)

    g = torch.Generator().manual_seed(0)
    b, prompt_len, steps = 2, 32, 16
    prompt = torch.randint(0, cfg.vocab_size, (b, prompt_len), generator=g)
    feed = torch.randint(0, cfg.vocab_size, (b, steps), generator=g)  # teacher-forced decode inputs
    cache = ours.new_cache(b, prompt_len + steps, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(prompt, use_cache=True)
        out = ours(prompt, cache=cache)
        assert rel_err(out.logits, ref.logits) < 1e-4, "prefill"
        past = ref.past_key_values
        for i in range(steps):
            ref = hf(feed[:, i : i + 1], past_key_values=past, use_cache=True)
            past = ref.past_key_values
            pos = torch.full((b, 1), prompt_len + i)
            out = ours(feed[:, i : i + 1], pos, cache)
            assert rel_err(out.logits, ref.logits) < 1e-4, f"decode step {i}"


def test_yarn_parity_far_from_origin(tmp_path):
    """Positions ~100k exercise the YaRN-interpolated low frequencies (no cache on either side)."""
    cfg = make_config("tiny", vocab_size=1024, mtp=False)
    write_random_checkpoint(tmp_path, cfg, dtype="bf16", seed=3, tokenizer=False)
    transformers.logging.set_verbosity_error()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(100_000, 100_024).unsqueeze(0)
    with torch.no_grad():
        ref = hf(ids, position_ids=pos, use_cache=False).logits
    assert rel_err(ours(ids, pos).logits, ref) < 1e-4
