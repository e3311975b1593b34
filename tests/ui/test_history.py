"""Saved conversations (issue 20.1), per-chat settings (20.4) and feedback (20.5): the SQLite
store on its own, then `rag-ui` itself across a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from evals.datasets import load_qa
from rag.types import Hit
from tests.ui.conftest import FIXTURE_DOCS
from tests.ui.process import rag_ui, ui_env
from ui.history import History, Passage, Turn, export_markdown, qa_lines, settings_line

REPO = FIXTURE_DOCS.parents[3]
SETTINGS = {"backend": "deepseek", "backend_label": "DeepSeek API", "model": "deepseek-chat", "top_k": 5,
            "mode": "hybrid", "score_floor": 0.3, "collection": "docs"}


def _turn(question: str, answer: str = "Copy the folder [2].") -> Turn:
    hits = [Hit("a" * 32, 1.0, "x", "docs/a.md", "A", 0, {"start": 0, "end": 10}, 0.9, 1, "hybrid"),
            Hit("b" * 32, 0.5, "y", "docs/b.md", "B › Backups", 3, {"start": 40, "end": 90}, 0.8, 2, "hybrid")]
    return Turn(question, answer, "docs", SETTINGS, [Passage.of(n, h) for n, h in enumerate(hits, 1)])


def test_conversations_are_per_user_and_survive_reopening(tmp_path):
    db = History(tmp_path / "ui.sqlite3")
    msgs = [{"role": "user", "content": "How do I back up?"}, {"role": "assistant", "content": "Copy [2]."}]
    cid = db.save("user:alice", None, msgs, [_turn("How do I back up?")], SETTINGS)
    assert db.list("user:bob") == [] and db.get("user:bob", cid) is None
    # Bob cannot write into Alice's chat by naming its id: he gets a chat of his own.
    assert db.save("user:bob", cid, [], [], SETTINGS) != cid
    db.close()

    db = History(tmp_path / "ui.sqlite3")
    [(got_id, title, _)] = db.list("user:alice")
    assert (got_id, title) == (cid, "How do I back up?")
    conv = db.get("user:alice", cid)
    assert conv.messages == msgs and conv.turns[0].passages[1].source == "docs/b.md"
    assert db.rename("user:alice", cid, "  Backups  ") and db.list("user:alice")[0][1] == "Backups"
    assert not db.rename("user:bob", cid, "mine")
    assert not db.delete("user:bob", cid) and db.delete("user:alice", cid)
    assert db.list("user:alice") == []


def test_export_markdown_has_answers_settings_and_sources(tmp_path):
    db = History(tmp_path / "ui.sqlite3")
    cid = db.save("u", None, [], [_turn("How do I back up?")], SETTINGS)
    md = export_markdown(db.get("u", cid))
    assert md.startswith("# How do I back up?\n") and "## How do I back up?\n\nCopy the folder [2]." in md
    assert "DeepSeek API deepseek-chat · top-k 5 · hybrid · floor 0.30 · collection docs" in md
    assert "- [2] `docs/b.md` › B › Backups (similarity 0.800, hybrid rank 2)" in md


def test_settings_line_names_everything_that_made_the_answer():
    assert settings_line(SETTINGS) == "DeepSeek API deepseek-chat · top-k 5 · hybrid · floor 0.30"
    assert settings_line({"backend_label": "Retrieval only", "top_k": 3, "mode": "bm25",
                          "score_floor": None}) == "Retrieval only · top-k 3 · bm25"


def test_liked_answers_export_as_a_qa_file_rag_eval_reads(tmp_path):
    db = History(tmp_path / "ui.sqlite3")
    cid = db.save("u", None, [], [_turn("How do I back up?"), _turn("What is BM25?", "No idea.")], SETTINGS)
    db.feedback("u", cid, 0, True)
    db.feedback("u", cid, 1, False)
    with pytest.raises(KeyError):
        db.feedback("u", cid, 2, True)
    rows = db.feedback_rows("u")
    assert [(r["turn"], r["liked"]) for r in rows] == [(0, True), (1, False)]
    assert rows[0]["hits"][1]["id"] == "b" * 32  # the retrieved ids are kept with the answer
    lines = qa_lines(rows)
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    [item] = load_qa(path)  # the disliked answer gives no item; the liked one cites [2]
    assert (item.question, item.gold[0].source, item.gold[0].heading, item.gold[0].span) == ("How do I back up?", "docs/b.md", "Backups", (40, 90))
    db.feedback("u", cid, 0, None)  # withdrawn
    assert [r["turn"] for r in db.feedback_rows("u")] == [1]


@pytest.mark.slow
def test_chat_is_listed_and_reloads_after_a_restart(tmp_path):
    """A real `rag-ui` process: ask, stop the server, start it again; the chat is still there."""
    args = ("--uri", str(tmp_path / "milvus.db"), "--data-dir", str(tmp_path / "data"), "--backend", "retrieval-only")
    with rag_ui(*args, cwd=REPO, env=ui_env(), log=tmp_path / "ui1.log") as url:
        client = Client(url, verbose=False, download_files=False)
        client.predict([handle_file(str(FIXTURE_DOCS / "storage.md"))], "docs", api_name="/ingest")
        messages, _ = client.predict("How do I back up the index?", top_k=3, mode="bm25", browser_id="browser-1",
                                     api_name="/chat")
        assert "storage.md" in json.dumps(messages)
    with rag_ui(*args, cwd=REPO, env=ui_env(), log=tmp_path / "ui2.log") as url:
        client = Client(url, verbose=False, download_files=False)
        assert client.predict("browser-2", api_name="/conversations") == []  # another browser sees nothing
        [chat] = client.predict("browser-1", api_name="/conversations")
        assert chat["title"] == "How do I back up the index?"
        reloaded, title, collection, top_k, _, mode, backend, _ = client.predict(chat["id"], "browser-1",
                                                                                api_name="/open_chat")
        assert (title, collection, top_k, mode, backend) == (chat["title"], "docs", 3, "bm25", "retrieval-only")
        assert [m["role"] for m in reloaded][:2] == ["user", "assistant"]
        assert json.dumps(reloaded) == json.dumps(messages)
        assert "Retrieval only · top-k 3 · bm25" in json.dumps(reloaded, ensure_ascii=False)  # the settings shown with the answer


def test_a_stopped_answer_is_saved_with_its_passages(app, client):
    """Stop closes the stream before the pipeline finishes; the turn is still saved, as far as it
    got, with the passages it retrieved (so feedback and the export have them)."""
    app.stub.state.reply = lambda body: " ".join(f"word{i}" for i in range(80))
    app.stub.state.delay_s = 0.1
    job = client.submit("How do I back up the index?", browser_id="stopper", api_name="/chat")
    deadline = time.monotonic() + 60
    while not any("word3" in json.dumps(out) for out in job.outputs()):
        assert time.monotonic() < deadline, "no tokens arrived"
        time.sleep(0.05)
    job.cancel()
    db = History(app.data_dir / "ui.sqlite3")
    try:
        def saved():
            chats = db.list("browser:stopper")
            conv = db.get("browser:stopper", chats[0][0]) if chats else None
            return conv if conv and conv.turns and "word3" in conv.turns[0].answer else None

        deadline = time.monotonic() + 20
        while (conv := saved()) is None:
            assert time.monotonic() < deadline, "the stopped turn was not saved"
            time.sleep(0.1)
        turn = conv.turns[0]
        assert "word79" not in turn.answer and "#cite:" not in turn.answer
        assert turn.passages and turn.passages[0].source.endswith("storage.md")
    finally:
        db.close()


def test_rename_export_and_delete_the_open_chat(app, client):
    client.predict("How do I back up the index?", browser_id="exporter", api_name="/chat")
    assert len(client.predict("exporter", api_name="/conversations")) == 1
    client.predict("Backups, in short", "exporter", api_name="/rename_chat")  # the open chat: this session's
    assert [c["title"] for c in client.predict("exporter", api_name="/conversations")] == ["Backups, in short"]
    exported = client.predict("exporter", api_name="/export_chat")
    md = Path(exported["value"]["path"] if "value" in exported else exported["path"]).read_text()
    assert md.startswith("# Backups, in short\n\n## How do I back up the index?\n")
    assert "copy the whole `data/milvus.db` directory [1]" in md and "#cite:" not in md
    assert "DeepSeek API deepseek-chat · top-k" in md and "- [1] `tests/ui/fixtures/docs/storage.md`" in md
    client.predict("exporter", api_name="/delete_chat")
    assert client.predict("exporter", api_name="/conversations") == []
    assert client.predict("someone-else", api_name="/conversations") == []


def test_the_login_names_the_user_else_the_browser():
    from types import SimpleNamespace

    from ui.people import user_of

    assert user_of(SimpleNamespace(username="alice", session_hash="s"), "b1") == "user:alice"
    assert user_of(SimpleNamespace(username=None, session_hash="s"), "b1") == "browser:b1"
    assert user_of(SimpleNamespace(username=None, session_hash="s"), "") == "session:s"


def test_operator_exports_every_users_liked_answers(tmp_path, capsys):
    from ui.app import main

    assert main(["--data-dir", str(tmp_path / "none"), "--export-qa", str(tmp_path / "x.jsonl")]) == 2
    assert "no saved chats" in capsys.readouterr().err
    db = History(tmp_path / "ui.sqlite3")
    for user in ("user:alice", "user:bob"):
        cid = db.save(user, None, [], [_turn(f"Question of {user}?")], SETTINGS)
        db.feedback(user, cid, 0, True)
    db.close()
    out = tmp_path / "qa.jsonl"
    assert main(["--data-dir", str(tmp_path), "--export-qa", str(out)]) == 0
    assert sorted(i.question for i in load_qa(out)) == ["Question of user:alice?", "Question of user:bob?"]
