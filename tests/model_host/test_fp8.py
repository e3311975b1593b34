"""FP8 block weights: exact dequantization, loader round trip, FP8 vs dequantized logits."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from model_host.checkpoint import export_checkpoint, make_config, write_random_checkpoint
from model_host.fp8 import FP8_DTYPE, block_dequantize, block_quantize
from model_host.loader import load_model, scan_checkpoint
from model_host.ops import TorchOps
from model_host.spec import checkpoint_layout

from .conftest import rel_err

# Widths that are not multiples of 128 (kv_a_proj out = 192 + 32 = 224, hidden 288, ...)
ODD = dict(
    vocab_size=512, hidden_size=288, intermediate_size=320, moe_intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=160, kv_lora_rank=192, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
)  # fmt: skip


def blockwise_reference(w: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """w_fp8.float() * scale_inv, block by block with explicit loops."""
    out = w.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= s[i, j]
    return out


@pytest.mark.parametrize("shape", [(576, 300), (128, 128), (100, 7), (3, 200, 130)])
def test_quantize_dequantize(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, s = block_quantize(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    d = block_dequantize(q, s)
    flat_q, flat_s = q.reshape(-1, *shape[-2:]), s.reshape(-1, *s.shape[-2:])
    ref = torch.stack([blockwise_reference(a, b) for a, b in zip(flat_q, flat_s, strict=True)]).reshape(shape)
    assert torch.equal(d, ref)
    assert ((d - w).abs() <= w.abs() * 0.07 + 1e-2).all()  # e4m3: 3 mantissa bits
    assert block_dequantize(q, s, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def odd_fp8_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("odd_fp8")
    write_random_checkpoint(out, make_config("tiny", **ODD, fp8=True), dtype="fp8", seed=4, tokenizer=False)
    return out


def test_checkpoint_holds_fp8_exactly_where_v3_does(odd_fp8_ckpt):
    infos = scan_checkpoint(odd_fp8_ckpt)
    fp8 = {n for n, i in infos.items() if i.dtype == "F8_E4M3"}
    assert fp8 and all(n + "_scale_inv" in infos for n in fp8)
    for n in fp8:  # only attention / MLP / expert projections
        assert any(p in n for p in ("self_attn.", "mlp.")) and ".gate.weight" not in n
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.2.eh_proj.weight", "model.layers.2.shared_head.head.weight"):  # fmt: skip
        assert infos[n].dtype == "BF16", n
    assert infos["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"


@pytest.mark.parametrize("mode", ["keep", "dequantize"])
def test_loader_dequantized_weights_are_exact(odd_fp8_ckpt, mode):
    model = load_model(odd_fp8_ckpt, dtype=torch.float32, fp8=mode)
    params = dict(model.named_parameters())
    cfg = make_config("tiny", **ODD, fp8=True)
    handles = {}
    checked = 0
    for spec in checkpoint_layout(cfg, include_mtp=False):
        if not spec.fp8:
            continue
        path = scan_checkpoint(odd_fp8_ckpt)[spec.name].file
        f = handles.setdefault(path, safe_open(path, framework="pt"))
        ref = blockwise_reference(f.get_tensor(spec.name), f.get_tensor(spec.name + "_scale_inv"))
        mod = model.get_submodule(spec.target.rpartition(".")[0])
        got = model.ops.dense_weight(mod, torch.float32) if mode == "keep" else params[spec.target]
        if spec.expert is not None:
            got = got[spec.expert]
        assert torch.equal(got, ref), spec.name
        checked += 1
    assert checked >= 40


def test_fp8_logits_equal_dequantized_export(odd_fp8_ckpt, tmp_path):
    fp8_model = load_model(odd_fp8_ckpt, dtype=torch.float32)
    assert fp8_model.layers[0].self_attn.kv_a_proj_with_mqa.is_fp8
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = fp8_model(ids).logits
    export_checkpoint(fp8_model, tmp_path / "fp32", dtype="fp32", tokenizer=False)
    dense = load_model(tmp_path / "fp32", dtype=torch.float32)
    assert not dense.layers[0].self_attn.kv_a_proj_with_mqa.is_fp8
    assert rel_err(dense(ids).logits, ref) < 1e-6
    export_checkpoint(fp8_model, tmp_path / "bf16", dtype="bf16", tokenizer=False)
    assert rel_err(load_model(tmp_path / "bf16", dtype=torch.float32)(ids).logits, ref) < 2e-2
    cache = fp8_model.new_cache(2, 13, dtype=torch.float32)  # FP8 path with the cache / absorbed decode
    fp8_model(ids[:, :11], cache=cache)
    step = fp8_model(ids[:, 11:], torch.full((2, 1), 11), cache).logits
    assert rel_err(step, ref[:, 11:]) < 1e-5


def test_dequant_cache_policy_and_explicit_ops(odd_fp8_ckpt):
    model = load_model(odd_fp8_ckpt, dtype=torch.float32)
    lin = model.layers[0].self_attn.o_proj
    ids = torch.zeros(1, 3, dtype=torch.long)
    base = model(ids).logits
    assert not model.ops._dense  # default: dequantize on the fly, keep nothing
    model.ops = TorchOps(cache_dequantized=True)
    assert torch.equal(model(ids).logits, base)
    assert model.ops._dense[lin].dtype == torch.float32  # kept by the ops, keyed by module
    assert not any(isinstance(v, torch.Tensor) for v in vars(lin).values())  # nothing on the module

    class Counting(TorchOps):  # the model reaches kernels only through its ops
        def __init__(self):
            super().__init__()
            self.calls = {"linear": 0, "moe": 0}

        def linear(self, x, layer):
            self.calls["linear"] += 1
            return super().linear(x, layer)

        def moe(self, *args, **kw):
            self.calls["moe"] += 1
            return super().moe(*args, **kw)

    model.ops = counting = Counting()
    assert torch.equal(model(ids).logits, base)
    assert counting.calls["linear"] > 10 and counting.calls["moe"] == 1  # one MoE layer
