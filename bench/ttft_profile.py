"""Where a served request's time to first token goes (issue 16), layer by layer, in one process.

serve_bench measures TTFT from the client; this splits it. On the truncated real-width model
(bench/decode_bench.py's, FP8 on the GPU) or the tiny random checkpoint (--quick, CPU), for fresh
prompts of N tokens that share nothing with the cache:

1. **forward**: the model's own prefill of N tokens into a paged cache (what serve_bench quotes
   as "prefill"), timed with CUDA events;
2. **engine**: `Engine.add` to the first token, synchronously, with each step's wall time
   (scheduling, packing, the packed varlen forward, sampling, detokenizing);
3. **HTTP**: the same engine behind `model-host serve`'s app, run as serve runs it (uvicorn on
   127.0.0.1 on a side thread, the engine on the main one); warm clients stream
   /v1/chat/completions, raw `httpx` and the `openai` SDK; the server's own TTFT (/metrics) beside.
4. a `torch.profiler` table of one engine TTFT (host time per op, kernel count).

    python3 bench/ttft_profile.py --out $OUT      # GPU
    python bench/ttft_profile.py --quick          # CPU plumbing check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def build(quick: bool, workdir: Path):
    from model_host.checkpoint import make_config

    if quick:
        from model_host.checkpoint import write_random_checkpoint
        from model_host.loader import load_model
        from model_host.tokenizer import Tokenizer

        ckpt = workdir / "tiny"
        write_random_checkpoint(ckpt, make_config("tiny", mtp=False), dtype="bf16", seed=0)
        return load_model(ckpt, dtype=torch.float32), Tokenizer(ckpt)
    import decode_bench as db

    from model_host.kernels.backend import TritonOps
    from model_host.tokenizer import Tokenizer

    model = db.build_model(make_config("v3", layers=3, dense_layers=1, mtp=False, fp8=True))
    model.ops = TritonOps()  # what `model-host serve --device cuda` loads the model with
    return model, Tokenizer()


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def forward_ms(model, engine, ids: list[int]) -> float:
    """The model's prefill of `ids` into the engine's cache (blocks 0..), as serve_bench times it."""
    cache, page, n = engine.cache, engine.cache.block_size, len(ids)
    dev = model.device
    x = torch.tensor([ids], device=dev)
    pos = torch.arange(n, device=dev).view(1, -1)
    table = torch.arange(-(-n // page), device=dev).view(1, -1)

    def run():
        cache.bind(table)
        return model(x, pos, cache, kv_len=n, last_only=True)

    times = []
    with torch.inference_mode():
        for i in range(6):
            sync(model)
            t0 = time.perf_counter()
            run()
            sync(model)
            if i:
                times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def engine_ttft(engine, ids: list[int]) -> tuple[float, list[float]]:
    """Wall ms from add() to the first token, and each step's wall ms."""
    from model_host.sampler import SamplingParams

    t0 = time.perf_counter()
    seq = engine.add(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    steps = []
    while seq.first_token_at is None:
        s0 = time.perf_counter()
        engine.step()
        sync(engine.model)
        steps.append(1e3 * (time.perf_counter() - s0))
    ms = 1e3 * (time.perf_counter() - t0)
    while engine.has_work:
        engine.step()
    return ms, steps


def fresh_prompts(tok, n_tokens: int, count: int, seed: int) -> list[list[dict]]:
    """Chat messages of about n_tokens each, sharing no prefix (a nonce first line)."""
    import serve_bench as sb

    pool = sb.passages(REPO / "docs")
    hits, _ = sb.context_set(pool, seed, n_tokens - 150)
    return [sb.messages(sb.QUESTIONS[0], hits, nonce=f"t{seed}-{k}") for k in range(count)]


def http_phase(served, msgs: list[list[dict]]) -> dict:
    """As `model-host serve` runs: the engine on this (main) thread, uvicorn on 127.0.0.1 on a
    side thread; a client thread with warm connections sends `msgs` one at a time."""
    import httpx
    import openai
    import uvicorn
    from serve_clients import server_ttft

    from tests.support.openai_stub import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(served.app, host="127.0.0.1", port=port, log_level="warning"))
    root = f"http://127.0.0.1:{port}"
    out: dict = {"raw_ms": [], "sdk_ms": [], "server_ms": []}

    body = lambda m: {"model": "probe", "messages": m, "max_tokens": 2, "temperature": 0, "stream": True,  # noqa: E731
                      "ignore_eos": True}

    async def requests() -> None:
        async with httpx.AsyncClient(timeout=120) as h, openai.AsyncOpenAI(
                base_url=root + "/v1", api_key="x", max_retries=0) as oc:
            await h.get(f"{root}/health")
            for i, m in enumerate(msgs):
                s0, c0 = server_ttft(root)
                t0 = time.perf_counter()
                if i % 2 == 0:  # raw HTTP: the first SSE line with text
                    async with h.stream("POST", f"{root}/v1/chat/completions", json=body(m)) as r:
                        async for line in r.aiter_lines():
                            if '"content":"' in line and '"content":""' not in line:
                                break
                    key = "raw_ms"
                else:  # the openai SDK, as users call it
                    stream = await oc.chat.completions.create(model="probe", messages=m, max_tokens=2, temperature=0,
                                                              stream=True, extra_body={"ignore_eos": True})
                    async for chunk in stream:
                        if any(c.delta.content for c in chunk.choices):
                            break
                    await stream.close()
                    key = "sdk_ms"
                out[key].append(1e3 * (time.perf_counter() - t0))
                await asyncio.sleep(0.3)  # the request finishes; the metrics count it
                s1, c1 = server_ttft(root)
                out["server_ms"].append(1e3 * (s1 - s0) / max(1, c1 - c0))

    def client() -> None:
        try:
            while not server.started:
                time.sleep(0.05)
            asyncio.run(requests())
        finally:
            server.should_exit = True
            served.loop.stop()

    threads = [threading.Thread(target=server.run, daemon=True), threading.Thread(target=client, daemon=True)]
    for t in threads:
        t.start()
    served.loop.run()
    for t in threads:
        t.join(timeout=30)
    return {k: [round(x, 2) for x in v] for k, v in out.items()}


def profile_table(engine, ids: list[int]) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.model.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        engine_ttft(engine, ids)
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return f"device events: {kernels}\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=2000, help="prompt length (chat-rendered)")
    ap.add_argument("--max-prefill-tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from model_host.cli import build_parser
    from model_host.server.cli import build as build_served

    if args.quick:
        args.tokens = min(args.tokens, 400)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build(args.quick, Path(tmp))
        prompts = [tok.encode_chat(m) for m in fresh_prompts(tok, args.tokens, 24, 0)]
        res["prompt_tokens"] = statistics.median(len(p) for p in prompts)
        for mpt in args.max_prefill_tokens:
            sa = build_parser().parse_args([
                "serve", "--checkpoint", str(Path(tmp) / "tiny") if args.quick else tmp, "--served-model-name",
                "probe", "--max-batch", "128" if not args.quick else "4", "--block-size", "64",
                "--max-prefill-tokens", str(mpt), "--max-model-len", "8192",
                *(["--kv-memory-gb", "0.1"] if args.quick else ["--kv-memory-gb", "8"])])
            served = build_served(sa, model=model, tokenizer=tok)
            eng = served.loop.engine
            r = {"forward_ms": forward_ms(model, eng, prompts[0])}
            engine_ttft(eng, prompts[1])  # warm-up
            runs = [engine_ttft(eng, p) for p in prompts[2:7]]
            r["engine_ttft_ms"] = statistics.median(ms for ms, _ in runs)
            r["engine_steps_ms"] = [[round(x, 2) for x in steps] for _, steps in runs]
            if mpt == args.max_prefill_tokens[0]:
                r["profile"] = profile_table(eng, prompts[7])
                msgs = fresh_prompts(tok, args.tokens, 9, 1)
                r["http"] = http_phase(served, msgs[1:])
            res[str(mpt)] = r
            print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
            if "profile" in r:
                print(r["profile"], flush=True)
            del served, eng
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ttft_profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
