"""The engine: requests in, tokens out, one scheduler step at a time; plus a thread that drives it.

`Engine` is single-threaded and deterministic: `add`, `abort`, `step`. `EngineLoop` runs it on a
background thread for the HTTP server, taking new requests and aborts through a thread-safe
inbox so the engine's state is only ever touched by its own thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from model_host.engine.block_manager import BlockManager
from model_host.engine.memory import plan_kv
from model_host.engine.paged_cache import PagedLatentCache
from model_host.engine.runner import ModelRunner, capture_sizes
from model_host.engine.scheduler import Batch, PrefillChunk, Scheduler
from model_host.engine.sequence import Sequence
from model_host.engine.speculative import SpeculativeDecoder
from model_host.model import DeepseekV3
from model_host.sampler import Sampler, SamplingParams
from model_host.speculative import mtp_draft
from model_host.tokenizer import Tokenizer

log = logging.getLogger(__name__)
ROW_PREFILL_TOKENS = 64  # EngineConfig.row_prefill_tokens where decode steps are graph-captured


class RequestError(ValueError):
    """A request the engine can never serve (too long for the context or the whole cache)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16
    kv_memory_gb: float | None = None  # default: measured on a GPU (engine/memory.py), 1 GiB on the CPU
    block_size: int = 16
    max_prefill_tokens: int = 2048  # prompt tokens per step; running decodes wait for at most this many
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    cache_dtype: torch.dtype | None = None  # default: the model's dtype
    graph_memory_gb: float = 1.0  # most GPU memory the decode CUDA graphs may take
    speculative_tokens: int = 0  # MTP drafts verified per decode step (0 = off; needs the MTP layer)
    # A step of at most this many rows in all (its decode rows plus one row per prompt token)
    # runs its prompt chunks as rows of the decode step instead of a separate eager prefill
    # forward: a RAG prompt whose prefix is cached owes a few dozen tokens, and the decode step
    # is a replayed CUDA graph. Capped by rows, not prompt tokens: at 128 decode rows, 64 more
    # rows made every step dearer than the prefill forward they saved (docs/benchmarks.md).
    # None: 64 where decode steps are graph-captured, else 0 (eagerly a row costs an LM-head row).
    row_prefill_tokens: int | None = None


@dataclasses.dataclass
class TokenLogprob:
    """Log-probability of a chosen token under the model (raw logits, before temperature and
    top-k/top-p) and the `n` most likely alternatives, as asked by `SamplingParams.logprobs`."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class StepOutput:
    seq: Sequence
    text: str  # newly releasable text (may be empty)
    token: int | None
    finished: bool
    ttft: float | None = None  # seconds from arrival, on a request's first token
    itl: float | None = None  # seconds since the previous token, on later tokens
    logprob: TokenLogprob | None = None  # only for requests that asked (and not for EOS)


RunnerFactory = Callable[[DeepseekV3, PagedLatentCache], ModelRunner]


class Engine:
    def __init__(self, model: DeepseekV3, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 runner: RunnerFactory = ModelRunner, drafter=None):
        """``runner`` builds the model runner over the engine's cache (tensor-parallel rank 0
        passes one that broadcasts each forward to the other ranks).  ``drafter`` replaces the
        MTP drafter of speculative decoding: for tests and benchmarks only (an oracle that forces
        acceptance); the server never passes one."""
        cfg = model.cfg
        self.model, self.tokenizer, self.config = model, tokenizer, config
        dtype = config.cache_dtype or model.dtype
        layers = model.num_cache_layers
        self.kv_plan = plan_kv(model, config.kv_memory_gb, config.max_prefill_tokens, config.graph_memory_gb)
        num_blocks = PagedLatentCache.blocks_for_budget(
            self.kv_plan.kv_bytes, layers, config.block_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)
        self.cache = PagedLatentCache(layers, num_blocks, config.block_size, cfg.kv_lora_rank,
                                      cfg.qk_rope_head_dim, dtype=dtype, device=model.device)
        k = config.speculative_tokens
        self.blocks = BlockManager(num_blocks, config.block_size, spec_tokens=k)
        self.scheduler = Scheduler(self.blocks, config.max_batch, config.max_prefill_tokens)
        self.sampler = Sampler()
        self.capacity_tokens = num_blocks * config.block_size
        # A verify step writes k positions past the sequence: they must fit in the cache too.
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, self.capacity_tokens - k)
        self.spec = SpeculativeDecoder(model, self.cache, self.blocks, k, drafter or mtp_draft) if k else None
        self.runner = runner(model, self.cache, spec=self.spec) if self.spec else runner(model, self.cache)
        # With speculation a step runs B * (k + 1) verify rows (and MTP rows as many), each with a
        # block table up to k positions longer; without, B decode rows and the short prompt chunks.
        # (Speculation keeps prompt chunks out of the decode step: its MTP layer needs their
        # hidden states in a prefill of its own.)
        rows = config.row_prefill_tokens
        self.row_tokens = 0 if k else (rows if rows is not None else ROW_PREFILL_TOKENS * self.runner.graphs_enabled)
        self.max_rows = max(config.max_batch * (k + 1), self.row_tokens)
        self.graph_report = self.runner.capture_graphs(capture_sizes(self.max_rows),
                                                       int(config.graph_memory_gb * 2**30),
                                                       self.blocks.blocks_needed(self.max_model_len + 1 + k))
        self.by_id: dict[int, Sequence] = {}
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %d B/token/layer)",
                 num_blocks, config.block_size, self.capacity_tokens, self.cache.nbytes() / 2**30,
                 self.cache.bytes_per_token_per_layer())

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise RequestError for a request that can never fit."""
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        if prompt_len + max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request needs "
                f"{prompt_len + max_tokens} ({prompt_len} prompt + {max_tokens} max_tokens); "
                f"shorten the prompt or lower max_tokens")

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        self.check(len(prompt_ids), params.max_tokens)
        seq = Sequence(prompt_ids, params, self.tokenizer.stream_decoder(), params.generator(self.model.device))
        self.by_id[seq.id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request now and free its blocks (client gone, or an explicit abort)."""
        if not seq.finished:
            seq.finish_reason = seq.finish_reason or "abort"
            self.scheduler.finish(seq)
        self.by_id.pop(seq.id, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[StepOutput]:
        return self.execute(self.scheduler.schedule())

    def execute(self, batch: Batch) -> list[StepOutput]:
        """Run one scheduled step: the prefill chunks (one runner call) and the decode rows (one
        graph replay, or one speculative round); a token is sampled for every decode row and
        every finished prompt."""
        rows: list[Sequence] = []
        logits: list[torch.Tensor] = []
        riding, packed = self._split(batch.prefill, len(batch.decode))
        if packed:
            logits.append(self.runner.prefill(packed))
            rows += [c.seq for c in packed if c.last]
            for c in packed:
                self.blocks.register_full_blocks(c.seq, self._filled(c.seq))
        outs: list[StepOutput] = []
        if batch.decode and self.spec is not None:
            outs = self._speculative_step(batch.decode)
        elif batch.decode or riding:
            logits.append(self.runner.decode(batch.decode, riding))
            rows += [c.seq for c in riding if c.last] + batch.decode
            for c in riding:
                self.blocks.register_full_blocks(c.seq, self._filled(c.seq))
        if not rows:
            return outs
        all_logits = torch.cat(logits)
        sampled = self.sampler(all_logits, [s.params for s in rows], [s.generator for s in rows])
        tokens = sampled.tolist()
        logprobs = self._logprobs(all_logits, sampled, tokens, rows)
        now = time.perf_counter()
        decoded = set(map(id, batch.decode))
        for s, tok, lp in zip(rows, tokens, logprobs, strict=True):
            outs.append(self._emit(s, tok, now, lp))
            if id(s) not in decoded and self.spec is not None and not s.finished:
                self.spec.first_token(s, tok)  # a finished prompt: its first pending MTP input
            if id(s) in decoded and s.num_computed % self.blocks.block_size == 0 and not s.finished:
                self.blocks.register_full_blocks(s)
        return outs

    def _split(self, chunks: list[PrefillChunk], decode_rows: int) -> tuple[list[PrefillChunk], list[PrefillChunk]]:
        """(chunks that ride in the decode step as rows, chunks for the packed prefill forward):
        chunks ride while the step stays within ``row_prefill_tokens`` rows, decode rows included."""
        rows = decode_rows
        riding, packed = [], []
        for c in chunks:
            if rows + c.length <= self.row_tokens:
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
            lps = self._logprobs(target[i, : len(toks)], torch.tensor(toks, device=target.device), toks,
                                 [s] * len(toks))
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

    def _emit(self, s: Sequence, tok: int, now: float, lp: TokenLogprob | None) -> StepOutput:
        ttft = now - s.arrival if s.first_token_at is None else None
        itl = None if ttft is not None else now - (s.last_token_at or now)
        s.first_token_at = s.first_token_at or now
        s.last_token_at = now
        try:
            out = self._append(s, tok)
        except Exception:  # this request's decoding or stop matching: it fails alone
            log.exception("request %d failed after token %d", s.id, tok)
            return self._fail(s)
        out.ttft, out.itl = ttft, itl
        out.logprob = lp if out.token is not None else None
        return out

    @staticmethod
    def _logprobs(logits: torch.Tensor, sampled: torch.Tensor, tokens: list[int],
                  seqs: list[Sequence]) -> list[TokenLogprob | None]:
        """log_softmax of the rows that asked for logprobs; nothing is computed for the others."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if not rows:
            return out
        lp = logits[rows].float().log_softmax(dim=-1)
        chosen = lp.gather(1, sampled[rows].unsqueeze(1)).squeeze(1).tolist()
        k = max(seqs[i].params.logprobs for i in rows)
        # A stable sort, not topk: among tied logits the lowest index comes first, the sampler's rule.
        top_v, top_i = (t[:, :k] for t in lp.sort(dim=-1, descending=True, stable=True))
        for j, (i, v, idx) in enumerate(zip(rows, top_v.tolist(), top_i.tolist(), strict=True)):
            n = seqs[i].params.logprobs
            out[i] = TokenLogprob(tokens[i], chosen[j], list(zip(idx[:n], v[:n], strict=True)))
        return out

    def _append(self, s: Sequence, tok: int) -> StepOutput:
        if tok == self.tokenizer.eos_id and not s.params.ignore_eos:
            return self._finish(s, "stop", None)
        s.token_ids.append(tok)
        text = s.matcher.feed(s.decoder.push(tok))
        if s.matcher.stopped:
            return self._finish(s, "stop", tok, text)
        if s.num_output >= s.params.max_tokens or len(s) >= self.max_model_len:
            return self._finish(s, "length", tok, text + s.matcher.flush())
        return StepOutput(s, text, tok, False)

    def _finish(self, s: Sequence, reason: str, tok: int | None, text: str = "") -> StepOutput:
        s.finish_reason = reason
        if not s.matcher.stopped:
            text += s.matcher.flush()
        self.scheduler.finish(s)
        self.by_id.pop(s.id, None)
        return StepOutput(s, text, tok, True)

    def _fail(self, s: Sequence) -> StepOutput:
        s.finish_reason = "error"
        self.scheduler.finish(s)
        self.by_id.pop(s.id, None)
        return StepOutput(s, "", None, True)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Run prompts to completion synchronously (tests, benchmarks, offline use)."""
        seqs = [self.add(p, params) for p in prompts]
        while self.has_work:
            self.step()
        return seqs


class EngineStopped(RuntimeError):
    """The engine thread is gone (a failed step, or shutdown): no request can be served."""


Callback = Callable[[StepOutput | Exception], None]


class EngineLoop:
    """Drives an Engine, on the calling thread (:meth:`run`) or a background one (:meth:`start`);
    callbacks run on the engine's thread.

    `model-host serve` runs it on the main thread, the one that loaded the model, and uvicorn on
    a side thread: on the CPU, torch's OpenMP ops issued from a second thread, once the main
    thread has used its own OpenMP team, ran 2.5-4x slower (libgomp keeps one worker pool per
    master thread, and the pools contend; measured in docs/gpu_notes.md "CPU serving").

    A callback gets each StepOutput of its request, or one Exception when the request failed
    (the engine refused it, or the engine stopped).  A failure that belongs to one request
    (its admission, its decoding) fails that request only.  A failed model step is not one
    request's fault and leaves the device in an unknown state (CUDA errors are sticky), so the
    loop fails every request in flight and stops: `alive` turns False, `/health` answers 503, and
    the orchestrator restarts the process instead of the server hanging or serving garbage.
    """

    def __init__(self, engine: Engine, on_step: Callable[[list[StepOutput]], None] | None = None):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.callbacks: dict[int, Callback] = {}
        self.aborts: dict[int, threading.Event] = {}  # sequence id -> its request's abort switch
        self.on_step = on_step
        self._stop = threading.Event()
        self._closed = False  # no more submissions; guarded by _lock with the inbox's last drain
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # the background thread of start(), if any
        self._running = False
        self.thread: threading.Thread | None = None  # the thread that drives the engine, once running
        self.recent_tokens: collections.deque[tuple[float, int]] = collections.deque(maxlen=512)
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        """Running and taking requests (False from the moment the loop starts failing its requests)."""
        return self._running and not self._closed

    def start(self) -> None:
        """Run on a background thread (tests, and callers whose main thread is busy)."""
        self._running = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run on the calling thread until :meth:`stop` (from any thread) or a failed step."""
        self._running = True
        self._run()

    def stop(self, timeout: float = 10) -> None:
        """Stop after the current step; requests still in flight get EngineStopped."""
        self._stop.set()
        self.inbox.put(None)
        if self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callback) -> threading.Event:
        """Queue a request; returns an event to set for aborting it. Validate with engine.check first.

        Raises EngineStopped when the engine thread has ended."""
        abort = threading.Event()
        with self._lock:
            if self._closed:
                raise EngineStopped(f"the engine has stopped: {self.error or 'shutting down'}")
            self.inbox.put(("add", prompt_ids, params, callback, abort))
        return abort

    @staticmethod
    def _notify(callback: Callback, item: StepOutput | Exception) -> bool:
        try:
            callback(item)
            return True
        except Exception:  # e.g. the server's event loop is closed: only this request is lost
            log.exception("delivering a result failed")
            return False

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            _, prompt_ids, params, callback, abort = item
            try:
                seq = self.engine.add(prompt_ids, params)
            except Exception as e:  # this request only (the HTTP layer validates, this is the backstop)
                log.warning("request refused by the engine: %s", e)
                self._notify(callback, e)
            else:
                self.callbacks[seq.id] = callback
                self.aborts[seq.id] = abort
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _apply_aborts(self) -> None:
        for sid in [sid for sid, ev in self.aborts.items() if ev.is_set()]:
            seq = self.engine.by_id.get(sid)
            cb = self.callbacks.pop(sid, None)
            del self.aborts[sid]
            if seq is None:
                continue
            self.engine.abort(seq)
            if cb:  # an explicit /v1/abort: the request's handler ends with finish_reason "abort"
                self._notify(cb, StepOutput(seq, "", None, True))

    def _deliver(self, outs: list[StepOutput]) -> None:
        n = sum(1 for o in outs if o.token is not None)
        self.recent_tokens.append((time.perf_counter(), n))
        if self.on_step:
            try:
                self.on_step(outs)
            except Exception:
                log.exception("the on_step hook failed")
        for o in outs:
            cb = self.callbacks.get(o.seq.id)
            if cb and not self._notify(cb, o) and not o.finished and o.seq.id in self.aborts:
                self.aborts[o.seq.id].set()  # nobody is listening: free its blocks next step
            if o.finished:
                self.callbacks.pop(o.seq.id, None)
                self.aborts.pop(o.seq.id, None)

    def _run(self) -> None:
        eng = self.engine
        self.thread = threading.current_thread()
        try:
            while not self._stop.is_set():
                self._drain(block=not eng.has_work)
                self._apply_aborts()
                if not eng.has_work:
                    continue
                try:
                    outs = eng.step()
                except Exception as e:
                    log.exception("engine step failed; the engine stops and /health reports 503")
                    self.error = e
                    return
                self._deliver(outs)
        except BaseException as e:  # a bug in the loop itself: never die silently
            log.exception("engine loop failed")
            self.error = e
        finally:
            self._close()
            self._running = False

    def _close(self) -> None:
        """Fail every request still queued or running, and refuse new ones."""
        err = EngineStopped(f"the engine stopped: {self.error}" if self.error else "the server is shutting down")
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._notify(item[3], err)
        for seq in list(self.engine.by_id.values()):
            self.engine.abort(seq)
            cb = self.callbacks.pop(seq.id, None)
            if cb:
                self._notify(cb, err)
        self.aborts.clear()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        n = sum(c for t, c in self.recent_tokens if now - t <= window)
        return n / window
