"""`model-host serve`: load a checkpoint and serve it over the OpenAI protocol.

`build` loads the model and constructs the engine and the app; `run` adds the process around
them: the fit check, the ranks, start-up logging, uvicorn (a side thread), the engine (the main
thread), and a prompt shutdown on SIGTERM/SIGINT.

With ``--tp N`` the model is split over N ranks (:mod:`model_host.parallel`): this process is
rank 0 (scheduler + HTTP) and spawns ranks 1..N-1, or, under ``torchrun``, every process runs
this command and its rank picks its role.  Before anything is loaded or spawned, the memory
plan (:mod:`model_host.plan`) must say the model fits, else serve exits with its sentence.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI

from model_host import dist
from model_host.config import ModelConfig
from model_host.engine.loop import EngineLoop
from model_host.server.metrics import Metrics
from model_host.sharding import check_divisible

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# On a GPU the routes get processes of their own by default: on one H100, paired, concurrency
# 128 went from 80% / 80% to 85% / 87% of the decode-step bound with 4 (docs/benchmarks.md,
# "Eleventh session"). On the CPU the engine is the bottleneck and the processes only cost memory.
API_PROCESSES_CUDA = 4
log = logging.getLogger("model_host.server")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="activation dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together")
    p.add_argument("--kv-memory-gb", type=float, default=None,
                   help="memory of the paged latent KV cache per GPU (default: on one GPU 90%% of the memory free "
                        "after the weights, one prefill step and the CUDA graphs; under --tp the memory plan's "
                        "figure; 1 GiB on the CPU)")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens computed per step: long prompts are split, and running decodes wait for "
                        "at most this many (default 4096: against 2048, 24%% more output and 30%% lower TTFT p99 "
                        "with 32 clients sending unique RAG prompts, ITL p99 no worse; docs/benchmarks.md)")
    p.add_argument("--row-prefill-tokens", type=int, default=None,
                   help="a step of at most this many rows (decode rows plus one per prompt token) runs its "
                        "prompt chunks inside the graph-captured decode step instead of a separate prefill "
                        "forward: at low load a prompt whose prefix is cached starts at decode speed (default 64 "
                        "with CUDA graphs, else 0; 0 = off; off with --speculative-tokens)")
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="queue step n+1 on the GPU before reading step n's tokens, so detokenizing and "
                        "streaming hide behind the GPU (auto: on with CUDA graphs, off on the CPU, with "
                        "--speculative-tokens and under --tp)")
    p.add_argument("--graph-memory-gb", type=float, default=None,
                   help="most GPU memory the CUDA graphs may take: decode (one per batch size up to --max-batch), "
                        "riding steps (one per 64 rows up to --riding-graph-rows) and whole-prompt prefills (one "
                        "per 128 tokens up to --prefill-graph-tokens), in one pool (default 4 with prefill or "
                        "riding graphs: at V3's widths, decode to 192 rows and prefill to 4,096 tokens took 1.85 "
                        "GiB on an H200; 1 without)")
    p.add_argument("--riding-graph-rows", type=int, default=None,
                   help="steps where prompt chunks ride the decode step as rows (--row-prefill-tokens, and "
                        "short chunks after a cached prefix), past the decode batch sizes, replay a CUDA graph "
                        "of their 64-row bucket up to this many rows (default 1024; 0 = off)")
    p.add_argument("--prefill-graph-tokens", type=int, default=None,
                   help="prompts of 257 to this many tokens with nothing cached prefill by replaying a CUDA graph "
                        "of their length bucket, where decode steps are captured (default: --max-prefill-tokens, "
                        "at most 4096; 0 = off)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (prefix-cache granularity)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: checkpoint dir name)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor/expert-parallel ranks, one per GPU (spawned here, or torchrun's WORLD_SIZE)")
    p.add_argument("--gpu-mem-gb", type=float, default=None,
                   help="GiB per GPU for the fit check (default: the GPU's own; on CPU only checked when given)")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="MTP speculative decoding: draft K tokens per decode step with the checkpoint's MTP "
                        "layer and verify them in one forward (0 = off; see docs/benchmarks.md)")
    p.add_argument("--api-processes", type=int, default=None, metavar="N",
                   help="serve the HTTP routes from N processes of their own, each parsing, tokenizing and "
                        "streaming its share of the connections, with the engine alone in this one (0 = the "
                        f"routes on a thread of the engine's process; default {API_PROCESSES_CUDA} on CUDA, "
                        "0 on the CPU; see docs/benchmarks.md)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 5)")
    p.set_defaults(func=run)


@dataclass
class Served:
    app: FastAPI
    loop: EngineLoop
    metrics: Metrics
    model_name: str
    device: str
    tokenizer_path: Path
    ctx: dist.DistContext = field(default_factory=dist.DistContext)

    def close(self) -> None:
        """Stop the engine thread, then release the other ranks and leave the group."""
        self.loop.stop()
        if self.ctx.world > 1:
            self.loop.engine.runner.shutdown()
        self.ctx.close()


def _device_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]


def _engine_config(args: argparse.Namespace, world: int = 1):
    from model_host.engine.engine import EngineConfig

    kv = args.kv_memory_gb
    if kv is None and world > 1 and _device_dtype(args)[0].startswith("cuda"):
        # Every rank must hold the same blocks, so not a per-rank measurement: the memory plan's
        # figure, the same pure answer on every rank.
        kv = _plan(args).kv_bytes / 2**30
    return EngineConfig(max_batch=args.max_batch, kv_memory_gb=kv, block_size=args.block_size,
                        max_model_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens,
                        graph_memory_gb=args.graph_memory_gb, row_prefill_tokens=args.row_prefill_tokens,
                        prefill_graph_tokens=args.prefill_graph_tokens, riding_graph_rows=args.riding_graph_rows,
                        speculative_tokens=args.speculative_tokens,
                        # Under TP the other ranks take their tokens from rank 0's plan, on the host.
                        overlap=False if world > 1 else {"auto": None, "on": True, "off": False}[args.overlap])


def _load(args: argparse.Namespace, ctx: dist.DistContext):
    """This rank's share of the model (on its own GPU under TP) and the tokenizer."""
    from model_host.loader import load_model
    from model_host.tokenizer import Tokenizer

    device, dtype = _device_dtype(args)
    ops = None  # the CPU keeps the pure-PyTorch ops
    if device.startswith("cuda"):
        # FP8 GEMM, grouped MoE and paged MLA decode kernels; with them the runner replays
        # decode steps from captured CUDA graphs.
        from model_host.kernels.backend import TritonOps

        ops = TritonOps()
    where = ctx.device if ctx.world > 1 else device
    model = load_model(args.checkpoint, device=where, dtype=dtype, ops=ops, parallel=ctx,
                       load_mtp=args.speculative_tokens > 0)
    return model, Tokenizer(args.checkpoint)


def build(args: argparse.Namespace, ctx: dist.DistContext | None = None, model=None, tokenizer=None) -> Served:
    """Load the checkpoint (rank 0's share under TP) and build the engine loop (not started) and
    the app over it.  ``model`` and ``tokenizer``: serve these instead of loading (bench/serve_bench.py
    passes a model it built on the GPU, so the benchmark serves through exactly this code)."""
    from model_host.engine.engine import Engine
    from model_host.engine.runner import ModelRunner
    from model_host.engine.tp import DriverRunner
    from model_host.server.app import create_app
    from model_host.server.handle import LocalEngine

    ctx = ctx or dist.DistContext()
    device, dtype = _device_dtype(args)
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    t0 = time.perf_counter()
    if model is None:
        log.info("loading %s on %s (%s), %d rank(s)", args.checkpoint, device, str(dtype).removeprefix("torch."),
                 ctx.world)
        model, tokenizer = _load(args, ctx)
    runner = functools.partial(DriverRunner, ctx=ctx) if ctx.world > 1 else ModelRunner
    engine = Engine(model, tokenizer, _engine_config(args, ctx.world), runner=runner)
    log.info("model %s loaded in %.1f s: %d layers, device %s; KV cache holds %d tokens (%d blocks of %d); "
             "max context %d tokens", name, time.perf_counter() - t0, model.cfg.num_hidden_layers, device,
             engine.capacity_tokens, engine.blocks.num_blocks, engine.blocks.block_size, engine.max_model_len)
    loop = EngineLoop(engine)
    local = LocalEngine(loop)
    return Served(create_app(local, tokenizer, name, args.api_key), loop, local.metrics, name, device,
                  tokenizer.path, ctx)


def _plan(args: argparse.Namespace):
    """The memory plan for this checkpoint, --tp and GPU size (None on the CPU without --gpu-mem-gb)."""
    from model_host.plan import GiB, plan

    device, dtype = _device_dtype(args)
    mem = args.gpu_mem_gb
    if mem is None and device.startswith("cuda"):
        mem = torch.cuda.get_device_properties(0).total_memory / GiB
    return None if mem is None else plan(ModelConfig.from_json(args.checkpoint), args.tp, mem, dtype=dtype)


def _check_fits(args: argparse.Namespace) -> None:
    """Exit with the planner's sentence when the model, or the asked-for KV cache, does not fit."""
    from model_host.plan import GiB

    p = _plan(args)
    if p is None:
        return
    if not p.fits:
        raise SystemExit(f"model-host: {Path(args.checkpoint).name} {p.sentence()}")
    if args.kv_memory_gb is not None and args.kv_memory_gb * GiB > p.kv_bytes:
        raise SystemExit(f"model-host: --kv-memory-gb {args.kv_memory_gb:g} is more than the "
                         f"{p.kv_bytes / GiB:.1f} GiB per GPU left for the KV cache; lower it ({p.sentence()})")


def _check_speculative(args: argparse.Namespace) -> None:
    from model_host.speculative import require_mtp

    try:
        require_mtp(args.checkpoint, args.speculative_tokens)
    except ValueError as e:
        raise SystemExit(f"model-host: {e}") from None
    if args.speculative_tokens and args.tp > 1:
        raise SystemExit("model-host: --speculative-tokens runs on one GPU for now; drop it or use --tp 1")


def run(args: argparse.Namespace) -> int:
    # Before any rank loads a byte; under torchrun every rank checks (the same pure answer), so
    # a refusal stops them all instead of leaving ranks waiting for rank 0.
    rv = dist.from_env()
    if rv is not None and rv.world != args.tp:
        raise SystemExit(f"model-host: --tp {args.tp} but torchrun started {rv.world} ranks; pass --tp {rv.world}")
    check_divisible(ModelConfig.from_json(args.checkpoint), args.tp)
    if args.api_processes is not None and args.api_processes < 0:
        raise SystemExit(f"model-host: --api-processes {args.api_processes} must be 0 (routes in this process) "
                         f"or more")
    _check_speculative(args)
    _check_fits(args)
    device, _ = _device_dtype(args)
    if device.startswith("cuda") and rv is None and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"model-host: --tp {args.tp} needs {args.tp} GPUs; {torch.cuda.device_count()} visible")
    workers = []
    if rv is None:
        rv, workers = dist.spawn(args.tp, serve_rank, (args,)) if args.tp > 1 else (dist.Rendezvous(0, 1, 0), [])
    try:
        return serve_rank(rv, args)
    finally:
        for w in workers:
            w.join(timeout=30)


def serve_rank(rv: dist.Rendezvous, args: argparse.Namespace) -> int:
    """One rank: rank 0 serves HTTP; the others load their share and follow its step plans."""
    from model_host.engine.engine import Engine
    from model_host.engine.tp import follow

    # Start-up lines are shown without -v: a server that prints nothing looks hung while it loads.
    logging.basicConfig(format=f"model-host[{rv.rank}]: %(message)s" if rv.world > 1 else "%(message)s")
    log.setLevel(logging.INFO)
    ctx = dist.init(rv, "cuda" if _device_dtype(args)[0].startswith("cuda") else "cpu")
    if not ctx.is_driver:  # the same engine (same cache and blocks), driven by rank 0's plans
        model, tokenizer = _load(args, ctx)
        follow(Engine(model, tokenizer, _engine_config(args, ctx.world)).runner, ctx)
        ctx.close()
        return 0
    return serve(build(args, ctx), args)


def api_processes(args: argparse.Namespace) -> int:
    """--api-processes, or its default: API_PROCESSES_CUDA on a GPU, 0 on the CPU."""
    if args.api_processes is not None:
        return args.api_processes
    return API_PROCESSES_CUDA if _device_dtype(args)[0].startswith("cuda") else 0


def http_stack() -> tuple[str, str]:
    """uvicorn's HTTP protocol and event loop: the C parser (httptools) and libuv loop (uvloop)
    where installed, as `uvicorn[standard]` has them; else the pure-Python h11 and asyncio. The
    HTTP thread shares the GIL with the engine, and its per-event CPU is what bounds served
    throughput at high concurrency (docs/benchmarks.md, "HTTP stack")."""
    http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop_impl = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http_impl, loop_impl


def serve(served: Served, args: argparse.Namespace) -> int:
    """Rank 0: uvicorn on ``--host``/``--port`` on a side thread, the engine on this one (the thread
    that loaded the model: see EngineLoop), until SIGTERM/SIGINT; then the process ends by that
    signal, after the other ranks are released."""
    import uvicorn

    # A short graceful timeout: uvicorn otherwise waits for every open request (a long
    # generation, a stalled stream) before exiting on SIGTERM.
    http_impl, loop_impl = http_stack()
    if (n := api_processes(args)) > 0:
        from model_host.server.processes import serve_api_processes

        return serve_api_processes(served, args, n, http_impl, loop_impl)
    server = uvicorn.Server(uvicorn.Config(served.app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_timeout,
                                           http=http_impl, loop=loop_impl))
    signals: list[int] = []

    def on_signal(sig: int, frame) -> None:
        signals.append(sig)
        server.handle_exit(sig, frame)  # graceful first; a second Ctrl-C forces

    def http() -> None:
        try:
            server.run()  # off the main thread uvicorn installs no signal handlers: on_signal does
        finally:
            served.loop.stop()  # in-flight requests were answered (or timed out): the engine may go

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="http", daemon=True)
    thread.start()
    log.info("serving %s on http://%s:%d/v1 (HTTP: %s on %s; Ctrl-C or SIGTERM stops it)", served.model_name,
             args.host, args.port, http_impl, loop_impl)
    try:
        served.loop.run()
        # A failed engine leaves uvicorn answering /health with 503 until the orchestrator stops us.
        thread.join(timeout=None if served.loop.error is not None else args.shutdown_timeout + 5)
    finally:
        served.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(f"model-host: could not serve on {args.host}:{args.port} (see the error above); "
                         f"pick a free --port")
    if served.loop.error is not None:
        return 1
    for sig in signals[-1:]:  # the exit status says which signal stopped the server (no traceback)
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)
    return 0
