"""The chat tab's handlers: answering into a saved conversation, the chat list, feedback, citations.

Every handler finds its user with `ui.people.user_of` (the login, else the browser id) and
touches only that user's rows of the `History` database. Gradio injects `gr.Request` and
`gr.LikeData` by annotation, so these are plain bound methods wired up in `ui.app`.
"""

from __future__ import annotations

import html
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
from pymilvus import MilvusException

from rag.store import StoreError
from rag.types import Hit
from ui import citations
from ui.backends import LABELS, Prober, resolve
from ui.chat import content_text, respond, unlink
from ui.config import UIConfig
from ui.errors import explain
from ui.history import History, Passage, Turn, export_markdown, qa_lines, settings_line
from ui.people import user_of
from ui.service import KnowledgeBase


class ChatHandlers:
    """Closures of the chat tab over the process' shared handles."""

    def __init__(self, kb: KnowledgeBase, ui: UIConfig, prober: Prober, db: History, llm_configured: bool):
        self.kb, self.ui, self.prober, self.db = kb, ui, prober, db
        self.rag = kb.rag_config
        self.llm_configured = llm_configured

    def chat(self, message: str, history: list, collection: str, top_k: float, score_floor: float,
             mode: str, backend: str, local_url: str, conv_id: str | None, browser_id: str | None = None,
             request: gr.Request = None):  # type: ignore[assignment]
        be = resolve(backend, self.ui, self.rag, local_url)
        question = (message or "").strip()
        if not question:
            yield history, "", conv_id
            return
        user = user_of(request, browser_id)
        conv = self.db.get(user, conv_id)
        conv_id = conv.id if conv else uuid.uuid4().hex  # known before streaming, so Stop keeps the chat
        settings = {"backend": backend, "backend_label": LABELS.get(backend, backend), "model": None,
                    "top_k": int(top_k), "mode": mode, "score_floor": score_floor, "collection": collection,
                    "local_url": local_url}
        if be.kind != "retrieval-only" and not be.problem:
            settings["model"] = self.prober.model_for(be)
        finished: dict = {}
        msgs = history
        try:
            for msgs in respond(self.kb, self.prober, be, question, history, collection, int(top_k), score_floor, mode,
                                self.llm_configured, made_with=settings_line(settings),
                                done=lambda a, h: finished.update(answer=a, hits=h)):
                yield msgs, "", conv_id  # "" empties the question box as soon as the turn starts
        finally:  # also when Stop closes the stream: what was shown is what is kept
            answer = finished.get("answer") or _last_answer(msgs)
            passages = [Passage.of(n, h) for n, h in enumerate(finished.get("hits") or [], 1)]
            turn = Turn(question, answer, collection, settings, passages)
            self.db.save(user, conv_id, msgs, [*(conv.turns if conv else []), turn], settings)

    # -- saved chats -----------------------------------------------------------------------

    def chat_choices(self, user: str) -> list[tuple[str, str]]:
        return [(title, cid) for cid, title, _ in self.db.list(user)]

    def list_chats(self, conv_id: str | None, browser_id: str | None = None, request: gr.Request = None):  # type: ignore[assignment]
        user = user_of(request, browser_id)
        return gr.update(choices=self.chat_choices(user), value=conv_id)

    def open_chat(self, conv_id: str | None, browser_id: str | None = None, request: gr.Request = None):  # type: ignore[assignment]
        conv = self.db.get(user_of(request, browser_id), conv_id)
        if conv is None:
            return [], None, "", *(gr.update() for _ in range(6))
        s = conv.settings
        return (conv.messages, conv.id, conv.title, s.get("collection"), s.get("top_k"), s.get("score_floor"),
                s.get("mode"), s.get("backend"), s.get("local_url"))

    def rename_chat(self, conv_id: str | None, title: str, browser_id: str | None = None, request: gr.Request = None):  # type: ignore[assignment]
        user = user_of(request, browser_id)
        if not conv_id or not self.db.rename(user, conv_id, title or ""):
            gr.Warning("Open a saved chat and type a new title first.")
        return gr.update(choices=self.chat_choices(user), value=conv_id)

    def delete_chat(self, conv_id: str | None, browser_id: str | None = None, request: gr.Request = None):  # type: ignore[assignment]
        user = user_of(request, browser_id)
        if conv_id:
            self.db.delete(user, conv_id)
        return gr.update(choices=self.chat_choices(user), value=None), [], None, ""

    def export_chat(self, conv_id: str | None, browser_id: str | None = None, request: gr.Request = None):  # type: ignore[assignment]
        conv = self.db.get(user_of(request, browser_id), conv_id)
        if conv is None:
            raise gr.Error("Ask a question first: only saved chats can be exported.")
        return gr.update(value=_export_file(f"chat-{conv.id[:8]}.md", export_markdown(conv)), visible=True)

    def export_qa(self, browser_id: str | None = None, request: gr.Request = None):  # type: ignore[assignment]
        lines = qa_lines(self.db.feedback_rows(user_of(request, browser_id)))
        if not lines:
            raise gr.Error("No liked answers yet: press 👍 under a good answer to add it to the QA file.")
        text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
        return gr.update(value=_export_file("feedback-qa.jsonl", text), visible=True)

    def feedback(self, conv_id: str | None, messages: list, browser_id: str | None, data: gr.LikeData,
                 request: gr.Request):
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        turn = sum(1 for m in (messages or [])[: index + 1] if _role(m) == "user") - 1
        liked = data.liked if isinstance(data.liked, bool) else None
        try:
            self.db.feedback(user_of(request, browser_id), conv_id or "", turn, liked)
        except KeyError:
            gr.Warning("This answer is not saved yet; wait until it has finished.")

    def conversations_api(self, browser_id: str = "", request: gr.Request = None) -> list[dict]:  # type: ignore[assignment]
        """The caller's saved chats, newest first: id, title, updated (Unix time), messages."""
        user = user_of(request, browser_id)
        return [{"id": cid, "title": title, "updated": updated, "messages": self.db.get(user, cid).messages}
                for cid, title, updated in self.db.list(user)]

    # -- citations ---------------------------------------------------------------------------

    def _cited(self, ref: str) -> tuple[str, Hit, list[Hit]]:
        """The collection, the cited chunk and all chunks of its file, for a #cite: reference."""
        coll, chunk_id = citations.parse_ref(ref)
        view = self.kb.store(coll)
        cited = view.chunk(chunk_id)
        if cited is None:
            raise citations.CitationError("this passage is no longer in the knowledge base (re-ingested or deleted)")
        return coll, cited, view.source_chunks(cited.source)

    def _problem(self, e: Exception, ref: str) -> str:
        msg = str(e) if isinstance(e, citations.CitationError) else explain(e, ref.split(":")[0], self.rag.milvus_uri)
        return f"<p>⚠️ {html.escape(msg)}</p>"

    def open_citation(self, ref: str):
        """The cited passage in its section, shown in the side panel (which this opens)."""
        try:
            _, cited, chunks = self._cited(ref)
            return citations.passage_html(cited, chunks), gr.update(visible=True), ref
        except (citations.CitationError, StoreError, MilvusException) as e:
            return self._problem(e, ref), gr.update(visible=True), ref

    def open_file(self, ref: str):
        """The whole file of the cited passage, the passage highlighted."""
        try:
            coll, cited, chunks = self._cited(ref)
            return citations.file_html(cited, chunks, self.ui.uploads_dir / coll)
        except (citations.CitationError, StoreError, MilvusException) as e:
            return self._problem(e, ref)


def _role(message: Any) -> str:
    return message.get("role", "") if isinstance(message, dict) else getattr(message, "role", "")


def _last_answer(messages: list) -> str:
    """The text of the last answer shown (a stopped or failed turn has no Finished event)."""
    for m in reversed(messages or []):
        meta = m.get("metadata") if isinstance(m, dict) else None
        if _role(m) == "user":
            return ""
        if _role(m) == "assistant" and not (meta or {}).get("title"):
            return unlink(content_text(m.get("content") if isinstance(m, dict) else getattr(m, "content", "")))
    return ""


def _export_file(name: str, text: str) -> str:
    """A download for one export, in a fresh folder under the system temp dir: Gradio serves
    files from there whatever RAG_DATA_DIR is (a data dir outside the working folder it refuses)."""
    path = Path(tempfile.mkdtemp(prefix="rag-ui-export-")) / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def export_all_qa(ui: UIConfig, out: Path) -> int:
    """`rag-ui --export-qa FILE`: the operator's export of everyone's liked answers."""
    if not ui.history_path.is_file():
        print(f"rag-ui: no saved chats at {ui.history_path}; check --data-dir (RAG_DATA_DIR)", file=sys.stderr)
        return 2
    db = History(ui.history_path)
    try:
        lines = qa_lines(db.feedback_rows())
    finally:
        db.close()
    out.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    print(f"wrote {len(lines)} questions to {out}; evaluate with: rag-eval qa {out} --collection NAME --uri URI")
    return 0
