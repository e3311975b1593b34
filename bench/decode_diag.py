"""Diagnostics for bench/decode_bench.py (kept apart so the benchmark script stays short).

* ``run_micro``     (--micro)   Triton W8A8 vs cuBLASLt blockwise ``_scaled_mm`` per linear shape;
* ``tune``          (--tune)    sweep the launch table (model_host/kernels/tables) over whole
                                captured decode steps and grouped prefill launches; writes the
                                winner as ``OUT/tables/<gpu>.json`` (copy it into the package);
* ``sweep_small_m`` (--gemv)    small-M tensor-core GEMM and CUDA-core GEMV launch parameters
                                per decode linear, in CUDA graphs over rotating weight copies
                                (no L2 reuse); writes the best table as ``OUT/gemv/<gpu>.json``;
* ``check_modules`` (--check)   kernel vs torch path per module on identical real-width inputs;
* ``profile``       (--profile) top kernels by GPU time of a bs1 decode step and a 2048 prefill.

Each takes the benchmark module ``db`` (timer, logger, device, rig helpers) as first argument.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from model_host.kernels.backend import TritonOps
from model_host.kernels.tuning import Tuning, load_tuning, write_table
from model_host.ops import TorchOps


def run_micro(db, model, res: dict) -> None:
    """Triton W8A8 vs cuBLASLt blockwise _scaled_mm on the model's own FP8 weights."""
    from model_host.kernels.fp8_linear import (
        gemm_config,
        num_sms,
        scaled_mm_linear,
        w8a8_linear,
        w8a8_reference,
    )

    at, mlp = model.layers[0].self_attn, model.layers[0].mlp
    layers = {"q_a": at.q_a_proj, "q_b": at.q_b_proj, "kv_a": at.kv_a_proj_with_mqa,
              "o": at.o_proj, "mlp_gate": mlp.gate_proj, "mlp_down": mlp.down_proj}
    rows = ["| linear (N x K) | M | triton ms | scaled_mm ms | triton TB/s or TFLOP/s | err triton | err smm |",
            "|---|---|---|---|---|---|---|"]
    for name, lin in layers.items():
        w, s = lin.weight, lin.weight_scale_inv
        for m in (1, 32, 128, 2048):
            x = torch.randn(m, w.shape[1], device=db.DEVICE, dtype=torch.bfloat16)
            ref = w8a8_reference(x, w, s, torch.float32)
            out = {}
            cfg = gemm_config(m, w.shape[0], w.shape[1], num_sms(), load_tuning())
            triton_mm = lambda x, w, s, cfg=cfg: w8a8_linear(x, w, s, cfg)  # noqa: E731
            for impl, fn in (("triton", triton_mm), ("smm", scaled_mm_linear)):
                try:
                    err = ((fn(x, w, s).float() - ref).norm() / ref.norm()).item()
                    out[impl] = (db.gpu_ms(lambda fn=fn, x=x, w=w, s=s: fn(x, w, s), iters=20, warmup=3), err)
                except Exception as e:  # shape / build not supported
                    out[impl] = (None, None)
                    db.log(f"micro {name} M={m} {impl}: {type(e).__name__}: {str(e)[:200]}")
            t = out["triton"][0]
            rate = (w.nbytes / t / 1e9 if m <= 128 else 2 * m * w.numel() / t / 1e9) if t else None
            rows.append(f"| {name} ({w.shape[0]}x{w.shape[1]}) | {m} | {db.fmt(out['triton'][0], '.4f')} | "
                        f"{db.fmt(out['smm'][0], '.4f')} | {db.fmt(rate, '.2f')} | {db.fmt(out['triton'][1], '.1e')} | "
                        f"{db.fmt(out['smm'][1], '.1e')} |")
    res["micro"] = "\n".join(rows)
    db.log(res["micro"])


def _set(t: Tuning, field: str, **kw) -> Tuning:
    """``t`` with ``kw`` changed in its table ``field`` (tables are immutable: a new Tuning)."""
    return dataclasses.replace(t, **{field: {**getattr(t, field), **kw}})


def tune(db, model, rig, res: dict, out: Path, part: str = "all") -> Tuning:
    """Sweep launch tables on this GPU (``part``: "decode", "prefill" or "all"); write the
    winner as ``out/tables/<gpu>.json``.

    Decode is swept over whole captured steps (bs1 and bs8), not launch by launch: an isolated
    sweep of one launch once picked a setting that made the whole step 12% slower.  Stages:
    grouped warps x stages, the grouped N-tile policy, then the small-M GEMM's N tile,
    warps/stages and split-K target, and the one-row GEMV on or off.  Prefill times the gated
    and the down grouped launches alone (large launches).
    """
    from model_host.kernels.graphs import DecodeGraphs

    prev = model.ops

    def step_ms(tuning: Tuning) -> float:
        model.ops = TritonOps(tuning)
        graphs = DecodeGraphs(model, rig.cache, rig.per_row)
        try:
            total = 0.0
            for b, weight in ((1, 1.0), (8, 0.25)):
                ids, pos, tables = rig.decode_inputs(b)
                total += weight * db.gpu_ms(
                    lambda ids=ids, pos=pos, t=tables, g=graphs: g.run(ids.view(-1), pos.view(-1), t), iters=20, warmup=3)
            return total
        finally:
            model.ops = prev
            graphs.graphs.clear()  # free the captured graphs' pool before the next candidate
            torch.cuda.empty_cache()

    def sweep(name: str, best: Tuning, field: str, cands: list[dict], timer=step_ms) -> Tuning:
        times = []
        for c in cands:
            try:
                times.append((timer(_set(best, field, **c)), c))
            except Exception as e:  # e.g. out of shared memory
                db.log(f"tune {name} {c}: {type(e).__name__}: {e}")
        times.sort(key=lambda tc: tc[0])
        res[f"tune/{name}"] = [(round(ms, 4), c) for ms, c in times]
        db.log(f"tune {name} (ms): " + "; ".join(f"{ms:.3f} {c}" for ms, c in times))
        return _set(best, field, **times[0][1])

    best = load_tuning()
    if part in ("all", "decode"):
        best = _tune_decode(best, sweep)
    if part in ("all", "prefill"):
        best = _tune_prefill(db, model, best, sweep)
    path = write_table(best, out / "tables", torch.cuda.get_device_name())
    res["tune/table"] = str(path)
    db.log(f"tune: wrote {path} (copy it into model_host/kernels/tables/ to adopt it)")
    return best


def _tune_decode(best: Tuning, sweep) -> Tuning:
    best = sweep("decode-grouped", best, "grouped_decode",
                 [dict(num_warps=w, num_stages=st) for w in (4, 8) for st in (3, 4, 6)])
    best = sweep("decode-grouped-bn", best, "grouped_decode",
                 [dict(block_ns=bns, min_programs=mp) for bns in ((64,), (128, 64), (64, 32), (128, 64, 32))
                  for mp in (132, 256, 528)])
    best = sweep("decode-small-m", best, "small_m",
                 [dict(BLOCK_N=bn, num_warps=w, num_stages=st, waves=wv) for bn, w, st, wv in
                  ((32, 4, 3, 8), (64, 4, 3, 8), (32, 4, 4, 8), (32, 4, 3, 4), (64, 4, 3, 2), (32, 4, 4, 2),
                   (128, 4, 4, 2), (64, 8, 4, 8))])
    return sweep("decode-gemv", best, "gemv", [dict(max_m=0), dict(max_m=1)])


def _tune_prefill(db, model, best: Tuning, sweep) -> Tuning:
    from model_host.kernels import moe_grouped as mg
    from model_host.kernels.fp8_linear import act_quant

    moe = next(m.mlp for m in model.layers if hasattr(m.mlp, "experts"))
    gp, up, dp = moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj
    x = torch.randn(2048, model.cfg.hidden_size, device=db.DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        idx = TritonOps(best).route(x, moe.gate).indices
    from model_host.ops import sort_by_expert

    order, counts = sort_by_expert(idx, moe.experts.num_experts)
    token = (order // idx.shape[1]).to(torch.int32)
    e, rows = moe.experts.num_experts, token.numel()
    h = torch.randn(rows, dp.in_features, device=db.DEVICE, dtype=torch.bfloat16)
    aq, hq = act_quant(x), act_quant(h)
    # 64-wide N tiles at 4 warps fit up to three programs on an SM (likely why: one's MMA wait
    # overlaps another's loads; not profiled): the gated launch's winner on the H100 (ninth
    # session, docs/benchmarks.md).
    cands = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
             for bm, bn, w, st in ((64, 128, 8, 3), (64, 128, 8, 4), (64, 256, 8, 3), (128, 128, 8, 3),
                                   (128, 256, 8, 3), (32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 8, 4),
                                   (64, 256, 8, 4), (128, 256, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4),
                                   (64, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 2),
                                   # deeper pipelines: the H200's bandwidth wants more bytes in flight
                                   (64, 64, 4, 5), (64, 64, 4, 6), (64, 64, 8, 5), (64, 128, 8, 5))]

    def gated_ms(t: Tuning) -> float:  # one launch, 10 in a row
        cfg = mg.grouped_config(rows, gp.out_features, e, t)
        return db.gpu_ms(lambda: [mg.grouped_w8a8(
            x, gp.weight, gp.weight_scale_inv, counts, num_rows=rows, mode="gated", rows=token, w2=up.weight,
            w2_s=up.weight_scale_inv, config=cfg, a_quant=aq) for _ in range(10)], iters=5, warmup=1) / 10

    def down_ms(t: Tuning) -> float:
        cfg = mg.grouped_config(rows, dp.out_features, e, t, down=True)
        return db.gpu_ms(lambda: [mg.grouped_w8a8(h, dp.weight, dp.weight_scale_inv, counts, num_rows=rows,
                                                  config=cfg, a_quant=hq) for _ in range(10)], iters=5, warmup=1) / 10

    best = sweep("prefill", best, "grouped_prefill", cands, gated_ms)
    best = sweep("prefill_down", best, "grouped_prefill_down", cands, down_ms)
    # Launch order, gate/up in one tile, TMA weight loads: see grouped_w8a8.
    opts = [dict(order=o, tma=t) for o in ("n", "tile", "expert") for t in (False, True)]
    best = sweep("prefill-order", best, "grouped_prefill", opts + [dict(order=o, fuse=True) for o in ("tile", "expert")],
                 gated_ms)
    return sweep("prefill_down-order", best, "grouped_prefill_down", opts, down_ms)


@torch.no_grad()
def sweep_small_m(db, model, res: dict, out: Path, copies: int = 8) -> Tuning:
    """GPU microseconds per launch of each decode linear (bs 1 and 8) for a grid of small-M
    tensor-core launch parameters and, at bs 1, of the CUDA-core GEMV; writes the table with the
    least time per decode step (each shape weighted by its launches per step) as
    ``out/gemv/<gpu>.json``.  Each timing replays a graph of ``copies`` launches, each on its own
    copy of the weight (more bytes than the L2)."""
    from model_host.kernels import fp8_linear as fl

    at, mlp = model.layers[1].self_attn, model.layers[0].mlp
    cat = lambda *ls: (torch.cat([lin.weight for lin in ls]), torch.cat([lin.weight_scale_inv for lin in ls]))  # noqa: E731
    per_step = sum(hasattr(layer.mlp, "experts") for layer in model.layers) + 1  # attention launches
    shapes = {"q_a+kv_a": (cat(at.q_a_proj, at.kv_a_proj_with_mqa), per_step), "q_b": (cat(at.q_b_proj), per_step),
              "o": (cat(at.o_proj), per_step), "dense down": (cat(mlp.down_proj), 1)}
    base = _set(load_tuning(), "gemv", max_m=0)  # tensor-core candidates: no GEMV
    tc_grid = [_set(base, "small_m", BLOCK_N=bn, num_warps=w, num_stages=st, waves=wv)
               for bn in (16, 32, 64) for w, st in ((2, 4), (4, 3), (4, 4), (4, 6), (8, 4)) for wv in (1, 2, 4, 8)]
    gemv_grid = [_set(base, "gemv", max_m=1, BLOCK_N=bn, KB=kb, num_warps=w, waves=wv)
                 for bn in (16, 32, 64) for kb in (1, 2, 4) for w in (2, 4, 8) for wv in (2, 4, 8)]

    def launch_us(ws, x, tuning: Tuning) -> float | None:
        try:
            cfg = fl.gemm_config(x.shape[0], ws[0][0].shape[0], x.shape[1], fl.num_sms(), tuning)
            fn = lambda: [fl.w8a8_linear(x, w, s, cfg) for w, s in ws]  # noqa: E731
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return db.gpu_ms(g.replay, iters=20, warmup=3) * 1e3 / len(ws)
        except Exception as e:  # e.g. out of shared memory
            db.log(f"gemv sweep {tuning.small_m} {tuning.gemv}: {type(e).__name__}: {str(e)[:120]}")
            return None

    # us of small-M GEMMs per decode step, per candidate (each shape times its launches per step)
    tc_bs1, tc_bs8, gemv_bs1 = [0.0] * len(tc_grid), [0.0] * len(tc_grid), [0.0] * len(gemv_grid)
    rows = ["| linear (N x K) | M | kernel | default us | best us | best TB/s | best config |", "|---|---|---|---|---|---|---|"]
    for name, ((w, s), count) in shapes.items():
        ws = [(w.clone(), s.clone()) for _ in range(copies)]
        for m in (1, 8):
            x = torch.randn(m, w.shape[1], device=db.DEVICE, dtype=torch.bfloat16)
            kinds = [("tensor-core", tc_grid)] + ([("gemv", gemv_grid)] if m == 1 else [])
            for kind, grid in kinds:
                default = launch_us(ws, x, base if kind == "tensor-core" else _set(load_tuning(), "gemv", max_m=1))
                times = [launch_us(ws, x, t) for t in grid]
                for i, t in enumerate(times):
                    t = t if t is not None else float("inf")
                    if kind == "gemv":
                        gemv_bs1[i] += count * t
                    else:
                        (tc_bs1 if m == 1 else tc_bs8)[i] += count * t
                best = min(range(len(grid)), key=lambda i: times[i] or float("inf"))
                bt = times[best]
                cfg = grid[best].gemv if kind == "gemv" else grid[best].small_m
                rows.append(f"| {name} ({w.shape[0]}x{w.shape[1]}) | {m} | {kind} | {db.fmt(default, '.1f')} | "
                            f"{bt:.1f} | {w.nbytes / bt / 1e6:.2f} | {dict(cfg)} |")
                db.log(rows[-1])
        del ws
        torch.cuda.empty_cache()
    i_gv = min(range(len(gemv_grid)), key=lambda i: gemv_bs1[i])
    use_gemv = gemv_bs1[i_gv] < min(tc_bs1)
    # The tensor-core tiles serve bs8 only once the GEMV takes bs1; else both, bs8 at a quarter.
    i_tc = min(range(len(tc_grid)), key=lambda i: tc_bs8[i] + (0.0 if use_gemv else 4.0 * tc_bs1[i]))
    best = dataclasses.replace(tc_grid[i_tc], gemv=gemv_grid[i_gv].gemv if use_gemv else base.gemv)
    path = write_table(best, out / "gemv", torch.cuda.get_device_name())
    summary = (f"best: tensor-core {dict(best.small_m)} (small-M GEMMs per step: bs1 {tc_bs1[i_tc]:.1f} us, "
               f"bs8 {tc_bs8[i_tc]:.1f} us); GEMV best {dict(gemv_grid[i_gv].gemv)} (bs1 {gemv_bs1[i_gv]:.1f} us) -> "
               f"{'used' if use_gemv else 'not used'} at bs1; table {path}")
    res["gemv"] = "\n".join(rows + ["", summary])
    db.log(summary)
    return best


@torch.no_grad()
def check_modules(db, model, rig, res: dict, b: int = 8) -> None:
    """Kernel ops vs torch ops per module on identical inputs at real widths: separates the
    kernels' arithmetic from the routing flips that compound over a whole random model."""
    x = torch.randn(b, 1, model.cfg.hidden_size, device=db.DEVICE, dtype=torch.bfloat16)
    ids, pos, tables = rig.decode_inputs(b)
    rig.cache.bind(tables)
    batch = model.attention_batch(ids, pos, rig.cache, kv_len=db.CTX + 1)
    mods = {"attention (decode, paged)": model.layers[1].self_attn, "dense MLP": model.layers[0].mlp,
            "MoE (routed + shared)": model.layers[1].mlp}
    for name, mod in mods.items():
        outs = [(mod(x, batch, ops) if "attention" in name else mod(x, ops)).float() for ops in (TorchOps(), TritonOps())]
        err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
        res[f"check/{name}/bs{b}"] = err
        db.log(f"check module {name} (bs{b}): kernel vs torch path rel err {err:.4f}")


def profile(db, model, rig, res: dict) -> None:
    """Kernel-level GPU time of one eager bs1 decode step and one 2048 prefill (kernel ops)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    prev, model.ops = model.ops, TritonOps()
    try:
        ids, pos, tables = rig.decode_inputs(1)
        long = torch.randint(0, model.cfg.vocab_size, (1, 2048), device=db.DEVICE)
        for name, fn in (("decode1", lambda: rig.eager_step(ids, pos, tables)),
                         ("prefill2048", lambda: rig.prefill(long))):
            fn()
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                fn()
                torch.cuda.synchronize()
            ev = [e for e in p.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
            ev.sort(key=lambda e: -e.self_device_time_total)
            total = sum(e.self_device_time_total for e in ev)
            n = sum(e.count for e in ev)
            lines = [f"[profile {name}] {n} kernels, {total / 1e3:.3f} ms GPU time"]
            lines += [f"  {e.self_device_time_total / 1e3:8.3f} ms  x{e.count:<4d} {e.key[:110]}" for e in ev[:14]]
            res[f"profile/{name}"] = "\n".join(lines)
            db.log(res[f"profile/{name}"])
    finally:
        model.ops = prev


def prefill_ab(db, model, rig, base: Tuning, tuning: Tuning, res: dict, rounds: int = 3) -> None:
    """Eager prefill of 2,048 tokens with two launch tables, alternating, ``rounds`` each, on one
    warm GPU: a table change measured against the table before it, not against another run."""
    g = torch.Generator(device=db.DEVICE).manual_seed(2048)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 2048), device=db.DEVICE, generator=g)
    prev, times = model.ops, {"baseline": [], "table": []}
    try:
        for _ in range(rounds):
            for name, t in (("baseline", base), ("table", tuning)):
                model.ops = TritonOps(t)
                times[name].append(db.gpu_ms(lambda: rig.prefill(ids), iters=10))
    finally:
        model.ops = prev
    for name, ms in times.items():
        res[f"ab/{name}/prefill2048"] = statistics.median(ms)
    db.log("prefill2048 paired, baseline table vs this table (ms): "
           f"{' '.join(f'{m:.3f}' for m in times['baseline'])} vs {' '.join(f'{m:.3f}' for m in times['table'])}")


def log_checks(db, res: dict, flops: float) -> None:
    """The prefill's FP8-linear rate, and each variant's logits against the reference path's
    (and the captured prefill's against the eager one's), from what the runs left in ``res``."""

    def err(a, r) -> float:
        return ((a - r).norm() / r.norm()).item()

    for v in ("torch", "fp8-eager"):
        if res.get(f"{v}/prefill2048"):
            db.log(f"{v} prefill: FP8-linear {flops / res[f'{v}/prefill2048'] / 1e9:.0f} TFLOP/s "
                   f"({flops / 1e12:.1f} TFLOP)")
        if f"{v}/prefill_logits" in res and "torch/prefill_logits" in res and v != "torch":
            db.log(f"check {v} vs torch-path logits (256-token prefill): rel err "
                   f"{err(res[f'{v}/prefill_logits'], res['torch/prefill_logits']):.4f}")
    for n, what in ((2048, "2048 tokens"), (2000, "2000 tokens padded to 2048")):
        a, r = res.get(f"fp8-graph/prefill{n}_logits"), res.get(f"fp8-graph/prefill{n}_eager_logits")
        if a is not None and r is not None:
            db.log(f"check prefill graph vs eager logits ({what}): rel err {err(a, r):.5f}")
    for v in ("fp8-eager", "fp8-graph"):
        a, r = res.get(f"{v}/decode8_logits"), res.get("torch/decode8_logits")
        if a is not None and r is not None:
            agree = (a.argmax(-1) == r.argmax(-1)).float().mean().item()
            db.log(f"check {v} vs torch-path decode logits (bs8, ctx {db.CTX}): rel err {err(a, r):.4f}, "
                   f"argmax agreement {agree:.2f}")
