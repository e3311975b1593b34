"""The paged MLA kernel on an eager riding step: many query rows per sequence over a long cached
context, as when a wave of prefix-hit requests rides one decode step (docs/gpu_notes.md, ninth
session: at concurrency 128 ~40 rows per arrival over ~2,000 cached keys each).

The kernel gives a program BLOCK_H heads of one row, so each row reads its keys once per head
block (128 / 16 = 8 times at decode's setting) and its MMAs are BLOCK_H rows tall. This times
`mla_decode` at wider head blocks on those shapes, against the shipped setting and an fp64
check of one row, and reports the attention TFLOP/s and the key bytes read per step.

    python3 bench/mla_rows_bench.py --out $OUT      # GPU
    python bench/mla_rows_bench.py --quick          # CPU: plumbing only (the reference path)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from serve_bench import median_ms  # noqa: E402

from model_host.kernels.mla_decode import mla_decode, mla_decode_reference  # noqa: E402

# (BLOCK_H, num_warps, BLOCK_N, num_stages): the narrow setting first, then the wide one at the
# 32-key blocks it shipped with until the fifteenth session (the tables now read 64 keys).
GRID = [(16, 4, 32, 2), (64, 8, 32, 2), (64, 8, 32, 1), (64, 8, 32, 3), (64, 8, 64, 2), (64, 8, 64, 3),
        (64, 8, 16, 3), (64, 4, 32, 2), (32, 4, 64, 3), (128, 16, 32, 2), (64, 16, 32, 2), (64, 16, 64, 2), (64, 16, 32, 3),
        (32, 8, 64, 2)]


def compiled_count() -> int:
    """How many variants of the split kernel Triton 3's JIT cache holds (-1 where this Triton
    keeps it elsewhere)."""
    try:
        from model_host.kernels.mla_decode import _mla_split_kernel

        return sum(len(c[0]) for c in _mla_split_kernel.device_caches.values())
    except Exception:  # noqa: BLE001 - diagnostics only
        return -1


def registers(before: int) -> str:
    """Registers a thread and spilled bytes of the split kernel a setting compiled, if it
    compiled one (a later shape reuses the first shape's kernels: "" then): spills explain a
    slow setting."""
    if before < 0 or compiled_count() <= before:
        return ""
    from model_host.kernels.mla_decode import _mla_split_kernel

    k = [k for c in _mla_split_kernel.device_caches.values() for k in c[0].values()][-1]
    return f"{k.n_regs} regs, {k.n_spills} spills"


def case(seqs: int, per: int, ctx: int, heads: int, page: int, dev: str, iters: int) -> list[dict]:
    """One riding step: `seqs` sequences of `ctx` cached tokens, each with `per` new rows (row i
    of a sequence attends to ctx + i + 1 positions), at every GRID setting."""
    r, dr = 512, 64
    g = torch.Generator(device=dev).manual_seed(0)
    per_seq = -(-(ctx + per) // page)
    c_kv = torch.randn(seqs * per_seq * page, r, device=dev, dtype=torch.bfloat16, generator=g)
    k_pe = torch.randn(seqs * per_seq * page, dr, device=dev, dtype=torch.bfloat16, generator=g)
    tables = torch.arange(seqs * per_seq, device=dev, dtype=torch.int32).view(seqs, per_seq)
    tables = tables.repeat_interleave(per, 0).contiguous()  # every row of a sequence: its table
    pos = (ctx + torch.arange(per, device=dev)).repeat(seqs).contiguous()
    rows = seqs * per
    q = 0.05 * torch.randn(rows, heads, r + dr, device=dev, dtype=torch.bfloat16, generator=g)
    q_lat, q_pe = q[..., :r], q[..., r:]
    # fp64 truth for the last row (the longest context): every setting is checked against it.
    ref = mla_decode_reference(q[-1:].double(), c_kv.double(), k_pe.double(), tables[-1:], pos[-1:], page, 0.07,
                               lens_from_positions=True)[0]
    flop = 2 * heads * (r + dr + r) * sum(ctx + i + 1 for i in range(per)) * seqs
    out = []
    for block_h, warps, block_n, stages in GRID:
        def fn(bh=block_h, w=warps, bn=block_n, st=stages):
            return mla_decode(q_lat, c_kv, k_pe, tables, pos, page, 0.07, block_n=bn, lens_from_positions=True,
                              q_pe=q_pe, block_h=bh, num_warps=w, num_stages=st)
        before = compiled_count()
        try:
            err = ((fn()[-1].double() - ref).norm() / ref.norm()).item()
            ms = median_ms(fn, iters, dev == "cuda")
        except Exception as e:  # e.g. out of shared memory or registers at this setting
            out.append({"block_h": block_h, "num_warps": warps, "block_n": block_n, "num_stages": stages, "error": f"{type(e).__name__}: {e}"})
            continue
        out.append({"seqs": seqs, "rows_per_seq": per, "ctx": ctx, "block_h": block_h, "num_warps": warps,
                    "block_n": block_n, "num_stages": stages, "ms": ms, "tflops": flop / ms / 1e9, "rel_err_vs_fp64": err, "registers": registers(before),
                    "key_gb_read": rows * -(-heads // block_h) * (ctx + per / 2) * (r + dr) * 2 / 1e9})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, tiny shapes: the plumbing, not the kernel")
    ap.add_argument("--out", type=Path, help="folder for mla_rows_bench.json")
    args = ap.parse_args()
    dev = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    # Riding steps (40 rows a sequence), then decode-shaped steps (one row a sequence), which
    # tell where wide head blocks start to pay (the table's wide_min_rows).
    shapes = [(2, 3, 40, 16, 8)] if args.quick else [(32, 40, 2000, 128, 64), (128, 40, 2000, 128, 64),
                                                     *((b, 1, 2000, 128, 64) for b in (32, 64, 128, 256))]
    res = [r for s in shapes for r in case(*s, dev=dev, iters=2 if args.quick else 10)]
    print("| rows (seqs x rows) | BLOCK_H | warps | BLOCK_N | stages | ms | TFLOP/s | key GB read | rel err vs fp64 | registers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res:
        if "error" in r:
            print(f"| | {r['block_h']} | {r['num_warps']} | {r['block_n']} | {r['num_stages']} | {r['error'][:80]} | | | | |")
            continue
        print(f"| {r['seqs'] * r['rows_per_seq']} ({r['seqs']} x {r['rows_per_seq']}) | {r['block_h']} | {r['num_warps']} "
              f"| {r['block_n']} | {r['num_stages']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['key_gb_read']:.1f} | {r['rel_err_vs_fp64']:.1e} | {r['registers']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mla_rows_bench.json").write_text(json.dumps({"device": dev, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
