"""Bitwise comparison of two checkouts of model_host on CPU: prefills into a paged cache and one
batched decode step of a tiny random FP8 model, through the reference ops (``--ops torch``) or
the Triton kernels under the interpreter (``--ops kernels``, run with TRITON_INTERPRET=1).

    git archive 87d25b2 model_host | tar -x -C /tmp/old
    TRITON_INTERPRET=1 python3 bench/compare_trees.py /tmp/old . --ops kernels

Trees before issue 15 need two fixes to run under the interpreter (no change on GPUs): the
scalar K mask of ``_w8a8_kernel`` as a [1] block, and ``ValueError`` among the exceptions that
send a shape from cuBLASLt back to Triton (what ``_scaled_mm`` raises on CPU)::

    sed -i 's/in_k = k0 < K$/in_k = tl.full((1,), k0, tl.int32) < K/' /tmp/old/model_host/kernels/fp8_linear.py
    sed -i 's/except (RuntimeError, NotImplementedError, TypeError):/except (RuntimeError, NotImplementedError, TypeError, ValueError):/' /tmp/old/model_host/kernels/backend.py

Each tree runs in its own process (``--run`` is that child); fp32 activations, because the
interpreter mis-evaluates bf16 ``tl.dot``.  Prints, per output, "bitwise equal" or the difference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(tree: str, ops_kind: str, out: str, lens: list[int]) -> None:
    sys.path.insert(0, tree)
    import torch

    from model_host.checkpoint import make_config, write_random_checkpoint
    from model_host.engine.paged_cache import PagedLatentCache
    from model_host.loader import load_model

    ck = Path(tempfile.gettempdir()) / "compare_trees_ckpt"
    if not (ck / "config.json").exists():  # q_lora_rank 128: q_a + kv_a run as one GEMM
        write_random_checkpoint(ck, make_config("tiny", vocab_size=1024, q_lora_rank=128), dtype="fp8", tokenizer=False)
    model = load_model(ck, dtype=torch.float32)
    paged = PagedLatentCache(model.num_cache_layers, 64, 16, model.cfg.kv_lora_rank, model.cfg.qk_rope_head_dim,
                             dtype=torch.float32)
    if ops_kind == "kernels":
        if Path(tree, "model_host/ops.py").exists():
            from model_host.kernels.backend import TritonOps

            model.ops = TritonOps()
        else:  # before issue 15: a process-wide backend, and a cache flag for the paged kernel
            from model_host.fp8 import set_backend
            from model_host.kernels.backend import TritonFP8Backend

            set_backend(TritonFP8Backend())
            paged.decode_kernel = True
    g = torch.Generator().manual_seed(0)
    res, tables, used = {}, [], 0
    for i, n in enumerate(lens):  # each sequence into its own blocks
        nb = -(-(n + 1) // 16)
        tables.append(list(range(used, used + nb)))
        used += nb
        paged.bind(torch.tensor([tables[-1]]))
        ids = torch.randint(0, 1024, (1, n), generator=g)
        res[f"prefill{i}"] = model(ids, torch.arange(n).view(1, -1), paged, kv_len=n, last_only=True).logits
    width = max(map(len, tables))
    paged.bind(torch.tensor([t + [0] * (width - len(t)) for t in tables]))
    ids = torch.randint(0, 1024, (len(lens), 1), generator=g)
    res["decode"] = model(ids, torch.tensor(lens).view(-1, 1), paged, kv_len=max(lens) + 1, last_only=True).logits
    res["cache"] = paged.c_kv
    torch.save(res, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--ops", choices=("torch", "kernels"), default="torch")
    ap.add_argument("--lens", default="40,12", help="prompt lengths (300: the prefill MoE / 128-row tile paths)")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lens = [int(n) for n in args.lens.split(",")]
    if args.run:
        return run(args.old, args.ops, args.run, lens)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for i, tree in enumerate((args.old, args.new)):
            outs.append(os.path.join(tmp, f"{i}.pt"))
            subprocess.run([sys.executable, __file__, os.path.abspath(tree), os.path.abspath(tree), "--ops", args.ops,
                            "--lens", args.lens, "--run", outs[-1]], check=True)
        a, b = (torch.load(p) for p in outs)
    for k in a:
        x, y = a[k].float(), b[k].float()
        print(k, "bitwise equal" if torch.equal(x, y) else f"differs: max {(x - y).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
