"""The markdown table of bench/serve_bench.py's results (served output tok/s against the decode-step
bound per concurrency, TTFT by part, prefix reuse, start-up, idle TTFT)."""

from __future__ import annotations

import statistics


def markdown(res: dict) -> str:
    f = lambda x, s=".1f": "n/a" if x is None else format(x, s)  # noqa: E731
    b = res["bound"]
    lines = [f"Served context ~{b['ctx']} tokens, {res['max_tokens']} output tokens, mean prompt "
             f"{res['mean_prompt_tokens']:.0f} tokens, --max-prefill-tokens {res['max_prefill_tokens']}, "
             f"--row-prefill-tokens {res['row_prefill_tokens']}, --overlap {res.get('overlap', 'auto')}, "
             f"--api-processes {res.get('api_processes', 0)}, --block-size {res['plan']['block_size']}; "
             f"{b.get('device', 'n/a')}, host {res.get('host_cpu', 'n/a')}.", "",
             "Output tok/s and share of the bound: in the steady state (while every client has a request going; "
             "the clients start spread over one request's decode time) / over the whole level (its ramp and "
             "drain included).", "",
             "| concurrency | output tok/s | step bound tok/s (B / step ms) | share of bound | goal | TTFT p50 / p99 ms "
             "| ITL p50 / p99 ms | prefix hits | distinct completions | Triton compiles |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["levels"]:
        c = r["concurrency"]
        step = b["decode_ms"][str(c)]
        bound = 1e3 * c / step
        steady = r.get("steady_tok_s")  # older reports lack it
        tok = f"{f(steady)} / {f(r['output_tok_s'])}"
        share = f"{steady / bound:.0%}" if steady else "n/a"
        share += f" / {r['output_tok_s'] / bound:.0%}"
        lines.append(f"| {c} | {tok} | {bound:.1f} ({step:.2f} ms) | {share} "
                     f"| {'>= 90%' if c == 1 else '>= 85%'} | {f(r['ttft_p50_ms'])} / {f(r['ttft_p99_ms'])} "
                     f"| {f(r['itl_p50_ms'], '.2f')} / {f(r['itl_p99_ms'], '.2f')} | {r['prefix_hit_rate']:.0%} "
                     f"| {r.get('distinct_completions', 'n/a')} of {r['requests']} | {r.get('triton_compiles', 'n/a')} |")
    shares: dict[str, dict[int, list[float]]] = {"steady state": {}, "whole level": {}}
    for r in res["levels"]:
        c = r["concurrency"]
        for name, key in (("steady state", "steady_tok_s"), ("whole level", "output_tok_s")):
            if r.get(key):  # older reports lack the steady state; a level may have none
                shares[name].setdefault(c, []).append(r[key] * b["decode_ms"][str(c)] / (1e3 * c))
    for name, per_c in shares.items():
        repeated = {c: v for c, v in per_c.items() if len(v) > 1}
        if repeated:
            lines += ["", f"Share of the step bound over the repeats ({name}): " + "; ".join(
                f"c={c}: {' / '.join(f'{x:.0%}' for x in v)} (median {statistics.median(v):.0%})"
                for c, v in repeated.items()) + "."]
    lines += ["", "Mean TTFT by part (ms): the client's; in the server, received to queued for the engine "
              "(parse, template, tokenize); in the engine, arrival to admission and the whole arrival to first token.",
              "", "| concurrency | client | HTTP received to queued | engine: admission wait | engine: to first token |",
              "|---|---|---|---|---|"]
    for r in res["levels"]:
        lines.append(f"| {r['concurrency']} | {f(r.get('ttft_mean_ms'))} | {f(r.get('server_prep_mean_ms'))} "
                     f"| {f(r.get('server_queue_mean_ms'))} | {f(r.get('server_ttft_mean_ms'))} |")
    lines += ["", "Engine steps by what they ran (steps x mean device ms each, mean query rows): decode rows "
              "only; prompt chunks riding as rows; a packed prefill.", "", "| concurrency | decode | riding | prefill |",
              "|---|---|---|---|"]

    def cell(st: dict) -> str:
        rows = f" ({st['mean_rows']:.0f} rows)" if "mean_rows" in st else ""  # older reports lack it
        return f"{st['steps']} x {st['mean_ms']:.2f}{rows}"

    for r in res["levels"]:
        st = r.get("server_steps", {})
        cells = [cell(st[k]) if k in st else "-" for k in ("decode", "riding", "prefill")]
        lines.append(f"| {r['concurrency']} | {' | '.join(cells)} |")
    lines += ["", "Occupancy: the share of client time with a request in flight, the mean gap between one "
              "client's requests, the drain (first client done to the level's end), and the mean rows of "
              "the decode steps against the concurrency; how late the first requests went out against their "
              "schedule (spread over one request's decode time): the latest process / the latest client.", "",
              "| concurrency | in flight | client gap ms | drain s | decode rows / concurrency | late start ms: "
              "process / client |", "|---|---|---|---|---|---|"]
    for r in res["levels"]:
        if "in_flight_share" not in r:  # older reports lack it
            continue
        dec = r.get("server_steps", {}).get("decode", {})
        rows = f"{dec['mean_rows'] / r['concurrency']:.0%}" if "mean_rows" in dec else "n/a"
        lines.append(f"| {r['concurrency']} | {r['in_flight_share']:.0%} | {f(r['client_gap_ms'])} "
                     f"| {r['drain_s']:.2f} | {rows} | {f(r['process_late_ms'])} / {f(r['client_late_ms'])} |")
    u = res["unique"]
    lines += ["", "| prefix reuse at concurrency {} | output tok/s | TTFT p50 / p99 ms | prefix hits |".format(
        u["concurrency"]), "|---|---|---|---|"]
    rec = [r for r in res["levels"] if r["concurrency"] == u["concurrency"]]  # absent under --levels
    for name, r in (("4 recurring context sets", rec[0] if rec else None), ("every prompt unique", u)):
        if r is None:
            continue
        lines.append(f"| {name} | {f(r['output_tok_s'])} | {f(r['ttft_p50_ms'])} / {f(r['ttft_p99_ms'])} "
                     f"| {r['prefix_hit_rate']:.0%} |")
    i = res["idle"]
    lines += ["", f"Server start-up (model build, step bound, graphs, prefill warm-up): {res['startup_s']:.0f} s, "
              f"{res.get('triton_compiles_at_startup', 'n/a')} Triton kernels compiled."]
    lines += ["", f"Idle TTFT, {i['prompt_tokens']}-token prompt sharing nothing with the cache: "
              f"{f(i['ttft_ms'])} ms at a warm client, {f(i['server_ttft_ms'])} ms in the engine (median of {i['n']}) "
              f"vs its prefill {b['prefill_ms']:.1f} ms = {i['ttft_ms'] / b['prefill_ms']:.2f}x (goal <= 2x)"
              + (f"; its prefill graph {b['prefill_graph_ms']:.1f} ms = {i['ttft_ms'] / b['prefill_graph_ms']:.2f}x."
                 if b.get("prefill_graph_ms") else ".")]
    return "\n".join(lines) + "\n"
