"""Host time of the engine's per-step host->device copies while the GPU is busy (diagnostic).

The overlapped engine step (model_host/engine/engine.py) queues step n+1 while the GPU runs step
n, so a copy that blocks the host until the GPU drains costs a whole step. This queues ~50 ms
of GPU work, then times each way of uploading a step's block tables (128 rows x 130 blocks)
and a small index list, and SDPA prefill attention with a bool mask vs a lower-right causal
bias, all on the host clock.

    python bench/host_copy_diag.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def busy(ms: float = 50) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    a @ a
    t1.record()
    torch.cuda.synchronize()
    per = t0.elapsed_time(t1)
    for _ in range(max(1, int(ms / per))):
        a @ a


def timed(fn, n: int = 20) -> float:
    out = []
    for _ in range(n):
        busy()
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main() -> None:
    rows = [[(i * 131 + j) % 100000 for j in range(130)] for i in range(128)]
    small = list(range(128))
    dev = torch.device("cuda")
    staging = torch.empty(1 << 20, dtype=torch.long).pin_memory()
    dst = torch.empty(128 * 130, dtype=torch.long, device=dev)
    cases = {
        "tables: torch.tensor(rows, device=cuda)": lambda: torch.tensor(rows, device=dev),
        "tables: torch.tensor(rows).pin_memory().to(non_blocking)": lambda: torch.tensor(rows).pin_memory().to(dev, non_blocking=True),
        "tables: torch.tensor(rows) only (host build)": lambda: torch.tensor(rows),
        "tables: into a persistent pinned buffer + copy_": lambda: (staging[: 128 * 130].copy_(torch.tensor(rows).view(-1)),
                                                                   dst.copy_(staging[: 128 * 130], non_blocking=True)),
        "128 ints: torch.tensor(device=cuda)": lambda: torch.tensor(small, device=dev),
        "128 ints: pin_memory().to(non_blocking)": lambda: torch.tensor(small).pin_memory().to(dev, non_blocking=True),
        "128 ints: .to(non_blocking) from pageable": lambda: torch.tensor(small).to(dev, non_blocking=True),
    }
    q = torch.randn(1, 128, 40, 192, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 128, 2000, 192, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 128, 2000, 128, device=dev, dtype=torch.bfloat16)
    mask = torch.arange(2000, device=dev) <= torch.arange(1960, 2000, device=dev).unsqueeze(1)
    cases["SDPA 40 q x 2000 k: bool mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    cases["SDPA 40 q x 2000 k: causal_lower_right"] = lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(40, 2000))
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        print(f"{name:60s} {timed(fn):9.1f} us host")
    for name, m in (("bool mask", mask), ("causal_lower_right", causal_lower_right(40, 2000))):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=m).float()
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        e1.record()
        torch.cuda.synchronize()
        print(f"SDPA {name}: GPU {e0.elapsed_time(e1) / 20 * 1e3:.1f} us, max err vs fp32 {(got - ref).abs().max():.3g}")


if __name__ == "__main__":
    main()
