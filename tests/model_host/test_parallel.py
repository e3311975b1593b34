"""Tensor + expert parallelism on CPU: gloo, one process per rank, a tiny random model.

Every rank is a real child process (spawned, as ``serve --tp`` does) that joins a gloo group,
loads only its slices of a sharded checkpoint, and runs the same forwards; rank 0 writes what
it saw to a file.  TP2 / TP4 must match TP1: logits to float32 tolerance (the partial sums of
o_proj / down / experts are added in another order), greedy tokens exactly, through the
engine's scheduler and paged latent cache.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model_host import dist
from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.config import ModelConfig
from model_host.loader import load_model
from model_host.sharding import Layout
from model_host.spec import checkpoint_layout

PROMPTS = [[0, 11, 57, 301, 7, 900, 23], [0, 5] * 10 + [77], [0, 999, 3]]
STEPS = 32


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    """Restart the peak-RSS count (Linux clear_refs 5).  ru_maxrss alone cannot serve: a spawned
    child inherits, at exec, its parent's peak (the pytest process, models and all)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rank(rv: dist.Rendezvous, ckpt: str, out: str, task: str) -> None:
    """One rank's whole life: join, load its share, run ``task``, rank 0 saves the results."""
    from model_host.engine.engine import Engine, EngineConfig
    from model_host.engine.runner import ModelRunner
    from model_host.engine.tp import DriverRunner, follow
    from model_host.sampler import SamplingParams
    from model_host.tokenizer import Tokenizer

    torch.set_num_threads(1)
    ctx = dist.init(rv, "cpu")
    _reset_peak()
    before = _status_mb("VmRSS")
    mtp = task == "engine" and ModelConfig.from_json(ckpt).num_nextn_predict_layers > 0
    model = load_model(ckpt, dtype=torch.float32, parallel=ctx, load_mtp=mtp)
    result = {
        "load_peak_mb": _status_mb("VmHWM") - before,  # the peak resident set while loading
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # for the record
        "params_mb": sum(p.nbytes for p in model.parameters()) / 2**20,
    }
    if task == "engine":
        ids = torch.tensor([PROMPTS[0] * 2, PROMPTS[2] * 4 + [1, 2]])
        cache = model.new_cache(2, 32)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        first = model(ids, pos, cache)
        prefill = first.logits
        step = model(ids[:, -1:] + 1, pos[:, -1:] + 1, cache).logits  # one cached decode step
        if mtp:  # the MTP layer's draft logits from the same hidden states
            result["mtp"] = model.mtp_forward(ids, first.hidden).logits
        runner = (lambda m, c: DriverRunner(m, c, ctx)) if ctx.world > 1 and ctx.is_driver else ModelRunner
        engine = Engine(model, Tokenizer(ckpt), EngineConfig(max_batch=3, kv_memory_gb=0.01, block_size=8),
                        runner=runner)
        if ctx.is_driver:
            params = SamplingParams(max_tokens=STEPS, ignore_eos=True)
            seqs = engine.generate(PROMPTS, params)
            result.update(prefill=prefill, step=step, tokens=[s.output_ids for s in seqs])
            if ctx.world > 1:
                engine.runner.shutdown()
        else:
            result["follower_steps"] = follow(engine.runner, ctx)
    torch.save(result, f"{out}/rank{ctx.rank}.pt")
    ctx.close()


def run_ranks(world: int, ckpt: Path, out: Path, task: str) -> list[dict]:
    """Spawn ``world`` ranks, wait for all, return each rank's saved results."""
    out.mkdir(parents=True, exist_ok=True)
    port = dist.free_port()
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_rank, args=(dist.Rendezvous(r, world, r, "127.0.0.1", port), str(ckpt),
                                               str(out), task)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed (see its traceback above)"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """tiny (with its MTP layer) and a 1024-token vocabulary, in many small shards + an index."""
    out = tmp_path_factory.mktemp("tp_ckpt")
    rep = write_random_checkpoint(out, make_config("tiny", vocab_size=1024), dtype="bf16",
                                  seed=3, shard_size_mb=0.25)
    assert rep.num_shards > 4 and (out / "model.safetensors.index.json").exists()
    return out


@pytest.fixture(scope="module")
def tp1(ckpt, tmp_path_factory) -> dict:
    return run_ranks(1, ckpt, tmp_path_factory.mktemp("tp1"), "engine")[0]


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tp_matches_tp1(world, ckpt, tp1, tmp_path):
    ranks = run_ranks(world, ckpt, tmp_path, "engine")
    got = ranks[0]
    for key in ("prefill", "step", "mtp"):
        ref = tp1[key]
        err = (got[key] - ref).abs().max().item()
        assert err <= 2e-5 * ref.abs().max().item(), f"{key} logits differ by {err}"
    assert got["tokens"] == tp1["tokens"]
    assert all(len(t) == STEPS for t in got["tokens"])
    # The followers ran every forward rank 0 ran: the prompts' packed prefill + the decode steps.
    assert all(r["follower_steps"] >= STEPS for r in ranks[1:])
    assert all(abs(r["params_mb"] - tp1["params_mb"] / world) < tp1["params_mb"] * 0.3 for r in ranks)


def test_each_rank_loads_only_its_slices(tmp_path):
    """Real 129,280-token vocabulary: the two tables dominate, so each TP2 rank's load peak
    (ru_maxrss over its RSS before loading) stays near half of TP1's."""
    ck = tmp_path / "ck"
    write_random_checkpoint(ck, make_config("tiny", mtp=False), dtype="bf16", seed=0, shard_size_mb=16,
                            tokenizer=False)
    one = run_ranks(1, ck, tmp_path / "tp1", "load")[0]
    two = run_ranks(2, ck, tmp_path / "tp2", "load")
    print(f"load peak MiB over RSS before loading: TP1 {one['load_peak_mb']:.0f}; TP2 ranks "
          + ", ".join(f"{r['load_peak_mb']:.0f}" for r in two)
          + f" (ru_maxrss, parent's peak included: {one['ru_maxrss_mb']:.0f}; "
          + ", ".join(f"{r['ru_maxrss_mb']:.0f}" for r in two) + ")")
    assert one["params_mb"] > 130  # fp32 tables: 2 x 129280 x 128 x 4 B
    for r in two:
        assert r["params_mb"] < 0.55 * one["params_mb"]
        assert r["load_peak_mb"] < 0.6 * one["load_peak_mb"]


@pytest.mark.slow
def test_fp8_scales_are_sliced_on_block_edges(tmp_path):
    """An FP8 model whose head / MLP splits fall on 128-blocks: TP2 logits equal TP1's."""
    cfg = make_config("tiny", fp8=True, vocab_size=1024, mtp=False, qk_nope_head_dim=64,
                      qk_rope_head_dim=64, v_head_dim=64, moe_intermediate_size=256)
    lay = Layout(cfg, 1, 2)
    scales = {s.name: lay.shard(s) for s in checkpoint_layout(cfg) if s.kind == "scale"}
    assert scales["model.layers.0.self_attn.o_proj.weight_scale_inv"].start == 1  # second column block
    assert scales["model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv"].start == 1
    ck = tmp_path / "ck"
    write_random_checkpoint(ck, cfg, dtype="fp8", seed=5, shard_size_mb=0.25)
    ref = run_ranks(1, ck, tmp_path / "tp1", "engine")[0]
    got = run_ranks(2, ck, tmp_path / "tp2", "engine")[0]
    assert (got["prefill"] - ref["prefill"]).abs().max() <= 2e-5 * ref["prefill"].abs().max()
    assert got["tokens"] == ref["tokens"]


def test_torchrun_env_keeps_global_and_local_rank_apart():
    # Rank 9 of 16 on the second node is that node's GPU 1: the shard follows the global rank,
    # the device the local one.
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
    assert dist.from_env(env) == dist.Rendezvous(9, 16, 1, "10.0.0.1", 29501)
    assert dist.from_env({}) is None  # not under torchrun: serve spawns its own ranks
