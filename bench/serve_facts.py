"""Facts about the served process for bench/serve_bench.py: its /metrics gauges and start-up log
lines, the kernels its own Triton cache compiled (by signature), and the host CPU."""

from __future__ import annotations

import os
import re
from pathlib import Path


def server_facts(root: str, log: Path) -> dict:
    """Gauges from /metrics and the start-up lines (KV budget, graph capture) from the log."""
    import httpx

    text = httpx.get(f"{root}/metrics", timeout=10).text
    facts = {}
    for name in ("model_host_kv_blocks_total", "model_host_kv_block_size_tokens", "model_host_preemptions",
                 "model_host_prefix_cache_hit_rate"):
        m = re.search(rf"^{name} ([0-9.eE+-]+)$", text, re.M)
        facts[name] = float(m.group(1)) if m else None
    facts["startup_log"] = [ln.strip() for ln in log.read_text().splitlines()
                            if re.search(r"KV budget|KV cache|captured (decode|CUDA)|warmed up|model built|HTTP:", ln)]
    return facts


def compiled(workdir: Path) -> set[Path]:
    """Kernels the server has compiled so far (entries of its own Triton cache)."""
    cache = workdir / "triton"
    return set(cache.iterdir()) if cache.exists() else set()


def kernel_signatures(entries: set[Path]) -> list[str]:
    """What each cache entry compiled: the kernel's TTIR signature (its name, and the argument
    specialisation, e.g. ``tt.divisibility``), so a compile mid-run names the shape warm-up missed."""
    sigs = []
    for entry in sorted(entries):
        ttir = next(entry.glob("*.ttir"), None)
        line = next((ln for ln in ttir.read_text().splitlines() if "tt.func" in ln), "") if ttir else ""
        sigs.append(line.strip() or entry.name)
    return sigs


def host_cpu() -> str:
    """The CPU model and core count: served throughput at high concurrency moves with the host."""
    info = Path("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", info.read_text() if info.exists() else "", re.M)
    return f"{model.group(1) if model else 'unknown CPU'}, {os.cpu_count()} cores"
