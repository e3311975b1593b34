"""Prometheus metrics of one server instance (its own registry: no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from model_host.engine.loop import EngineLoop
from model_host.engine.outputs import StepOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1, 5)


class Metrics:
    def __init__(self, loop: EngineLoop):
        self.loop = loop
        r = self.registry = CollectorRegistry()
        eng = loop.engine
        sched, blocks = eng.scheduler, eng.blocks
        Gauge("model_host_requests_running", "Sequences in the running batch", registry=r).set_function(
            lambda: len(sched.running))
        Gauge("model_host_requests_waiting", "Sequences queued for admission", registry=r).set_function(
            lambda: len(sched.waiting))
        Gauge("model_host_kv_blocks_total", "Paged-KV blocks in the cache", registry=r).set(blocks.num_blocks)
        Gauge("model_host_kv_blocks_free", "Free paged-KV blocks", registry=r).set_function(lambda: blocks.num_free)
        Gauge("model_host_kv_blocks_used", "Paged-KV blocks in use", registry=r).set_function(
            lambda: blocks.num_blocks - blocks.num_free)
        Gauge("model_host_kv_block_size_tokens", "Tokens per KV block", registry=r).set(blocks.block_size)
        Gauge("model_host_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / looked up",
              registry=r).set_function(lambda: blocks.hit_rate)
        Gauge("model_host_generation_tokens_per_second", "Generated tokens/s over the last 10 s",
              registry=r).set_function(loop.tokens_per_second)
        Gauge("model_host_preemptions", "Sequences preempted for lack of KV blocks", registry=r).set_function(
            lambda: sched.preemptions)
        if eng.spec is not None:  # MTP speculative decoding
            st = eng.spec.stats
            Gauge("model_host_spec_acceptance_rate", "Accepted / verified MTP draft tokens since start",
                  registry=r).set_function(lambda: st.acceptance_rate)
            Gauge("model_host_spec_mean_accepted_length", "Tokens emitted per sequence per speculative step",
                  registry=r).set_function(lambda: st.mean_accepted_length)
            Gauge("model_host_spec_draft_tokens", "MTP draft tokens verified since start", registry=r).set_function(
                lambda: st.drafted)
            Gauge("model_host_spec_accepted_tokens", "MTP draft tokens accepted since start",
                  registry=r).set_function(lambda: st.accepted)
        self.prompt_tokens = Counter("model_host_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter("model_host_prompt_cached_tokens", "Prompt tokens served by the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("model_host_generation_tokens", "Tokens generated", registry=r)
        # Counted by the HTTP layer, which sees every outcome: finished (ok: stop or length),
        # aborted (client gone, /v1/abort, shutdown) or failed (error).
        self.requests = Counter("model_host_requests", "Generation requests by outcome",
                                ["status", "finish_reason"], registry=r)
        self.ttft = Histogram("model_host_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        # TTFT's parts (bench/serve_bench.py reads their means per level): the HTTP side, from the
        # request received to queued for the engine (parse, chat template, tokenize), and the wait
        # in the engine for admission (its rest is the prefill step(s) up to the first token).
        self.prep = Histogram("model_host_request_prep_seconds", "Request received to queued for the engine",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("model_host_queue_seconds", "Arrival at the engine to admission",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("model_host_inter_token_latency_seconds", "Gap between consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        # Device time per engine step by what it ran (decode rows only; prompt chunks riding as
        # rows; a packed prefill): how long a wave of arrivals holds the running decodes.
        self.step = Histogram("model_host_step_seconds", "Device time of an engine step", ["kind"],
                              buckets=STEP_BUCKETS, registry=r)
        # ... and how wide the steps were: with the step count, the mean rows of a riding step
        # (which graph bucket the waves land in).
        self.step_rows = Counter("model_host_step_rows", "Query rows of the engine's steps (decode rows "
                                   "plus prompt-chunk tokens, before graph padding)", ["kind"], registry=r)

    def on_step(self, outs: list[StepOutput]) -> None:
        """Called on the engine thread after every step."""
        for t in self.loop.engine.take_timings():
            self.step.labels(t.kind).observe(t.seconds)
            self.step_rows.labels(t.kind).inc(t.rows)
        for o in outs:
            if o.token is not None:
                self.generation_tokens.inc()
            if o.ttft is not None:
                self.ttft.observe(o.ttft)
            if o.queued is not None:
                self.queue.observe(o.queued)
            if o.itl is not None:
                self.itl.observe(o.itl)

    def request_started(self, prompt_tokens: int, prep_seconds: float) -> None:
        """A generation request was queued for the engine, `prep_seconds` after it was received."""
        self.prompt_tokens.inc(prompt_tokens)
        self.prep.observe(prep_seconds)

    def request_ended(self, finish_reason: str, cached_tokens: int) -> None:
        """One generation request ended: stop / length (ok), abort (aborted) or error."""
        status = {"stop": "ok", "length": "ok", "abort": "aborted"}.get(finish_reason, "error")
        self.requests.labels(status, finish_reason).inc()
        self.cached_tokens.inc(cached_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
