"""The op interface: every backend implements all of it, the model reaches kernels only through
it, packed prefill attention, and the kernels' launch tables as read-only data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model_host.fp8 import Linear, block_dequantize, block_quantize
from model_host.kernels.backend import TritonOps
from model_host.kernels.tuning import gpu_key, load_tuning, mla_config, read_table, write_table
from model_host.ops import Ops, TorchOps

TABLES = Path(__file__).resolve().parents[2] / "model_host" / "kernels" / "tables"


def test_triton_ops_implement_the_whole_interface_and_fall_back_on_cpu(small_model):
    assert not TritonOps.__abstractmethods__ and not TorchOps.__abstractmethods__
    ops = {name for name, f in vars(Ops).items() if getattr(f, "__isabstractmethod__", False)}
    assert {"linear", "linears", "swiglu", "route", "moe", "rms_norm", "store_latents", "concat_heads",
            "mla_decode", "mla_prefill", "dense_weight", "precision_switches"} == ops
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = small_model(ids).logits
    small_model.ops = TritonOps()  # CPU tensors: every op takes the reference path
    try:
        assert torch.equal(small_model(ids).logits, ref)
    finally:
        small_model.ops = TorchOps()


def test_mla_prefill_packs_sequences_with_a_cached_prefix():
    """Sequence 0: 3 new queries after 2 cached keys; sequence 1: 4 queries, no prefix.  Packed in
    one call, each equals dense attention with a causal mask by absolute position."""
    g = torch.Generator().manual_seed(1)
    h, d, dv = 3, 8, 4
    lq, lk = [3, 4], [5, 4]
    q = torch.randn(sum(lq), h, d, generator=g)
    k = torch.randn(sum(lk), h, d, generator=g)
    v = torch.randn(sum(lk), h, dv, generator=g)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5, 9], dtype=torch.int32)
    out = TorchOps().mla_prefill(q, k, v, cu_q, cu_k, 0.5)
    assert out.shape == (7, h, dv)
    for i in range(2):
        qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        q_pos = torch.arange(lk[i] - lq[i], lk[i])
        mask = torch.arange(lk[i]) <= q_pos.unsqueeze(1)  # query at p sees keys at <= p
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * 0.5
        want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vs)
        assert torch.allclose(out[cu_q[i]:cu_q[i + 1]], want, atol=1e-6)
    assert torch.equal(TritonOps().mla_prefill(q, k, v, cu_q, cu_k, 0.5), out)


def test_prepared_weights_live_in_the_ops_not_on_modules():
    lin = Linear(200, 136, fp8_block=(128, 128))
    lin.weight.data, lin.weight_scale_inv.data = block_quantize(torch.randn(136, 200))
    before = dict(vars(lin))
    ops = TorchOps(cache_dequantized=True)
    w = ops.dense_weight(lin, torch.float32)
    assert ops.dense_weight(lin, torch.float32) is w  # kept by the ops, keyed by the module
    assert vars(lin).keys() == before.keys() and not TorchOps()._dense  # nothing on the module
    assert torch.equal(w, block_dequantize(lin.weight, lin.weight_scale_inv))


def test_launch_tables_are_read_only_data(tmp_path):
    t = load_tuning("NVIDIA H200")
    with pytest.raises(TypeError, match="read-only"):
        t.small_m["BLOCK_N"] = 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.scaled_mm_min_m = 1
    assert load_tuning("NVIDIA A100-SXM4-80GB") == t  # no A100 table: the default one
    # each card its own file (today the two hold the same values)
    assert [gpu_key(g) for g in ("NVIDIA H100 80GB HBM3", "NVIDIA H200")] == ["h100", "h200"]
    assert (TABLES / "h100.json").exists() and load_tuning("NVIDIA H100 80GB HBM3") == read_table(TABLES / "h100.json")
    tuned = dataclasses.replace(t, small_m={**t.small_m, "BLOCK_N": 32})
    path = write_table(tuned, tmp_path, "NVIDIA H100 80GB HBM3")
    assert path.name == "h100.json" and read_table(path) == tuned
    path.write_text('{"small_m": {}}')
    with pytest.raises(ValueError, match="h100.json"):
        read_table(path)


@pytest.mark.parametrize("gpu", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
def test_paged_attention_widens_its_head_blocks_from_32_rows(gpu):
    """Few rows (decode at small batch) want many programs: narrow head blocks. From 32 rows,
    decode steps as well as eager steps where prompt chunks ride as rows read each row's keys
    for more heads at once (bench/mla_rows_bench.py on an H100: B=128 decode rows at a 2,000-key
    context 1.46 -> 0.86 ms a layer; a riding step of 1,280 rows 12.7 -> 6.1 ms)."""
    t = load_tuning(gpu)
    narrow = (t.mla_decode["narrow_block_h"], t.mla_decode["narrow_num_warps"], 32)
    wide = (t.mla_decode["wide_block_h"], t.mla_decode["wide_num_warps"], t.mla_decode["wide_block_n"])
    assert wide[0] > narrow[0] and wide[2] == 64
    assert [mla_config(rows, 128, t) for rows in (1, 16, 31, 32, 128, 129, 5120)] == [narrow] * 3 + [wide] * 4
    # A rank's 16 heads under --tp 8 (or V3-Lite's 16): no block wider than the heads there are.
    assert mla_config(512, 16, t) == (16, *wide[1:]) and mla_config(512, 20, t) == (32, *wide[1:])


def test_one_query_attends_absorbed_whatever_kv_len(small_model):
    """A captured decode step passes kv_len=1 (the paged kernel reads lengths on the device):
    one query must take mla_decode, never the expanded path that reads kv_len positions."""
    calls = []

    class Spy(TorchOps):
        def mla_decode(self, *a, **kw):
            calls.append("decode")
            return super().mla_decode(*a, **kw)

        def mla_prefill(self, *a, **kw):
            calls.append("prefill")
            return super().mla_prefill(*a, **kw)

    small_model.ops = Spy()
    try:
        small_model(torch.tensor([[5]]), torch.tensor([[0]]), small_model.new_cache(1, 4), kv_len=1)
    finally:
        small_model.ops = TorchOps()
    assert calls and set(calls) == {"decode"}
