"""`rag-ui` / `python -m ui`: the Gradio web UI (chat, settings sidebar, knowledge-base tab).

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
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a self-hosted tool phones no one

import gradio as gr  # noqa: E402  (after the analytics switch above)
from pymilvus import MilvusException  # noqa: E402

from ingest.config import IngestConfig  # noqa: E402
from rag.config import RagConfig  # noqa: E402
from rag.settings import SettingsError, settings_table  # noqa: E402
from rag.store import StoreError  # noqa: E402
from ui import views  # noqa: E402
from ui.backends import LABELS, Prober, default_backend, default_local_url, resolve  # noqa: E402
from ui.chat import respond  # noqa: E402
from ui.config import BACKENDS, UIConfig  # noqa: E402
from ui.errors import explain  # noqa: E402
from ui.service import KnowledgeBase, check_collection_name  # noqa: E402
from ui.uploads import UploadLimits, store_uploads, upload_source_namer, uploaded_file  # noqa: E402

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
        "max_file_size": int(ui.max_zip_mb * 1e6), "theme": _theme(), "css": views.CSS,
        "ssr_mode": False, "footer_links": ["api"], "show_error": True,
    }


def build_app(kb: KnowledgeBase, ui: UIConfig) -> gr.Blocks:
    """The Blocks app around a shared KnowledgeBase; `launch(**launch_kwargs(ui))` serves it."""
    rag = kb.rag_config
    prober = Prober(timeout=ui.probe_timeout, ttl=max(5.0, ui.status_every / 2))
    limits = UploadLimits(
        max_file_bytes=int(kb.ingest_config.max_file_mb * 1e6), max_zip_bytes=int(ui.max_zip_mb * 1e6),
        max_unzipped_bytes=int(ui.max_unzipped_mb * 1e6), max_ratio=ui.max_zip_ratio,
        max_members=ui.max_zip_files,
    )
    floor = rag.score_floor if rag.score_floor is not None else kb.embedder.score_floor
    collections = sorted({rag.collection, *kb.collections()})
    llm_configured = bool(rag.deepseek_api_key or rag.llm_base_url)

    # -- handlers (closures over the shared handles) ----------------------------------------

    def chat(message: str, history: list, collection: str, top_k: float, score_floor: float,
             mode: str, backend: str, local_url: str):
        be = resolve(backend, ui, rag, local_url)
        for msgs in respond(kb, prober, be, message, history, collection, int(top_k), score_floor, mode,
                            llm_configured):
            yield msgs, ""  # "" empties the question box as soon as the turn starts

    def kb_view(collection: str):
        """Stats table, source list and delete choices for one collection."""
        try:
            stats = kb.stats(collection)
        except (StoreError, MilvusException) as e:
            return f"⚠️ {explain(e, collection, rag.milvus_uri)}", [], gr.update(choices=[], value=None)
        sources = list((stats or {}).get("sources", {}))
        return (views.stats_markdown(collection, stats), views.sources_rows(stats),
                gr.update(choices=sources, value=None))

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
            try:
                report = kb.ingest(result.saved, collection, warn=warnings.append, name=upload_source_namer(root))
            except (StoreError, FileNotFoundError, SettingsError, MilvusException) as e:
                note = f"⚠️ ingest failed: {explain(e, collection, rag.milvus_uri)}\n\n"
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
        with gr.Sidebar(open=True, width=340, elem_id="settings"):
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
            mode = gr.Radio(["dense", "bm25", "hybrid"], value=rag.mode, label="Retrieval mode")

        gr.HTML(views.HEADER)
        banner = gr.HTML(elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(
                    height="64vh", show_label=False, elem_id="chatbot", buttons=["copy"],
                    feedback_options=None, layout="bubble",
                    placeholder="**Ask a question about your documents.**<br>"
                                "Answers cite passages as [1], [2]…; open *Sources* under an answer to see them.",
                )
                with gr.Row(equal_height=True):
                    question = gr.Textbox(placeholder="Ask a question about your docs…", show_label=False,
                                          scale=8, max_lines=6, autofocus=True, elem_id="question")
                    send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, elem_id="stop")
                    new_chat = gr.Button("New chat", scale=1, min_width=120)
            with gr.Tab("Knowledge base", id="kb"):
                stats_md = gr.Markdown(elem_id="kb-stats")
                upload = gr.File(file_count="multiple", type="filepath", elem_id="upload",
                                 label="Upload .md, .markdown, .txt files or a .zip of them")
                ingest_btn = gr.Button("Ingest", variant="primary", elem_id="ingest")
                ingest_md = gr.Markdown(elem_id="ingest-report", min_height=80)
                sources_df = gr.Dataframe(headers=["Source", "Chunks"], datatype=["str", "number"],
                                          interactive=False, label="Sources", wrap=True, elem_id="kb-sources")
                with gr.Row(equal_height=True):
                    source_dd = gr.Dropdown([], label="Source to delete", scale=4, allow_custom_value=True)
                    delete_btn = gr.Button("Delete source", variant="stop", scale=1)
                delete_md = gr.Markdown()
        timer = gr.Timer(ui.status_every or 1.0, active=ui.status_every > 0)

        # -- events --------------------------------------------------------------------------
        settings = [collection, top_k, score_floor, mode, backend, local_url]
        answer = gr.on(
            [question.submit, send.click], chat, [question, chatbot, *settings], [chatbot, question],
            api_name="chat", concurrency_limit=ui.concurrency,
        )
        stop.click(None, None, None, cancels=[answer], api_visibility="private")
        new_chat.click(lambda: ([], ""), None, [chatbot, question], api_visibility="private")

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
        for after_write in (ingest_evt, delete_evt):
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
