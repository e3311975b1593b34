"""The chat turn: Gradio message history in, a streamed answer with Reasoning and Sources out.

Gradio 6 Chatbot messages are dicts {"role", "content", "metadata"}; `content` is a string when
we produce it and a list of blocks ({"type": "text", "text": ...}, files, components) when
Gradio hands history back to us, so every reader here accepts both shapes.

One answer appends, in order: the user's message, an optional collapsible "Reasoning" message
(DeepSeek-R1 style reasoning deltas), the answer, and a collapsible "Sources" message that
lists each [n] with its file, heading path, similarity and rank, and a snippet.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterator
from typing import Any

from pymilvus import MilvusException

from rag.llm import Delta, LLMError
from rag.pipeline import HISTORY_TURNS, NO_LLM_NOTE, Finished, Retrieved
from rag.store import StoreError
from rag.types import Hit
from ui.backends import Backend, Prober
from ui.errors import explain
from ui.service import KnowledgeBase
from ui.snippets import snippet_markdown

SOURCES_TITLE = "Sources"
REASONING_TITLE = "Reasoning"
RETRIEVAL_ONLY_CHOSEN = (
    "Retrieval-only mode is selected in the sidebar, so no language model was asked: "
    "here are the most relevant passages."
)
CITATION_RE = re.compile(r"\[(\d+)\]")
Message = dict[str, Any]


def ingest_first(collection: str) -> str:
    return (
        f"The knowledge base **{collection}** is empty: ingest documents first. Open the "
        f"**Knowledge base** tab and upload .md, .markdown or .txt files (or a .zip of them), "
        f"or run `rag-ingest docs/` while the UI is stopped."
    )


def content_text(content: Any) -> str:
    """Plain text of message content: a string, one block, or a list of blocks/strings."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type", "text") == "text" and isinstance(content.get("text"), str):
            return content["text"]
        return ""  # files and components carry no text the rewriter could use
    if isinstance(content, (list, tuple)):
        return "\n".join(t for t in (content_text(c) for c in content) if t)
    return str(getattr(content, "text", "") or "")


def _title(message: Any) -> str | None:
    meta = message.get("metadata") if isinstance(message, dict) else getattr(message, "metadata", None)
    return (meta or {}).get("title") if isinstance(meta, dict) else None


def _role(message: Any) -> str:
    return message.get("role", "") if isinstance(message, dict) else getattr(message, "role", "")


def _content(message: Any) -> Any:
    return message.get("content") if isinstance(message, dict) else getattr(message, "content", None)


def history_pairs(messages: list[Any] | None, turns: int = HISTORY_TURNS) -> list[tuple[str, str]]:
    """The last `turns` (question, answer) pairs; Sources and Reasoning messages are left out."""
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    answer: list[str] = []
    for m in messages or []:
        if _title(m):  # a collapsible panel, not part of what was said
            continue
        role, text = _role(m), content_text(_content(m)).strip()
        if role == "user":
            if question is not None:
                pairs.append((question, "\n".join(answer)))
            question, answer = text, []
        elif role == "assistant" and question is not None and text:
            answer.append(text)
    if question is not None:
        pairs.append((question, "\n".join(answer)))
    return [p for p in pairs if p[0]][-turns:]


def _escape(text: str) -> str:
    """Markdown-inert text: a snippet must not turn into headings, links or HTML."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+\-!|>~])", r"\\\1", text)


def cited_numbers(answer: str) -> set[int]:
    return {int(n) for n in CITATION_RE.findall(answer)}


def format_sources(hits: list[Hit], answer: str = "") -> str:
    """Markdown list: [n] path › heading, similarity and rank, and a snippet; cited ones are marked."""
    cited = cited_numbers(answer)
    lines = []
    for n, h in enumerate(hits, 1):
        heading = f" › {_escape(h.header_path)}" if h.header_path else ""
        mark = " · **cited**" if n in cited else ""
        quoted = "\n".join(f"> {ln}" if ln else ">" for ln in snippet_markdown(h.text).splitlines())
        lines.append(f"**[{n}]** `{h.source}`{heading} — {h.score_label()}{mark}\n{quoted}")
    return "\n\n".join(lines)


def sources_message(hits: list[Hit], answer: str, searched: str, question: str,
                    open_panel: bool = False, seconds: float | None = None) -> Message:
    """The collapsible Sources message; `open_panel` when the passages are the answer."""
    meta: dict[str, Any] = {"title": f"{SOURCES_TITLE} ({len(hits)})"}
    if searched.strip() != question.strip():
        meta["log"] = f"searched for: {searched}"  # shows what the follow-up was rewritten to
    if not open_panel:
        meta["status"] = "done"  # Gradio starts a "done" panel collapsed
    if seconds is not None:
        meta["duration"] = round(seconds, 2)
    return {"role": "assistant", "content": format_sources(hits, answer), "metadata": meta}


def respond(
    kb: KnowledgeBase, prober: Prober, backend: Backend, message: str, history: list[Any] | None,
    collection: str, top_k: int, score_floor: float | None, mode: str, llm_configured: bool = False,
) -> Iterator[list[Message]]:
    """Yield the whole chat history after each step, so Gradio streams the diff to the browser.

    `llm_configured`: an LLM exists but the user picked retrieval-only, so the pipeline's
    "no LLM is configured" note would be wrong and is replaced.
    """
    history = list(history or [])
    question = (message or "").strip()
    if not question:
        yield history
        return
    t0 = time.perf_counter()
    shown = [*history, {"role": "user", "content": question}]
    answer: Message = {"role": "assistant", "content": ""}
    reasoning: Message | None = None
    sources: Message | None = None

    def assemble() -> list[Message]:
        # No empty answer bubble: until text arrives, Gradio shows its own "typing" indicator.
        return [*shown, *([reasoning] if reasoning else []), *([answer] if answer["content"] else []),
                *([sources] if sources else [])]

    def warn(text: str) -> list[Message]:
        answer["content"] = (answer["content"] + "\n\n" if answer["content"] else "") + f"⚠️ {text}"
        if reasoning is not None:
            reasoning["metadata"]["status"] = "done"
        return assemble()

    if backend.problem:
        yield warn(f"Cannot use the {backend.label}: {backend.problem}.")
        return
    try:
        if not kb.exists(collection):
            answer["content"] = ingest_first(collection)
            yield assemble()
            return
        pipe = kb.pipeline(collection, backend, prober.model_for(backend), top_k, score_floor, mode)
    except (StoreError, MilvusException) as e:
        yield warn(explain(e, collection, kb.rag_config.milvus_uri))
        return
    yield assemble()  # the question shows at once, then the answer streams in below it

    retrieved: Retrieved | None = None
    open_panel = backend.kind == "retrieval-only"
    try:
        for ev in pipe.ask(question, history=history_pairs(history)):
            if isinstance(ev, Retrieved):
                retrieved = ev
                if ev.hits:
                    sources = sources_message(ev.hits, "", ev.question, question, open_panel)
            elif isinstance(ev, Delta) and ev.kind == "reasoning":
                if reasoning is None:
                    reasoning = {"role": "assistant", "content": "",
                                 "metadata": {"title": REASONING_TITLE, "status": "pending"}}
                reasoning["content"] += ev.text
            elif isinstance(ev, Delta):
                if reasoning is not None:
                    reasoning["metadata"]["status"] = "done"  # the answer has started
                answer["content"] += ev.text
            elif isinstance(ev, Finished):
                answer["content"] = ev.answer
                if reasoning is not None:
                    reasoning["metadata"]["status"] = "done"
                if ev.hits and retrieved is not None:
                    sources = sources_message(ev.hits, ev.answer, retrieved.question, question,
                                              open_panel, seconds=time.perf_counter() - t0)
            if llm_configured and answer["content"] == NO_LLM_NOTE:
                answer["content"] = RETRIEVAL_ONLY_CHOSEN
            yield assemble()
    except LLMError as e:  # shown in the chat, not as a bare error toast
        yield warn(str(e))
    except (StoreError, MilvusException) as e:
        yield warn(explain(e, collection, kb.rag_config.milvus_uri))
