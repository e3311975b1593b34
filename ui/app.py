"""`rag-ui` / `python -m ui`: the Gradio web UI (chat, saved chats, settings sidebar, knowledge-base tab).

The process opens ONE `KnowledgeBase` (one Milvus client, one embedder) and every browser
session shares it. Public API endpoints have pinned names so `gradio_client` scripts keep
working across UI changes: /chat, /ingest, /stats, /kb_view, /delete_source, /status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a self-hosted tool phones no one

import gradio as gr  # noqa: E402  (after the analytics switch above)
from pymilvus import MilvusException  # noqa: E402

from ingest.config import IngestConfig  # noqa: E402
from ingest.loader import source_name  # noqa: E402
from rag.config import RagConfig  # noqa: E402
from rag.settings import SettingsError, settings_table  # noqa: E402
from rag.store import StoreError  # noqa: E402
from ui import citations, kb_files, views  # noqa: E402
from ui.backends import LABELS, Prober, default_backend, default_local_url, resolve  # noqa: E402
from ui.chats import ChatHandlers, export_all_qa  # noqa: E402
from ui.config import BACKENDS, UIConfig  # noqa: E402
from ui.errors import explain  # noqa: E402
from ui.history import History  # noqa: E402
from ui.people import BROWSER_KEY, browser_secret, new_browser_id  # noqa: E402
from ui.service import KnowledgeBase, check_collection_name  # noqa: E402
from ui.uploads import UPLOADS_PREFIX, UploadLimits, store_uploads, upload_source_namer, uploaded_file  # noqa: E402

log = logging.getLogger("rag-ui")
STATUS_MAX_AGE = 30.0  # seconds a timer tick may reuse collection stats


def _theme() -> gr.themes.Base:
    # System fonts only: the default theme pulls Google Fonts, which an offline host cannot reach.
    return gr.themes.Soft(
        primary_hue="indigo", secondary_hue="slate",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


def launch_kwargs(ui: UIConfig) -> dict[str, Any]:
    """Keyword arguments of `Blocks.launch` that `main` and the tests share."""
    return {
        "server_name": ui.host, "server_port": ui.port, "auth": ui.auth,
        "auth_message": "Sign in to the docs Q&A" if ui.auth else None,
        # Gradio refuses bigger uploads before they reach the disk; ui.uploads checks the rest.
        "max_file_size": int(ui.max_zip_mb * 1e6), "theme": _theme(), "css": views.CSS + citations.CSS,
        "head": citations.CLICK_JS,
        "ssr_mode": False, "footer_links": ["api"], "show_error": True,
    }


def build_app(kb: KnowledgeBase, ui: UIConfig, history: History | None = None) -> gr.Blocks:
    """The Blocks app around a shared KnowledgeBase; `launch(**launch_kwargs(ui))` serves it.

    `history`: the conversations database (default: `ui.history_path`)."""
    rag = kb.rag_config
    chats_db = history or History(ui.history_path)
    prober = Prober(timeout=ui.probe_timeout, ttl=max(5.0, ui.status_every / 2))
    limits = UploadLimits(
        max_file_bytes=int(kb.ingest_config.max_file_mb * 1e6), max_zip_bytes=int(ui.max_zip_mb * 1e6),
        max_unzipped_bytes=int(ui.max_unzipped_mb * 1e6), max_ratio=ui.max_zip_ratio,
        max_members=ui.max_zip_files,
    )
    floor = rag.score_floor if rag.score_floor is not None else kb.embedder.score_floor
    collections = sorted({rag.collection, *kb.collections()})
    llm_configured = bool(rag.deepseek_api_key or rag.llm_base_url)

    h = ChatHandlers(kb, ui, prober, chats_db, llm_configured)

    # -- handlers (closures over the shared handles) ----------------------------------------


    def kb_view(collection: str):
        """The collection's settings, its files table and the file choices for one collection."""
        try:
            stats = kb.stats(collection)
            view = kb.store(collection)
            states = view.file_states() if stats is not None else {}
        except (StoreError, MilvusException) as e:
            return f"⚠️ {explain(e, collection, rag.milvus_uri)}", [], gr.update(choices=[], value=None)
        rows = kb_files.file_rows(stats, states, chats_db.ingest_log(view.collection), ui.uploads_dir / view.collection)
        return (kb_files.collection_markdown(collection, stats), rows,
                gr.update(choices=[r[0] for r in rows], value=None))

    def file_chunks(collection: str, source: str | None):
        """Every stored chunk of one file, for the chunk browser."""
        if not source:
            raise gr.Error("Choose a file first.")
        try:
            return kb_files.chunk_rows(kb.store(collection).source_chunks(source))
        except (StoreError, MilvusException) as e:
            raise gr.Error(explain(e, collection, rag.milvus_uri)) from e

    def log_ingest(collection: str, results: list[tuple[str, str, str]]) -> None:
        chats_db.record_ingest(collection, results, datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def record(collection: str, root: Path, saved: list[Path], report, error: str | None) -> None:
        """The ingest log: each saved file indexed, skipped (with the loader's reason) or failed."""
        name = upload_source_namer(root)
        skipped = dict(report.skipped) if report is not None else {}
        results = []
        for path in saved:
            src = name(path)
            if error:
                results.append((src, "failed", error))
            elif src in skipped:
                results.append((src, "skipped", skipped[src]))
            else:
                results.append((src, "indexed", ""))
        log_ingest(collection, results)

    def reingest(collection: str, source: str | None, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        """Index one file again from scratch: its chunks are deleted, then the file is ingested."""
        if not source:
            return "Choose a file to re-ingest first.", *kb_view(collection)
        root = ui.uploads_dir / collection
        path = citations.source_path(source, root)
        if path is None:
            return (f"**{source}** is not on this server's disk, so it cannot be re-ingested here; "
                    f"run `rag-ingest` where it lives."), *kb_view(collection)
        progress(0, desc=f"Re-ingesting {source}")
        try:
            kb.delete_source(collection, source)
            namer = upload_source_namer(root) if source.startswith(UPLOADS_PREFIX) else source_name
            report = kb.ingest([path], collection, name=namer)
        except (StoreError, FileNotFoundError, SettingsError, MilvusException) as e:
            log_ingest(collection, [(source, "failed", explain(e, collection, rag.milvus_uri))])
            return f"⚠️ re-ingest failed: {explain(e, collection, rag.milvus_uri)}", *kb_view(collection)
        skipped = dict(report.skipped)
        log_ingest(collection, [(source, "skipped", skipped[source]) if source in skipped else (source, "indexed", "")])
        return f"Re-ingested **{source}**: {report.chunks_written} chunks written.", *kb_view(collection)

    def stats_api(collection: str = rag.collection) -> dict:
        """Collection stats as JSON: files, chunks, embedder, dim, last_ingest and sources."""
        try:
            stats = kb.stats(collection)
        except (StoreError, MilvusException) as e:
            raise gr.Error(explain(e, collection, rag.milvus_uri)) from e
        return {"collection": collection, "exists": False} if stats is None else {**stats, "exists": True}

    def status(backend: str, local_url: str, collection: str):
        backends = [resolve(k, ui, rag, local_url) for k in BACKENDS]
        probes = prober.probe_all(backends)
        stats, error = None, None
        try:
            stats = kb.stats(collection, max_age=STATUS_MAX_AGE)
        except (StoreError, MilvusException) as e:
            error = explain(e, collection, rag.milvus_uri)
        chosen = BACKENDS.index(backend) if backend in BACKENDS else 0
        return (views.status_html(backends, probes, backend, collection, stats, error),
                views.banner(backends[chosen], probes[chosen], collection, stats, llm_configured))

    # Gradio finds its progress tracker by this default value; track_tqdm relays ingest's own bars.
    def ingest_files(files: list[str] | None, collection: str,
                     progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        try:
            collection = check_collection_name(collection)
        except StoreError as e:
            return f"⚠️ {e}", *kb_view(rag.collection), None
        progress(0, desc="Checking uploads")
        root = ui.uploads_dir / collection
        result = store_uploads(files or [], root, limits)
        report, note, warnings = None, "", []
        if result.saved:
            progress(0.05, desc=f"Ingesting {len(result.saved)} files")
            error = None
            try:
                report = kb.ingest(result.saved, collection, warn=warnings.append, name=upload_source_namer(root))
            except (StoreError, FileNotFoundError, SettingsError, MilvusException) as e:
                error = explain(e, collection, rag.milvus_uri)
                note = f"⚠️ ingest failed: {error}\n\n"
            record(collection, root, result.saved, report, error)
        md = note + views.ingest_markdown(report, len(result.saved), result.rejected, warnings)
        return md, *kb_view(collection), None  # None clears the upload box for the next batch

    def delete_source(collection: str, source: str | None):
        if not source:
            return "Choose a source to delete first.", *kb_view(collection)
        try:
            n = kb.delete_source(collection, source)
        except (StoreError, MilvusException) as e:
            return f"⚠️ {explain(e, collection, rag.milvus_uri)}", *kb_view(collection)
        if n == 0:
            return f"**{source}** is not a source of **{collection}**; nothing was deleted.", *kb_view(collection)
        chats_db.forget_ingest(collection, source)
        note = f"Deleted **{source}** ({n} chunks) from **{collection}**."
        # An uploaded copy goes too, or the next upload batch would not bring it back as "new".
        path = uploaded_file(ui.uploads_dir / collection, source)
        if path is not None:
            path.unlink()
            note += " Its uploaded file was removed as well."
        else:
            note += " Files on disk are untouched: a later `rag-ingest` of their folder adds them back."
        return note, *kb_view(collection)

    # -- layout ----------------------------------------------------------------------------

    with gr.Blocks(title="Docs Q&A", fill_height=True, fill_width=True, delete_cache=(3600, 3600)) as demo:
        browser_id = gr.BrowserState("", storage_key=BROWSER_KEY, secret=browser_secret(Path(ui.data_dir)))
        conv_id = gr.State(None)
        with gr.Sidebar(open=True, width=340, elem_id="settings"):
            gr.Markdown("### Chats")
            chats = gr.Dropdown([], label="Past chats", elem_id="chats", allow_custom_value=True)  # choices are per user
            with gr.Row(equal_height=True):
                chat_title = gr.Textbox(placeholder="New title", show_label=False, max_lines=1, scale=3,
                                        elem_id="chat-title")
                rename_btn = gr.Button("Rename", size="sm", scale=1, min_width=70)
            with gr.Row():
                export_btn = gr.Button("Export .md", size="sm", elem_id="export-chat")
                delete_chat_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-chat")
            qa_btn = gr.Button("Export liked answers (QA file)", size="sm", elem_id="export-qa")
            exported = gr.File(label="Download", visible=False, interactive=False, elem_id="exported")
            gr.Markdown("### Answer with")
            backend = gr.Radio([(LABELS[k], k) for k in BACKENDS], value=default_backend(ui, rag),
                               show_label=False, elem_id="backend")
            local_url = gr.Textbox(default_local_url(rag), label="Model host URL", max_lines=1,
                                   info="OpenAI-compatible base URL of the local model host")
            status_box = gr.HTML(elem_id="status")
            check = gr.Button("Check backends now", size="sm")
            gr.Markdown("### Retrieval")
            collection = gr.Dropdown(collections, value=rag.collection, label="Collection",
                                     allow_custom_value=True, elem_id="collection")
            top_k = gr.Slider(1, 20, value=rag.top_k, step=1, label="Top-k passages")
            score_floor = gr.Slider(0.0, 1.0, value=round(floor, 2), step=0.01, label="Score floor",
                                    info="drop passages less similar than this")
            mode = gr.Radio(["dense", "bm25", "hybrid"], value=rag.mode, label="Retrieval mode", elem_id="mode")

        gr.HTML(views.HEADER)
        banner = gr.HTML(elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"), gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(
                        height="64vh", show_label=False, elem_id="chatbot", buttons=["copy"],
                        feedback_options=("Like", "Dislike"), layout="bubble",
                        placeholder="**Ask a question about your documents.**<br>"
                                    "Answers cite passages as [1], [2]…: click one to read it in its section.",
                    )
                    with gr.Row(equal_height=True):
                        question = gr.Textbox(placeholder="Ask a question about your docs…", show_label=False,
                                              scale=8, max_lines=6, autofocus=True, elem_id="question")
                        send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, elem_id="stop")
                        new_chat = gr.Button("New chat", scale=1, min_width=120, elem_id="new-chat")
                with gr.Column(scale=2, visible=False, elem_id="passage-panel") as passage_panel:
                    gr.Markdown("#### Cited passage")
                    passage = gr.HTML(elem_id="passage")
                    with gr.Row():
                        whole_file = gr.Button("Open the whole file", size="sm", elem_id="open-file")
                        close_passage = gr.Button("Close", size="sm", elem_id="close-passage")
                cite_ref = gr.Textbox(visible="hidden", elem_id="cite-ref")
                cite_open = gr.Button(visible="hidden", elem_id="cite-open")
            with gr.Tab("Knowledge base", id="kb"):
                stats_md = gr.Markdown(elem_id="kb-stats")
                upload = gr.File(file_count="multiple", type="filepath", elem_id="upload",
                                 label="Upload .md, .markdown, .txt files or a .zip of them")
                ingest_btn = gr.Button("Ingest", variant="primary", elem_id="ingest")
                ingest_md = gr.Markdown(elem_id="ingest-report", min_height=80)
                sources_df = gr.Dataframe(headers=kb_files.FILE_HEADERS,
                                          datatype=["str", "number", "str", "str", "str", "str"],
                                          interactive=False, label="Files", wrap=True, elem_id="kb-sources")
                with gr.Row(equal_height=True):
                    source_dd = gr.Dropdown([], label="File", scale=4, allow_custom_value=True, elem_id="kb-file")
                    browse_btn = gr.Button("Browse chunks", scale=1, elem_id="browse-chunks")
                    reingest_btn = gr.Button("Re-ingest", scale=1, elem_id="reingest")
                    delete_btn = gr.Button("Delete source", variant="stop", scale=1)
                delete_md = gr.Markdown(elem_id="kb-action")
                chunks_df = gr.Dataframe(headers=kb_files.CHUNK_HEADERS, datatype=["number", "str", "number", "str"],
                                         interactive=False, label="Chunks of the chosen file", wrap=True,
                                         elem_id="kb-chunks")
        timer = gr.Timer(ui.status_every or 1.0, active=ui.status_every > 0)

        # -- events --------------------------------------------------------------------------
        settings = [collection, top_k, score_floor, mode, backend, local_url]
        answer = gr.on(
            [question.submit, send.click], h.chat, [question, chatbot, *settings, conv_id, browser_id],
            [chatbot, question, conv_id], api_name="chat", concurrency_limit=ui.concurrency,
        )
        stop.click(None, None, None, cancels=[answer], api_visibility="private")
        who = [browser_id]
        list_args = dict(fn=h.list_chats, inputs=[conv_id, *who], outputs=[chats], api_visibility="private")
        answer.then(**list_args)
        stop.click(**list_args)  # a stopped answer is saved too
        new_chat.click(lambda: ([], "", None, ""), None, [chatbot, question, conv_id, chat_title],
                       api_visibility="private").then(**list_args)
        demo.load(new_browser_id, [browser_id], [browser_id], api_visibility="private").then(**list_args)
        chats.input(h.open_chat, [chats, *who], [chatbot, conv_id, chat_title, *settings], api_name="open_chat")
        rename_btn.click(h.rename_chat, [conv_id, chat_title, *who], [chats], api_name="rename_chat")
        delete_chat_btn.click(h.delete_chat, [conv_id, *who], [chats, chatbot, conv_id, chat_title],
                              api_name="delete_chat")
        export_btn.click(h.export_chat, [conv_id, *who], [exported], api_name="export_chat")
        qa_btn.click(h.export_qa, who, [exported], api_name="export_qa")
        chatbot.like(h.feedback, [conv_id, chatbot, *who], None, api_visibility="private")
        gr.api(h.conversations_api, api_name="conversations", concurrency_limit=None)
        cite_open.click(h.open_citation, [cite_ref], [passage, passage_panel, cite_ref], api_name="citation")
        whole_file.click(h.open_file, [cite_ref], [passage], api_name="citation_file")
        close_passage.click(lambda: gr.update(visible=False), None, [passage_panel], api_visibility="private")

        kb_outputs = [stats_md, sources_df, source_dd]
        status_args = dict(fn=status, inputs=[backend, local_url, collection], outputs=[status_box, banner],
                           concurrency_limit=None)
        # Public endpoints first: a private listener of the same function registered earlier
        # would take the plain name and push the public one to "status_2".
        gr.on([demo.load, check.click, backend.change, local_url.submit, local_url.blur, collection.change],
              **status_args, api_name="status")
        gr.on([demo.load, collection.change], kb_view, [collection], kb_outputs, api_name="kb_view",
              concurrency_limit=None)
        ingest_evt = ingest_btn.click(ingest_files, [upload, collection], [ingest_md, *kb_outputs, upload],
                                      api_name="ingest", concurrency_limit=1, show_progress_on=[ingest_md])
        delete_evt = delete_btn.click(delete_source, [collection, source_dd], [delete_md, *kb_outputs],
                                      api_name="delete_source", concurrency_limit=1)
        reingest_evt = reingest_btn.click(reingest, [collection, source_dd], [delete_md, *kb_outputs],
                                          api_name="reingest", concurrency_limit=1, show_progress_on=[delete_md])
        browse_btn.click(file_chunks, [collection, source_dd], [chunks_df], api_name="file_chunks")
        for after_write in (ingest_evt, delete_evt, reingest_evt):
            after_write.then(**status_args, api_visibility="private")
        timer.tick(**status_args, api_visibility="private")
        gr.api(stats_api, api_name="stats", concurrency_limit=None)
    demo.queue(default_concurrency_limit=ui.concurrency)
    return demo


def build_parser() -> argparse.ArgumentParser:
    rows = "\n".join(f"  {var:<24} {help} (default {default})" for var, default, help in settings_table(UIConfig))
    p = argparse.ArgumentParser(
        prog="rag-ui", description="Web UI: chat with cited answers over your docs, and manage the knowledge base.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags win over environment variables. The UI's own variables:\n" + rows
               + "\nRetrieval and LLM settings (MILVUS_URI, DEEPSEEK_API_KEY, LLM_BASE_URL, ...) are rag-ask's.",
    )
    p.add_argument("--host", help="interface to bind (RAG_UI_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (RAG_UI_PORT, default 7860)")
    p.add_argument("--collection", help="Milvus collection (RAG_COLLECTION, default docs)")
    p.add_argument("--uri", help="Milvus Lite path or server URI (MILVUS_URI, default ./data/milvus.db)")
    p.add_argument("--embedder", help="auto (default: the collection's own), minilm, e5 or openai:<model> (RAG_EMBEDDER)")
    p.add_argument("--k", type=int, help="passages per answer (RAG_TOP_K)")
    p.add_argument("--score-floor", type=float, help="minimum dense similarity (RAG_SCORE_FLOOR)")
    p.add_argument("--mode", choices=["dense", "bm25", "hybrid"], help="retrieval mode (RAG_MODE)")
    p.add_argument("--backend", choices=list(BACKENDS), help="initial answer backend (RAG_UI_BACKEND)")
    p.add_argument("--data-dir", help="uploads go under DATA_DIR/uploads (RAG_DATA_DIR, default ./data)")
    p.add_argument("--concurrency", type=int, help="answers streamed at once (RAG_UI_CONCURRENCY, default 4)")
    p.add_argument("--export-qa", metavar="FILE", help="write every user's liked answers as a rag-eval QA file "
                   "(JSON lines) and exit")
    return p


def _warm_up(kb: KnowledgeBase) -> None:
    """Load the embedding model in the background so the first question does not wait for it."""
    try:
        kb.embedder.embed_query("warm up")
    except Exception as e:  # only a head start; a real failure shows on the first question
        log.warning("embedder warm-up failed: %s", e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="rag-ui: %(message)s")
    try:
        ui = UIConfig.load(host=args.host, port=args.port, backend=args.backend, data_dir=args.data_dir,
                           concurrency=args.concurrency)
        if args.export_qa:
            return export_all_qa(ui, Path(args.export_qa))
        rag = RagConfig.load(collection=args.collection, milvus_uri=args.uri, embedder=args.embedder,
                             top_k=args.k, score_floor=args.score_floor, mode=args.mode)
        kb = KnowledgeBase(rag, IngestConfig.load())
    except (SettingsError, StoreError) as e:
        print(f"rag-ui: {e}", file=sys.stderr)
        return 2
    if ui.host not in ("127.0.0.1", "localhost", "::1") and not ui.auth:
        log.warning("listening on %s without a login; set RAG_UI_USER and RAG_UI_PASSWORD", ui.host)
    if ui.warm_up:
        threading.Thread(target=_warm_up, args=(kb,), daemon=True).start()
    demo = build_app(kb, ui)
    try:
        demo.launch(**launch_kwargs(ui))
    finally:
        kb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
