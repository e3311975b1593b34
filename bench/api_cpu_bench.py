"""CPU per streamed token in the engine's process, by thread, with the routes on a thread of it
(`--api-processes 0`) and in API processes of their own (`--api-processes N`).

The engine's process shares one GIL among its threads; at high concurrency on a GPU the HTTP
work on that GIL is what the served throughput loses to (docs/gpu_notes.md). This starts the
real `model-host serve` (tiny random checkpoint, one torch thread) once per setting and streams
one level of requests at it from client processes (bench/serve_clients.py). It reads, from
/proc, the CPU time over the level of the engine thread (the server's main thread), of the
engine process's other threads (the HTTP thread and tokenizer workers, or the hub's threads),
and of the API processes, each divided by the tokens streamed.

    python bench/api_cpu_bench.py                         # --api-processes 0 and 2, twice each
    python bench/api_cpu_bench.py --settings 0 4 --repeat 3 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from serve_clients import run_level  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(stat: Path) -> float:
    """utime + stime of a /proc stat file, in seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return out


def sample(pid: int, kids: list[int]) -> tuple[float, float, float]:
    """(engine process, its main thread, API processes) CPU seconds so far."""
    return (cpu_s(Path(f"/proc/{pid}/stat")), cpu_s(Path(f"/proc/{pid}/task/{pid}/stat")),
            sum(cpu_s(Path(f"/proc/{k}/stat")) for k in kids))


def one(ckpt: Path, api_processes: int, args, pool) -> dict:
    import httpx

    from tests.support.openai_stub import free_port

    port = free_port()
    root = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "model_host.cli", "serve", "--checkpoint", str(ckpt), "--port", str(port),
         "--api-processes", str(api_processes), "--kv-memory-gb", "0.2", "--max-batch", str(args.concurrency),
         "--served-model-name", "bench"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"api_cpu_bench: model-host serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(root + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("api_cpu_bench: model-host serve did not become healthy in 120 s")
            time.sleep(0.25)
        prompts = [[{"role": "user", "content": f"Question {i}: how are vectors indexed in segment {i % 7}?"}]
                   for i in range(args.requests)]
        run_level(pool, root + "/v1", prompts[:8], 4, 4)  # connections, first steps, API processes up
        kids = children(proc.pid)
        before = sample(proc.pid, kids)
        level = run_level(pool, root + "/v1", prompts, args.concurrency, args.max_tokens)
        after = sample(proc.pid, kids)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    n = max(1, level["output_tokens"])
    per = lambda d: round(1e6 * d / n, 1)  # noqa: E731
    return {"api_processes": api_processes, "tokens": level["output_tokens"], "errors": level["errors"],
            "output_tok_s": round(level["output_tok_s"], 1),
            "engine_thread_us_per_token": per(after[1] - before[1]),
            "engine_process_other_threads_us_per_token": per((after[0] - after[1]) - (before[0] - before[1])),
            "api_processes_us_per_token": per(after[2] - before[2])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", type=int, nargs="+", default=[0, 2], help="--api-processes values to compare")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each setting, interleaved")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    from model_host.checkpoint import make_config, write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(2) as pool:
        ckpt = Path(tmp) / "tiny"
        write_random_checkpoint(ckpt, make_config("tiny", mtp=False), dtype="bf16", seed=0)
        for _ in range(args.repeat):
            for n in args.settings:
                print(json.dumps(one(ckpt, n, args, pool)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
