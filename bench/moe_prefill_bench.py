"""The grouped MoE launches of one V3 MoE layer at prefill, alone: where the 2,048-token prefill
spends most of its time (docs/gpu_notes.md: ~10.4 of 18.45 ms on the H100), measured against
its two ceilings without building a model.

One layer at V3's widths (256 experts, hidden 7,168, expert width 2,048, 8 experts a token),
random FP8 weights with 128x128 scales, tokens routed uniformly (what random gate weights give),
the launch shapes of this GPU's table (`grouped_config`). For the gated gate/up launch and the
down launch it reports the time, the weight bytes per second against the copy bandwidth
measured in the same run, and the MMA rate on the rows actually computed (tiles padded to
BLOCK_M) and on the useful rows.

    python3 bench/moe_prefill_bench.py --out $OUT                  # GPU
    ncu --clock-control none --set full -k regex:_grouped_kernel -c 2 \\
        python3 bench/moe_prefill_bench.py --once                  # one launch of each, for ncu
    python3 bench/moe_prefill_bench.py --baseline-table old.json   # paired against another table
    python bench/moe_prefill_bench.py --quick                      # CPU: plumbing (reference path)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from model_host.kernels import moe_grouped as mg  # noqa: E402
from model_host.kernels.fp8_linear import act_quant  # noqa: E402
from model_host.kernels.tuning import load_tuning, read_table  # noqa: E402
from model_host.ops import sort_by_expert  # noqa: E402


def fp8_experts(e: int, n: int, k: int, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] FP8 weights and [E, N/128, K/128] scales, built expert by expert (one layer's
    gate and up are 7.5 GB of FP8; their fp32 source at once would be 30 GB)."""
    w = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=device)
    for i in range(e):
        w[i] = (torch.randn(n, k, device=device, generator=gen) * 0.5).to(torch.float8_e4m3fn)
    s = torch.rand(e, -(-n // 128), -(-k // 128), device=device, generator=gen) * 2e-3 + 1e-3
    return w, s


def routed(tokens: int, experts: int, top_k: int, device: str, gen: torch.Generator):
    """Each token's top_k distinct experts, uniformly: sorted rows, counts, and each row's token."""
    idx = torch.rand(tokens, experts, device=device, generator=gen).topk(top_k, dim=1).indices
    order, counts = sort_by_expert(idx, experts)
    return (order // top_k).to(torch.int32), counts


def timed_ms(fn, cuda: bool, iters: int) -> float:
    if not cuda:
        import time

        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    import decode_bench as db  # sibling module; CUDA events around each call

    return db.gpu_ms(fn, iters=iters, warmup=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--once", action="store_true", help="one launch of each after a warm-up (for ncu)")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny widths: the plumbing, not the kernels")
    ap.add_argument("--out", type=Path, help="folder for moe_prefill_bench.json")
    ap.add_argument("--baseline-table", type=Path,
                    help="a launch table (JSON) to time alternately against this GPU's table, paired")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    dev = "cuda" if cuda else "cpu"
    e, hidden, inter, top_k = (256, 7168, 2048, 8) if cuda else (8, 256, 128, 2)
    tokens = args.tokens if cuda else 64
    gen = torch.Generator(dev).manual_seed(0)
    tuning = load_tuning() if cuda else load_tuning("NVIDIA H200")
    gate, gate_s = fp8_experts(e, inter, hidden, dev, gen)
    up, up_s = fp8_experts(e, inter, hidden, dev, gen)
    down, down_s = fp8_experts(e, hidden, inter, dev, gen)
    token, counts = routed(tokens, e, top_k, dev, gen)
    rows = token.numel()
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    h = torch.randn(rows, inter, device=dev, dtype=torch.bfloat16, generator=gen)
    xq, hq = act_quant(x), act_quant(h)
    def launchers(t) -> dict:
        cfg_g = mg.grouped_config(rows, inter, e, t)
        cfg_d = mg.grouped_config(rows, hidden, e, t, down=True)
        # The tile schedules are computed once, as the product's sort by expert does for the layer.
        sched_g, sched_d = mg.tile_schedule(counts, cfg_g["BLOCK_M"]), mg.tile_schedule(counts, cfg_d["BLOCK_M"])
        return {
            "gated": (cfg_g, lambda: mg.grouped_w8a8(x, gate, gate_s, None, num_rows=rows, mode="gated", rows=token,
                                                      w2=up, w2_s=up_s, config=cfg_g, a_quant=xq, schedule=sched_g)),
            # Prefill stores the down rows (fp32 atomics would cost more than the GEMM); the combine
            # that un-sorts and weights them is a separate, small pass (backend._moe_prefill).
            "down": (cfg_d, lambda: mg.grouped_w8a8(h, down, down_s, None, num_rows=rows, config=cfg_d, a_quant=hq,
                                                     schedule=sched_d)),
        }

    launches = launchers(tuning)
    base = launchers(read_table(args.baseline_table)) if args.baseline_table else None
    if args.once:  # Triton compiles on the host before a launch, so ncu profiles these as they run
        for _, fn in launches.values():
            fn()
        return 0
    import decode_bench as db

    copy_gbs = db.copy_bandwidth() if cuda else float("nan")
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tokens": tokens, "experts": e,
           "top_k": top_k, "copy_GBps": copy_gbs, "launches": {}}
    print(f"{res['device']}: {tokens} tokens x {top_k} of {e} experts; copy bandwidth {copy_gbs:.0f} GB/s")
    print("| launch | config | ms | weight GB | weight GB/s (% of copy) | padded rows | TFLOP/s padded / useful |")
    print("|---|---|---|---|---|---|---|")
    for name, (cfg, fn) in launches.items():
        if base is None:
            ms = timed_ms(fn, cuda, 10 if cuda else 2)
        else:  # paired: the two tables' launches alternate, three rounds, medians
            rounds = [(timed_ms(base[name][1], cuda, 10 if cuda else 2), timed_ms(fn, cuda, 10 if cuda else 2))
                      for _ in range(3)]
            base_ms, ms = (statistics.median(r[i] for r in rounds) for i in (0, 1))
            err = float((fn().float() - base[name][1]().float()).norm() / base[name][1]().float().norm())
            res.setdefault("baseline", {})[name] = {"config": dict(base[name][0]), "ms": base_ms, "rel_err": err}
            print(f"{name}: baseline table {base_ms:.3f} ms, this table {ms:.3f} ms ({base_ms / ms:.2f}x), "
                  f"outputs differ by {err:.1e}", flush=True)
        n, k = (2 * inter, hidden) if name == "gated" else (hidden, inter)  # gated: gate and up
        weight_gb = e * n * k / 1e9  # every expert is active at prefill sizes: read once at best
        padded = int(((counts + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"]).sum()) * cfg["BLOCK_M"]
        flop_padded, flop_useful = 2 * padded * n * k, 2 * rows * n * k
        shape = ", ".join(f"{k_}={v}" for k_, v in cfg.items() if k_ != "a_mode")
        r = {"config": dict(cfg), "ms": ms, "weight_GB": weight_gb, "weight_GBps": weight_gb / ms * 1e3,
             "padded_rows": padded, "rows": rows, "tflops_padded": flop_padded / ms / 1e9,
             "tflops_useful": flop_useful / ms / 1e9}
        res["launches"][name] = r
        print(f"| {name} | {shape} | {ms:.3f} | {weight_gb:.2f} | {r['weight_GBps']:.0f} "
              f"({100 * r['weight_GBps'] / copy_gbs:.0f}%) | {padded} of {rows} | "
              f"{r['tflops_padded']:.0f} / {r['tflops_useful']:.0f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "moe_prefill_bench.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
