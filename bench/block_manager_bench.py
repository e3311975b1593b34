"""Host cost of the prefix cache's bookkeeping at serving scale (CPU only, no model).

128 sequences of a 1,900-token RAG prompt in 64-token blocks: their registration after the
prefill, 128 decode steps (a block fills every 64 tokens), then re-admission with prefix hits.
Run before and after a change to model_host/engine/block_manager.py (git stash) on one machine;
``--block N`` for another block size (serve's default is 16).

    python bench/block_manager_bench.py [--block 16]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_host.engine.block_manager import BlockManager  # noqa: E402
from model_host.engine.sequence import Sequence  # noqa: E402
from model_host.sampler import SamplingParams  # noqa: E402

ROWS, PROMPT, STEPS, BLOCK = 128, 1900, 128, 64


def prompt(r: int) -> Sequence:
    return Sequence(list(range(r * 10**5, r * 10**5 + PROMPT)), SamplingParams(), decoder=None, generator=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=BLOCK, help="tokens per KV block")
    block = ap.parse_args().block
    bm = BlockManager(100_000, block)
    seqs = [prompt(r) for r in range(ROWS)]
    for s in seqs:
        bm.allocate(s)
        s.num_computed = len(s)
    t0 = time.perf_counter()
    for s in seqs:
        bm.register_full_blocks(s)  # after the prefill
    for _ in range(STEPS):  # decode steps: registration whenever a block fills
        for s in seqs:
            s.token_ids.append(7)
            bm.append_slot(s)
            s.num_computed = len(s)
            if s.num_computed % block == 0:
                bm.register_full_blocks(s)
    register_ms = 1e3 * (time.perf_counter() - t0)
    for s in seqs:
        bm.release(s)
    t1 = time.perf_counter()
    for r in range(ROWS):  # the same prompts again: every full block a prefix hit
        s = prompt(r)
        bm.allocate(s)
        bm.release(s)
    allocate_ms = 1e3 * (time.perf_counter() - t1) / ROWS
    print(f"{block}-token blocks: register_full_blocks: {register_ms:.1f} ms for {ROWS} prefills + {STEPS} decode steps x {ROWS} rows; "
          f"allocate with prefix hits: {allocate_ms:.2f} ms per request")


if __name__ == "__main__":
    main()
