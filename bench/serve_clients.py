"""The client side of bench/serve_bench.py: streaming requests through the `openai` SDK, load
levels spread over client processes, their summary, and idle TTFT against the server's own.

Imported by bench/serve_bench.py and bench/ttft_profile.py (bench/ is on sys.path when they run).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

# Lead time of a level's common start: long enough for a new pool worker to come up and import
# the SDK (a spawned one; a forked one inherits it once the parent has imported it).
START_LEAD_S = 3.0


def client_worker(base_url: str, prompts: list, concurrency: int, max_tokens: int,
                  starts: list[float] | None = None, job: int = 0) -> list[dict]:
    """One client process: `concurrency` streaming clients working through `prompts`, client i
    from ``starts[i]`` (``time.monotonic()``, one clock for every process on the host) if given.
    Each record names its client as ``(job, i)``: ``job`` is the caller's index of this share."""
    return asyncio.run(_clients(base_url, prompts, concurrency, max_tokens, starts, job))


async def request(client, msgs: list, max_tokens: int) -> dict:
    """One streaming chat completion: its TTFT (first non-empty content), gaps, token counts."""
    import openai

    rec = {"start": time.monotonic(), "ttft": None, "itl": [], "tokens": 0, "cached": 0, "prompt": 0, "error": None,
           "text": []}
    last = None
    try:
        stream = await client.chat.completions.create(
            model="bench", messages=msgs, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.monotonic()
            if chunk.usage:
                rec["tokens"] = chunk.usage.completion_tokens
                rec["prompt"] = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                rec["cached"] = (details.cached_tokens or 0) if details else 0
            rec["text"] += [c.delta.content for c in chunk.choices if c.delta.content]
            if any(c.delta.content for c in chunk.choices):
                if last is None:
                    rec["ttft"] = now - rec["start"]
                else:
                    rec["itl"].append(now - last)
                last = now
    except openai.OpenAIError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["end"] = time.monotonic()
    rec["text"] = "".join(rec["text"])
    return rec


async def _clients(base_url: str, prompts: list, concurrency: int, max_tokens: int,
                   starts: list[float] | None = None, job: int = 0) -> list[dict]:
    import openai

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    records: list[dict] = []

    async def one(client, slot: tuple[int, int]) -> None:
        if starts is not None:
            await asyncio.sleep(max(0.0, starts[slot[1]] - time.monotonic()))
        due = starts[slot[1]] if starts is not None else None  # when its first request was due
        while not queue.empty():
            records.append({**await request(client, queue.get_nowait(), max_tokens), "slot": slot, "due": due})

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=900) as client:
        await asyncio.gather(*(one(client, (job, i)) for i in range(concurrency)))
    return records


# The server's TTFT histograms (model_host/server/metrics.py): the whole in the engine, and its
# parts on either side (HTTP receipt to queued; arrival at the engine to admission).
TTFT_PARTS = {"ttft": "model_host_time_to_first_token_seconds", "prep": "model_host_request_prep_seconds",
              "queue": "model_host_queue_seconds"}


def server_histograms(root: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of the server's TTFT_PARTS histograms, and of its step-time histogram
    per kind as ``step_<kind>`` (decode, riding, prefill), from one read of /metrics."""
    import httpx

    text = httpx.get(f"{root}/metrics", timeout=10).text
    vals = {(m + labels, f): float(v)  # ("name{labels}", "sum" | "count") -> value
            for m, f, labels, v in re.findall(r"^(\w+)_(sum|count)(\{[^}]*\})? (\S+)$", text, re.M)}
    out = {name: (vals[m, "sum"], vals[m, "count"]) for name, m in TTFT_PARTS.items()}
    for kind in re.findall(r'^model_host_step_seconds_count\{kind="(\w+)"\}', text, re.M):
        m = f'model_host_step_seconds{{kind="{kind}"}}'
        rows = re.search(rf'^model_host_step_rows_total\{{kind="{kind}"\}} (\S+)$', text, re.M)
        out[f"step_{kind}"] = (vals[m, "sum"], vals[m, "count"])
        out[f"steprows_{kind}"] = (float(rows.group(1)) if rows else 0.0, vals[m, "count"])
    return out


def server_ttft(root: str) -> tuple[float, float]:
    """(sum, count) of the server's own TTFT histogram: arrival at the engine to the first token."""
    return server_histograms(root)["ttft"]


def idle_ttft(base_url: str, root: str, prompts: list) -> dict:
    """TTFT of prompts that share nothing with the cache, one at a time, from one warm client
    (the first request opens the connection and is not counted), beside the server's own figure:
    the difference is HTTP, chat templating and tokenizing, and the client."""
    import openai

    async def run() -> tuple[list[float], list[float], list[dict]]:
        client_ms, server_ms, recs = [], [], []
        async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=900) as client:
            for i, msgs in enumerate(prompts):
                s0, c0 = server_ttft(root)
                rec = await request(client, msgs, 1)
                if rec["error"]:
                    raise SystemExit(f"serve_bench: idle TTFT request failed: {rec['error']}")
                s1, c1 = server_ttft(root)
                if i:
                    client_ms.append(1e3 * rec["ttft"])
                    server_ms.append(1e3 * (s1 - s0) / max(1.0, c1 - c0))
                    recs.append(rec)
        return client_ms, server_ms, recs

    client_ms, server_ms, recs = asyncio.run(run())
    return {"ttft_ms": statistics.median(client_ms), "server_ttft_ms": statistics.median(server_ms),
            "n": len(client_ms), "prefix_hit_rate": sum(r["cached"] for r in recs) / sum(r["prompt"] for r in recs)}


def run_level(pool: ProcessPoolExecutor, base_url: str, prompts: list, concurrency: int, max_tokens: int,
              root: str | None = None, stagger_s: float = 0.0) -> dict:
    """Spread `concurrency` clients over up to 8 processes (16 clients each at most). With the
    server's ``root`` URL, the level's mean TTFT in the engine (arrival at the engine to the first
    token) goes beside the clients' mean, with the HTTP side's share (received to queued: parse,
    template, tokenize) and the engine's admission wait."""
    before = server_histograms(root) if root else {}
    procs = max(1, min(8, math.ceil(concurrency / 16)))
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    # One start for every process: the pool's workers come up (a new one at a wider level) and
    # set up their clients at different times, and a process that began late would stretch the
    # level with a part-empty batch (on a 2-core host, two spawned workers new to a level began
    # 0.8 s after a warm one without this: tests/serving/test_serve_bench.py).
    # From that start, ``stagger_s`` spreads the clients' first requests evenly (round robin over
    # the processes): over one request's lifetime, equal-length requests keep roughly those
    # phases, and the level runs in the steady state of many users instead of waves that end
    # together. Each client still runs about as many requests, so the last ones end spread over
    # a lifetime too: the whole level then has a ramp and a drain of about one lifetime each.
    jobs, start, start_at = [], 0, time.monotonic() + START_LEAD_S
    for job, share in enumerate(shares):  # each process gets prompts in proportion to its clients
        n = round(len(prompts) * share / concurrency)
        starts = [start_at + stagger_s * (i * procs + job) / concurrency for i in range(share)]
        jobs.append(pool.submit(client_worker, base_url, prompts[start:start + n], share, max_tokens, starts, job))
        start += n
    recs = [r for j in jobs for r in j.result()]
    res = summarize(recs, concurrency)
    if root:
        after = server_histograms(root)
        for name in TTFT_PARTS:  # means over this level's requests
            (s0, c0), (s1, c1) = before[name], after[name]
            res[f"server_{name}_mean_ms"] = 1e3 * (s1 - s0) / max(1.0, c1 - c0)
        res["server_steps"] = {}  # this level's engine steps by kind: how many, mean device ms, mean rows
        for name, (s1, c1) in after.items():
            s0, c0 = before.get(name, (0.0, 0.0))
            if name.startswith("step_") and c1 > c0:
                t0, t1 = before.get("steprows_" + name[5:], (0.0, 0.0))[0], after["steprows_" + name[5:]][0]
                res["server_steps"][name[5:]] = {"steps": int(c1 - c0), "mean_ms": 1e3 * (s1 - s0) / (c1 - c0),
                                                 "mean_rows": (t1 - t0) / (c1 - c0)}
    return res


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else None


def _by_client(recs: list[dict]) -> dict[tuple, list[dict]]:
    by: dict[tuple, list[dict]] = {}
    for r in recs:
        by.setdefault(tuple(r.get("slot", ())), []).append(r)
    return by


def steady_state(recs: list[dict], concurrency: int) -> dict:
    """Output tokens a second while every client has a request going: from the last client's
    first request to the first client's last response. The step bound is a steady-state figure
    (every row busy at every step); a finite run also has its ramp and its drain, which the
    whole level's tok/s counts. A request's tokens are timed by its chunks' arrivals. None
    where the window is empty or a client never ran."""
    by = _by_client(recs).values()
    t1, t2 = max(min(r["start"] for r in rs) for rs in by), min(max(r["end"] for r in rs) for rs in by)
    if t2 <= t1 or len(by) < concurrency:
        return {"steady_window_s": 0.0, "steady_tok_s": None}
    n = 0.0
    for r in recs:
        if r["error"] is None and r["ttft"] is not None:
            times = list(itertools.accumulate([r["start"] + r["ttft"], *r["itl"]]))
            n += r["tokens"] / len(times) * sum(t1 < t <= t2 for t in times)  # tokens per chunk, usually 1
    return {"steady_window_s": t2 - t1, "steady_tok_s": n / (t2 - t1)}


def occupancy(recs: list[dict], wall: float, concurrency: int) -> dict:
    """Where the clients' time goes outside their requests: the share of client time with a
    request in flight (sent to last chunk), the mean gap between one client's requests, the
    drain (from the first client's last response to the level's end, while the batch empties),
    and how late the clients' first requests went out against their schedule (``run_level``'s
    start and stagger): the latest process (its earliest client: a worker that came up late) and
    the latest client (a process also builds its clients' first requests one by one). The step
    bound assumes every one of the ``concurrency`` rows busy at every step."""
    by_slot = _by_client(recs)
    gaps = [b["start"] - a["end"] for rs in by_slot.values()
            for a, b in itertools.pairwise(sorted(rs, key=lambda r: r["start"]))]
    late = {slot: min(r["start"] for r in rs) - rs[0]["due"] for slot, rs in by_slot.items()
            if rs[0].get("due") is not None}
    procs: dict = {}
    for slot, t in late.items():
        procs[slot[:1]] = min(t, procs.get(slot[:1], t))
    firsts = [min(r["start"] for r in rs) for rs in by_slot.values()]
    return {"in_flight_share": sum(r["end"] - r["start"] for r in recs) / (wall * concurrency),
            "first_start_spread_ms": 1e3 * (max(firsts) - min(firsts)),
            "process_late_ms": 1e3 * max(procs.values()) if procs else None,
            "client_late_ms": 1e3 * max(late.values()) if late else None,
            "client_gap_ms": 1e3 * statistics.fmean(gaps) if gaps else None,
            "drain_s": max(r["end"] for r in recs) - min(max(r["end"] for r in rs) for rs in by_slot.values())}


def summarize(recs: list[dict], concurrency: int) -> dict:
    ok = [r for r in recs if r["error"] is None]
    wall = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    ms = lambda x: None if x is None else 1e3 * x  # noqa: E731
    return {**occupancy(recs, wall, concurrency), **steady_state(recs, concurrency),
            "concurrency": concurrency, "requests": len(recs), "errors": len(recs) - len(ok),
            "first_error": next((r["error"] for r in recs if r["error"]), None), "wall_s": wall,
            "output_tokens": tokens, "output_tok_s": tokens / wall,
            "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
            "ttft_mean_ms": ms(statistics.fmean(ttft)) if ttft else None,
            "itl_p50_ms": ms(pct(itl, 50)), "itl_p99_ms": ms(pct(itl, 99)),
            "prefix_hit_rate": sum(r["cached"] for r in ok) / max(1, sum(r["prompt"] for r in ok)),
            # Requests whose completions are equal decode the same tokens: a step of them routes
            # few distinct tokens (few experts) and runs faster than the step bound's random ids.
            "distinct_completions": len({r["text"] for r in ok})}
