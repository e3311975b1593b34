"""bench/moe_prefill_bench.py --quick on the CPU: both grouped launches of a tiny MoE layer run
(through the reference path here) and the report counts their rows and padding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_moe_prefill_bench_quick(tmp_path):
    subprocess.run([sys.executable, "bench/moe_prefill_bench.py", "--quick", "--out", str(tmp_path)],
                   cwd=REPO, check=True, timeout=300, capture_output=True)
    res = json.loads((tmp_path / "moe_prefill_bench.json").read_text())
    assert set(res["launches"]) == {"gated", "down"}
    for r in res["launches"].values():
        assert r["rows"] == res["tokens"] * res["top_k"] and r["ms"] > 0
        # Each expert's rows are cut into BLOCK_M tiles, so padding is under one tile an expert.
        block_m = r["config"]["BLOCK_M"]
        assert r["padded_rows"] % block_m == 0 and r["rows"] <= r["padded_rows"] < r["rows"] + res["experts"] * block_m
    subprocess.run([sys.executable, "bench/moe_prefill_bench.py", "--quick", "--once"], cwd=REPO, check=True,
                   timeout=300, capture_output=True)


def test_moe_prefill_bench_pairs_two_tables(tmp_path):
    """--baseline-table times another launch table against this GPU's, alternating, and checks
    that both compute the same rows (the CPU reference path: identical)."""
    table = REPO / "model_host" / "kernels" / "tables" / "h100.json"
    subprocess.run([sys.executable, "bench/moe_prefill_bench.py", "--quick", "--baseline-table", str(table),
                    "--out", str(tmp_path)], cwd=REPO, check=True, timeout=300, capture_output=True)
    res = json.loads((tmp_path / "moe_prefill_bench.json").read_text())
    assert set(res["baseline"]) == {"gated", "down"}
    for name, b in res["baseline"].items():
        assert b["ms"] > 0 and b["rel_err"] == 0.0 and b["config"]["BLOCK_M"] == res["launches"][name]["config"]["BLOCK_M"]

