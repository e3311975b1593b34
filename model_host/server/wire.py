"""What crosses the socket between the engine process and an API process (`--api-processes`).

Messages are tuples pickled by :mod:`multiprocessing.connection`, one per engine step and
connection: a step's outputs for that API process travel together, so the engine process
pays one send (on its sender thread, never the engine's) per step, not one per token.

    API -> engine   ("submit", rid, prompt_ids, SamplingParams, prep_seconds)
                    ("abort", rid)
                    ("ended", finish_reason, cached_tokens)      the HTTP layer's outcome, for /metrics
                    ("metrics", ask_id)
    engine -> API   ("hello", max_model_len)                     first, on connect
                    ("out", [(rid, encoded output), ...])        once per step with outputs for it
                    ("metrics", ask_id, rendered bytes)
                    ("stopped", reason)                          the engine loop has ended
"""

from __future__ import annotations

import dataclasses

from model_host.engine.loop import EngineStopped
from model_host.engine.outputs import StepOutput


@dataclasses.dataclass(frozen=True)
class SeqInfo:
    """The part of a Sequence that the HTTP layer reads, as an API process receives it."""

    id: int
    num_output: int
    prompt_cached_tokens: int
    finish_reason: str | None


def encode(out: StepOutput | Exception) -> tuple:
    if isinstance(out, Exception):
        return ("stopped" if isinstance(out, EngineStopped) else "failed", str(out))
    s = out.seq
    return (out.text, out.token, out.finished, s.finish_reason, s.num_output, s.prompt_cached_tokens, out.logprob)


def decode(rid: int, item: tuple) -> StepOutput | Exception:
    if len(item) == 2:
        kind, message = item
        return EngineStopped(message) if kind == "stopped" else RuntimeError(message)
    text, token, finished, reason, num_output, cached, logprob = item
    return StepOutput(SeqInfo(rid, num_output, cached, reason), text, token, finished,  # type: ignore[arg-type]
                      logprob=logprob)
