"""Random checkpoint writer, the V3 layout, and the model-host CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model_host.checkpoint import checkpoint_nbytes, make_config, plan_shards, write_random_checkpoint
from model_host.cli import main
from model_host.spec import checkpoint_layout


def test_v3_layout_matches_published_parameter_counts():
    """671B main model + 14B MTP = 685B (deepseek-ai/DeepSeek-V3 model card); ~642 GiB in FP8."""
    cfg = make_config("v3", fp8=True)

    def count(specs):
        return sum(math.prod(s.shape) for s in specs if s.kind != "scale")

    main_params = count(checkpoint_layout(cfg, include_mtp=False))
    total = count(checkpoint_layout(cfg, include_mtp=True))
    assert round(main_params / 1e9, 2) == 671.03
    assert round(total / 1e9, 2) == 684.49
    assert 640 < checkpoint_nbytes(cfg, "fp8") / 2**30 < 643
    kv_a = next(
        s for s in checkpoint_layout(cfg) if s.name == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    )
    assert kv_a.shape == (576, 7168) and kv_a.fp8
    assert next(s for s in checkpoint_layout(cfg) if s.name == kv_a.name + "_scale_inv").shape == (5, 56)


def test_shard_plan_keeps_scales_with_weights():
    cfg = make_config("tiny", fp8=True)
    specs = checkpoint_layout(cfg)
    shards = plan_shards(specs, torch.bfloat16, 50_000)
    assert sum(map(len, shards)) == len(specs) and len(shards) > 10
    for shard in shards:
        names = {s.name for s in shard}
        assert all(s.name[: -len("_scale_inv")] in names for s in shard if s.kind == "scale")


def test_writer_output_is_deterministic_and_complete(tmp_path):
    cfg = make_config("tiny", vocab_size=512, layers=2)
    a = write_random_checkpoint(tmp_path / "a", cfg, dtype="fp8", seed=3, shard_size_mb=0.2)
    b = write_random_checkpoint(tmp_path / "b", cfg, dtype="fp8", seed=3, shard_size_mb=0.2)
    assert a.num_shards == b.num_shards > 1
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {
        "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"
    }  # fmt: skip
    conf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (
        conf["quantization_config"]["weight_block_size"] == [128, 128]
        and conf["num_nextn_predict_layers"] == 1
    )
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == a.total_bytes

    # the MTP layer's embedding / head are exact copies of the globals (as in V3)
    def get(name):
        with safe_open(tmp_path / "a" / index["weight_map"][name], framework="pt") as f:
            return f.get_tensor(name)

    assert torch.equal(get("model.layers.2.embed_tokens.weight"), get("model.embed_tokens.weight"))
    assert torch.equal(get("model.layers.2.shared_head.head.weight"), get("lm_head.weight"))
    bias = get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and (bias >= 0).all() and bias.std() > 0.03


def test_cli_make_checkpoint_and_generate(tmp_path, capsys):
    out = tmp_path / "ck"
    assert (
        main(["make-checkpoint", "--out", str(out), "--preset", "tiny", "--dtype", "fp8", "--layers", "2"])
        == 0
    )
    capsys.readouterr()
    rc = main(["generate", "--checkpoint", str(out), "--prompt", "Hello", "--max-tokens", "5", "--seed", "1",
               "--temperature", "0.7", "--top-k", "40"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.strip() and "generated 5 tok" in captured.err
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "config.json not found" in capsys.readouterr().err
    assert main(["make-checkpoint", "--out", str(out), "--preset", "v3", "--dtype", "fp8", "--dry-run"]) == 0
    assert "641.29 GiB" in capsys.readouterr().err


SCRIPT = Path(sys.executable).with_name("model-host")


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_console_script_from_shell(tmp_path):
    out = tmp_path / "ck"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: thread hand-off costs more than it saves

    def run(*args):
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)

    made = run("make-checkpoint", "--out", str(out), "--layers", "1", "--no-mtp")
    assert made.returncode == 0, made.stderr
    gen = run("generate", "--checkpoint", str(out), "--prompt", "Hi", "--max-tokens", "4", "--stop", "\n\n\n")
    assert gen.returncode == 0 and "generated" in gen.stderr, gen.stderr
