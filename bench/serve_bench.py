"""Serving benchmark: N concurrent streaming clients sending realistic RAG prompts.

Each prompt is our real RAG prompt (system rules + numbered context passages of about 1,500
DeepSeek tokens + a question), built by `rag.prompt.build_prompt` from markdown passages. A few
context sets recur across requests, as they do when users ask about the same topic, which is
what the prefix cache is for.

    python bench/serve_bench.py --checkpoint /tmp/tiny --clients 8 --requests 32      # in-process server
    python bench/serve_bench.py --base-url http://127.0.0.1:8000/v1 --model NAME        # any OpenAI server

Reports requests/s, output tokens/s, TTFT p50/p99, ITL p50/p99 and the prefix-cache hit rate
(from the server's /metrics when it is ours).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rag.prompt import build_prompt, count_tokens  # noqa: E402
from rag.types import Hit  # noqa: E402


def passages(corpus: Path, n: int, seed: int) -> list[Hit]:
    """Paragraph-sized passages from a markdown tree, as retrieval would return them."""
    rnd = random.Random(seed)
    files = sorted(corpus.rglob("*.md"))
    out: list[Hit] = []
    for f in rnd.sample(files, min(len(files), 4 * n)):
        paras = [p.strip() for p in re.split(r"\n\s*\n", f.read_text(errors="ignore")) if len(p.strip()) > 200]
        if paras:
            out.append(Hit(id=str(len(out)), score=0.8, text=rnd.choice(paras)[:1200], source=str(f.relative_to(corpus)),
                           header_path="", chunk_index=0))
        if len(out) == n:
            break
    return out


def rag_prompts(corpus: Path, n_requests: int, context_sets: int, context_tokens: int, seed: int) -> list[list[dict]]:
    pool = passages(corpus, 200, seed)
    rnd = random.Random(seed)
    sets = []
    for _ in range(context_sets):
        hits, used = [], 0
        for h in rnd.sample(pool, len(pool)):
            if used >= context_tokens:
                break
            hits.append(h)
            used += count_tokens(h.text)
        sets.append(hits)
    questions = ["How do I configure this?", "What are the limits?", "How is data stored?",
                 "Which index should I use?", "How do I scale it out?", "What does the error mean?"]
    return [build_prompt(rnd.choice(questions), sets[i % context_sets], 4 * context_tokens).messages
            for i in range(n_requests)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def run_load(base_url: str, model: str, prompts: list[list[dict]], clients: int, max_tokens: int) -> dict:
    ttft, itl, out_tokens, errors = [], [], 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def worker(client: openai.AsyncOpenAI) -> None:
        nonlocal out_tokens, errors
        while not queue.empty():
            messages = queue.get_nowait()
            t0 = time.perf_counter()
            last = None
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.usage:
                        out_tokens += chunk.usage.completion_tokens
                    if any(c.delta.content for c in chunk.choices):
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            itl.append(now - last)
                        last = now
            except openai.OpenAIError:
                errors += 1

    t0 = time.perf_counter()
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "errors": errors, "wall_s": wall, "requests_per_s": len(prompts) / wall,
            "output_tokens_per_s": out_tokens / wall, "ttft_p50_ms": 1e3 * pct(ttft, 50),
            "ttft_p99_ms": 1e3 * pct(ttft, 99), "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "mean_ttft_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan")}


def prefix_hit_rate(base_url: str) -> float | None:
    try:
        text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^model_host_prefix_cache_hit_rate ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def start_local_server(args) -> tuple[str, str, object]:
    """Our model host in this process (uvicorn on a thread), for a self-contained run."""
    import threading

    import torch
    import uvicorn

    from model_host.engine.engine import Engine, EngineConfig, EngineLoop
    from model_host.loader import load_model
    from model_host.server.app import create_app
    from model_host.tokenizer import Tokenizer
    from tests.support.openai_stub import free_port

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(args.checkpoint, device=device, dtype=dtype)
    tok = Tokenizer(args.checkpoint)
    engine = Engine(model, tok, EngineConfig(max_batch=args.max_batch, kv_memory_gb=args.kv_memory_gb,
                                             max_model_len=8192))
    loop = EngineLoop(engine)
    app = create_app(loop, tok, "bench-model")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    loop.start()
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", "bench-model", (server, loop)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="serve this checkpoint in-process (else --base-url)")
    ap.add_argument("--base-url")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--context-tokens", type=int, default=1500)
    ap.add_argument("--context-sets", type=int, default=4, help="distinct context sets (prefix-cache reuse)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--kv-memory-gb", type=float, default=0.5)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared/data/milvus_docs_en"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()

    if args.checkpoint:
        base_url, model, handles = start_local_server(args)
    elif args.base_url:
        base_url, handles = args.base_url, None
        model = args.model or openai.OpenAI(base_url=base_url, api_key="bench").models.list().data[0].id
    else:
        ap.error("give --checkpoint or --base-url")
    prompts = rag_prompts(Path(args.corpus), args.requests, args.context_sets, args.context_tokens, args.seed)
    prompt_tokens = statistics.fmean(sum(count_tokens(m["content"]) for m in p) for p in prompts)
    # Warm-up request (kernel compilation, allocator) stays out of the numbers.
    asyncio.run(run_load(base_url, model, prompts[:1], 1, 4))
    result = run = asyncio.run(run_load(base_url, model, prompts, args.clients, args.max_tokens))
    run["prefix_cache_hit_rate"] = prefix_hit_rate(base_url)
    run.update(clients=args.clients, max_tokens=args.max_tokens, mean_prompt_tokens=prompt_tokens)
    print(f"{'metric':<24}{'value':>12}")
    for k in ("clients", "requests", "errors", "mean_prompt_tokens", "max_tokens", "wall_s", "requests_per_s",
              "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
              "prefix_cache_hit_rate"):
        v = result[k]
        print(f"{k:<24}{v:>12.3f}" if isinstance(v, float) else f"{k:<24}{v!s:>12}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if handles:
        server, loop = handles
        server.should_exit = True
        loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
