"""MTP speculative decoding: draft with the multi-token-prediction layer, verify with the model.

One round for a batch of rows, each row at its own position (``L`` tokens known, the last one,
``t[L-1]``, sampled but not yet in the main model's cache):

1. **draft** (:func:`mtp_draft`): the MTP layer first *extends* over the row's pending inputs
   (the tokens accepted last round with the main model's hidden states at the positions before
   them; this writes the MTP layer's latent cache exactly as a non-speculative run would), and its
   last column drafts ``d1``; for k > 1 it runs on its own output hidden state and draft token,
   one position further each time, to draft ``d2 .. dk``;
2. **verify**: the main model runs ``[t[L-1], d1 .. dk]`` at positions ``L-1 .. L-1+k`` in one
   forward, giving the target distribution of every draft plus one bonus position;
3. **accept** (:func:`verify`): greedy rows keep the drafts that equal the target's argmax; sampled
   rows use the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept draft
   ``d`` with probability ``min(1, p(d) / q(d))``; at the first rejection sample from
   ``norm(max(0, p - q))``; with every draft accepted, sample the bonus token from ``p``.  The
   emitted tokens are then distributed exactly as non-speculative sampling from ``p``.

A row emits ``accepted + 1`` tokens (1 .. k+1).  Cache positions past the accepted ones hold
rejected latents: they are past the row's length, so they are never read, and the next round
overwrites them (the engine also frees blocks that hold nothing else).

The functions here are batched tensor code with per-row parameters and no engine state, so the
single-request loop and the serving engine share them: the model runs through a
:class:`Forwards`, which takes the round's tokens *packed* (each sequence's entries back to back,
``counts`` per sequence, as a varlen batch) - the engine maps every entry to a single-token row of
the paged cache, ``generate`` to one chunk of its contiguous cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .cache import LatentCache
from .model import DeepseekV3
from .sampler import apply_top_k_top_p, sample
from .transfer import upload


def require_mtp(ckpt_dir, k: int) -> None:
    """The one-line error of ``--speculative-tokens K`` on a checkpoint without an MTP layer."""
    from .config import ModelConfig

    if k < 0:
        raise ValueError(f"--speculative-tokens must be >= 0, got {k}")
    if k and not ModelConfig.from_json(ckpt_dir).num_nextn_predict_layers:
        raise ValueError(f"--speculative-tokens {k} drafts with the checkpoint's MTP layer, but {ckpt_dir} has "
                         "none (num_nextn_predict_layers = 0); drop the flag or use a checkpoint with it")


@dataclass(frozen=True)
class Verdict:
    """tokens [B, k+1]: row b emits ``tokens[b, :accepted[b] + 1]``; accepted [B]: drafts kept."""

    tokens: torch.Tensor
    accepted: torch.Tensor


def probs_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """The distribution :func:`~model_host.sampler.sample` draws from, for logits [B, S, V] with
    per-row parameters [B] (temperature > 0 rows; greedy rows give a harmless softmax)."""
    b, s, v = logits.shape
    rep = lambda t: t.repeat_interleave(s)  # noqa: E731 - the same parameters for each column
    t = rep(temperature).clamp(min=1e-5).unsqueeze(1)
    flat = apply_top_k_top_p(logits.reshape(b * s, v).float() / t, rep(top_k), rep(top_p))
    return flat.softmax(dim=-1).view(b, s, v)


def _uniform(shape: tuple[int, int], generators: Sequence[torch.Generator | None] | None,
             device: torch.device) -> torch.Tensor:
    """[B, n] U[0, 1) draws; row b from ``generators[b]`` (its own seed, whatever the batch)."""
    if generators is None:
        return torch.rand(shape, device=device)
    return torch.stack([torch.rand(shape[1], device=device, generator=g) for g in generators])


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None] | None) -> torch.Tensor:
    """One sample per row of probs [B, V] (exponential race, as the sampler does)."""
    noise = torch.empty_like(probs)
    if generators is None:
        noise.exponential_()
    else:
        for row, g in enumerate(generators):
            noise[row].exponential_(generator=g)
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def _first_false(ok: torch.Tensor) -> torch.Tensor:
    """Per row of ok [B, k] (bool), the count of leading True values (0 .. k)."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def greedy_verify(drafts: torch.Tensor, target_logits: torch.Tensor,
                  num_drafts: torch.Tensor | None = None) -> Verdict:
    """Temperature 0: keep the drafts that equal the target's argmax, up to the first miss.

    drafts [B, k]; target_logits [B, k+1, V] at the verify positions; num_drafts [B] (default k)
    limits a row to its first ``num_drafts[b]`` drafts.  The emitted tokens are the target's own
    argmax at every kept position plus the next one, so the output equals greedy decoding.
    """
    best = target_logits.argmax(dim=-1)
    ok = drafts == best[:, :-1]
    if num_drafts is not None:
        ok &= torch.arange(drafts.shape[1], device=drafts.device) < num_drafts.unsqueeze(1)
    return Verdict(best, _first_false(ok))


def sampled_verify(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                   generators: Sequence[torch.Generator | None] | None = None,
                   num_drafts: torch.Tensor | None = None) -> Verdict:
    """The speculative-sampling rule; drafts [B, k] were drawn from q [B, k, V]; p [B, k+1, V] is
    the target distribution at the verify positions (already tempered / top-k / top-p).

    Accept draft i when ``u_i * q_i(d_i) < p_i(d_i)`` (probability min(1, p/q)); the first
    rejected position n samples from ``norm(max(0, p_n - q_n))``; a row with all its drafts
    accepted samples its bonus token from ``p`` at the position after them.
    """
    b, k = drafts.shape
    rows = torch.arange(b, device=drafts.device)
    p_d = p[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)
    q_d = q.gather(2, drafts.unsqueeze(2)).squeeze(2)
    ok = _uniform((b, k), generators, drafts.device) * q_d < p_d
    limit = torch.full((b,), k, device=drafts.device) if num_drafts is None else num_drafts
    ok &= torch.arange(k, device=drafts.device) < limit.unsqueeze(1)
    n = _first_false(ok)
    p_n = p[rows, n]
    residual = (p_n - q[rows, n.clamp(max=k - 1)]).clamp(min=0)
    # Past a row's drafts there is nothing to correct: the bonus token comes from p itself.  An
    # all-zero residual (p == q to rounding) cannot be reached by a rejection; fall back to p.
    use_p = (n >= limit) | (residual.sum(dim=1) <= 0)
    dist = torch.where(use_p.unsqueeze(1), p_n, residual)
    extra = _draw(dist / dist.sum(dim=1, keepdim=True), generators)
    tokens = torch.cat((drafts, drafts[:, :1]), dim=1)  # column k is a placeholder until scatter
    tokens[rows, n] = extra
    return Verdict(tokens, n)


def verify(drafts: torch.Tensor, draft_logits: torch.Tensor, target_logits: torch.Tensor,
           temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: Sequence[torch.Generator | None] | None = None,
           num_drafts: torch.Tensor | None = None, all_greedy: bool | None = None) -> Verdict:
    """Per-row rule: greedy rows (temperature 0) by argmax, the others by speculative sampling
    with q and p from ``draft_logits`` [B, k, V] / ``target_logits`` [B, k+1, V] under the
    row's temperature, top-k and top-p (the drafts must have been drawn from that q).
    ``all_greedy``: known on the host (None reads it from the device, a sync)."""
    greedy = greedy_verify(drafts, target_logits, num_drafts)
    sampled_rows = temperature > 0
    if all_greedy if all_greedy is not None else not bool(sampled_rows.any()):
        return greedy
    q = probs_from_logits(draft_logits, temperature, top_k, top_p)
    p = probs_from_logits(target_logits, temperature, top_k, top_p)
    sampled = sampled_verify(drafts, q, p, generators, num_drafts)
    pick = sampled_rows.unsqueeze(1)
    return Verdict(torch.where(pick, sampled.tokens, greedy.tokens),
                   torch.where(sampled_rows, sampled.accepted, greedy.accepted))


class Forwards(Protocol):
    """How a caller runs the model over *packed* rows: ``counts[s]`` consecutive entries of
    ids / positions [N] (and hidden [N, D]) belong to sequence s, each entry one token at its own
    absolute position, attending that sequence's cache up to it.  Both return
    (logits [N, V] float32, final-normed hidden [N, D]) and write the tokens' latents first."""

    def main(self, ids: torch.Tensor, positions: torch.Tensor,
             counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mtp(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
            counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Pending:
    """MTP inputs each sequence still owes the MTP layer's cache, packed (see :class:`Forwards`):
    entry j pairs the main model's hidden state at ``positions[j]`` with the token after it
    (``next_ids[j]``).  A sequence's last entry holds its most recently sampled token."""

    next_ids: torch.Tensor
    hidden: torch.Tensor
    positions: torch.Tensor
    counts: list[int]

    @staticmethod
    def cat(parts: Sequence[Pending]) -> Pending:
        return Pending(torch.cat([p.next_ids for p in parts]), torch.cat([p.hidden for p in parts]),
                       torch.cat([p.positions for p in parts]), [c for p in parts for c in p.counts])

    def last_index(self) -> torch.Tensor:
        """Index of each sequence's last entry, built on the host (no wait for the GPU)."""
        return upload([n - 1 for n in itertools.accumulate(self.counts)], torch.long, self.next_ids.device)

    def split(self) -> list[Pending]:
        """One Pending per sequence."""
        out, start = [], 0
        for c in self.counts:
            sl = slice(start, start + c)
            out.append(Pending(self.next_ids[sl], self.hidden[sl], self.positions[sl], [c]))
            start += c
        return out


@dataclass(frozen=True)
class Drafts:
    """tokens [B, k] drafted; logits [B, k, V] they were drawn from (q, before tempering)."""

    tokens: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class Round:
    """What a round produced: the verdict, each sequence's next pending MTP input, and the target
    logits [B, k+1, V] of the verify positions (row b's first ``accepted[b] + 1`` are real)."""

    verdict: Verdict
    pending: Pending
    target: torch.Tensor


def _flat_rows(lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Indices into a flattened [B, width] of each row's first ``lengths[b]`` columns: built on
    the host, as a boolean mask index would wait for the GPU to count its True entries."""
    return upload([b * width + j for b, n in enumerate(lengths) for j in range(n)], torch.long, device)


@torch.no_grad()
def mtp_draft(fw: Forwards, pending: Pending, k: int, temperature: torch.Tensor, top_k: torch.Tensor,
              top_p: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None,
              all_greedy: bool | None = None) -> Drafts:
    """Draft k tokens per sequence with the MTP layer.

    The first forward runs the pending entries (filling the MTP cache where a non-speculative
    run would have it) and its last entry per sequence drafts d1; each further draft runs the
    MTP layer one position on, on its own output hidden state and previous draft.  Drafts are
    drawn with the sequence's own sampling parameters (argmax at temperature 0).
    """
    last = pending.last_index()
    logits, hidden = fw.mtp(pending.next_ids, pending.hidden, pending.positions, pending.counts)
    logits, hidden, pos = logits[last], hidden[last], pending.positions[last]
    ones = [1] * len(pending.counts)
    tokens, all_logits = [], []
    for step in range(k):
        tok = sample(logits, temperature, top_k, top_p, generators, all_greedy=all_greedy)
        tokens.append(tok)
        all_logits.append(logits)
        if step < k - 1:
            pos = pos + 1
            logits, hidden = fw.mtp(tok, hidden, pos, ones)
    return Drafts(torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1))


@torch.no_grad()
def speculative_round(fw: Forwards, pending: Pending, k: int, temperature: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor,
                      generators: Sequence[torch.Generator | None] | None = None,
                      num_drafts: list[int] | None = None, drafter=mtp_draft, all_greedy: bool | None = None) -> Round:
    """Draft, verify in one packed forward of the main model, accept.

    Sequence b verifies its last sampled token and its first ``num_drafts[b]`` (default k) drafts
    at positions ``L-1 .. L-1+num_drafts[b]`` (``L-1`` is one past its last pending position), so
    those cache slots must exist.  Returns the verdict and the next pending input: the verified
    entries up to and including the first non-accepted one, and the verify logits.
    ``drafter`` is :func:`mtp_draft`
    (benchmarks substitute an oracle to force acceptance). ``all_greedy``: whether every row is
    greedy, known on the host. The round's one wait for the GPU is reading the accepted counts.
    """
    b = len(pending.counts)
    dev = pending.next_ids.device
    drafts = drafter(fw, pending, k, temperature, top_k, top_p, generators, all_greedy=all_greedy)
    last = pending.last_index()
    n_ver = [k + 1] * b if num_drafts is None else [n + 1 for n in num_drafts]
    ids = torch.cat((pending.next_ids[last].unsqueeze(1), drafts.tokens), dim=1)  # [B, k+1]
    positions = (pending.positions[last] + 1).unsqueeze(1) + torch.arange(k + 1, device=dev)
    live = _flat_rows(n_ver, k + 1, dev)  # each sequence's verified columns, flattened
    logits, hidden = fw.main(ids.view(-1)[live], positions.view(-1)[live], n_ver)
    target = logits.new_zeros(b * (k + 1), logits.shape[-1])
    target[live] = logits  # columns past a sequence's drafts stay padding; verify never reads them
    target = target.view(b, k + 1, -1)
    nd = None if num_drafts is None else upload(num_drafts, torch.long, dev)
    verdict = verify(drafts.tokens, drafts.logits, target, temperature, top_k, top_p, generators, nd, all_greedy)
    accepted = verdict.accepted.tolist()
    keep = _flat_rows([n + 1 for n in accepted], k + 1, dev)  # within `live`
    full_hidden = hidden.new_zeros(b * (k + 1), hidden.shape[-1])
    full_hidden[live] = hidden
    return Round(verdict, Pending(verdict.tokens.reshape(-1)[keep], full_hidden[keep], positions.reshape(-1)[keep],
                                  [n + 1 for n in accepted]), target)


class OneRowForwards:
    """:class:`Forwards` for one sequence in row 0 of a contiguous latent cache (the
    single-request ``generate`` loop): its packed entries are simply one chunk."""

    def __init__(self, model: DeepseekV3, cache: LatentCache) -> None:
        self.model, self.cache = model, cache

    def main(self, ids, positions, counts):
        out = self.model(ids.unsqueeze(0), positions.unsqueeze(0), self.cache)
        return out.logits[0], out.hidden[0]

    def mtp(self, ids, hidden, positions, counts):
        out = self.model.mtp_forward(ids.unsqueeze(0), hidden.unsqueeze(0), positions.unsqueeze(0), self.cache)
        return out.logits[0], out.hidden[0]
