"""GPU benchmark of MTP speculative decoding (issue 18) on the truncated real-width DeepSeek-V3.

One command on one GPU builds the truncated model of ``decode_bench.py`` (V3 widths, 1 dense +
2 MoE layers, FP8 weights drawn at random) plus its MTP layer (a MoE decoder block sharing the
embedding and the LM head), on a paged latent cache with ``CTX`` random positions per row, and
measures, with every single-token step replayed from CUDA graphs (the serving path):

1. the cost of one plain decode step, one verify step (k + 1 packed rows per sequence) and one
   MTP draft (its extend over k + 1 accepted entries plus k - 1 chained steps), k = 1, 2, at
   batches 1 and 32;
2. forced acceptance: greedy decoding of ``--tokens`` tokens per sequence, plain against
   speculative rounds whose drafts are the main model's own greedy continuation (recorded by
   greedy steps in the verify's shape; the MTP layer still runs, so its cost is paid).  Random weights make the MTP
   layer's real acceptance meaningless; this switch exists only here and in tests - the server
   and ``generate`` always draft with the MTP layer;
3. the projection at DeepSeek's published acceptance alpha = 0.85 and 0.90 of a draft token:
   a round emits E = (1 - alpha^(k+1)) / (1 - alpha) tokens in expectation (each draft accepted
   with probability alpha, independently, until the first rejection; plus the verified token),
   so speed-up(alpha, k) = E * t_plain_token / t_round, with t_round from the forced run (the
   cost of a round hardly depends on how many drafts it accepts).

    python3 bench/spec_bench.py --out $OUT            # GPU, about 2 minutes on an H200
    python3 bench/spec_bench.py --quick               # CPU plumbing check (tiny model, eager)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_host.engine.paged_cache import PagedLatentCache  # noqa: E402
from model_host.engine.speculative import PagedForwards  # noqa: E402
from model_host.speculative import Drafts, Pending, mtp_draft, speculative_round  # noqa: E402

CTX, PAGE = 512, 64
ALPHAS = (0.85, 0.90)


def oracle_drafter(miss_every: int = 0):
    """BENCHMARK / TEST ONLY: draft the main model's own greedy continuation (k plain decode
    steps from the sequence's last token), so greedy verification accepts every draft.  The MTP
    drafter still runs first (its cache work and cost stay real).  With ``miss_every`` m, a draft
    landing at a position p with p % m == 0 is corrupted, so rounds also reject at every depth."""

    def draft(fw, pending: Pending, k, temperature, top_k, top_p, generators, all_greedy=None) -> Drafts:
        real = mtp_draft(fw, pending, k, temperature, top_k, top_p, generators, all_greedy=all_greedy)
        last = pending.last_index()
        tok, pos = pending.next_ids[last], pending.positions[last] + 1
        ones, toks = [1] * len(pending.counts), []
        for _ in range(k):
            logits, _ = fw.main(tok, pos, ones)
            pos = pos + 1
            tok = logits.argmax(-1)
            if miss_every:
                tok = torch.where(pos % miss_every == 0, (tok + 1) % logits.shape[-1], tok)
            toks.append(tok)
        return Drafts(torch.stack(toks, 1), real.logits)

    return draft


def continuation_drafter(known: torch.Tensor, start: int):
    """BENCHMARK ONLY: drafts read from ``known`` [B, n] (row b's token at position start + j in
    column j, from a plain greedy run) after the real MTP draft has run for its cost."""

    def draft(fw, pending: Pending, k, temperature, top_k, top_p, generators, all_greedy=None) -> Drafts:
        real = mtp_draft(fw, pending, k, temperature, top_k, top_p, generators, all_greedy=all_greedy)
        last = pending.last_index()
        first = pending.positions[last] + 2 - start  # column of each row's first draft
        cols = (first.unsqueeze(1) + torch.arange(k, device=known.device)).clamp(max=known.shape[1] - 1)
        return Drafts(known.gather(1, cols), real.logits)

    return draft


def timed(fn, sync, iters: int = 20, warmup: int = 2) -> float:
    """Median milliseconds of fn() (wall clock around a synchronized call)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per round when each draft is accepted with probability alpha until the first miss."""
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def plain_run(fw, ids, pos, steps: int, known: torch.Tensor | None = None, rows: int = 1) -> None:
    """``steps`` greedy decode steps of every row from ``ids`` at ``pos``; records the tokens.

    With ``rows`` = k + 1, each step runs in the verify's shape: the sequence's token at
    positions p .. p + k (the extra rows' outputs are dropped and their cache entries rewritten
    by the next step before anything reads them), so the GEMMs take the verify's kernel
    configuration and the recorded continuation is the one the verify computes. Recorded with
    one row per sequence (the one-row GEMV path), random weights' near-ties flip a token within
    a few steps on some GPUs, and every later forced draft of that sequence is rejected."""
    tok, b = ids, ids.shape[0]
    offsets = torch.arange(rows, device=ids.device)
    for t in range(steps):
        logits, _ = fw.main(tok.repeat_interleave(rows), ((pos + t).unsqueeze(1) + offsets).reshape(-1), [rows] * b)
        tok = logits[::rows].argmax(-1)
        if known is not None:
            known[:, t + 1] = tok


def spec_run(fw, first: Pending, k: int, greedy, tokens: int, drafter) -> tuple[int, int]:
    """Speculative rounds until every row has ``tokens`` tokens: (tokens emitted in all, rounds)."""
    pending, rounds = first, 0
    done = torch.zeros(len(first.counts), dtype=torch.long)
    while int(done.min()) < tokens:
        pending = speculative_round(fw, pending, k, *greedy, drafter=drafter, all_greedy=True).pending
        done += torch.tensor(pending.counts)
        rounds += 1
    return int(done.sum()), rounds


def rows_blocks(ctx: int, page: int, tokens: int, ks) -> int:
    """Blocks per sequence: the context, the generated tokens and the drafts past them."""
    return -(-(ctx + tokens + 2 * max(ks) + 2) // page)


def run_batch(model, cache: PagedLatentCache, b: int, ks, tokens: int, ctx: int, graphs, mtp_graphs, sync,
              log, iters: int = 20) -> dict:
    dev, cfg = model.device, model.cfg
    per_row = rows_blocks(ctx, cache.block_size, tokens, ks)
    res: dict = {}
    tables = torch.arange(b * per_row, device=dev).view(b, per_row)
    fw = PagedForwards(model, cache, tables, graphs, mtp_graphs)
    g = torch.Generator(device=dev).manual_seed(b)
    ids = torch.randint(0, cfg.vocab_size, (b,), device=dev, generator=g)
    pos = torch.full((b,), ctx, device=dev)
    zero = torch.zeros(b, device=dev)
    greedy = (zero, zero.long(), zero + 1)  # temperature, top_k, top_p
    res[f"decode{b}"] = timed(lambda: fw.main(ids, pos, [1] * b), sync, iters)
    log(f"B={b}: plain decode step {res[f'decode{b}']:.3f} ms")
    for k in ks:
        vid = ids.repeat_interleave(k + 1)
        vpos = (pos.unsqueeze(1) + torch.arange(k + 1, device=dev)).reshape(-1)
        counts = [k + 1] * b
        res[f"verify{b}_k{k}"] = timed(lambda v=vid, p=vpos, c=counts: fw.main(v, p, c), sync, iters)
        hidden = torch.randn(b * (k + 1), cfg.hidden_size, device=dev, dtype=model.dtype)
        pending = Pending(vid, hidden, vpos - 1, counts)  # the worst case: k accepted last round
        res[f"draft{b}_k{k}"] = timed(lambda p=pending, k=k: mtp_draft(fw, p, k, *greedy), sync, iters)
        log(f"B={b} k={k}: verify {res[f'verify{b}_k{k}']:.3f} ms "
            f"({res[f'verify{b}_k{k}'] / res[f'decode{b}']:.2f}x a decode step), "
            f"MTP draft {res[f'draft{b}_k{k}']:.3f} ms")

    # Forced acceptance: a plain greedy run records the continuation, then speculation replays it.
    known = torch.empty(b, tokens + max(ks) + 1, dtype=torch.long, device=dev)
    known[:, 0] = ids
    t0 = time.perf_counter()
    plain_run(fw, ids, pos, tokens)
    sync()
    plain = res[f"plain{b}_ms_per_token"] = (time.perf_counter() - t0) * 1e3 / tokens
    first = Pending(ids, torch.randn(b, cfg.hidden_size, device=dev, dtype=model.dtype), pos - 1, [1] * b)
    for k in ks:
        plain_run(fw, ids, pos, known.shape[1] - 1, known, rows=k + 1)
        drafter = continuation_drafter(known, ctx)
        spec_run(fw, first, k, greedy, tokens, drafter)  # warm-up (and MTP graph capture)
        sync()
        t0 = time.perf_counter()
        emitted, rounds = spec_run(fw, first, k, greedy, tokens, drafter)
        sync()
        wall = (time.perf_counter() - t0) * 1e3
        round_ms = res[f"round{b}_k{k}"] = wall / rounds
        # Below k + 1 the recorded continuation and the verify parted (a row's first flip ends
        # its forced run): GEMM rows that depend on their batch-mates, or a defect.
        per_round = res[f"tokens_per_round{b}_k{k}"] = emitted / b / rounds
        forced = res[f"forced{b}_k{k}"] = plain * emitted / b / wall
        line = (f"B={b} k={k}: forced acceptance {forced:.2f}x ({per_round:.2f} tokens per round of "
                f"{round_ms:.3f} ms; plain {plain:.3f} ms/token)")
        for a in ALPHAS:
            proj = res[f"projected{b}_k{k}_a{a}"] = expected_tokens(a, k) * plain / round_ms
            line += f"; projected at alpha {a}: {proj:.2f}x"
        log(line)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="directory for spec_bench.json")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ks", default="1,2", help="draft lengths k")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per sequence in the forced-acceptance runs")
    ap.add_argument("--quick", action="store_true", help="CPU plumbing check: tiny random model, eager steps")
    args = ap.parse_args()
    batches, ks = [int(b) for b in args.batches.split(",")], [int(k) for k in args.ks.split(",")]
    if args.quick:
        model, ctx, page, graphs, sync = quick_model(), 24, 8, False, lambda: None
    else:
        model, ctx, page, graphs, sync = gpu_model(), CTX, PAGE, True, torch.cuda.synchronize
    cfg = model.cfg
    per_row = rows_blocks(ctx, page, args.tokens, ks)
    cache = PagedLatentCache(model.num_cache_layers, max(batches) * per_row, page, cfg.kv_lora_rank,
                             cfg.qk_rope_head_dim, dtype=model.dtype, device=model.device)
    cache.c_kv.normal_()
    cache.k_pe.normal_()
    main_graphs = mtp_graphs = None
    if graphs:
        from model_host.kernels.graphs import DecodeGraphs

        # Every row count a step can have: B (decode, MTP chain), B * (k + 1) (verify, MTP extend).
        sizes = sorted({b * (k + 1) for b in batches for k in (0, *ks)})
        main_graphs = DecodeGraphs(model, cache, per_row, buckets=sizes)
        mtp_graphs = DecodeGraphs(model, cache, per_row, buckets=sizes, mtp=True)
    res: dict = {"device": str(model.device), "ctx": ctx, "tokens": args.tokens}
    if model.device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            res.update(run_batch(model, cache, b, ks, args.tokens, ctx, main_graphs, mtp_graphs, sync, log))
    log(f"[spec_bench done in {time.perf_counter() - t0:.0f}s]")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "spec_bench.json").write_text(json.dumps(res, indent=1))


def log(*a) -> None:
    print(*a, flush=True)


def quick_model():
    import tempfile

    from model_host.checkpoint import make_config, write_random_checkpoint
    from model_host.loader import load_model

    torch.set_num_threads(1)  # tiny ops: thread hand-off would dominate
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(Path(tmp), make_config("tiny"), dtype="bf16", tokenizer=False)
        return load_model(tmp, dtype=torch.float32, load_mtp=True)


def gpu_model():
    """decode_bench's truncated real-width model with an MTP layer sharing the embedding and the
    LM head (as the loader shares them), on the GPU kernels."""
    from bench import decode_bench
    from model_host.checkpoint import make_config
    from model_host.kernels.backend import TritonOps

    t0 = time.perf_counter()
    model = decode_bench.build_model(make_config("v3", layers=3, dense_layers=1, mtp=True, fp8=True), with_mtp=True)
    mtp = model.mtp[0]
    mtp.embed_tokens, mtp.shared_head.head = model.embed_tokens, model.lm_head
    torch.cuda.empty_cache()
    model.ops = TritonOps()
    log(f"model built in {time.perf_counter() - t0:.1f}s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    return model


if __name__ == "__main__":
    main()
