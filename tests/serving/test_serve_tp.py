"""`model-host serve --tp N`: the fit check before anything loads, and a real TP2 server over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from model_host.cli import main
from model_host.dist import NO_MULTICAST_ENV
from model_host.engine.engine import Engine, EngineConfig
from model_host.loader import load_model
from model_host.sampler import SamplingParams
from model_host.tokenizer import Tokenizer
from tests.support.openai_stub import free_port

PROMPT = [0, 4, 33, 260, 1999, 12, 77, 5000, 8]


def test_serve_refuses_a_model_that_does_not_fit(tiny_checkpoint):
    # The tiny model holds ~130 MiB of fp32 weights; 0.05 GiB per "GPU" cannot hold it even
    # split in two.  The refusal is the planner's sentence, before any rank starts.
    with pytest.raises(SystemExit) as e:
        main(["serve", "--checkpoint", str(tiny_checkpoint), "--tp", "2", "--gpu-mem-gb", "0.05"])
    msg = str(e.value)
    assert msg.startswith("model-host: tiny-v3 does not fit on 2 x 0.05 GiB:") and "per GPU" in msg


def test_serve_refuses_a_kv_budget_beyond_the_plan(tiny_checkpoint):
    with pytest.raises(SystemExit, match=r"--kv-memory-gb 50 is more than the [\d.]+ GiB per GPU left"):
        main(["serve", "--checkpoint", str(tiny_checkpoint), "--gpu-mem-gb", "40", "--kv-memory-gb", "50"])


def test_serve_refuses_a_degree_that_does_not_divide(tiny_checkpoint, capsys):
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--tp", "3"]) == 1
    assert "error: tensor-parallel degree 3 does not divide num_attention_heads=4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reference_text(tiny_checkpoint) -> str:
    """The single-process engine's greedy completion of PROMPT (24 tokens)."""
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    tok = Tokenizer(tiny_checkpoint)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = Engine(model, tok, EngineConfig(kv_memory_gb=0.01, block_size=8)).generate([PROMPT], params)[0]
    return tok.decode(ref.output_ids, skip_special_tokens=True)


def _start(launcher: list[str], ckpt, port: int, *extra: str) -> subprocess.Popen:
    serve = ["serve", "--checkpoint", str(ckpt), "--tp", "2", "--port", str(port), "--kv-memory-gb", "0.01",
             "--block-size", "8", "--max-model-len", "256", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, "-m", "model_host.cli", *serve], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _complete_twice(proc: subprocess.Popen, port: int, expected: str) -> None:
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, f"serve exited: {proc.stdout.read()}"
        assert time.time() < deadline, "serve --tp 2 did not come up"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    body = {"model": "tiny-v3", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    for _ in range(2):  # twice: the second run is served from the prefix cache on both ranks
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 24
        assert r.json()["choices"][0]["text"] == expected


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.mark.slow
def test_serve_tp2_over_http_matches_one_process(tiny_checkpoint, reference_text):
    """A real `serve --tp 2` (rank 0 spawns rank 1, gloo on CPU): greedy completions over HTTP
    equal the single-process engine's; the worker has NVLink multicast off and exits with it."""
    port = free_port()
    proc = _start([sys.executable], tiny_checkpoint, port)
    try:
        _complete_twice(proc, port, reference_text)
        workers = _spawned_children(proc.pid)
        assert len(workers) == 1, "serve --tp 2 should run one worker process"
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{workers[0]}/environ").read_text().split("\0") if "=" in kv)
        assert {k: env.get(k) for k in NO_MULTICAST_ENV} == NO_MULTICAST_ENV
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGTERM, proc.stdout.read()  # ended by the signal, after its cleanup
    deadline = time.time() + 30  # rank 0 released its worker on the way out
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.time() < deadline, "the worker rank outlived the server"
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_tp2_under_torchrun(tiny_checkpoint, reference_text):
    """The multi-node way on one node: torchrun starts both ranks, each reads its rank from the
    environment; rank 0 serves the same tokens."""
    port = free_port()
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-port", str(free_port())], tiny_checkpoint, port)
    try:
        _complete_twice(proc, port, reference_text)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_serve_tp2_with_api_processes(tiny_checkpoint, reference_text):
    """On CUDA `serve` puts the routes in API processes by default, --tp or not: rank 0's engine
    serves them over the hub's socket while it drives rank 1, and SIGTERM ends every process."""
    port = free_port()
    proc = _start([sys.executable], tiny_checkpoint, port, "--api-processes", "2")
    try:
        _complete_twice(proc, port, reference_text)
        spawned = _spawned_children(proc.pid)
        assert len(spawned) == 3, "one worker rank and two API processes"
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGTERM, proc.stdout.read()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in spawned):
        assert time.time() < deadline, "a worker rank or an API process outlived the server"
        time.sleep(0.2)


def _spawned_children(pid: int) -> list[int]:
    """Child processes of ``pid`` started by multiprocessing's spawn (the worker ranks)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


class _NoPlans:
    """A control group that fails the test if rank 0 sends its followers a plan."""

    world = 2

    def broadcast(self, *args):
        raise AssertionError("rank 0 broadcast a plan its followers are not yet listening for")


def test_start_up_warm_up_runs_on_each_rank_alone(tiny_model):
    """Every rank warms its prefill and riding-row kernels up inside Engine() (on GPUs), before the followers
    enter follow(): rank 0 must not send those forwards as plans (a hang at start-up under
    --tp), and an engine over the driver never overlaps its steps (its plans carry host tokens)."""
    from model_host.engine.block_tables import DeviceBlockTables
    from model_host.engine.tp import DriverRunner

    model, tok = tiny_model
    engine = Engine(model, tok, EngineConfig(kv_memory_gb=0.02, block_size=8),
                    runner=lambda m, c: DriverRunner(m, c, _NoPlans()))
    engine.runner.warm_up([1, 7, 30])  # what Engine() runs with CUDA graphs, on every rank
    # and the eager riding decode steps, with tables as narrow as graphs of a 16-token
    # max_model_len would leave (capture_graphs narrows them so; block size 8): 33 rows ride as
    # prompts of 16, 16 and 1 tokens, so no table outgrows the graphs' width (a wider one would
    # turn every later decode step eager).
    engine.runner.block_tables = DeviceBlockTables(2, engine.runner.device)
    engine.runner.warm_up_rows([9, 33], max_len=16)
    assert not engine.runner.block_tables.slot_of  # the warm-up rows' tables are given back
    assert engine.runner.block_tables.width == 2
    assert engine.overlap is False and engine.runner.device_tokens is False
    with pytest.raises(ValueError, match="tokens on the device"):
        Engine(model, tok, EngineConfig(kv_memory_gb=0.02, overlap=True),
               runner=lambda m, c: DriverRunner(m, c, _NoPlans()))
