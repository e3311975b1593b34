"""The multi-token-prediction module: loading (shared tables) and drafting the token after next."""

from __future__ import annotations

import torch

from model_host.loader import load_model

from .conftest import rel_err


def test_mtp_shares_embedding_and_head_with_main_model(tiny_model):
    mtp = tiny_model.mtp[0]
    assert mtp.embed_tokens.weight.data_ptr() == tiny_model.embed_tokens.weight.data_ptr()
    assert mtp.shared_head.head.weight.data_ptr() == tiny_model.lm_head.weight.data_ptr()


def test_mtp_not_loaded_by_default(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    assert len(model.mtp) == 0 and model.new_cache(1, 2).num_layers == model.cfg.num_hidden_layers


def test_mtp_draft_with_cache_equals_recompute(tiny_model):
    """Draft logits for t_{i+2} from (t_{i+1}, h_i): incremental (cached) == full recompute."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_model.cfg.vocab_size, (1, 12), generator=g)
    main = tiny_model(ids)
    # MTP input at position i: token i+1 and the main model's hidden state at i
    full = tiny_model.mtp_forward(ids[:, 1:], main.hidden[:, :-1])
    assert full.logits.shape == (1, 11, tiny_model.cfg.vocab_size) and full.logits.isfinite().all()

    cache = tiny_model.new_cache(1, 12, dtype=torch.float32)
    tiny_model(ids[:, :8], cache=cache)
    h = tiny_model(ids[:, :8]).hidden
    tiny_model.mtp_forward(ids[:, 1:8], h[:, :7], cache=cache)  # MTP prefill of positions 0..6
    for i in range(7, 11):
        step = tiny_model(ids[:, i : i + 1], torch.tensor([[i]]), cache)
        assert rel_err(step.hidden[0, 0], main.hidden[0, i]) < 1e-5
        draft = tiny_model.mtp_forward(ids[:, i + 1 : i + 2], step.hidden, torch.tensor([[i]]), cache)
        assert rel_err(draft.logits[0, 0], full.logits[0, i]) < 1e-5
