"""The engine: requests in, tokens out, one scheduler step at a time.

`Engine` is single-threaded and deterministic: `add`, `abort`, `step`. `engine/loop.py` drives it
for the HTTP server.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import torch

from model_host.engine.block_manager import BlockManager
from model_host.engine.config import ROW_PREFILL_TOKENS, EngineConfig
from model_host.engine.memory import plan_kv
from model_host.engine.outputs import Launched, StepOutput, StepTiming, TokenLogprob, logprob_rows
from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.runner import ModelRunner, capture_sizes
from model_host.engine.scheduler import Batch, PrefillChunk, Scheduler
from model_host.engine.sequence import PENDING, Sequence
from model_host.engine.speculative import SpeculativeDecoder
from model_host.kernels.graphs import riding_buckets
from model_host.mla import absorb_is_cheaper
from model_host.model import DeepseekV3
from model_host.sampler import Sampler, SamplingParams
from model_host.speculative import mtp_draft
from model_host.tokenizer import Tokenizer
from model_host.transfer import download, upload

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine can never serve (too long for the context or the whole cache)."""


def check_request(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """Raise RequestError for a request that can never fit (API processes check with this too)."""
    if prompt_len == 0:
        raise RequestError("the prompt is empty")
    if prompt_len + max_tokens > max_model_len:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens; the request needs "
            f"{prompt_len + max_tokens} ({prompt_len} prompt + {max_tokens} max_tokens); "
            f"shorten the prompt or lower max_tokens")


RunnerFactory = Callable[[DeepseekV3, PagedLatentCache], ModelRunner]


class Engine:
    def __init__(self, model: DeepseekV3, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 runner: RunnerFactory = ModelRunner, drafter=None):
        """``runner`` builds the model runner over the engine's cache (tensor-parallel rank 0
        passes one that broadcasts each forward to the other ranks).  ``drafter`` replaces the
        MTP drafter of speculative decoding: for tests and benchmarks only (an oracle that forces
        acceptance); the server never passes one."""
        cfg, config = model.cfg, config or EngineConfig()
        for flag, n in (("prefill-graph-tokens", config.prefill_graph_tokens),
                        ("riding-graph-rows", config.riding_graph_rows)):
            if n is not None and n < 0:
                raise ValueError(f"--{flag} must be >= 0 (0 = off), got {n}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        dtype = config.cache_dtype or model.dtype
        layers = model.num_cache_layers
        self.kv_plan = plan_kv(model, config.kv_memory_gb, config.max_prefill_tokens, config.graph_budget_gb(),
                               config.max_batch)
        num_blocks = PagedLatentCache.blocks_for_budget(
            self.kv_plan.kv_bytes, layers, config.block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)
        self.cache = PagedLatentCache(layers, num_blocks, config.block_size, cfg.kv_lora_rank,
                                      cfg.qk_rope_head_dim, dtype=dtype, device=model.device)
        k = config.speculative_tokens
        if config.overlap and k:
            raise ValueError("overlapped steps and speculative decoding do not combine: a speculative "
                             "round reads its tokens before the next; drop one of them")
        self.blocks = BlockManager(num_blocks, config.block_size, spec_tokens=k)
        self.sampler = Sampler()
        self.capacity_tokens = num_blocks * config.block_size
        # A verify step writes k positions past the sequence: they must fit in the cache too.
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, self.capacity_tokens - k)
        self.scheduler = Scheduler(self.blocks, config.max_batch, config.max_prefill_tokens, self.max_model_len)
        self.spec = SpeculativeDecoder(model, self.cache, self.blocks, k, drafter or mtp_draft) if k else None
        self.runner = runner(model, self.cache, spec=self.spec) if self.spec else runner(model, self.cache)
        # With speculation a step runs B * (k + 1) verify rows (and MTP rows as many), each with a
        # block table up to k positions longer; without, B decode rows and the short prompt chunks.
        # (Speculation keeps prompt chunks out of the decode step: its MTP layer needs their
        # hidden states in a prefill of its own.)
        rows = config.row_prefill_tokens
        self.row_tokens = 0 if k else (rows if rows is not None else ROW_PREFILL_TOKENS * self.runner.graphs_enabled)
        self.max_rows = max(config.max_batch * (k + 1), self.row_tokens)
        # Riding steps past the decode sizes, captured by 64 rows (no riding with speculation).
        switches = model.ops.precision_switches(cfg)
        self.riding_rows = riding_buckets(self.max_rows, config.riding_graph_limit(), switches) if self.row_tokens else []
        self.graph_report = self.runner.capture_graphs(capture_sizes(self.max_rows),
                                                       int(config.graph_budget_gb() * 2**30),
                                                       self.blocks.blocks_needed(self.max_model_len + 1 + k),
                                                       min(config.prefill_graph_limit(), self.max_model_len),
                                                       self.riding_rows)
        self.warmup_seconds = self._warm_up_prefill() if self.runner.graphs_enabled else 0.0
        self.by_id: dict[int, Sequence] = {}
        if config.overlap and not self.runner.device_tokens:
            raise ValueError("overlapped steps need a runner that takes tokens on the device; "
                             "a tensor-parallel driver does not: EngineConfig(overlap=False)")
        self.overlap = (config.overlap if config.overlap is not None
                        else self.runner.graphs_enabled and not k and self.runner.device_tokens)
        self._inflight: Launched | None = None  # the overlapped step whose tokens are not read yet
        # Each read step's device time, until the server's metrics take them (bounded: an engine
        # driven without a server keeps only the latest).
        self._timings: collections.deque[StepTiming] = collections.deque(maxlen=4096)
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %d B/token/layer)",
                 num_blocks, config.block_size, self.capacity_tokens, self.cache.nbytes() / 2**30,
                 self.cache.bytes_per_token_per_layer())

    def _warm_up_prefill(self) -> float:
        """Run one packed prefill of each length whose Triton kernels compile separately, so that
        no request waits for a compile (a second or more each) mid-run: every length up to 256
        rows (the decode-shaped tiles and split-K choices change with the row count there), and
        beyond that one length of each divisibility class Triton specializes integer arguments
        on; then, where prompt chunks ride decode steps, the eager steps past the captured
        sizes. The blocks are written before any request exists and nothing is published."""
        t0 = time.perf_counter()
        top = self.config.max_prefill_tokens
        lengths = sorted({n for n in [*range(1, 257), *(2**i + d for i in range(8, 16) for d in (0, 1, 2, 8, 16))]
                          if n <= top} | {top})
        lengths = [n for n in lengths if self.blocks.blocks_needed(n) <= self.blocks.num_blocks]
        self.runner.warm_up(lengths)
        if self.row_tokens:
            # Prefix-hit chunks past the captured sizes (riding graphs included) ride as eager
            # decode steps. Their GEMMs are the packed prefill's, compiled above; the paged
            # attention's variants follow pointer alignment (an odd row count: compiled mid-run at
            # c=32 before this, ~1 s of TTFT p99), divisibility, and the KV split count, which
            # falls with the rows up to 264 (num_splits_for; past the captured sizes with few
            # heads a rank). So every row count past the widest graph to 512, or 16 of them past
            # it (riding graphs to 1,024 rows); more rows add only start-up time.
            captured = max([self.max_rows, *self.riding_rows])
            last = min(max(512, captured + 16), top + self.config.max_batch)
            self.runner.warm_up_rows([n for n in range(captured + 1, last + 1)
                                      if self.blocks.blocks_needed(n) <= self.blocks.num_blocks], self.max_model_len)
        seconds = time.perf_counter() - t0
        log.info("warmed up packed prefill at %d lengths (1..%d tokens), and riding rows, in %.1f s",
                 len(lengths), top, seconds)
        return seconds

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise RequestError for a request that can never fit."""
        check_request(prompt_len, max_tokens, self.max_model_len)

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        self.check(len(prompt_ids), params.max_tokens)
        seq = Sequence(prompt_ids, params, self.tokenizer.stream_decoder(), params.generator(self.model.device))
        self.by_id[seq.id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request now and free its blocks (client gone, or an explicit abort)."""
        if not seq.finished:
            while seq.awaiting_token:  # tokens of steps still in flight: never read, never counted
                seq.token_ids.pop()
            seq.finish_reason = seq.finish_reason or "abort"
            self.scheduler.finish(seq)
            self.runner.release(seq)
        self.by_id.pop(seq.id, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    def step(self) -> list[StepOutput]:
        """One scheduler step. Overlapped: launch step n+1, then read step n's tokens while the
        GPU runs n+1 (so the outputs returned are the previous step's)."""
        if not self.overlap:
            return self.execute(self.scheduler.schedule())
        batch = self.scheduler.schedule()
        outs, launched = self._launch(batch) if batch else ([], None)
        previous, self._inflight = self._inflight, launched
        return outs + (self._resolve(previous) if previous else [])

    def execute(self, batch: Batch) -> list[StepOutput]:
        """Run one scheduled step to its outputs: the prefill chunks (one runner call) and the
        decode rows (one graph replay, or one speculative round); a token is sampled for every
        decode row and every finished prompt."""
        outs, launched = self._launch(batch)
        return outs + (self._resolve(launched) if launched else [])

    def _launch(self, batch: Batch) -> tuple[list[StepOutput], Launched | None]:
        """Queue the step's forwards and sampling; each sampled row gets a PENDING token slot.
        Returns a speculative round's outputs (speculation reads its tokens at once) and the
        sampled rows still to read."""
        rows: list[Sequence] = []
        logits: list[torch.Tensor] = []
        riding, packed = self._split(batch.prefill, len(batch.decode))
        start = self._mark()
        if packed:
            logits.append(self.runner.prefill(packed))
            rows += [c.seq for c in packed if c.last]
            for c in packed:
                self.blocks.register_full_blocks(c.seq, self._filled(c.seq))
        outs: list[StepOutput] = []
        first = len(rows) + sum(c.last for c in riding)  # rows before this are prompts' first tokens
        if batch.decode and self.spec is not None:
            outs = self._speculative_step(batch.decode)
        elif batch.decode or riding:
            logits.append(self.runner.decode(batch.decode, riding, self._fill(batch.decode)))
            rows += [c.seq for c in riding if c.last] + batch.decode
            for c in riding:
                self.blocks.register_full_blocks(c.seq, self._filled(c.seq))
        if not rows:
            return outs, None
        all_logits = torch.cat(logits)
        sampled = self.sampler(all_logits, [s.params for s in rows], [s.generator for s in rows])
        for s in rows:
            s.token_ids.append(PENDING)
        launched = Launched(rows, [len(s) - 1 for s in rows], first, sampled, download(sampled),
                            logprob_rows(all_logits, sampled, rows),
                            kind="prefill" if packed else "riding" if riding else "decode", start=start,
                            query_rows=sum(c.length for c in batch.prefill) + len(batch.decode) * (self.spec is None))
        if sampled.is_cuda:
            launched.done = torch.cuda.Event(enable_timing=True)
            launched.done.record()
        return outs, launched

    def _mark(self) -> torch.cuda.Event | float:
        """A step's start: an event in the stream on the GPU (it runs when the step's first
        kernel can, so an overlapped step is timed alone), the wall clock on the CPU."""
        if self.runner.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def take_timings(self) -> list[StepTiming]:
        """The device time of every step read since the last call (the server's /metrics)."""
        out = list(self._timings)
        self._timings.clear()
        return out

    def _fill(self, seqs: list[Sequence]) -> tuple[list[int], list[int], torch.Tensor] | None:
        """Decode rows whose last token is the in-flight step's, still on the device: (their
        indices in ``seqs``, their rows in that step's tokens, the tokens)."""
        if self._inflight is None:
            return None
        row_of = self._inflight.row_of
        pending = [(i, row_of[s.id]) for i, s in enumerate(seqs) if s.awaiting_token]
        if not pending:
            return None
        into, src = zip(*pending, strict=True)
        return list(into), list(src), self._inflight.tokens

    def _resolve(self, launched: Launched) -> list[StepOutput]:
        """Read a launched step's tokens (waiting for its sampling only) and emit them."""
        if launched.done is not None:
            launched.done.synchronize()
            seconds = launched.start.elapsed_time(launched.done) / 1e3
            self._timings.append(StepTiming(launched.kind, seconds, launched.query_rows))
        elif launched.start is not None:
            self._timings.append(StepTiming(launched.kind, time.perf_counter() - launched.start, launched.query_rows))
        tokens = launched.host.tolist()
        logprobs = launched.logprobs.read(tokens) if launched.logprobs else [None] * len(tokens)
        now = time.perf_counter()
        outs = []
        for i, (s, slot, tok, lp) in enumerate(zip(launched.rows, launched.slots, tokens, logprobs, strict=True)):
            if s.finished:
                continue  # aborted, or stopped on its previous token while this step ran
            outs.append(self._emit(s, tok, now, lp, slot))
            if s.finished:
                continue
            if i < launched.first and self.spec is not None:
                self.spec.first_token(s, tok)  # a finished prompt: its first pending MTP input
            elif i >= launched.first and self.spec is None and s.num_computed // self.blocks.block_size > s.blocks_registered:
                self.blocks.register_full_blocks(s)  # a decode filled a block (its tokens all read now)
        return outs

    def _split(self, chunks: list[PrefillChunk], decode_rows: int) -> tuple[list[PrefillChunk], list[PrefillChunk]]:
        """(chunks that ride in the decode step as rows, chunks for the packed prefill forward):
        chunks ride while the step stays within ``row_prefill_tokens`` rows, decode rows included,
        and (where rows ride at all) so does any chunk that costs less as latent-space rows than
        expanded: a few new tokens after a long cached prefix. The packed forward expands every
        chunk's whole context through W_UKV, so at concurrency 128, where each new RAG request
        owes ~30 tokens after a ~2,000-token cache hit, 128 requests cost 16 forwards of 16k
        expanded keys (TTFT p50 0.37 s on an H100); as rows they cost one decode step, eager when
        it outgrows the captured graphs (docs/benchmarks.md)."""
        rows = decode_rows
        riding, packed = [], []
        for c in chunks:
            if self.row_tokens and (rows + c.length <= self.row_tokens
                                    or absorb_is_cheaper(self.model.cfg, c.length, c.end)):
                riding.append(c)
                rows += c.length
            else:
                packed.append(c)
        return riding, packed

    def _speculative_step(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Draft, verify and accept for every decode row; a row emits 1 .. k+1 tokens (the ones
        after a finish are dropped), then gives back the blocks of its rejected drafts."""
        emitted, target = self.runner.speculate(seqs)
        now = time.perf_counter()
        outs = []
        for i, (s, toks) in enumerate(zip(seqs, emitted, strict=True)):
            # Logprobs of the emitted tokens under the verify forward's logits (what plain decoding sees).
            rows = logprob_rows(target[i, : len(toks)], upload(toks, torch.long, target.device), [s] * len(toks))
            lps = rows.read(toks) if rows else [None] * len(toks)
            for tok, lp in zip(toks, lps, strict=True):
                outs.append(self._emit(s, tok, now, lp))
                if s.finished:
                    break
            if not s.finished:
                self.spec.settle(s)
        return outs

    def _filled(self, s: Sequence) -> int:
        """Positions whose latents are final in every cache layer (with speculation the MTP
        layer trails the main model by the sequence's pending MTP inputs)."""
        return s.num_computed if self.spec is None else self.spec.filled(s)

    def _emit(self, s: Sequence, tok: int, now: float, lp: TokenLogprob | None, slot: int | None = None) -> StepOutput:
        """Take token ``tok`` into its slot of ``s.token_ids`` (appended when ``slot`` is None)."""
        ttft = now - s.arrival if s.first_token_at is None else None
        itl = None if ttft is not None else now - (s.last_token_at or now)
        s.first_token_at = s.first_token_at or now
        s.last_token_at = now
        if slot is None:
            s.token_ids.append(PENDING)
            slot = len(s) - 1
        try:
            out = self._append(s, tok, slot)
        except Exception:  # this request's decoding or stop matching: it fails alone
            log.exception("request %d failed after token %d", s.id, tok)
            return self._finish(s, "error", None, end=slot)
        out.ttft, out.itl = ttft, itl
        if ttft is not None and s.admitted_at is not None:
            out.queued = s.admitted_at - s.arrival
        out.logprob = lp if out.token is not None else None
        return out

    def _append(self, s: Sequence, tok: int, slot: int) -> StepOutput:
        if tok == self.tokenizer.eos_id and not s.params.ignore_eos:
            return self._finish(s, "stop", None, end=slot)
        s.token_ids[slot] = tok
        text = s.matcher.feed(s.decoder.push(tok))
        if s.matcher.stopped:
            return self._finish(s, "stop", tok, text, end=slot + 1)
        if slot + 1 - s.prompt_len >= s.params.max_tokens or slot + 1 >= self.max_model_len:
            return self._finish(s, "length", tok, text + s.matcher.flush(), end=slot + 1)
        return StepOutput(s, text, tok, False)

    def _finish(self, s: Sequence, reason: str, tok: int | None, text: str = "", *, end: int) -> StepOutput:
        """End ``s`` with its tokens before ``end`` (later slots, still on the device, are dropped)."""
        del s.token_ids[end:]
        s.finish_reason = reason
        if reason != "error" and not s.matcher.stopped:
            text += s.matcher.flush()
        self.scheduler.finish(s)
        self.runner.release(s)
        self.by_id.pop(s.id, None)
        return StepOutput(s, text, tok, True)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Run prompts to completion synchronously (tests, benchmarks, offline use)."""
        seqs = [self.add(p, params) for p in prompts]
        while self.has_work:
            self.step()
        return seqs
