"""Memory planner against DeepSeek-V3's real config (FP8, 61 layers, 256 experts)."""

from __future__ import annotations

import json
import math

import pytest

from model_host.checkpoint import checkpoint_nbytes, make_config
from model_host.cli import main
from model_host.plan import GiB, kv_bytes_per_token, plan, weight_bytes
from model_host.sharding import Layout, ShardError
from model_host.spec import checkpoint_layout


@pytest.fixture(scope="module")
def v3():
    return make_config("v3", fp8=True)


def test_v3_kv_bytes_per_token(v3):
    # (512 + 64) latent values x 61 layers x 2 bytes (BF16), replicated on every rank.
    assert kv_bytes_per_token(v3) == 70_272
    assert kv_bytes_per_token(v3, mtp=True) == 576 * 62 * 2


def test_v3_weights_split_over_ranks_add_up_to_the_checkpoint(v3):
    # One rank's bytes x 8 = the whole model plus 7 extra copies of what is replicated; FP8
    # tensors and scales are stored as on disk, so with BF16 elsewhere the sum is the checkpoint.
    whole = weight_bytes(v3, 1)
    assert whole == checkpoint_nbytes(v3.replace(num_nextn_predict_layers=0), "fp8")
    per_rank = weight_bytes(v3, 8)
    replicated = sum(
        math.prod(s.shape) * (4 if s.kind in ("scale", "bias") else 1 if s.fp8 else 2)
        for s in checkpoint_layout(v3, include_mtp=False)
        if Layout(v3, 0, 8).local_shape(s) == s.shape and s.expert is None
    )
    assert 8 * per_rank == whole + 7 * replicated
    assert 78 * GiB < per_rank < 81 * GiB  # ~635 GB of FP8 weights / 8, plus the replicated parts


def test_v3_fits_on_8_h200(v3):
    p = plan(v3, 8, 141)
    assert p.fits
    assert p.kv_tokens == (p.gpu_bytes - p.weight_bytes - p.reserve_bytes) // 70_272
    assert p.kv_tokens == 844_985  # 55.3 GiB per GPU left for the latent cache (docs quote it)
    s = p.sentence()
    assert s.startswith("fits on 8 x 141 GiB") and f"{p.kv_tokens:,} tokens" in s


def test_v3_does_not_fit_on_8_h100(v3):
    p = plan(v3, 8, 80)
    assert not p.fits and p.kv_tokens == 0
    assert p.sentence().startswith("does not fit on 8 x 80 GiB")
    assert "16 x 80 GiB would fit" in p.sentence()


def test_v3_fits_on_two_8_h100_nodes(v3):
    p = plan(v3, 16, 80)
    assert p.fits and 450_000 < p.kv_tokens < 550_000
    assert p.weight_bytes < plan(v3, 8, 80).weight_bytes / 1.9


def test_impossible_split_is_one_sentence(v3):
    p = plan(v3, 6, 141)
    assert not p.fits and "does not divide num_attention_heads=128" in p.sentence()


def test_fp8_split_off_the_block_edge_is_refused():
    # tiny: 4 heads x 48 q dims = 192 rows; two ranks would cut an FP8 block in half.
    cfg = make_config("tiny", fp8=True)
    with pytest.raises(ShardError, match="q_b_proj.weight: 2 ranks split dim 0 into 96-wide parts"):
        weight_bytes(cfg, 2)


def test_plan_cli(tmp_path, v3, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(v3.to_dict()))
    assert main(["plan", "--config", str(cfg), "--gpus", "8", "--gpu-mem-gb", "141"]) == 0
    assert capsys.readouterr().out.startswith("fits on 8 x 141 GiB")
    assert main(["plan", "--checkpoint", str(tmp_path), "--gpus", "8", "--gpu-mem-gb", "80"]) == 1
    assert capsys.readouterr().out.startswith("does not fit on 8 x 80 GiB")
