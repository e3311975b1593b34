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
    engine = Engine(model, Tokenizer(work), EngineConfig(max_batch=4, kv_memory_gb=0.05, max_prefill_tokens=320,
                                                         max_model_len=2048))
    before = {p.name for p in cache.iterdir()}
    # Prompt chunks riding as rows past the captured sizes (eager decode steps), odd and even
    # row counts, with and without decode rows beside them, as prefix hits arrive in a wave.
    params = SamplingParams(max_tokens=1)
    rows = []
    for n in (engine.max_rows + 3, engine.max_rows + 37, 2 * engine.max_rows + 6, 301):
        seq = Sequence([5] * n, params, decoder=None, generator=None)
        seq.block_table = list(range(-(-n // engine.cache.block_size)))
        engine.runner.decode([], [PrefillChunk(seq, 0, n)])
        engine.runner.release(seq)
        rows.append(n)
    torch.cuda.synchronize()
    new = sorted(p.name for p in cache.iterdir() if p.name not in before)
    names = [next((f.stem for f in (cache / d).glob("*.json") if not f.name.startswith("__grp__")), d) for d in new]
    print(json.dumps({"max_rows": engine.max_rows, "rows": rows, "compiled": names}))
""")


def test_riding_steps_past_the_captured_graphs_compile_nothing_after_start_up(tmp_path):
    cache = tmp_path / "triton"
    cache.mkdir()
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), str(cache)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["compiled"] == [], f"kernels compiled after start-up, in rows {report['rows']}: {report['compiled']}"
