"""`model-host serve`: load a checkpoint and serve it over the OpenAI protocol.

With ``--tp N`` the model is split over N ranks (:mod:`model_host.parallel`): this process is
rank 0 (scheduler + HTTP) and spawns ranks 1..N-1, or, under ``torchrun``, every process runs
this command and the rank picks its role.  Before anything is loaded or spawned, the memory
plan (:mod:`model_host.plan`) must say the model fits, else serve exits with its sentence.
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

import torch

from model_host import dist
from model_host.config import ModelConfig
from model_host.sharding import check_divisible

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="activation dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together")
    p.add_argument("--kv-memory-gb", type=float, default=1.0, help="memory budget of the paged latent KV cache")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (prefix-cache granularity)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: checkpoint dir name)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor/expert-parallel ranks, one per GPU (spawned here, or torchrun's WORLD_SIZE)")
    p.add_argument("--gpu-mem-gb", type=float, default=None,
                   help="GiB per GPU for the fit check (default: the GPU's own; on CPU only checked when given)")
    p.set_defaults(func=run)


def _engine_config(args: argparse.Namespace):
    from model_host.engine.engine import EngineConfig

    return EngineConfig(max_batch=args.max_batch, kv_memory_gb=args.kv_memory_gb, block_size=args.block_size,
                        max_model_len=args.max_model_len)


def _check_fits(args: argparse.Namespace, device: str, dtype: torch.dtype) -> None:
    """Exit with the planner's sentence when the model, or the asked-for KV cache, does not fit."""
    from model_host.plan import GiB, plan

    mem = args.gpu_mem_gb
    if mem is None and device.startswith("cuda"):
        mem = torch.cuda.get_device_properties(0).total_memory / GiB
    if mem is None:
        return
    p = plan(ModelConfig.from_json(args.checkpoint), args.tp, mem, dtype=dtype)
    if not p.fits:
        raise SystemExit(f"model-host: {Path(args.checkpoint).name} {p.sentence()}")
    if args.kv_memory_gb * GiB > p.kv_bytes:
        raise SystemExit(f"model-host: --kv-memory-gb {args.kv_memory_gb:g} is more than the "
                         f"{p.kv_bytes / GiB:.1f} GiB per GPU left for the KV cache; lower it ({p.sentence()})")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="model-host: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    rv = dist.from_env()
    if rv is not None and rv.world != args.tp:
        raise SystemExit(f"model-host: --tp {args.tp} but torchrun started {rv.world} ranks; pass --tp {rv.world}")
    # Before any rank loads a byte; under torchrun every rank checks (the same pure answer), so
    # a refusal stops them all instead of leaving ranks waiting for rank 0.
    check_divisible(ModelConfig.from_json(args.checkpoint), args.tp)
    _check_fits(args, device, dtype)
    if device.startswith("cuda") and rv is None and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"model-host: --tp {args.tp} needs {args.tp} GPUs; {torch.cuda.device_count()} visible")
    workers = []
    if rv is None:
        rv, workers = dist.spawn(args.tp, serve_rank, (args, device, dtype)) if args.tp > 1 else (
            dist.Rendezvous(0, 1, 0), [])
    try:
        return serve_rank(rv, args, device, dtype)
    finally:
        for w in workers:
            w.join(timeout=30)


def serve_rank(rv: dist.Rendezvous, args: argparse.Namespace, device: str, dtype: torch.dtype) -> int:
    """One rank: load its share; rank 0 serves HTTP, the others follow its step plans."""
    import uvicorn

    from model_host.engine.engine import Engine, EngineLoop
    from model_host.engine.runner import ModelRunner
    from model_host.engine.tp import DriverRunner, follow
    from model_host.loader import load_model
    from model_host.server.app import create_app
    from model_host.tokenizer import Tokenizer

    logging.basicConfig(level=logging.INFO, format=f"model-host[{rv.rank}]: %(message)s")
    ctx = dist.init(rv, "cuda" if device.startswith("cuda") else "cpu")
    model = load_model(args.checkpoint, device=ctx.device, dtype=dtype, parallel=ctx)
    if device.startswith("cuda"):
        # FP8 GEMM, grouped MoE and paged MLA decode kernels; with them the runner replays
        # decode steps from captured CUDA graphs. The CPU keeps the pure-PyTorch path.
        from model_host.kernels import install

        install(model)
    tokenizer = Tokenizer(args.checkpoint)
    if not ctx.is_driver:  # same engine (same cache and blocks), driven by rank 0's plans
        follow(Engine(model, tokenizer, _engine_config(args)).runner, ctx)
        ctx.close()
        return 0
    runner = functools.partial(DriverRunner, ctx=ctx) if ctx.world > 1 else ModelRunner
    engine = Engine(model, tokenizer, _engine_config(args), runner=runner)
    logging.getLogger("model-host").info(
        "KV cache holds %d tokens (%d blocks); max context %d; %d rank(s); serving %s on http://%s:%d/v1",
        engine.capacity_tokens, engine.blocks.num_blocks, engine.max_model_len, ctx.world,
        args.served_model_name or Path(args.checkpoint).name, args.host, args.port)
    loop = EngineLoop(engine)
    app = create_app(loop, tokenizer, args.served_model_name or Path(args.checkpoint).resolve().name, args.api_key)
    loop.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        loop.stop()
        if ctx.world > 1:
            engine.runner.shutdown()
        ctx.close()
    return 0
