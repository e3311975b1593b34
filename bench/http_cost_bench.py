"""CPU time per streamed token of the server's two threads: HTTP (uvicorn's event loop) and engine.

On the GPU the served throughput at high load is bound by the GIL the two threads share
(docs/gpu_notes.md, "Overlapped steps"), so what matters is how much host CPU each spends per
token; that is measurable on the CPU. The real server (tiny random checkpoint, one torch thread)
runs in this process; streaming clients run in another (bench/serve_clients.py). Per thread:
CPU microseconds (its own clock) over the level, divided by the tokens streamed.

    python bench/http_cost_bench.py                      # this checkout
    python bench/http_cost_bench.py --repo /other/tree   # another checkout's model_host (paired runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def thread_cpu(t: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout whose model_host runs")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--http", default="auto", help="uvicorn's HTTP protocol: auto, h11 or httptools")
    ap.add_argument("--loop", default="auto", help="uvicorn's event loop: auto, asyncio or uvloop")
    args = ap.parse_args()
    sys.path[:0] = [args.repo, str(Path(__file__).resolve().parent)]
    import torch
    import uvicorn
    from serve_clients import run_level

    from model_host.checkpoint import make_config, write_random_checkpoint
    from model_host.engine.engine import Engine, EngineConfig
    from model_host.engine.loop import EngineLoop
    from model_host.loader import load_model
    from model_host.server.app import create_app
    from model_host.server.handle import LocalEngine
    from model_host.tokenizer import Tokenizer
    from tests.support.openai_stub import free_port

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny"
        write_random_checkpoint(ckpt, make_config("tiny", mtp=False), dtype="bf16", seed=0)
        model, tok = load_model(ckpt, dtype=torch.float32), Tokenizer(ckpt)
    engine = Engine(model, tok, EngineConfig(max_batch=args.concurrency, kv_memory_gb=0.2, max_model_len=4096))
    loop = EngineLoop(engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(LocalEngine(loop), tok, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning", http=args.http, loop=args.loop))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    loop.start()
    http.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/v1"
    prompts = [[{"role": "user", "content": f"Question {i}: how are vectors indexed in segment {i % 7}?"}]
               for i in range(args.requests)]
    try:
        with ProcessPoolExecutor(2) as pool:
            run_level(pool, base, prompts[:8], 4, 8)  # connections, first steps
            threads = {"http": http, "engine": loop.thread}
            before = {k: thread_cpu(t) for k, t in threads.items()}
            level = run_level(pool, base, prompts, args.concurrency, args.max_tokens)
            after = {k: thread_cpu(t) for k, t in threads.items()}
    finally:
        server.should_exit = True
        http.join(timeout=10)
        loop.stop()
    n = level["output_tokens"]
    out = {"repo": args.repo, "http": args.http, "loop": args.loop, "tokens": n, "errors": level["errors"], "output_tok_s": round(level["output_tok_s"], 1),
           **{f"{k}_cpu_us_per_token": round(1e6 * (after[k] - before[k]) / max(1, n), 1) for k in threads}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
