"""Latent cache: size per token, and cached decode == recomputing the prefix."""

from __future__ import annotations

import pytest
import torch

from model_host.cache import ContiguousLatentCache
from model_host.config import ModelConfig

from .conftest import rel_err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bytes_per_token_per_layer(dtype):
    cfg = ModelConfig()  # V3: 512 + 64
    cache = ContiguousLatentCache.for_config(cfg, batch_size=2, max_seq_len=8, dtype=dtype, device="meta")
    per = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
    assert cache.bytes_per_token_per_layer() == per
    assert cache.nbytes() == per * cfg.num_hidden_layers * 2 * 8
    if dtype == torch.bfloat16:
        assert per == 1152
        expanded = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2  # K and V per head
        assert expanded == 81920


def test_mtp_layer_gets_its_own_cache_layer(tiny_model):
    cache = tiny_model.new_cache(1, 4)
    assert cache.num_layers == tiny_model.cfg.num_hidden_layers + 1


def test_cached_decode_equals_recompute(small_model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (2, 20), generator=g)
    cache = small_model.new_cache(2, 20, dtype=torch.float32)
    small_model(ids[:, :12], cache=cache)
    for t in range(12, 20):
        step = small_model(ids[:, t : t + 1], torch.full((2, 1), t), cache).logits[:, -1]
        full = small_model(ids[:, : t + 1]).logits[:, -1]  # no cache: whole prefix again
        assert rel_err(step, full) < 1e-5, t


def test_absorbed_and_expanded_attention_agree(small_model):
    ids = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in ("absorb", "expand"):
        cache = small_model.new_cache(2, 12, dtype=torch.float32)
        prefill = small_model(ids, cache=cache, mla_mode=mode).logits
        step = small_model(ids[:, :1], torch.full((2, 1), 10), cache, mla_mode=mode).logits
        results[mode] = (prefill, step)
    assert rel_err(results["absorb"][0], results["expand"][0]) < 1e-5
    assert rel_err(results["absorb"][1], results["expand"][1]) < 1e-5


def test_chunked_prefill_and_ragged_batch(small_model):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 1024, (1, 9), generator=g), torch.randint(0, 1024, (1, 5), generator=g)
    ref_a = small_model(a).logits[0, -1]
    ref_b = small_model(b).logits[0, -1]
    # chunked prefill: 4 + 5 tokens of row a
    cache = small_model.new_cache(1, 9, dtype=torch.float32)
    small_model(a[:, :4], cache=cache)
    chunk = small_model(a[:, 4:], torch.arange(4, 9).unsqueeze(0), cache).logits[0, -1]
    assert rel_err(chunk, ref_a) < 1e-5
    # ragged batch: rows of different lengths, right-padded; each row masked by its own positions
    cache = small_model.new_cache(2, 10, dtype=torch.float32)
    padded = torch.cat((b, torch.zeros(1, 4, dtype=torch.long)), dim=1)
    small_model(torch.cat((a[:, :8], padded[:, :8])), cache=cache)
    # decode: row a feeds its 9th token at position 8, row b its last token again at position 4
    step = small_model(torch.tensor([[a[0, 8]], [b[0, 4]]]), torch.tensor([[8], [4]]), cache).logits[:, -1]
    assert rel_err(step[0], ref_a) < 1e-5
    assert rel_err(step[1], ref_b) < 1e-5


def test_bf16_cache_is_close_to_fp32(small_model):
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(3))
    c32, c16 = (
        small_model.new_cache(1, 17, dtype=torch.float32),
        small_model.new_cache(1, 17, dtype=torch.bfloat16),
    )
    small_model(ids, cache=c32)
    small_model(ids, cache=c16)
    nxt, pos = ids[:, :1], torch.tensor([[16]])
    a, b = small_model(nxt, pos, c32).logits, small_model(nxt, pos, c16).logits
    assert rel_err(b, a) < 2e-2


def test_cache_overflow_is_an_error(small_model):
    cache = small_model.new_cache(1, 4)
    with pytest.raises(IndexError, match="max_seq_len"):
        small_model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
