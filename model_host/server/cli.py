"""`model-host serve`: load a checkpoint and serve it over the OpenAI protocol.

`build` loads the model and constructs the engine and the app; `run` adds the process around
them: start-up logging, the engine thread, uvicorn, and a prompt shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI

from model_host.engine.engine import EngineLoop

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
log = logging.getLogger("model_host.server")


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
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="MTP speculative decoding: draft K tokens per decode step with the checkpoint's MTP "
                        "layer and verify them in one forward (0 = off; see docs/benchmarks.md)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (only 1 is implemented)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 5)")
    p.set_defaults(func=run)


@dataclass
class Served:
    app: FastAPI
    loop: EngineLoop
    model_name: str
    device: str


def build(args: argparse.Namespace) -> Served:
    """Load the checkpoint and build the engine loop (not started) and the app over it."""
    from model_host.engine.engine import Engine, EngineConfig
    from model_host.loader import load_model
    from model_host.server.app import create_app
    from model_host.tokenizer import Tokenizer

    if args.tp != 1:
        raise SystemExit("model-host: --tp > 1 is not implemented yet; run with --tp 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    from model_host.speculative import require_mtp

    try:
        require_mtp(args.checkpoint, args.speculative_tokens)
    except ValueError as e:
        raise SystemExit(f"model-host: {e}") from None
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    log.info("loading %s on %s (%s)", args.checkpoint, device, str(dtype).removeprefix("torch."))
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, device=device, dtype=dtype, load_mtp=args.speculative_tokens > 0)
    if device.startswith("cuda"):
        # FP8 GEMM, grouped MoE and paged MLA decode kernels; with them the runner replays
        # decode steps from captured CUDA graphs. The CPU keeps the pure-PyTorch path.
        from model_host.kernels import install

        install(model)
    tokenizer = Tokenizer(args.checkpoint)
    engine = Engine(model, tokenizer, EngineConfig(
        max_batch=args.max_batch, kv_memory_gb=args.kv_memory_gb, block_size=args.block_size,
        max_model_len=args.max_model_len, speculative_tokens=args.speculative_tokens,
    ))
    log.info("model %s loaded in %.1f s: %d layers, device %s; KV cache holds %d tokens (%d blocks of %d); "
             "max context %d tokens", name, time.perf_counter() - t0, model.cfg.num_hidden_layers, device,
             engine.capacity_tokens, engine.blocks.num_blocks, engine.blocks.block_size, engine.max_model_len)
    loop = EngineLoop(engine)
    return Served(create_app(loop, tokenizer, name, args.api_key), loop, name, device)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    # Start-up lines are shown without -v: a server that prints nothing looks hung while it loads.
    log.setLevel(logging.INFO)
    served = build(args)
    # A short graceful timeout: uvicorn otherwise waits for every open request (a long
    # generation, a stalled stream) before exiting on SIGTERM.
    server = uvicorn.Server(uvicorn.Config(served.app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    served.loop.start()
    log.info("serving %s on http://%s:%d/v1 (Ctrl-C or SIGTERM stops it)", served.model_name, args.host, args.port)
    try:
        server.run()  # on SIGTERM uvicorn re-raises the signal after its shutdown: the process ends here
    finally:
        served.loop.stop()
    return 0
