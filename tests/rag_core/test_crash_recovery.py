"""kill -9 a real `rag-ingest` mid-run, re-run, and get exactly the state of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_data
from tests.rag_core.conftest import cli_env, do_ingest, open_store, rows, snapshot

BATCH = 16  # chunks per embedding call and upsert: many small writes, so the kill lands mid-run
PROGRESS_RE = re.compile(rb"embedding:[^\r\n]*?\|\s*(\d+)/(\d+)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The 60 smallest real pages (~220 chunks), copied so that one can be edited."""
    src = shared_data("milvus_docs_en")
    files = sorted(src.rglob("*.md"), key=lambda p: (p.stat().st_size, p))[:60]
    root = tmp_path_factory.mktemp("crash") / "docs"
    for f in files:
        dest = root / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    return root


def kill_mid_embedding(cwd: Path, uri: str, min_done: int) -> tuple[int, int]:
    """Start `rag-ingest`, SIGKILL it once its progress bar shows `min_done` chunks upserted."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.cli", "docs", "--uri", uri],
        cwd=cwd, env=cli_env(RAG_EMBED_BATCH=str(BATCH)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    seen, done, total = b"", 0, 0
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                data = os.read(proc.stderr.fileno(), 65536)
                if not data:
                    break
                seen = (seen + data)[-4096:]
                hits = PROGRESS_RE.findall(seen)
                if hits:
                    done, total = int(hits[-1][0]), int(hits[-1][1])
                    if done >= min_done:
                        proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup, no flush, no atexit
                        break
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"rag-ingest ended before the kill: {seen[-500:]!r}"
    assert 0 < done < total
    return done, total


def assert_same_state(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert len(got) == len(want)
    assert got.keys() == want.keys()
    for i, r in want.items():
        assert got[i]["text"] == r["text"] and got[i]["source"] == r["source"]
        assert got[i]["chunk_count"] == r["chunk_count"] and got[i]["file_hash"] == r["file_hash"]
        # same text, same model: the vectors agree up to batch-padding noise
        assert np.allclose(got[i]["vector"], r["vector"], atol=1e-4)


@pytest.mark.slow
def test_kill_9_then_rerun_converges(corpus: Path, embedder):
    work = corpus.parent
    ref_uri = str(work / "reference.db")
    clean = do_ingest(["docs"], ref_uri, embedder, cwd=work, embed_batch=BATCH)
    assert clean.files_new == 60 and clean.chunks_written > 200

    crashed = str(work / "crashed.db")
    done, total = kill_mid_embedding(work, crashed, min_done=max(3 * BATCH, clean.chunks_written // 3))
    assert total == clean.chunks_written
    shutil.copytree(crashed, work / "crashed_then_edited.db")  # the same crash, for the edit case below

    store = open_store(crashed, embedder)
    try:
        partial = len(rows(store))
    finally:
        store.close()
    assert 0 < partial < total, f"the killed run left {partial} of {total} rows"

    rerun = do_ingest(["docs"], crashed, embedder, cwd=work, embed_batch=BATCH)
    assert rerun.files_unchanged + rerun.files_new + rerun.files_changed == 60
    assert rerun.chunks_embedded < total  # whole files that made it are not redone
    assert_same_state(snapshot(crashed, embedder), snapshot(ref_uri, embedder))

    # Same crash, but a file that was already (partly) written is edited before the re-run.
    edited_uri = str(work / "crashed_then_edited.db")
    store = open_store(edited_uri, embedder)
    try:
        written = sorted({r["source"] for r in rows(store).values()})
    finally:
        store.close()
    victim = work / written[0]
    victim.write_text(victim.read_text() + "\n\n## Added after the crash\n\nA new closing section.\n")
    do_ingest(["docs"], edited_uri, embedder, cwd=work, embed_batch=BATCH)
    update = do_ingest(["docs"], ref_uri, embedder, cwd=work, embed_batch=BATCH)  # uninterrupted runs
    assert update.files_changed == 1
    got = snapshot(edited_uri, embedder)
    assert_same_state(got, snapshot(ref_uri, embedder))
    assert any("Added after the crash" in r["text"] for r in got.values() if r["source"] == written[0])
    assert len({r["file_hash"] for r in got.values() if r["source"] == written[0]}) == 1


# A child process that ingests `docs` once, waits for the parent to edit a file, then ingests
# again and, in the window between writing the new chunks and deleting the old ones, reports
# what the collection holds and waits to be killed.
WINDOW_CHILD = """
import json, sys, time
from ingest.config import IngestConfig
from ingest.pipeline import ingest
from rag.config import RagConfig
from rag.embedder import MiniLMEmbedder
from rag.store import MilvusStore
from tests.rag_core.conftest import rows

uri = sys.argv[1]
embedder = MiniLMEmbedder(device="cpu")
rag_config, config = RagConfig.load(environ={}, milvus_uri=uri), IngestConfig.load(environ={})
ingest(["docs"], rag_config, config, embedder=embedder, progress=False, warn=lambda _m: None)
print("ingested", flush=True)
sys.stdin.readline()  # the parent has edited a file
store = MilvusStore(uri, "docs")

def in_the_window():
    held = {}
    for r in rows(store).values():
        held.setdefault(r["source"], set()).add(r["file_hash"])
    print("window " + json.dumps({s: sorted(h) for s, h in held.items()}), flush=True)
    time.sleep(600)  # SIGKILL arrives here

ingest(["docs"], rag_config, config, embedder=embedder, store=store, progress=False,
       warn=lambda _m: None, after_upsert=in_the_window)
"""


@pytest.mark.slow
def test_kill_9_between_new_chunks_and_old_deletion_converges(small_corpus: Path, embedder):
    """Milvus Lite: a changed file stored twice (new chunks in, old not yet deleted) when the run
    dies is redone by the next run, which ends with exactly the clean run's ids."""
    work = small_corpus.parent
    beta = small_corpus / "beta.md"
    edited = beta.read_text().replace("Part 2 of index building", "Part 2 of index building, rewritten")

    crashed = str(work / "crashed.db")
    log = work / "child.log"  # a file, not a pipe: nobody reads stderr while the child runs
    child = subprocess.Popen([sys.executable, "-c", WINDOW_CHILD, crashed], cwd=work, env=cli_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    try:
        assert child.stdout.readline().strip() == "ingested", log.read_text()[-3000:]
        ref_uri = str(work / "reference.db")
        do_ingest(["docs"], ref_uri, embedder, cwd=work)  # the clean runs, on a db of their own
        old_ids = {i for i, r in snapshot(ref_uri, embedder).items() if r["source"] == "docs/beta.md"}
        beta.write_text(edited)
        clean = do_ingest(["docs"], ref_uri, embedder, cwd=work)
        assert clean.files_changed == 1 and clean.chunks_deleted > 0
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        assert line.startswith("window "), log.read_text()[-3000:]
        held = json.loads(line.removeprefix("window "))
        assert len(held["docs/beta.md"]) == 2, held  # both versions visible in the window
        assert all(len(h) == 1 for s, h in held.items() if s != "docs/beta.md"), held
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    crashed_rows = snapshot(crashed, embedder)
    beta_hashes = {r["file_hash"] for r in crashed_rows.values() if r["source"] == "docs/beta.md"}
    assert len(beta_hashes) == 2, "the kill left both versions of the changed file"
    assert old_ids <= crashed_rows.keys()

    rerun = do_ingest(["docs"], crashed, embedder, cwd=work)
    assert (rerun.files_changed, rerun.files_unchanged, rerun.files_new) == (1, 3, 0)
    assert rerun.chunks_deleted == clean.chunks_deleted  # exactly the old version's leftovers
    assert_same_state(snapshot(crashed, embedder), snapshot(ref_uri, embedder))
