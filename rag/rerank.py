"""Optional LLM stages around retrieval: a listwise reranker and a HyDE query passage.

Both go through the configured OpenAI-compatible LLM (DeepSeek API or our model host) and
are off by default: no cross-encoder that ships its weights inside a wheel was found on PyPI
(flashrank and the rest fetch theirs from a model hub at run time), and their quality is
unmeasured here because no LLM with real weights is reachable (docs/benchmarks.md says how
to measure it). A bad or failed LLM reply never loses the first-stage ranking.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Protocol

from rag.config import RagConfig
from rag.llm import LLMClient, LLMError
from rag.types import Hit

log = logging.getLogger(__name__)

RERANK_SYSTEM = (
    "You rank passages by how well they answer a question. Reply with the passage numbers only, "
    "best first, separated by commas, e.g. 3, 1, 2. Include every passage."
)
HYDE_SYSTEM = (
    "Write one short passage (3-4 sentences) from technical documentation that answers the "
    "question. Reply with the passage only."
)
PASSAGE_TOKENS = 300  # per passage: the start of a section says what it is about


class Reranker(Protocol):
    """Reorders first-stage hits; returns at most k of them, best first."""

    def rerank(self, question: str, hits: Sequence[Hit], k: int) -> list[Hit]: ...


def parse_ranking(reply: str, n: int) -> list[int] | None:
    """0-based passage order from a reply such as "[3] > [1], 2"; None when it names no passage.

    Numbers out of range and repeats are ignored; passages the reply leaves out keep their
    first-stage order after the ranked ones, so nothing is lost.
    """
    order: list[int] = []
    for m in re.findall(r"\d+", reply):
        i = int(m) - 1
        if 0 <= i < n and i not in order:
            order.append(i)
    if not order:
        return None
    return order + [i for i in range(n) if i not in order]


class LLMReranker:
    """Listwise rerank in one request: numbered passages in, a ranked number list out.

    `token_budget` caps the passages' tokens (counted with `count_tokens`); passages that do not
    fit are not sent and follow the ranked ones in their first-stage order.
    """

    def __init__(self, client: LLMClient, count_tokens: Callable[[str], int], token_budget: int = 3000):
        self.client = client
        self.count_tokens = count_tokens
        self.token_budget = token_budget
        self._warned = False

    def _warn(self, why: str) -> None:
        if not self._warned:  # once per reranker: a misbehaving LLM would otherwise flood the log
            log.warning("LLM rerank skipped, keeping the retrieval order: %s", why)
            self._warned = True

    def _passages(self, hits: Sequence[Hit]) -> list[str]:
        blocks, spent = [], 0
        for n, h in enumerate(hits, 1):
            text = f"{h.header_path}\n{h.text}" if h.header_path else h.text
            words = text.split()
            while words and self.count_tokens(" ".join(words)) > PASSAGE_TOKENS:
                words = words[: int(len(words) * 0.8)]
            block = f"[{n}] {' '.join(words)}"
            cost = self.count_tokens(block)
            if spent + cost > self.token_budget:
                break
            blocks.append(block)
            spent += cost
        return blocks

    def rerank(self, question: str, hits: Sequence[Hit], k: int) -> list[Hit]:
        blocks = self._passages(hits)
        if len(blocks) < 2:
            return list(hits[:k])
        messages = [{"role": "system", "content": RERANK_SYSTEM},
                    {"role": "user", "content": f"Question: {question}\n\nPassages:\n" + "\n\n".join(blocks)}]
        try:
            reply = self.client.complete(messages, max_tokens=4 * len(blocks) + 16, temperature=0.0)
        except LLMError as e:
            self._warn(str(e))
            return list(hits[:k])
        order = parse_ranking(reply, len(blocks))
        if order is None:
            self._warn(f"the reply names no passage number: {reply[:80]!r}")
            return list(hits[:k])
        return ([hits[i] for i in order] + list(hits[len(blocks):]))[:k]


class HydeWriter:
    """Hypothetical document embeddings: the LLM writes a passage that would answer the question;
    the query vector becomes the mean of the question's and that passage's embeddings."""

    def __init__(self, client: LLMClient, max_tokens: int = 160):
        self.client = client
        self.max_tokens = max_tokens
        self._warned = False

    def passage(self, question: str) -> str | None:
        """The hypothetical passage, or None (one warning) when the LLM fails or says nothing."""
        messages = [{"role": "system", "content": HYDE_SYSTEM}, {"role": "user", "content": question}]
        try:
            text = self.client.complete(messages, max_tokens=self.max_tokens, temperature=0.0).strip()
        except LLMError as e:
            text, why = "", str(e)
        else:
            why = "empty reply"
        if not text and not self._warned:
            log.warning("HyDE skipped, searching with the question alone: %s", why)
            self._warned = True
        return text or None


def llm_stages(config: RagConfig, client: LLMClient | None) -> dict[str, object]:
    """Retriever keyword arguments for the LLM stages the config asks for; none without an LLM."""
    if client is None:
        if config.rerank != "off" or config.hyde:
            log.warning("RAG_RERANK / RAG_HYDE need an LLM (LLM_BASE_URL or DEEPSEEK_API_KEY); retrieving without them")
        return {}
    from rag.prompt import count_tokens  # DeepSeek's tokenizer: the budget in the model's own tokens

    out: dict[str, object] = {}
    if config.rerank == "llm":
        out["reranker"] = LLMReranker(client, count_tokens, config.rerank_tokens)
        out["rerank_candidates"] = config.rerank_candidates
    if config.hyde:
        out["hyde"] = HydeWriter(client)
    return out
