"""GPU decode / prefill benchmark of the truncated real-width DeepSeek-V3 (issue 7).

One command on one GPU builds the model directly on the device (V3 widths, 1 dense + 2 MoE
layers, 256 experts, FP8 128x128 block weights drawn at random in the checkpoint format, router
bias spread U[0, 0.25) so routing is not degenerate), then times:

* our runtime: the reference ops (``TorchOps``), the kernel ops (``TritonOps``) eagerly, and
  the kernel ops with decode and prefill replayed from CUDA graphs (the engine's
  ``DecodeGraphs`` / ``PrefillGraphs``; Triton GEMMs, cuBLASLt ``_scaled_mm``);
* transformers' DeepseekV3ForCausalLM on the same weights dequantized to BF16 (built after our
  runs, once our FP8 copies are no longer needed, so both fit on one 80 GB card);
* a roofline: bytes a decode step must read (weights actually touched: routed experts counted
  from the step's own routing, plus the latent KV) over the measured copy bandwidth.

Decode runs at context 512 over a paged latent cache filled with random latents (the cost of a
step does not depend on their values); prefill is 2048 tokens of one sequence into the cache.

    python3 bench/decode_bench.py --out $OUT          # full table (HF included)
    python3 bench/decode_bench.py --skip-hf --micro   # ours only, plus GEMM micro-benchmarks
    python3 bench/decode_bench.py --skip-hf --tune --out $OUT   # sweep; writes $OUT/tables/<gpu>.json
    python3 bench/decode_bench.py --skip-hf --tune prefill      # only the grouped prefill launches
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_host.checkpoint import make_config  # noqa: E402
from model_host.engine.paged_cache import PagedLatentCache  # noqa: E402
from model_host.fp8 import FP8_DTYPE, Linear, block_dequantize  # noqa: E402
from model_host.kernels.tuning import load_tuning, read_table  # noqa: E402
from model_host.layers import Embedding  # noqa: E402
from model_host.model import DeepseekV3  # noqa: E402
from model_host.moe import Gate  # noqa: E402
from model_host.ops import TorchOps  # noqa: E402

CTX, PAGE = 512, 64
RIDING_FROM = 128  # batches wider than this are timed as riding steps (kept rows only)
DEVICE = "cuda"  # the smoke test in tests/gpu points this at the CPU


def log(*a) -> None:
    print(*a, flush=True)


def gpu_ms(fn, iters: int = 10, warmup: int = 2) -> float:
    """Median milliseconds per call, CUDA events around each call (host gaps included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    x = torch.randn(2**29, device=DEVICE, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = gpu_ms(lambda: y.copy_(x), iters=20, warmup=3)
    return 2 * x.nbytes / ms / 1e6


@torch.no_grad()
def build_model(cfg, seed: int = 0, with_mtp: bool = False) -> DeepseekV3:
    """Random V3-format weights made on the GPU: FP8 values spread over the e4m3 range with
    per-block scales giving std 1/sqrt(fan_in) after dequantization (the writer's init)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    model = DeepseekV3(cfg, with_mtp=with_mtp, dtype=torch.bfloat16, device=DEVICE).eval()
    for mod in model.modules():
        if isinstance(mod, Linear):
            w = mod.weight
            std = 1.0 / math.sqrt(w.shape[-1])
            if mod.is_fp8:
                for c in range(0, w.shape[0], 16) if w.dim() == 3 else [None]:
                    dst = w if c is None else w[c:c + 16]
                    r = torch.randn(dst.shape, device=DEVICE, dtype=torch.bfloat16, generator=g)
                    dst.copy_(r.mul_(96.0).clamp_(-448, 448).to(FP8_DTYPE))
                s = mod.weight_scale_inv
                s.copy_(torch.rand(s.shape, device=DEVICE, generator=g).mul_(0.4).add_(0.8).mul_(std / 96.0))
            else:
                w.normal_(0, std, generator=g)
        elif isinstance(mod, Embedding):
            mod.weight.normal_(0, 1, generator=g)
        elif isinstance(mod, Gate):
            mod.weight.normal_(0, 1.0 / math.sqrt(mod.weight.shape[-1]), generator=g)
            mod.e_score_correction_bias.uniform_(0, 0.25, generator=g)
    return model


class Rig:
    """A paged latent cache with CTX random positions per row and the block tables for it."""

    def __init__(self, model: DeepseekV3, max_batch: int) -> None:
        cfg = model.cfg
        self.per_row = -(-(CTX + 1) // PAGE)
        blocks = max(max_batch * self.per_row, 2048 // PAGE + 1)
        self.cache = PagedLatentCache(model.num_cache_layers, blocks, PAGE, cfg.kv_lora_rank,
                                      cfg.qk_rope_head_dim, dtype=torch.bfloat16, device=DEVICE)
        self.cache.c_kv.normal_()
        self.cache.k_pe.normal_()
        self.model = model

    def decode_inputs(self, b: int):
        g = torch.Generator(device=DEVICE).manual_seed(b)  # same tokens for every variant
        ids = torch.randint(0, self.model.cfg.vocab_size, (b, 1), device=DEVICE, generator=g)
        pos = torch.full((b, 1), CTX, device=DEVICE)
        tables = torch.arange(b * self.per_row, device=DEVICE).view(b, self.per_row)
        return ids, pos, tables

    def eager_step(self, ids, pos, tables, at=None):
        """Logits of every row, or of rows ``at`` only (a riding step's kept rows)."""
        self.cache.bind(tables)
        return self.model(ids, pos, self.cache, kv_len=CTX + 1, last_only=at is None, logits_at=at).logits

    def prefill(self, ids):
        n = ids.shape[1]
        self.cache.bind(torch.arange(-(-n // PAGE), device=DEVICE).view(1, -1))
        pos = torch.arange(n, device=DEVICE).view(1, -1)
        return self.model(ids, pos, self.cache, kv_len=n, last_only=True).logits


def decode_bytes(model: DeepseekV3, rig: Rig, b: int, active: list[int]) -> int:
    """Bytes one decode step must read: every weight once (routed experts only if selected,
    the embedding only for the b looked-up rows) plus the attended latents."""
    total = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        total += b * p.shape[-1] * p.element_size() if name.startswith("embed_tokens") else p.nbytes
    for layer, n_active in zip((m for m in model.layers if hasattr(m.mlp, "experts")), active, strict=True):
        ex = layer.mlp.experts
        per_expert = sum(p.nbytes for p in ex.parameters()) // ex.num_experts
        total += n_active * per_expert
    kv = b * (CTX + 1) * (model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim) * 2 * len(model.layers)
    return total + kv


def active_experts(model: DeepseekV3, fn) -> list[int]:
    """Distinct routed experts per MoE layer in one run of ``fn`` (forward hooks on the MoEs,
    routing their inputs again with the model's ops)."""
    seen, hooks = [], []
    for layer in model.layers:
        if hasattr(layer.mlp, "gate"):
            slot = len(seen)
            seen.append(0)

            def hook(m, args, _out, s=slot):
                x = args[0].reshape(-1, args[0].shape[-1])
                seen[s] = int(args[1].route(x, m.gate).indices.unique().numel())

            hooks.append(layer.mlp.register_forward_hook(hook))
    fn()
    for h in hooks:
        h.remove()
    return seen


def linear_flops_per_token(model: DeepseekV3) -> float:
    """2 x weights used per token by the FP8 linears (8 routed + shared experts per MoE layer)."""
    cfg, n = model.cfg, 0
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.is_fp8:
            per = mod.in_features * mod.out_features
            n += per * cfg.num_experts_per_tok if ".experts." in name else per
    return 2.0 * n


def run_ours(model, rig, variant: str, batches, res: dict, tuning=None) -> None:
    """Time ``variant`` ("torch", "fp8-eager", "fp8-graph"); ``tuning``: the kernels' launch table
    (default: the package's table of this GPU)."""
    from model_host.kernels.backend import TritonOps
    from model_host.kernels.graphs import DecodeGraphs, PrefillGraphs

    ops = {"torch": lambda: TorchOps(), "fp8-eager": lambda: TritonOps(tuning), "fp8-graph": lambda: TritonOps(tuning)}
    if variant not in ops:
        raise SystemExit(f"decode_bench: unknown variant {variant!r}; use one of {', '.join(ops)}")
    prev, model.ops = model.ops, ops[variant]()
    # One graph per measured batch. Past RIDING_FROM rows a batch is timed as the engine runs a
    # riding step (prompt chunks as rows): logits of RIDING_FROM kept rows only, eager or captured.
    decode = sorted({b for b in batches if b <= RIDING_FROM} | {RIDING_FROM})
    riding = sorted({b for b in batches if b > RIDING_FROM})
    graphs = DecodeGraphs(model, rig.cache, rig.per_row, buckets=decode, riding=riding) if "graph" in variant else None
    try:
        for b in batches:
            key = f"{variant}/decode{b}"
            try:
                ids, pos, tables = rig.decode_inputs(b)
                at = torch.arange(RIDING_FROM, device=DEVICE) if b > RIDING_FROM else None
                if graphs is not None:
                    fn = lambda ids=ids, pos=pos, t=tables, g=graphs, at=at: g.run(ids.view(-1), pos.view(-1), t, at)  # noqa: E731
                else:
                    fn = lambda ids=ids, pos=pos, t=tables, at=at: rig.eager_step(ids, pos, t, at)  # noqa: E731
                res[key] = gpu_ms(fn, iters=5 if variant == "torch" else 50)
                log(f"{key}: {res[key]:.3f} ms")
                if b == 8:  # accuracy of the decode step at real widths (vs the torch path)
                    res[f"{variant}/decode8_logits"] = fn().reshape(b, -1).float().cpu()
            except Exception as e:  # keep going: one failing case must not lose the table
                res[key] = None
                log(f"{key}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc()
                torch.cuda.empty_cache()
        key = f"{variant}/prefill2048"
        try:
            g = torch.Generator(device=DEVICE).manual_seed(2048)
            ids = torch.randint(0, model.cfg.vocab_size, (1, 2048), device=DEVICE, generator=g)
            if graphs is not None:  # the engine's whole-prompt prefill graph (bucket 2048, no padding)
                pg = PrefillGraphs(model, rig.cache, [2048])
                host, table = ids[0].tolist(), list(range(-(-2048 // PAGE)))
                res[key] = gpu_ms(lambda: pg.run(host, table), iters=15)
                # The same prompt cut to 2,000 tokens: a padded replay against the eager forward.
                for n in (2048, 2000):
                    res[f"{variant}/prefill{n}_logits"] = pg.run(host[:n], table)[0].float().cpu()
                    res[f"{variant}/prefill{n}_eager_logits"] = rig.prefill(ids[:, :n])[0].float().cpu()
                pg = None
            else:
                res[key] = gpu_ms(lambda: rig.prefill(ids), iters=5 if variant == "torch" else 15)
                res[f"{variant}/prefill_logits"] = rig.prefill(ids[:, :256]).float().cpu()
            log(f"{key}: {res[key]:.3f} ms")
        except Exception as e:
            res[key] = None
            log(f"{key}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
    finally:
        model.ops = prev
        graphs = None  # noqa: F841 - drop the captured graphs before the next variant
        torch.cuda.empty_cache()


@torch.no_grad()
def build_hf(model: DeepseekV3):
    """transformers' model sharing our BF16 tensors; FP8 weights dequantized to BF16."""
    import transformers

    hcfg = transformers.DeepseekV3Config.from_dict(model.cfg.replace(quantization=None).to_dict())
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(hcfg)
    # Rotary tables are computed at construction: rebuild them off the meta device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hcfg).to(DEVICE)

    def deq(lin, sl=slice(None)):
        if not lin.is_fp8:
            return lin.weight[sl]
        return block_dequantize(lin.weight[sl], lin.weight_scale_inv[sl], lin.block, torch.bfloat16)

    def ours(name: str) -> torch.Tensor:
        if name == "lm_head.weight":
            return model.lm_head.weight
        path, attr = name.removeprefix("model.").rsplit(".", 1)
        if path.endswith("mlp.experts"):
            ex = model.get_submodule(path)
            parts = ([ex.gate_proj, ex.up_proj] if attr == "gate_up_proj" else [ex.down_proj])
            e, rows = ex.num_experts, sum(p.out_features for p in parts)
            out = torch.empty(e, rows, parts[0].in_features, dtype=torch.bfloat16, device=DEVICE)
            for c in range(0, e, 16):
                out[c:c + 16] = torch.cat([deq(p, slice(c, c + 16)) for p in parts], dim=1)
            return out
        mod = model.get_submodule(path)
        return deq(mod) if isinstance(mod, Linear) and attr == "weight" else getattr(mod, attr)

    for name, _ in list(hf.named_parameters()) + list(hf.named_buffers()):
        if "rotary_emb" in name:
            continue
        path, attr = name.rsplit(".", 1)
        mod = hf.get_submodule(path)
        t = ours(name)
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
    return hf.eval(), hcfg


@torch.no_grad()
def run_hf(hf, hcfg, batches, res: dict) -> None:
    from transformers import DynamicCache

    # A real 1 x CTX prefill, its cache replicated over the batch: works whatever the
    # transformers version stores (expanded K/V in some, MLA latents in others).
    prompt = torch.randint(0, hcfg.vocab_size, (1, CTX), device=DEVICE)
    for b in batches:
        key = f"hf-bf16/decode{b}"
        try:
            cache = DynamicCache(config=hcfg)
            hf(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for layer in cache.layers:
                layer.keys = layer.keys.repeat(b, *[1] * (layer.keys.dim() - 1))
                layer.values = layer.values.repeat(b, *[1] * (layer.values.dim() - 1))
            ids = torch.randint(0, hcfg.vocab_size, (b, 1), device=DEVICE)
            res[key] = gpu_ms(lambda ids=ids, c=cache: hf(ids, past_key_values=c, use_cache=True,
                                                         logits_to_keep=1), iters=5)
            log(f"{key}: {res[key]:.3f} ms")
            del cache
        except Exception as e:
            res[key] = None
            log(f"{key}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
        torch.cuda.empty_cache()
    ids = torch.randint(0, hcfg.vocab_size, (1, 2048), device=DEVICE)
    try:
        res["hf-bf16/prefill2048"] = gpu_ms(lambda: hf(ids, use_cache=True, logits_to_keep=1), iters=5)
        log(f"hf-bf16/prefill2048: {res['hf-bf16/prefill2048']:.3f} ms")
    except Exception as e:
        res["hf-bf16/prefill2048"] = None
        log(f"hf prefill FAILED {e}")


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(res: dict, batches) -> str:
    cols = ["hf-bf16", "torch", "fp8-eager", "fp8-graph"]
    lines = ["| case | " + " | ".join(f"{c} ms" for c in cols) + " | best ours | x HF | roofline ms | BW frac |",
             "|---" * (len(cols) + 5) + "|"]
    for case in [f"decode{b}" for b in batches] + ["prefill2048"]:
        vals = [res.get(f"{c}/{case}") for c in cols]
        ours = [v for c, v in zip(cols, vals, strict=True) if c.startswith("fp8") and v is not None]
        best = min(ours) if ours else None
        hf = vals[0]
        roof = res.get(f"roofline/{case}")
        lines.append(f"| {case} | " + " | ".join(fmt(v) for v in vals)
                     + f" | {fmt(best)} | {fmt(hf / best if hf and best else None, '.1f')}"
                     + f" | {fmt(roof, '.3f')} | {fmt(roof / best if roof and best else None, '.0%')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--variants", default="torch,fp8-eager,fp8-graph")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--table", type=Path, help="launch table (JSON) for every variant (default: this GPU's); "
                    "run twice on one machine for a decode / riding-step A/B of a table change")
    ap.add_argument("--ab-table", type=Path, help="also time the prefill with this launch table (JSON) as the "
                    "baseline against the run's table (--table, --tune's, or this GPU's), alternating, on the same model")
    ap.add_argument("--micro", action="store_true", help="also run GEMM micro-benchmarks")
    ap.add_argument("--profile", action="store_true", help="top kernels of a bs1 decode step and a prefill")
    ap.add_argument("--tune", nargs="?", const="all", choices=("all", "decode", "prefill"),
                    help="sweep the launch table first (decode: whole decode steps; prefill: the grouped prefill "
                         "launches; default all); writes OUT/tables/<gpu>.json and runs with it")
    ap.add_argument("--check", action="store_true", help="per-module kernel vs torch-path errors")
    ap.add_argument("--gemv", action="store_true",
                    help="small-M GEMM launch sweep per decode linear shape; writes OUT/gemv/<gpu>.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    import decode_diag  # noqa: E402 - sibling module (bench/ is on sys.path when run as a script)

    db = sys.modules[__name__]
    import triton
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": triton.__version__, "date": datetime.date.today().isoformat()}
    try:
        import transformers
        res["transformers"] = transformers.__version__
    except ImportError:
        pass
    log(json.dumps(res))
    bw = res["copy_GBps"] = copy_bandwidth()
    log(f"copy bandwidth {bw:.0f} GB/s (read + write)")
    cfg = make_config("v3", layers=3, dense_layers=1, mtp=False, fp8=True)
    t0 = time.perf_counter()
    model = build_model(cfg)
    log(f"model built in {time.perf_counter() - t0:.1f}s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    rig = Rig(model, max(batches))
    if args.micro:
        decode_diag.run_micro(db, model, res)
    from model_host.kernels.backend import TritonOps

    model.ops = TritonOps()
    for b in batches:  # roofline from this step's routing (kernel path: fits at any batch)
        ids, pos, tables = rig.decode_inputs(b)
        act = active_experts(model, lambda ids=ids, pos=pos, t=tables: rig.eager_step(ids, pos, t))
        nbytes = decode_bytes(model, rig, b, act)
        res[f"roofline/decode{b}"] = nbytes / bw / 1e6
        log(f"decode{b}: active experts {act}, {nbytes / 1e9:.2f} GB -> {res[f'roofline/decode{b}']:.3f} ms")
    model.ops = TorchOps()
    fl = linear_flops_per_token(model) * 2048
    if args.table and args.tune:
        raise SystemExit("decode_bench: --table and --tune both choose the run's table; give one")
    tuning = read_table(args.table) if args.table else None
    res["table"] = str(args.table) if args.table else "default"
    if args.tune:
        tuning = decode_diag.tune(db, model, rig, res, args.out or Path("."), args.tune)
    if args.check:
        for b in (1, 8):  # bs1: the one-row GEMV path; bs8: the tensor-core tiles
            decode_diag.check_modules(db, model, rig, res, b=b)
    if args.gemv:
        decode_diag.sweep_small_m(db, model, res, args.out or Path("."))
    if args.profile:
        try:
            decode_diag.profile(db, model, rig, res)
        except Exception as e:  # diagnostics only
            log(f"profile FAILED {type(e).__name__}: {e}")
    for v in args.variants.split(","):
        t0 = time.perf_counter()
        run_ours(model, rig, v, batches, res, tuning)
        log(f"[{v} done in {time.perf_counter() - t0:.0f}s]")
    if args.ab_table:
        decode_diag.prefill_ab(db, model, rig, read_table(args.ab_table), tuning or load_tuning(), res)
    decode_diag.log_checks(db, res, fl)
    if not args.skip_hf:
        try:
            hf, hcfg = build_hf(model)
            ids = torch.randint(0, cfg.vocab_size, (1, 64), device=DEVICE)
            with torch.no_grad():
                ref = hf(ids, use_cache=False).logits.float().cpu()[0]
            model.ops = TritonOps()
            rig.cache.bind(torch.arange(2, device=DEVICE).view(1, -1))
            ours = model(ids, cache=rig.cache, kv_len=64).logits.float().cpu()[0]
            agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
            log(f"check fp8 kernels vs HF BF16 logits (64-token prefill): rel err "
                f"{((ours - ref).norm() / ref.norm()).item():.4f}, argmax agreement {agree:.2f}")
            del model, rig
            torch.cuda.empty_cache()
            run_hf(hf, hcfg, batches, res)
        except Exception as e:
            log(f"HF baseline FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
    out = table(res, batches)
    print("\n" + out, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in res.items() if not isinstance(v, torch.Tensor)}
        (args.out / "bench.json").write_text(json.dumps(clean, indent=1))
        extra = [res.get(k, "") for k in ("micro", "gemv", "profile/decode1", "profile/prefill2048")]
        (args.out / "table.md").write_text(out + "\n\n" + "\n\n".join(extra) + "\n")


if __name__ == "__main__":
    main()
