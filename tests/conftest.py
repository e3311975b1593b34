"""Fixtures shared by every test package: the real embedder, a fresh Milvus Lite db, an LLM stub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RAG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2, loaded once per session."""
    from rag.embedder import MiniLMEmbedder

    return MiniLMEmbedder(device="cpu")


@pytest.fixture
def milvus_uri(tmp_path: Path) -> str:
    """A fresh Milvus Lite db (a directory) per test."""
    return str(tmp_path / "milvus.db")


@pytest.fixture
def openai_stub():
    """A real OpenAI-protocol server on 127.0.0.1; tweak `stub.state` to script replies."""
    from tests.support.openai_stub import OpenAIStub

    with OpenAIStub() as stub:
        yield stub


def shared_data(name: str) -> Path:
    """A folder of ../shared/data; tests that need it fail loudly when it is missing."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"shared data {path} is missing; set RAG_SHARED_DATA to the shared/data folder")
    return path
