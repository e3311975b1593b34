"""What a step produces: the sampled rows still on the device (`Launched`), their logprobs, and
the per-token `StepOutput` the engine hands to the server."""

from __future__ import annotations

import dataclasses

import torch

from model_host.engine.sequence import Sequence
from model_host.transfer import download, upload


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
    queued: float | None = None  # seconds from arrival to admission, on a request's first token
    logprob: TokenLogprob | None = None  # only for requests that asked (and not for EOS)


@dataclasses.dataclass
class LogprobRows:
    """Logprobs of the rows that asked for them, computed on the device with the step and copied
    to the host with its tokens (`read` after the step's event)."""

    rows: list[int]
    n: list[int]
    chosen: torch.Tensor  # [r] host
    top_v: torch.Tensor  # [r, max n] host
    top_i: torch.Tensor

    def read(self, tokens: list[int]) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(tokens)
        for i, n, c, v, idx in zip(self.rows, self.n, self.chosen.tolist(), self.top_v.tolist(),
                                   self.top_i.tolist(), strict=True):
            out[i] = TokenLogprob(tokens[i], c, list(zip(idx[:n], v[:n], strict=True)))
        return out


def logprob_rows(logits: torch.Tensor, sampled: torch.Tensor, seqs: list[Sequence]) -> LogprobRows | None:
    """log_softmax of the rows that asked for logprobs; nothing is computed for the others."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    n = [seqs[i].params.logprobs for i in rows]
    idx = upload(rows, torch.long, logits.device)
    lp = logits[idx].float().log_softmax(dim=-1)
    chosen = lp.gather(1, sampled[idx].unsqueeze(1)).squeeze(1)
    # A stable sort, not topk: among tied logits the lowest index comes first, the sampler's rule.
    top_v, top_i = (t[:, : max(n)] for t in lp.sort(dim=-1, descending=True, stable=True))
    return LogprobRows(rows, n, download(chosen), download(top_v), download(top_i))


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """One step's time on the device, from its first kernel to its tokens copied to the host
    (CUDA events, so an overlapped step is not charged for the one before it; wall time on the
    CPU), and what it ran: ``decode`` (decode rows only), ``riding`` (prompt chunks as rows of
    the decode step) or ``prefill`` (a packed prefill forward, with or without decode rows).
    Speculative rounds read their tokens at once and are not timed here. ``rows``: the query
    rows its forwards ran (decode rows plus prompt-chunk tokens), before padding to a graph."""

    kind: str
    seconds: float
    rows: int = 0


@dataclasses.dataclass
class Launched:
    """A step whose sampled tokens are queued on the device and not yet read."""

    rows: list[Sequence]  # sampled rows: prompts that ended (the first ``first``), then decode rows
    slots: list[int]  # each row's PENDING slot in its token_ids
    first: int
    tokens: torch.Tensor  # [m] on the device: the next step's decode rows read them there
    host: torch.Tensor  # [m] the same, copied to the host
    logprobs: LogprobRows | None
    kind: str = "decode"  # what the step ran (StepTiming.kind)
    query_rows: int = 0  # query rows its forwards ran (StepTiming.rows)
    start: torch.cuda.Event | float | None = None  # recorded before its first kernel (perf_counter on the CPU)
    done: torch.cuda.Event | None = None  # recorded after the copies (CUDA)

    @property
    def row_of(self) -> dict[int, int]:
        return {s.id: i for i, s in enumerate(self.rows)}
