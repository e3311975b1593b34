"""``model-host`` command line: make-checkpoint, generate, plan, serve.

Each subcommand is a ``register(subparsers)`` + ``run(args)`` pair in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from model_host.server import cli as serve_cli

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ------------------------------------------------------------------------ make-checkpoint
def _register_make_checkpoint(sub: argparse._SubParsersAction) -> None:
    from .checkpoint import PRESETS

    p = sub.add_parser(
        "make-checkpoint", help="write a random DeepSeek-V3 checkpoint (HF safetensors format)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "fp32"], help="weight format")
    p.add_argument("--layers", type=int, help="num_hidden_layers override")
    p.add_argument("--dense-layers", type=int, help="first_k_dense_replace override")
    p.add_argument("--experts", type=int, help="n_routed_experts override")
    mtp = p.add_mutually_exclusive_group()
    mtp.add_argument("--mtp", dest="mtp", action="store_true", default=None, help="include the MTP layer")
    mtp.add_argument("--no-mtp", dest="mtp", action="store_false", help="omit the MTP layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size-mb", type=float, default=2048, help="max shard size (default 2048)")
    p.add_argument("--dry-run", action="store_true", help="print the size and exit")
    p.set_defaults(func=_run_make_checkpoint)


def _run_make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_nbytes, make_config, write_random_checkpoint

    cfg = make_config(
        args.preset,
        fp8=args.dtype == "fp8",
        layers=args.layers,
        dense_layers=args.dense_layers,
        experts=args.experts,
        mtp=args.mtp,
    )
    size = checkpoint_nbytes(cfg, args.dtype)
    print(
        f"{args.preset}: {cfg.num_hidden_layers} layers (+{cfg.num_nextn_predict_layers} MTP), "
        f"hidden {cfg.hidden_size}, {cfg.n_routed_experts or 0} experts, {args.dtype}: {size / 2**30:.2f} GiB",
        file=sys.stderr,
    )
    if args.dry_run:
        return 0
    rep = write_random_checkpoint(
        args.out,
        cfg,
        dtype=args.dtype,
        seed=args.seed,
        shard_size_mb=args.shard_size_mb,
        progress=lambda msg: print(msg, file=sys.stderr),
    )
    print(
        f"wrote {rep.num_tensors} tensors in {rep.num_shards} shards, {rep.total_bytes / 2**20:.1f} MiB, "
        f"to {rep.path} in {rep.seconds:.1f}s",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------- generate
def _register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (streams to stdout)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--prompt", required=True, help="user message (or raw text with --raw)")
    p.add_argument("--system", help="system prompt (chat mode)")
    p.add_argument("--raw", action="store_true", help="tokenize the prompt as-is (no chat template)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="compute dtype (default: fp32 on cpu, bf16 on cuda)",
    )
    p.add_argument(
        "--fp8",
        default="keep",
        choices=["keep", "dequantize"],
        help="FP8 weights: keep + dequantize per call, or once at load",
    )
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="draft K tokens per step with the checkpoint's MTP layer and verify them (0 = off)")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from .generate import generate, generate_speculative
    from .loader import load_model
    from .sampler import SamplingParams
    from .tokenizer import Tokenizer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )
    t0 = time.perf_counter()
    from .speculative import require_mtp

    spec = args.speculative_tokens
    require_mtp(args.checkpoint, spec)
    model = load_model(args.checkpoint, device=device, dtype=dtype, fp8=args.fp8, load_mtp=spec > 0)
    tok = Tokenizer(args.checkpoint)
    if args.raw:
        ids = tok.encode(args.prompt, add_bos=True)
    else:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        ids = tok.encode_chat(msgs)
    load_s = time.perf_counter() - t0

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if spec:
        res = generate_speculative(model, tok, ids, params, spec, on_text=write)
    else:
        res = generate(model, tok, ids, params, on_text=write)
    sys.stdout.write("\n")
    print(
        f"[{res.finish_reason}] prompt {res.prompt_tokens} tok, generated {len(res.token_ids)} tok; "
        f"load {load_s:.1f}s, prefill {res.prefill_seconds:.2f}s, decode {res.decode_tokens_per_second:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


# ----------------------------------------------------------------------------------- plan
def _register_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="does the model fit on N GPUs, and how many KV tokens remain")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (its config.json is read)")
    src.add_argument("--config", help="a config.json file")
    p.add_argument("--gpus", type=int, required=True, help="tensor/expert-parallel ranks, one per GPU")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU in GiB (as nvidia-smi shows)")
    p.add_argument("--mtp", action="store_true", help="count the MTP layer too (serve does not load it)")
    p.add_argument("--max-prefill-tokens", type=int, default=8192, help="largest prefill (sizes the reserve)")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .plan import plan

    cfg = ModelConfig.from_json(args.checkpoint or args.config)
    p = plan(cfg, args.gpus, args.gpu_mem_gb, mtp=args.mtp, max_prefill_tokens=args.max_prefill_tokens)
    print(p.sentence())
    return 0 if p.fits else 1


COMMANDS = (_register_make_checkpoint, _register_generate, _register_plan, serve_cli.register)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="model-host", description="DeepSeek-V3 inference runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading progress")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``model-host`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # ConfigError / CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
