"""bench/serve_bench.py --quick on the CPU: the whole benchmark (child server, step bound, client
processes through the openai SDK, the three phases, JSON + markdown) on the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_bench_quick(tmp_path):
    # --block-size 32 (the quick plan's is 16): the flag must reach the server and the step bound.
    subprocess.run([sys.executable, "bench/serve_bench.py", "--quick", "--repeat", "2", "--block-size", "32",
                    "--out", str(tmp_path)], cwd=REPO, check=True, timeout=600, capture_output=True)
    res = json.loads((tmp_path / "serve_bench.json").read_text())
    table = (tmp_path / "serve_bench.md").read_text()
    plan = res["plan"]
    assert [r["concurrency"] for r in res["levels"]] == plan["levels"] * 2  # --repeat 2: interleaved
    for r in res["levels"] + [res["unique"]]:
        assert r["errors"] == 0, r["first_error"]
        assert r["output_tokens"] == r["requests"] * plan["max_tokens"]  # ignore_eos: every token counted
    for r in res["levels"]:  # TTFT's parts: each inside the whole it belongs to
        assert 0 < r["server_prep_mean_ms"] < r["ttft_mean_ms"]
        assert 0 <= r["server_queue_mean_ms"] <= r["server_ttft_mean_ms"] <= r["ttft_mean_ms"]
    assert all(r["prefix_hit_rate"] > 0.5 for r in res["levels"])  # 4 recurring context sets
    assert all(1 <= r["distinct_completions"] <= r["requests"] for r in res["levels"])
    for r in res["levels"]:  # every level decodes; its steps' mean device time is positive
        assert r["server_steps"]["decode"]["steps"] > 0 and r["server_steps"]["decode"]["mean_ms"] > 0
        assert 1 <= r["server_steps"]["decode"]["mean_rows"] <= r["concurrency"]  # one row a running request
    for r in res["levels"]:  # occupancy: each client ran several requests, one at a time
        assert 0 < r["in_flight_share"] <= 1 and r["client_gap_ms"] >= 0 and 0 <= r["drain_s"] < r["wall_s"]
        assert 0 <= r["steady_window_s"] <= r["wall_s"] and (r["steady_tok_s"] is None) == (r["steady_window_s"] == 0)
    assert "in the steady state (while every client has a request going" in table
    assert "| concurrency | in flight | client gap ms | drain s | decode rows / concurrency | late start ms: " in table
    assert res["unique"]["prefix_hit_rate"] == 0 and res["idle"]["prefix_hit_rate"] == 0  # nonce first lines
    assert set(res["bound"]["decode_ms"]) == {str(c) for c in plan["levels"]}
    assert res["bound"]["prefill_tokens"] == res["idle"]["prompt_tokens"]
    assert 0 < res["idle"]["server_ttft_ms"] <= res["idle"]["ttft_ms"]  # the engine's share of the client's
    assert res["server"]["model_host_kv_blocks_total"] > 0
    assert plan["block_size"] == res["server"]["model_host_kv_block_size_tokens"] == res["bound"]["block_size"] == 32
    assert "| 1 |" in table and "every prompt unique" in table and "Idle TTFT" in table
    assert "Share of the step bound over the repeats (whole level): c=1: " in table
    assert "| concurrency | decode | riding | prefill |" in table and " rows) |" in table
    assert "--block-size 32;" in table and f"host {res['host_cpu']}" in table and res["bound"]["device"] == "cpu"


def test_recurring_prompts_share_their_context_and_never_the_whole_prompt():
    """Regression (H100, ninth session): 12 whole prompts recurred, so greedy decoding gave their
    copies the same tokens, and a step of 128 rows routed few distinct tokens (few experts):
    served c=128 ran at 101% of the step bound, which times random token ids."""
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    import serve_bench as sb

    prompts = sb.build_prompts(sb.GPU)["recurring"][max(sb.GPU.levels)]  # the 1,024 of c=128
    texts = [json.dumps(m) for m in prompts]
    assert len(set(texts)) == len(texts)
    contexts = {json.dumps(m[:-1]) + m[-1]["content"].rsplit("\n\nQuestion: ", 1)[0] for m in prompts}
    assert len(contexts) == 4


@pytest.mark.slow
def test_ttft_profile_quick(tmp_path):
    """bench/ttft_profile.py --quick: forward, engine and HTTP TTFT of fresh prompts on the CPU."""
    subprocess.run([sys.executable, "bench/ttft_profile.py", "--quick", "--max-prefill-tokens", "4096",
                    "--out", str(tmp_path)], cwd=REPO, check=True, timeout=600, capture_output=True)
    r = json.loads((tmp_path / "ttft_profile.json").read_text())["4096"]
    assert r["forward_ms"] > 0 and r["engine_ttft_ms"] > 0
    assert all(len(steps) == 1 for steps in r["engine_steps_ms"])  # one chunk: the whole prompt
    http = r["http"]
    assert len(http["raw_ms"]) == len(http["sdk_ms"]) == 4 and len(http["server_ms"]) == 8
    assert all(0 < s <= c for s, c in zip(http["server_ms"][::2], http["raw_ms"], strict=True))


def test_client_processes_start_a_level_together():
    """Regression: each client process began its requests as soon as it was up, so at a level
    wider than the last one the workers new to the pool (spawned, importing the SDK) began
    their shares late and stretched the level with a part-empty batch. Here one worker is
    already up, two more come up for the level, against a local OpenAI-protocol server; the
    clients' first requests are due spread over 0.5 s, round robin over the processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tests.support.openai_stub import OpenAIStub

    sys.path[:0] = [str(REPO / "bench")]
    import serve_clients

    # 4 requests a client of ~0.2 s each (4 chunks, 50 ms apart): every client's first request
    # is due before its process's share of prompts runs out.
    msgs = [[{"role": "user", "content": f"question {k}"}] for k in range(192)]
    with OpenAIStub(reply="one two three four", delay_s=0.05) as stub, \
            ProcessPoolExecutor(max_workers=3, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(serve_clients.client_worker, stub.base_url, [], 1, 1).result() == []  # one worker up
        res = serve_clients.run_level(pool, stub.base_url, msgs, 48, 4, stagger_s=0.5)  # 3 processes of 16
    assert res["errors"] == 0 and res["requests"] == 192 and len(stub.state.requests) == 192
    # Measured on a 2-core host: without the common start the new workers' first requests went
    # out 0.79-0.83 s late; with it the latest process is on time within ~20 ms. A client's own
    # lateness (a process builds its first requests one by one, on cores the three share) is
    # reported, not bounded.
    assert res["process_late_ms"] < 150, res["process_late_ms"]
    assert res["client_late_ms"] >= res["process_late_ms"]
    # The stagger: the last client's first request was due 0.5 x 47/48 s after the first's.
    assert 0.5 * 47 / 48 - 0.01 <= res["first_start_spread_ms"] / 1e3 <= 0.5 * 47 / 48 + res["client_late_ms"] / 1e3
    assert 0 < res["in_flight_share"] <= 1 and res["client_gap_ms"] >= 0 and 0 <= res["drain_s"] < res["wall_s"]


def test_steady_state_counts_the_tokens_while_every_client_is_busy():
    """The steady window runs from the last client's first request to the first client's last
    response; a request's tokens are timed by its chunks (start + TTFT, then the gaps)."""
    sys.path[:0] = [str(REPO / "bench")]
    import serve_clients

    def rec(slot, start, end, chunks, tokens=None):  # chunks at start + 1, + 2, ...
        return {"slot": slot, "start": start, "end": end, "error": None, "ttft": 1.0, "itl": [1.0] * (chunks - 1),
                "tokens": tokens or chunks}

    # client (0, 0): t 0..10 with chunks at 1..10, then 10..20 with chunks at 11..20 in pairs of
    # tokens; client (0, 1) starts at 4.5 and ends at 14.5: the window is (4.5, 14.5].
    recs = [rec((0, 0), 0.0, 10.0, 10), rec((0, 0), 10.0, 20.0, 10, tokens=20), rec((0, 1), 4.5, 14.5, 10)]
    st = serve_clients.steady_state(recs, 2)
    assert st["steady_window_s"] == 10.0
    # chunks in (4.5, 14.5]: client 0's 5..10 (6 tokens) and 11..14 (4 chunks, 8 tokens); client 1's
    # 5.5..14.5 (10 tokens): 24 tokens in 10 s.
    assert st["steady_tok_s"] == pytest.approx(2.4)
    assert serve_clients.steady_state(recs[:2] + [rec((0, 1), 20.0, 30.0, 10)], 2)["steady_tok_s"] is None
    assert serve_clients.steady_state(recs, 3)["steady_tok_s"] is None  # a client that never ran
