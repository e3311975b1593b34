"""`rag-ask` as a user runs it: a subprocess against a db built by `rag-ingest`, the LLM a real HTTP stub."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shared_data
from tests.rag_core.conftest import cli_env, run_cli
from tests.support.openai_stub import free_port

QUESTION = "How is data stored in milvus?"
LOADING = "rag-ask: loading the embedding model ..."
REPLY = "Milvus stores inserted data in object storage [1] and metadata in etcd [2]."
# The similarity the score floor speaks of, and the mode's rank, labelled (issue 14.6).
SOURCE_LINE = re.compile(r"^  \[(\d+)\] (docs/\S+\.md) › (.+) \(similarity (\d\.\d{3}), hybrid rank (\d+)\)$")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two FAQ pages ingested by a real `rag-ingest` subprocess into ./ask.db (relative source paths)."""
    work = tmp_path_factory.mktemp("ask")
    (work / "docs").mkdir()
    for name in ("product_faq.md", "operational_faq.md"):
        shutil.copyfile(shared_data("milvus_docs_en") / "faq" / name, work / "docs" / name)
    res = run_cli("ingest.cli", "docs", "--quiet", cwd=work, env=cli_env(MILVUS_URI="ask.db"))
    assert res.returncode == 0, res.stderr
    assert "2 new" in res.stdout
    return work


def ask_env(**extra: str) -> dict[str, str]:
    return cli_env(MILVUS_URI="ask.db", **extra)


def test_streams_the_answer_then_sources(workdir: Path, openai_stub):
    openai_stub.state.reply = REPLY
    openai_stub.state.delay_s = 0.2
    env = ask_env(LLM_BASE_URL=openai_stub.base_url, RAG_TOP_K="5")
    proc = subprocess.Popen([sys.executable, "-m", "rag.cli", QUESTION, "--k", "2"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, first_piece_at = b"", None
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "rag-ask printed nothing for 2 minutes"
        data = os.read(proc.stdout.fileno(), 4096)
        if not data:
            break
        out += data
        if first_piece_at is None and out.strip():
            first_piece_at = time.monotonic()
    done_at = time.monotonic()
    assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
    text = out.decode()
    # the answer arrived word by word (0.2 s apart), not in one piece at the end
    assert first_piece_at is not None and done_at - first_piece_at > 1.0
    answer, sources = text.split("\n\nSources:\n")
    assert answer.strip() == REPLY
    lines = sources.rstrip("\n").splitlines()
    assert len(lines) == 2  # --k 2 beats RAG_TOP_K=5: the flag overrides the environment
    parsed = [SOURCE_LINE.match(ln) for ln in lines]
    assert all(parsed), lines
    assert [int(m.group(1)) for m in parsed] == [1, 2]
    assert any(m.group(2) == "docs/product_faq.md" and "Where does Milvus store data?" in m.group(3) for m in parsed)
    assert len(openai_stub.state.requests) == 1


def test_json_output(workdir: Path, openai_stub):
    openai_stub.state.reply = REPLY
    openai_stub.state.reasoning = "Look at passage 1."
    res = run_cli("rag.cli", QUESTION, "--json", cwd=workdir, env=ask_env(LLM_BASE_URL=openai_stub.base_url))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["status"] == "answered" and out["answer"] == REPLY and out["reasoning"] == "Look at passage 1."
    assert set(out["timings"]) == {"load_model_ms", "embed_ms", "search_ms", "llm_first_token_ms", "total_ms"}
    assert all(v >= 0 for v in out["timings"].values())
    assert out["timings"]["total_ms"] >= out["timings"]["llm_first_token_ms"]
    srcs = out["sources"]
    assert [s["n"] for s in srcs] == list(range(1, len(srcs) + 1)) and 1 <= len(srcs) <= 5
    assert srcs[0]["source"].startswith("docs/") and srcs[0]["heading"] and srcs[0]["text"]
    assert any("Where does Milvus store data?" in s["heading"] for s in srcs[:3])


def test_retrieval_only_without_an_llm(workdir: Path):
    res = run_cli("rag.cli", QUESTION, cwd=workdir, env=ask_env())
    assert res.returncode == 0, res.stderr
    assert "No LLM is configured" in res.stdout
    _, sources = res.stdout.split("\n\nSources:\n")
    lines = sources.rstrip("\n").splitlines()
    cites = [ln for ln in lines if SOURCE_LINE.match(ln)]
    assert len(cites) >= 1 and len(lines) == 2 * len(cites)  # each citation followed by its passage
    assert "Milvus" in lines[1]


def test_unreachable_llm_is_one_line_and_exit_1(workdir: Path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    res = run_cli("rag.cli", QUESTION, cwd=workdir, env=ask_env(LLM_BASE_URL=url, LLM_TIMEOUT="5"))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln]
    assert lines == [LOADING, f"rag-ask: cannot connect to the LLM at {url}; start it or fix LLM_BASE_URL"], res.stderr


@pytest.mark.slow
def test_model_loading_is_announced_and_timed(workdir: Path):
    """Issue 14.5: one stderr line while the embedding model loads, and its time in the timings;
    neither when nothing loads (BM25 mode does not embed the question)."""
    res = run_cli("rag.cli", QUESTION, "--json", cwd=workdir, env=ask_env())
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [LOADING], res.stderr
    timings = json.loads(res.stdout)["timings"]
    assert timings["load_model_ms"] > 100  # torch and the network load in seconds, not micro-seconds
    assert timings["embed_ms"] < timings["load_model_ms"]  # the load is no longer hidden in the first embed

    res = run_cli("rag.cli", QUESTION, "--json", "--mode", "bm25", cwd=workdir, env=ask_env())
    assert res.returncode == 0, res.stderr
    assert "loading the embedding model" not in res.stderr
    assert json.loads(res.stdout)["timings"]["load_model_ms"] == 0


@pytest.mark.slow
def test_sources_show_similarity_and_rank_not_the_fused_score(workdir: Path):
    """Issue 14.6: the printed number is the dense similarity (what the score floor compares),
    with the hybrid rank; the fused RRF score stays internal."""
    shown = run_cli("rag.cli", QUESTION, "--retrieval-only", cwd=workdir, env=ask_env())
    as_json = run_cli("rag.cli", QUESTION, "--json", "--retrieval-only", cwd=workdir, env=ask_env())
    assert shown.returncode == 0 and as_json.returncode == 0, shown.stderr + as_json.stderr
    parsed = [m for ln in shown.stdout.splitlines() if (m := SOURCE_LINE.match(ln))]
    sources = json.loads(as_json.stdout)["sources"]
    assert len(parsed) == len(sources) >= 2
    for m, src in zip(parsed, sources, strict=True):
        assert float(m.group(4)) == pytest.approx(src["similarity"], abs=5e-4)
        assert int(m.group(5)) == src["rank"] and src["mode"] == "hybrid"
        assert abs(src["score"] - src["similarity"]) > 0.1  # the fused score is another number
    assert [s["rank"] for s in sources] == sorted(s["rank"] for s in sources)
