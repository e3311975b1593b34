"""RAG through our own model host: ingest docs, `model-host serve` a tiny checkpoint, `rag-ask` it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.openai_stub import free_port

DOCS = {
    "storage.md": "# Storage\n\n## Where data lives\n\nMilvus keeps inserted vectors in object storage such as MinIO or S3.\n",
    "index.md": "# Indexes\n\n## HNSW\n\nHNSW is a graph index with fast approximate search.\n",
}


def test_rag_ask_streams_an_answer_from_the_model_host(tmp_path: Path, tiny_checkpoint: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    uri = str(tmp_path / "milvus.db")
    # A subprocess: Milvus Lite keeps a db locked by the process that opened it, even after close().
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILVUS_URI": uri}
    env.pop("DEEPSEEK_API_KEY", None)
    subprocess.run([sys.executable, "-m", "ingest.cli", str(docs), "--quiet"], env=env, check=True, timeout=180)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "model_host.cli", "serve", "--checkpoint", str(tiny_checkpoint),
         "--port", str(port), "--kv-memory-gb", "0.02", "--max-model-len", "4096"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "model-host did not come up"
            time.sleep(0.3)

        ask_env = {**env, "LLM_BASE_URL": f"http://127.0.0.1:{port}/v1", "LLM_MAX_TOKENS": "12"}
        out = subprocess.run([sys.executable, "-m", "rag.cli", "Where does Milvus keep vectors?", "--json"],
                             env=ask_env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["status"] == "answered"
        assert result["answer"]  # random weights: gibberish, but real tokens through the real protocol
        assert result["usage"]["completion_tokens"] == 12 or result["usage"]["finish_reason"] == "stop"
        assert result["sources"][0]["source"].endswith("storage.md")
        assert {"embed_ms", "search_ms", "llm_first_token_ms", "total_ms"} <= set(result["timings"])

        streamed = subprocess.run([sys.executable, "-m", "rag.cli", "Where does Milvus keep vectors?"],
                                  env=ask_env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert streamed.returncode == 0, streamed.stderr
        assert "Sources:" in streamed.stdout and "storage.md › Storage › Where data lives" in streamed.stdout
    finally:
        server.terminate()
        server.wait(timeout=20)
