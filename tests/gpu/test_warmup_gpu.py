"""Start-up compiles every kernel shape a served step can take: after the engine is built, no
request waits for a Triton compile (about a second each; one at concurrency 32 set TTFT p99 to
~0.96 s on an H100, docs/benchmarks.md).

The check runs in a child process with a Triton cache of its own, so that kernels compiled by
earlier tests or runs cannot hide a compile: the cache entries after the riding steps must be
the entries after start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from model_host.checkpoint import make_config, write_random_checkpoint
    from model_host.engine.engine import Engine, EngineConfig
    from model_host.engine.scheduler import PrefillChunk
    from model_host.engine.sequence import Sequence
    from model_host.kernels.backend import TritonOps
    from model_host.loader import load_model
    from model_host.sampler import SamplingParams
    from model_host.tokenizer import Tokenizer

    work, cache = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = make_config("tiny", mtp=False, hidden_size=256)
    write_random_checkpoint(work, cfg, dtype="fp8", seed=3)
    model = load_model(work, device="cuda", dtype=torch.bfloat16, ops=TritonOps())
    # Riding graphs off: every step below runs eagerly, as steps past the widest riding graph do.
    engine = Engine(model, Tokenizer(work), EngineConfig(max_batch=4, kv_memory_gb=0.05, max_prefill_tokens=320,
                                                         max_model_len=2048, riding_graph_rows=0))
    before = {p.name for p in cache.iterdir()}
    # Steps past the captured sizes (eager), as a wave of prefix hits makes them: decode rows
    # beside prompt chunks that start after a cached prefix, odd and even row counts, one chunk
    # or several. Blocks 0.. are shared (nothing is published; only the kernels matter here).
    params = SamplingParams(max_tokens=1)

    def seq(n):
        s = Sequence([5] * n, params, decoder=None, generator=None)
        s.block_table = list(range(-(-n // engine.cache.block_size)))
        return s

    m = engine.max_rows
    steps = [([seq(50), seq(77)], [(40, m + 1)]),          # m + 3 rows
             ([seq(33)], [(120, m + 36)]),                  # m + 37 rows
             ([], [(0, m + 3), (64, m + 3)]),               # 2m + 6 rows, two chunks
             ([seq(9)], [(200, 150), (7, 150)])]            # 301 rows
    rows = []
    for decode, chunks in steps:
        chunk_seqs = [PrefillChunk(seq(start + n), start, n) for start, n in chunks]
        engine.runner.decode(decode, chunk_seqs)
        for s in decode + [c.seq for c in chunk_seqs]:
            engine.runner.release(s)
        rows.append(len(decode) + sum(n for _, n in chunks))
    torch.cuda.synchronize()
    new = sorted(p.name for p in cache.iterdir() if p.name not in before)
    names = [next((f.stem for f in (cache / d).glob("*.json") if not f.name.startswith("__grp__")), d) for d in new]
    print(json.dumps({"max_rows": engine.max_rows, "rows": rows, "compiled": names}))
""")


def test_riding_steps_past_the_captured_graphs_compile_nothing_after_start_up(tmp_path):
    cache = tmp_path / "triton"
    cache.mkdir()
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "MODEL_HOST_CUDA_GRAPHS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), str(cache)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip(), f"the child failed:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["compiled"] == [], f"kernels compiled after start-up, in rows {report['rows']}: {report['compiled']}"
