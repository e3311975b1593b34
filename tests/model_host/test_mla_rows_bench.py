"""bench/mla_rows_bench.py --quick on the CPU: every head-block setting runs the riding-step
shapes (through the reference path here) and is checked against fp64."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mla_rows_bench_quick(tmp_path):
    subprocess.run([sys.executable, "bench/mla_rows_bench.py", "--quick", "--out", str(tmp_path)],
                   cwd=REPO, check=True, timeout=300, capture_output=True)
    sys.path.insert(0, str(REPO / "bench"))
    import mla_rows_bench

    res = json.loads((tmp_path / "mla_rows_bench.json").read_text())["results"]
    assert [(r["block_h"], r["num_warps"], r["block_n"], r["num_stages"]) for r in res] == mla_rows_bench.GRID
    assert all("error" not in r and r["ms"] > 0 and r["rel_err_vs_fp64"] < 1e-2 for r in res)
