"""The launched UI driven through gradio_client, as a script would: chat, follow-ups, uploads."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
from gradio_client import handle_file

from rag.pipeline import REWRITE_PROMPT
from tests.ui.conftest import ANSWER, REASONING, scripted_reply
from ui.chat import RETRIEVAL_ONLY_CHOSEN, content_text


def _text(message: dict) -> str:
    return content_text(message["content"])


def _title(message: dict) -> str:
    return (message.get("metadata") or {}).get("title") or ""


def _split(messages: list[dict]) -> tuple[list[dict], dict | None, dict | None]:
    """(answers, reasoning, sources) among the assistant messages of the last turn."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    turn = messages[last_user + 1 :]
    answers = [m for m in turn if not _title(m)]
    reasoning = next((m for m in turn if _title(m) == "Reasoning"), None)
    sources = next((m for m in turn if _title(m).startswith("Sources")), None)
    return answers, reasoning, sources


def test_api_names_are_pinned(client):
    """gradio_client scripts call these names; renaming one breaks them."""
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert named == {"/chat", "/ingest", "/stats", "/kb_view", "/delete_source", "/status"}


def test_streamed_answer_with_sources_and_reasoning(app, client):
    app.stub.state.reasoning = REASONING
    app.stub.state.delay_s = 0.01
    job = client.submit("How do I back up the index?", api_name="/chat")
    lengths = []
    for messages, _question in job:
        answers, _, _ = _split(messages)
        if answers:
            lengths.append(len(_text(answers[0])))
    messages, question_box = job.outputs()[-1]
    assert question_box == ""  # the box is emptied for the next question

    answers, reasoning, sources = _split(messages)
    assert [_text(a) for a in answers] == [ANSWER]
    # Streamed: the answer was seen growing through many intermediate lengths.
    assert len({n for n in lengths if 0 < n < len(ANSWER)}) >= 5, lengths
    # Reasoning arrives apart from the answer, in its own collapsible message.
    assert reasoning is not None and _text(reasoning) == REASONING
    assert REASONING not in _text(answers[0])
    assert reasoning["metadata"]["status"] == "done"
    # Sources: a collapsed panel listing [n] with path, heading, score and a snippet; [1] is cited.
    assert sources is not None and sources["metadata"]["status"] == "done"
    body = _text(sources)
    assert "**[1]** `tests/ui/fixtures/docs/storage.md` › Storage and backups › Backing up the index" in body
    assert "similarity 0." in body and "hybrid rank 1" in body and "**cited**" in body
    # the snippet keeps the passage's lines (quoted) and its code span intact
    assert "copy the whole `data/milvus.db` directory" in " ".join(body.replace("\n> ", " ").split())
    # The request the DeepSeek stub received carries the numbered context.
    (req,) = app.stub.state.requests
    assert req["model"] == "deepseek-chat" and req["stream"] is True
    assert "[1] tests/ui/fixtures/docs/storage.md" in req["messages"][1]["content"]


def test_follow_up_is_rewritten_before_retrieval(app, client):
    first = "What happens to files that are deleted from an ingested folder?"
    rewritten = "How can I keep the chunks of files deleted from an ingested folder?"
    history, _ = client.predict(first, api_name="/chat")
    app.stub.state.requests.clear()
    app.stub.state.reply = scripted_reply(rewritten=rewritten)

    # The history goes back exactly as Gradio returned it: content as lists of blocks.
    assert isinstance(history[0]["content"], list)
    messages, _ = client.predict("Can I keep them?", history, api_name="/chat")

    rewrite, answer = app.stub.state.requests
    assert rewrite["messages"][0]["content"] == REWRITE_PROMPT
    convo = rewrite["messages"][1]["content"]
    assert first in convo and ANSWER[:40] in convo and "Last question: Can I keep them?" in convo
    assert "Sources" not in convo  # panels are not conversation
    assert f"Question: {rewritten}" in answer["messages"][1]["content"]
    _, _, sources = _split(messages)
    assert sources["metadata"]["log"] == f"searched for: {rewritten}"
    assert "**[1]** `tests/ui/fixtures/docs/ingest.md` › Incremental ingest › Deleted files" in _text(sources)


def test_retrieval_only_mode(app, client):
    messages, _ = client.predict("Which fusion does hybrid search use?", backend="retrieval-only", api_name="/chat")
    answers, reasoning, sources = _split(messages)
    assert [_text(a) for a in answers] == [RETRIEVAL_ONLY_CHOSEN]  # an LLM exists; the user chose not to
    assert reasoning is None and app.stub.state.requests == []  # no LLM was asked anything
    assert "status" not in sources["metadata"]  # left open: the passages are the answer
    assert "`tests/ui/fixtures/docs/retrieval.md` › Retrieval modes › BM25 and hybrid" in _text(sources)
    assert "reciprocal-rank fusion" in _text(sources)

    status_html, banner = client.predict("retrieval-only", api_name="/status")
    assert "Retrieval-only mode" in banner
    assert "DeepSeek API" in status_html and "serves deepseek-chat" in status_html  # the stub answers /models
    assert "4 files" in status_html


def test_upload_is_ingested_and_retrievable(app, client, tmp_path):
    note = tmp_path / "release-notes.md"
    note.write_text("# Release notes\n\n## Version 2.4\n\nThe quokka scheduler now rotates log files every Tuesday.\n")
    report, stats_md, table, _, _ = client.predict([handle_file(str(note))], "uploaded", api_name="/ingest")
    assert "**Ingested 1 file** into **uploaded**: 1 new" in report
    assert "Rejected" not in report
    stored = app.data_dir / "uploads" / "uploaded" / "release-notes.md"
    assert stored.is_file()
    assert "| uploaded | 1 | 1 |" in stats_md
    assert [row[0] for row in table["data"]] == ["uploads/release-notes.md"]  # not the server's path

    stats = client.predict("uploaded", api_name="/stats")
    assert stats["exists"] and stats["files"] == 1 and stats["dim"] == 384 and stats["last_ingest"]

    messages, _ = client.predict("When does the quokka scheduler rotate logs?", collection="uploaded",
                                 api_name="/chat")
    _, _, sources = _split(messages)
    assert "**[1]** `uploads/release-notes.md` › Release notes › Version 2.4" in _text(sources)

    # Re-uploading the same file is incremental: nothing is embedded again.
    report, *_ = client.predict([handle_file(str(note))], "uploaded", api_name="/ingest")
    assert "0 new, 0 changed, 1 unchanged" in report

    note_md, _, table, _ = client.predict("uploaded", "uploads/release-notes.md", api_name="/delete_source")
    assert "Deleted" in note_md and table["data"] == [] and not stored.exists()
    note_md, *_ = client.predict("uploaded", "uploads/release-notes.md", api_name="/delete_source")
    assert "nothing was deleted" in note_md


def test_rejected_uploads_are_reported(app, client, tmp_path):
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ\x90\x00")
    slip = tmp_path / "slip.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("docs/fine.md", "# Fine\n\nharmless\n")
        zf.writestr("../../escape.md", "# Escape\n\nwritten outside the uploads folder\n")
    slip.write_bytes(buf.getvalue())

    report, stats_md, *_ = client.predict([handle_file(str(exe)), handle_file(str(slip))], "rejects",
                                          api_name="/ingest")
    assert "**Rejected 2:**" in report
    assert "`tool.exe`: type .exe is not accepted" in report
    assert "`slip.zip`:" in report and "zip-slip" in report and "nothing was extracted" in report
    assert "does not exist yet" in stats_md  # nothing was ingested, so no collection was made
    leaked = [p for p in app.data_dir.parent.rglob("*.md") if p.name in ("escape.md", "fine.md")]
    assert leaked == []


@pytest.mark.parametrize("name", ["bad name!", "1starts_with_digit"])
def test_invalid_collection_name_is_explained(client, name, tmp_path):
    f = tmp_path / "a.md"
    f.write_text("# A\n\ntext\n")
    report, *_ = client.predict([handle_file(str(f))], name, api_name="/ingest")
    assert "is not valid" in report


def test_answers_stream_concurrently(app, client):
    """Two users at once: a short answer is not stuck behind a long one (concurrency_limit > 1)."""
    from gradio_client import Client

    long_answer = " ".join(f"w{i}" for i in range(60)) + " [1]."
    app.stub.state.reply = lambda body: (
        long_answer if "Question: Where does Milvus Lite" in body["messages"][-1]["content"] else ANSWER)
    app.stub.state.delay_s = 0.05  # the long answer streams for about 3 s
    other = Client(app.url, verbose=False, download_files=False)
    slow = client.submit("Where does Milvus Lite keep the index?", api_name="/chat")
    deadline = time.monotonic() + 30
    while len(slow.outputs()) < 3:  # the long answer is under way before the second question
        assert time.monotonic() < deadline, "the first answer never started"
        time.sleep(0.05)
    fast = other.submit("How does hybrid search fuse results?", api_name="/chat")
    fast.result(timeout=60)
    assert not slow.done(), "the second answer waited for the first one to finish"
    messages, _ = slow.result(timeout=60)
    assert _text(_split(messages)[0][0]) == long_answer


def test_ingest_warnings_are_shown(app, client, tmp_path):
    bad = tmp_path / "bad-front-matter.md"
    bad.write_text("---\ntitle: [unclosed\n---\n# Body\n\nStill ingested as text.\n")
    report, *_ = client.predict([handle_file(str(bad))], "warned", api_name="/ingest")
    assert "**Ingested 1 file**" in report
    assert "**Notes:**" in report and "front matter is not valid YAML" in report


def test_unreachable_backend_is_explained_in_the_chat(app, client):
    from tests.support.openai_stub import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    messages, _ = client.predict("How do I back up the index?", backend="local", local_url=dead, api_name="/chat")
    answers, _, sources = _split(messages)
    assert "⚠️ cannot connect to the LLM at" in _text(answers[0])
    assert sources is not None  # retrieval still worked: the passages are listed
    status_html, banner = client.predict("local", dead, api_name="/status")
    assert "connection refused" in status_html and "Local model host" in banner


def test_uploads_land_while_an_answer_streams(app, client, tmp_path):
    """Two uploads under the write lock while a streamed answer runs: every row of both lands,
    and the answer completes (issue 14, honest tests)."""
    from gradio_client import Client

    long_answer = " ".join(f"w{i}" for i in range(80)) + " [1]."
    app.stub.state.reply = scripted_reply(answer=long_answer)
    app.stub.state.delay_s = 0.1  # the answer streams for about 8 s
    batches = []
    for b, names in enumerate((["alpha.md", "beta.md"], ["gamma.md"])):
        folder = tmp_path / f"batch{b}"
        folder.mkdir()
        for name in names:
            topic = name.removesuffix(".md")
            (folder / name).write_text(f"# {topic.title()}\n\n## Part one\n\nThe {topic} module starts first.\n\n"
                                       f"## Part two\n\nThe {topic} module stops last.\n")
        batches.append([handle_file(str(p)) for p in sorted(folder.iterdir())])

    chat = client.submit("How do I back up the index?", api_name="/chat")
    deadline = time.monotonic() + 60
    while len(chat.outputs()) < 3:  # the answer is streaming
        assert time.monotonic() < deadline, "the answer never started"
        time.sleep(0.05)
    uploads = [Client(app.url, verbose=False, download_files=False).submit(files, "concurrent", api_name="/ingest")
               for files in batches]
    assert not chat.done(), "the answer ended before the uploads were sent; make it longer"
    reports = [job.result(timeout=300)[0] for job in uploads]
    messages, _ = chat.result(timeout=120)

    assert _text(_split(messages)[0][0]) == long_answer
    assert all("Rejected" not in r and "ingest failed" not in r for r in reports), reports
    written = sum(int(r.split(" chunks written")[0].rsplit(" ", 1)[1]) for r in reports)
    states = app.kb.store("concurrent").file_states()
    assert sorted(states) == ["uploads/alpha.md", "uploads/beta.md", "uploads/gamma.md"]
    assert all(len(st.ids_by_hash) == 1 and st.is_complete(next(iter(st.ids_by_hash))) for st in states.values())
    assert sum(len(st.ids) for st in states.values()) == written == 6
