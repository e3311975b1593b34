"""Diagnostics for bench/decode_bench.py (kept apart so the benchmark script stays short).

* ``run_micro``     (--micro)   Triton W8A8 vs cuBLASLt blockwise ``_scaled_mm`` per linear shape;
* ``tune_grouped``  (--tune)    sweep the grouped MoE kernel's launch parameters on real routing;
* ``sweep_small_m`` (--gemv)    small-M tensor-core GEMM and CUDA-core GEMV launch parameters
                                per decode linear, in CUDA graphs over rotating weight copies
                                (no L2 reuse); installs the fastest per decode step;
* ``check_modules`` (--check)   kernel vs torch path per module on identical real-width inputs;
* ``profile``       (--profile) top kernels by GPU time of a bs1 decode step and a 2048 prefill.

Each takes the benchmark module ``db`` (timer, logger, device, rig helpers) as first argument.
"""

from __future__ import annotations

import torch

from model_host.fp8 import TorchBackend, set_backend


def run_micro(db, model, res: dict) -> None:
    """Triton W8A8 vs cuBLASLt blockwise _scaled_mm on the model's own FP8 weights."""
    from model_host.kernels.fp8_linear import scaled_mm_linear, w8a8_linear, w8a8_reference

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
            for impl, fn in (("triton", w8a8_linear), ("smm", scaled_mm_linear)):
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


def tune_grouped(db, model, rig, res: dict) -> None:
    """Pick launch parameters on this GPU and install them (TUNED dicts of the kernel modules).

    Decode is swept over whole captured steps (bs1 and bs8), not launch by launch: an isolated
    sweep of one launch once picked a setting that made the whole step 12% slower.  Stages:
    the activation mode of each (bf16 or two-term FP8), grouped warps x stages, then the grouped
    N-tile policy, then the small-M GEMM's N tile, warps/stages and split-K target.  Prefill
    times the gated launch alone (large launches).
    """
    from model_host.fp8 import set_backend
    from model_host.kernels import fp8_linear as fl
    from model_host.kernels import moe_grouped as mg
    from model_host.kernels.backend import TritonFP8Backend
    from model_host.kernels.fp8_linear import act_quant
    from model_host.kernels.graphs import DecodeGraphs

    def step_ms() -> float:
        prev = set_backend(TritonFP8Backend())
        rig.cache.decode_kernel = True
        graphs = DecodeGraphs(model, rig.cache, rig.per_row)
        try:
            total = 0.0
            for b, weight in ((1, 1.0), (8, 0.25)):
                ids, pos, tables = rig.decode_inputs(b)
                total += weight * db.gpu_ms(
                    lambda ids=ids, pos=pos, t=tables, g=graphs: g.run(ids.view(-1), pos.view(-1), t), iters=20, warmup=3)
            return total
        finally:
            set_backend(prev)
            graphs.graphs.clear()  # free the captured graphs' pool before the next candidate
            torch.cuda.empty_cache()

    def sweep(name: str, table: dict, key: str | None, cands: list[dict]) -> None:
        times = []
        for c in cands:
            saved = dict(table[key] if key else table)
            (table[key] if key else table).update(c)
            try:
                times.append((step_ms(), c))
            except Exception as e:  # e.g. out of shared memory
                db.log(f"tune {name} {c}: {type(e).__name__}: {e}")
            (table[key] if key else table).clear()
            (table[key] if key else table).update(saved)
        times.sort(key=lambda tc: tc[0])
        (table[key] if key else table).update(times[0][1])
        res[f"tune/{name}"] = [(round(ms, 4), c) for ms, c in times]
        db.log(f"tune {name} (bs1 + bs8/4 ms): " + "; ".join(f"{ms:.3f} {c}" for ms, c in times))

    # How decode's 16-bit activations meet the FP8 weights: bf16 MMAs on weights widened in
    # registers, or FP8 MMAs on two-term FP8 activations; per module, before the launch shapes.
    modes = [dict(act16=m) for m in ("fp8x2", "bf16")]
    sweep("decode-gemv-act16", fl.TUNED_SMALL_M, None, modes)
    sweep("decode-grouped-act16", mg.TUNED, "decode", modes)
    sweep("decode-grouped", mg.TUNED, "decode",
          [dict(num_warps=w, num_stages=st) for w in (4, 8) for st in (3, 4, 6)])
    sweep("decode-grouped-bn", mg.TUNED, "decode",
          [dict(block_ns=bns, min_programs=mp) for bns in ((64,), (128, 64), (64, 32), (128, 64, 32))
           for mp in (132, 256, 528)])
    sweep("decode-gemv", fl.TUNED_SMALL_M, None,
          [dict(BLOCK_N=bn, num_warps=w, num_stages=st, waves=wv, act16=a) for bn, w, st, wv in
           ((32, 4, 3, 8), (64, 4, 3, 8), (32, 4, 4, 8), (32, 4, 3, 4), (64, 4, 3, 2), (32, 4, 4, 2),
            (128, 4, 4, 2), (64, 8, 4, 8)) for a in ("bf16", "fp8x2")])

    moe = next(m.mlp for m in model.layers if hasattr(m.mlp, "experts"))
    gp, up = moe.experts.gate_proj, moe.experts.up_proj
    cands = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
             for bm, bn, w, st in ((64, 128, 8, 3), (64, 128, 8, 4), (64, 256, 8, 3), (128, 128, 8, 3),
                                   (128, 256, 8, 3), (32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 8, 4))]
    x = torch.randn(2048, model.cfg.hidden_size, device=db.DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        _, idx = moe.gate(x)
    flat = idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token = (order // idx.shape[1]).to(torch.int32)
    counts = torch.bincount(flat, minlength=moe.experts.num_experts).int()
    dp = moe.experts.down_proj
    h = torch.randn(token.numel(), dp.in_features, device=db.DEVICE, dtype=torch.bfloat16)
    e, rows = moe.experts.num_experts, token.numel()

    def launch_sweep(name: str, extra: list[dict], down: bool, call) -> None:
        """Time one grouped launch (10 in a row) per candidate; install the fastest as TUNED[name]."""
        times = []
        for c in cands + extra:
            cfg = {**mg.grouped_config(rows, (dp if down else gp).out_features, e, True, down=down), **c}
            try:
                times.append((db.gpu_ms(lambda cfg=cfg: [call(cfg) for _ in range(10)], iters=5, warmup=1) / 10, c))
            except Exception as err:  # e.g. out of shared memory
                db.log(f"tune {name} {c}: {type(err).__name__}")
        times.sort(key=lambda tc: tc[0])
        mg.TUNED[name] = dict(times[0][1])
        res[f"tune/{name}"] = [(round(ms, 4), c) for ms, c in times]
        db.log(f"tune {name} (launch ms): " + "; ".join(f"{ms:.3f} {c}" for ms, c in times))

    aq, hq = act_quant(x), act_quant(h)
    launch_sweep("prefill", [], False, lambda cfg: mg.grouped_w8a8(
        x, gp.weight, gp.weight_scale_inv, counts, num_rows=rows, mode="gated", rows=token, w2=up.weight,
        w2_s=up.weight_scale_inv, config=cfg, a_quant=aq))
    launch_sweep("prefill_down", [dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=4),
                                  dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=4)], True,
                 lambda cfg: mg.grouped_w8a8(h, dp.weight, dp.weight_scale_inv, counts, num_rows=rows, config=cfg,
                                             a_quant=hq))


@torch.no_grad()
def sweep_small_m(db, model, res: dict, copies: int = 8) -> None:
    """GPU microseconds per launch of each decode linear (bs 1 and 8) for a grid of small-M
    tensor-core launch parameters and, at bs 1, of the CUDA-core GEMV; installs the settings
    with the least time per decode step (each shape weighted by its launches per step) for the
    rest of the run.  Each timing replays a graph of ``copies`` launches,
    each on its own copy of the weight (more bytes than the L2)."""
    from model_host.kernels import fp8_linear as fl

    at, mlp = model.layers[1].self_attn, model.layers[0].mlp
    cat = lambda *ls: (torch.cat([lin.weight for lin in ls]), torch.cat([lin.weight_scale_inv for lin in ls]))  # noqa: E731
    per_step = sum(hasattr(layer.mlp, "experts") for layer in model.layers) + 1  # attention launches
    shapes = {"q_a+kv_a": (cat(at.q_a_proj, at.kv_a_proj_with_mqa), per_step), "q_b": (cat(at.q_b_proj), per_step),
              "o": (cat(at.o_proj), per_step), "dense down": (cat(mlp.down_proj), 1)}
    tc_grid = [dict(BLOCK_N=bn, num_warps=w, num_stages=st, waves=wv)
               for bn in (16, 32, 64) for w, st in ((2, 4), (4, 3), (4, 4), (4, 6), (8, 4)) for wv in (1, 2, 4, 8)]
    gemv_grid = [dict(max_m=1, BLOCK_N=bn, KB=kb, num_warps=w, waves=wv)
                 for bn in (16, 32, 64) for kb in (1, 2, 4) for w in (2, 4, 8) for wv in (2, 4, 8)]
    saved_tc, saved_gemv = dict(fl.TUNED_SMALL_M), dict(fl.TUNED_GEMV)

    def launch_us(ws, x) -> float:
        cfg = fl.gemm_config(x.shape[0], ws[0][0].shape[0], x.shape[1], fl.num_sms(), act16=True)
        fn = lambda: [fl.w8a8_linear(x, w, s, config=cfg) for w, s in ws]  # noqa: E731
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return db.gpu_ms(g.replay, iters=20, warmup=3) * 1e3 / len(ws)

    def measure(table: dict, grid: list[dict], ws, x) -> list[float | None]:
        out = []
        for c in grid:
            table.update(c)
            try:
                out.append(launch_us(ws, x))
            except Exception as e:  # e.g. out of shared memory
                out.append(None)
                db.log(f"gemv sweep {c}: {type(e).__name__}: {str(e)[:120]}")
        return out

    # us of small-M GEMMs per decode step, per candidate (each shape times its launches per step)
    tc_bs1, tc_bs8, gemv_bs1 = [0.0] * len(tc_grid), [0.0] * len(tc_grid), [0.0] * len(gemv_grid)
    rows = ["| linear (N x K) | M | kernel | default us | best us | best TB/s | best config |", "|---|---|---|---|---|---|---|"]
    try:
        for name, ((w, s), count) in shapes.items():
            ws = [(w.clone(), s.clone()) for _ in range(copies)]
            for m in (1, 8):
                x = torch.randn(m, w.shape[1], device=db.DEVICE, dtype=torch.bfloat16)
                kinds = [("tensor-core", fl.TUNED_SMALL_M, tc_grid)] + ([("gemv", fl.TUNED_GEMV, gemv_grid)] if m == 1 else [])
                for kind, table, grid in kinds:
                    fl.TUNED_GEMV.update(max_m=0)
                    default = measure(table, [saved_tc if kind == "tensor-core" else {**saved_gemv, "max_m": 1}], ws, x)[0]
                    times = measure(table, grid, ws, x)
                    fl.TUNED_SMALL_M.update(saved_tc)
                    fl.TUNED_GEMV.update(saved_gemv)
                    for i, t in enumerate(times):
                        t = t if t is not None else float("inf")
                        if kind == "gemv":
                            gemv_bs1[i] += count * t
                        else:
                            (tc_bs1 if m == 1 else tc_bs8)[i] += count * t
                    best = min(range(len(grid)), key=lambda i: times[i] or float("inf"))
                    bt = times[best]
                    rows.append(f"| {name} ({w.shape[0]}x{w.shape[1]}) | {m} | {kind} | {db.fmt(default, '.1f')} | "
                                f"{bt:.1f} | {w.nbytes / bt / 1e6:.2f} | {grid[best]} |")
                    db.log(rows[-1])
            del ws
            torch.cuda.empty_cache()
    finally:
        fl.TUNED_SMALL_M.update(saved_tc)
        fl.TUNED_GEMV.update(saved_gemv)
    i_gv = min(range(len(gemv_grid)), key=lambda i: gemv_bs1[i])
    use_gemv = gemv_bs1[i_gv] < min(tc_bs1)
    # The tensor-core tiles serve bs8 only once the GEMV takes bs1; else both, bs8 at a quarter.
    i_tc = min(range(len(tc_grid)), key=lambda i: tc_bs8[i] + (0.0 if use_gemv else 4.0 * tc_bs1[i]))
    fl.TUNED_SMALL_M.update(tc_grid[i_tc])
    fl.TUNED_GEMV.update(gemv_grid[i_gv] if use_gemv else dict(max_m=0))
    summary = (f"installed: tensor-core {tc_grid[i_tc]} (small-M GEMMs per step: bs1 {tc_bs1[i_tc]:.1f} us, "
               f"bs8 {tc_bs8[i_tc]:.1f} us); GEMV best {gemv_grid[i_gv]} (bs1 {gemv_bs1[i_gv]:.1f} us) -> "
               f"{'used' if use_gemv else 'not used'} at bs1")
    res["gemv"] = "\n".join(rows + ["", summary])
    res["gemv/installed"] = {"TUNED_SMALL_M": dict(fl.TUNED_SMALL_M), "TUNED_GEMV": dict(fl.TUNED_GEMV)}
    db.log(summary)


@torch.no_grad()
def check_modules(db, model, rig, res: dict, b: int = 8) -> None:
    """Kernel path vs torch path per module on identical inputs at real widths: separates the
    kernels' arithmetic from the routing flips that compound over a whole random model."""
    from model_host.kernels.backend import TritonFP8Backend

    x = torch.randn(b, 1, model.cfg.hidden_size, device=db.DEVICE, dtype=torch.bfloat16)
    ids, pos, tables = rig.decode_inputs(b)
    rig.cache.bind(tables)
    batch = model.attention_batch(ids, pos, rig.cache, kv_len=db.CTX + 1)
    mods = {"attention (decode, paged)": model.layers[1].self_attn, "dense MLP": model.layers[0].mlp,
            "MoE (routed + shared)": model.layers[1].mlp}
    for name, mod in mods.items():
        outs = []
        for backend, kernel in ((TorchBackend(), False), (TritonFP8Backend(), True)):
            prev = set_backend(backend)
            rig.cache.decode_kernel = kernel
            try:
                outs.append((mod(x, batch) if "attention" in name else mod(x)).float())
            finally:
                set_backend(prev)
        err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
        res[f"check/{name}/bs{b}"] = err
        db.log(f"check module {name} (bs{b}): kernel vs torch path rel err {err:.4f}")


def profile(db, model, rig, res: dict) -> None:
    """Kernel-level GPU time of one eager bs1 decode step and one 2048 prefill (kernel backend)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from model_host.kernels import pdl
    from model_host.kernels.backend import TritonFP8Backend

    prev = set_backend(TritonFP8Backend())
    pdl_was, pdl.LAUNCH["pdl"] = pdl.LAUNCH["pdl"], "off"  # with PDL a kernel's span includes its wait
    rig.cache.decode_kernel = True
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
        set_backend(prev)
        pdl.LAUNCH["pdl"] = pdl_was
