"""`model-host serve --api-processes N` as a user starts it: the routes in N spawned processes,
the engine alone in the server's own (test_server.py runs every route over the same socket
link in one process; these check the processes around it)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.serving.conftest import MODEL
from tests.serving.test_serve_cli import ServeProcess

CHAT = [{"role": "user", "content": "Where is data stored?"}]


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while (alive := [p for p in pids if Path(f"/proc/{p}").exists() and
                     Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def greedy(base_url: str, n: int) -> list[str]:
    client = openai.OpenAI(base_url=base_url, api_key="x")

    def one(i: int) -> str:
        msgs = [{"role": "user", "content": f"Question {i}: where is data stored?" + " more" * (7 * i)}]
        return client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_api_processes_serve_the_same_greedy_text_and_one_metrics_registry(tiny_checkpoint):
    """8 concurrent requests of mixed lengths through 2 API processes give the same greedy text
    as the routes on the engine's thread; /metrics, from whichever process answers, counts all of
    them; SIGTERM stops the server and both API processes, with the signal as exit status."""
    single = ServeProcess(tiny_checkpoint)
    try:
        single.wait_healthy()
        want = greedy(single.url + "/v1", 8)
    finally:
        single.close()
    p = ServeProcess(tiny_checkpoint, "--api-processes", "2")
    try:
        p.wait_healthy()
        assert "2 API processes" in "".join(p.lines)
        api = children(p.proc.pid)
        assert len([c for c in api if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]) == 2, api
        assert greedy(p.url + "/v1", 8) == want
        for _ in range(4):  # every answer is the engine's one registry, whichever process serves it
            text = httpx.get(f"{p.url}/metrics").text
            assert 'model_host_requests_total{finish_reason="length",status="ok"} 8.0' in text, text
            assert "model_host_kv_blocks_used 0.0" in text
        p.proc.send_signal(signal.SIGTERM)
        rc = p.proc.wait(timeout=20)
        assert rc in (0, -signal.SIGTERM), (rc, "".join(p.lines))
        assert not wait_gone(api, 5), "API processes outlived the server"
    finally:
        p.close()


def test_a_killed_api_process_stops_the_server_and_a_killed_server_its_api_processes(tiny_checkpoint):
    p = ServeProcess(tiny_checkpoint, "--api-processes", "2")
    try:
        p.wait_healthy()
        api = [c for c in children(p.proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        os.kill(api[0], signal.SIGKILL)
        rc = p.proc.wait(timeout=30)
        out = "".join(p.lines)
        assert rc == 1 and "exited with status -9; stopping the server" in out, (rc, out)
        assert not wait_gone(api, 5)
    finally:
        p.close()
    # The engine process killed outright: its API processes notice the link close and exit,
    # instead of holding the port with nobody to serve it.
    p = ServeProcess(tiny_checkpoint, "--api-processes", "2")
    try:
        p.wait_healthy()
        api = [c for c in children(p.proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        p.proc.kill()
        p.proc.wait(timeout=10)
        assert not wait_gone(api, 15), "API processes outlived a killed engine process"
    finally:
        p.close()


def test_a_negative_api_process_count_is_one_clear_error(tiny_checkpoint):
    r = subprocess.run([sys.executable, "-m", "model_host.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                        "--api-processes", "-1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "model-host: --api-processes -1 must be 0 (routes in this process) or more"), r.stderr
    assert "Traceback" not in r.stderr


def test_api_cpu_bench_runs_both_settings():
    """bench/api_cpu_bench.py's plumbing (its numbers are in docs/benchmarks.md)."""
    r = subprocess.run([sys.executable, "bench/api_cpu_bench.py", "--settings", "0", "1", "--repeat", "1",
                        "--concurrency", "2", "--requests", "4", "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["api_processes"] for row in rows] == [0, 1]
    assert all(row["tokens"] == 8 and row["errors"] == 0 for row in rows), rows
    assert rows[0]["api_processes_us_per_token"] == 0  # no API process with the routes on a thread


def test_a_taken_port_is_one_clear_error_before_any_api_process_starts(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "model_host.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                            "--port", str(port), "--api-processes", "2", "--kv-memory-gb", "0.02"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"model-host: could not serve on 127.0.0.1:{port} (see the error above); pick a free --port"), r.stderr
    assert "Traceback" not in r.stderr


def test_the_routes_get_processes_of_their_own_by_default_on_a_gpu_only():
    """On the GPU the routes leave the engine's process unless told otherwise (the API processes
    took concurrency 128 from 80% to 85-87% of the step bound on one H100); on the CPU they stay."""
    from model_host.cli import build_parser
    from model_host.server.cli import API_PROCESSES_CUDA, api_processes

    def parsed(*flags: str) -> int:
        return api_processes(build_parser().parse_args(["serve", "--checkpoint", "x", *flags]))

    assert API_PROCESSES_CUDA > 0
    assert parsed("--device", "cuda") == API_PROCESSES_CUDA
    assert parsed("--device", "cpu") == 0
    assert parsed("--device", "cuda", "--api-processes", "0") == 0
    assert parsed("--device", "cpu", "--api-processes", "2") == 2
