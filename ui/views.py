"""Pure rendering helpers: status panel, banners, collection stats and ingest reports.

Kept apart from the Gradio wiring so they can be read and tested without a server.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from ingest.pipeline import IngestReport
from ui.backends import LABELS, Backend, Probe

CSS = """
.status-panel { font-size: 0.9rem; line-height: 1.45; }
.status-row { display: flex; gap: 0.5rem; align-items: baseline; padding: 0.2rem 0.35rem; border-radius: 6px; }
.status-row.selected { background: var(--color-accent-soft); }
.status-dot { flex: none; width: 0.6rem; height: 0.6rem; border-radius: 50%; display: inline-block; }
.status-dot.ok { background: #16a34a; }
.status-dot.bad { background: #dc2626; }
.status-dot.warn { background: #d97706; }
.status-name { font-weight: 600; }
.status-detail { color: var(--body-text-color-subdued); font-size: 0.82rem; overflow-wrap: anywhere; }
.app-header h1 { margin-bottom: 0.1rem; }
.app-header p { margin-top: 0; color: var(--body-text-color-subdued); }
.banner { border-left: 4px solid #d97706; padding: 0.45rem 0.8rem; border-radius: 6px;
          background: color-mix(in srgb, #d97706 10%, transparent); }
#banner:not(:has(.banner)) { display: none; }  /* no empty box when all is well */
"""

HEADER = """<div class="app-header">
<h1>Docs Q&amp;A</h1>
<p>Answers from your own markdown docs, with every claim cited: Milvus retrieval + DeepSeek-V3.</p>
</div>"""


def _row(name: str, probe_ok: bool | None, detail: str, selected: bool) -> str:
    dot = "ok" if probe_ok else ("warn" if probe_ok is None else "bad")
    cls = "status-row selected" if selected else "status-row"
    mark = " ◂ in use" if selected else ""
    return (
        f'<div class="{cls}"><span class="status-dot {dot}"></span><div>'
        f'<span class="status-name">{html.escape(name)}</span>{mark}<br>'
        f'<span class="status-detail">{html.escape(detail)}</span></div></div>'
    )


def status_html(
    backends: Sequence[Backend], probes: Sequence[Probe], selected: str, collection: str,
    stats: dict[str, Any] | None, error: str | None = None,
) -> str:
    """One row per backend (green: reachable, red: not) and one for the knowledge base."""
    rows = []
    for b, p in zip(backends, probes, strict=True):
        where = f" · {b.base_url}" if b.kind == "local" and b.base_url else ""
        rows.append(_row(LABELS[b.kind], p.ok, p.detail + where, b.kind == selected))
    if error:
        rows.append(_row(f"Knowledge base “{collection}”", False, error, False))
    elif stats is None:
        rows.append(_row(f"Knowledge base “{collection}”", None, "empty: ingest documents first", False))
    else:
        rows.append(_row(f"Knowledge base “{collection}”", True,
                         f"{stats['files']} files, {stats['chunks']} chunks", False))
    return f'<div class="status-panel" id="backend-status">{"".join(rows)}</div>'


def banner(backend: Backend, probe: Probe, collection: str, stats: dict[str, Any] | None,
           llm_configured: bool = False) -> str:
    """The plain sentences above the chat when something limits the answers, else ''."""
    notes = []
    if stats is None or not stats["chunks"]:  # no collection, or one whose every source was deleted
        notes.append(f"The knowledge base <b>{html.escape(collection)}</b> is empty: <b>ingest documents "
                     f"first</b> (Knowledge base tab).")
    if backend.kind == "retrieval-only" and llm_configured:
        notes.append("<b>Retrieval-only mode</b>: no language model is asked, so each answer is the list of "
                     "the most relevant passages. Choose another backend under “Answer with” for written answers.")
    elif backend.kind == "retrieval-only":
        notes.append("<b>Retrieval-only mode</b>: no language model is configured, so each answer is the list of "
                     "the most relevant passages. Set <code>DEEPSEEK_API_KEY</code> (DeepSeek API) or "
                     "<code>LLM_BASE_URL</code> (a model host) and restart to get written answers.")
    elif not probe.ok:
        notes.append(f"The <b>{html.escape(backend.label)}</b> is not usable right now: "
                     f"{html.escape(probe.detail)}.")
    if not notes:
        return ""
    return '<div class="banner">' + "<br>".join(notes) + "</div>"


def stats_markdown(collection: str, stats: dict[str, Any] | None) -> str:
    if stats is None:
        return (f"Collection **{collection}** does not exist yet: ingest documents first. "
                f"Upload files below and press **Ingest**; the collection is created on the first run.")
    return (
        f"| Collection | Files | Chunks | Embedder | Dimension | Last ingest |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {collection} | {stats['files']} | {stats['chunks']} | {stats['embedder'] or '?'} | "
        f"{stats['dim'] or '?'} | {stats['last_ingest'] or 'never'} |"
    )


def sources_rows(stats: dict[str, Any] | None) -> list[list[Any]]:
    return [[src, n] for src, n in (stats or {}).get("sources", {}).items()]


def ingest_markdown(report: IngestReport | None, saved: int, rejected: Sequence[tuple[str, str]],
                    warnings: Sequence[str] = ()) -> str:
    """What happened to an upload: the ingest summary, every refused file with its reason, and
    the warnings ingest printed (front-matter problems, a poor embedder for the language)."""
    lines = []
    if report is not None:
        lines.append(
            f"**Ingested {saved} file{'s' if saved != 1 else ''}** into **{report.collection}**: "
            f"{report.files_new} new, {report.files_changed} changed, {report.files_unchanged} unchanged; "
            f"{report.chunks_written} chunks written, {report.chunks_deleted} deleted "
            f"in {report.seconds:.1f} s."
        )
        rejected = [*rejected, *report.skipped]
    elif not rejected:
        lines.append("Nothing to ingest: choose files first.")
    if rejected:
        lines.append(f"**Rejected {len(rejected)}:**")
        lines.extend(f"- `{name}`: {reason}" for name, reason in rejected)
    skips = {f"skipped {name}: {reason}" for name, reason in rejected}  # ingest warns about these too
    notes = [w for w in warnings if w not in skips]
    if notes:
        lines.append("**Notes:**")
        lines.extend(f"- {w}" for w in notes)
    return "\n".join(lines)
