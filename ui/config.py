"""Settings of the `ui` package: where the web server listens, who may use it, upload limits.

Retrieval and LLM settings stay in `rag.config.RagConfig` (MILVUS_URI, RAG_COLLECTION, RAG_TOP_K,
DEEPSEEK_API_KEY, LLM_BASE_URL, ...); ingest settings in `ingest.config.IngestConfig`. This
dataclass holds only what the web UI adds. Like the others it reads the environment first and
then CLI flags (`rag-ui --help`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rag.config import DEEPSEEK_BASE_URL
from rag.settings import SettingsError, env, load_settings

DEFAULT_MODEL_HOST_URL = "http://127.0.0.1:8000/v1"  # where `model-host` listens by default
BACKENDS = ("deepseek", "local", "retrieval-only")


@dataclasses.dataclass(frozen=True)
class UIConfig:
    """Everything `rag-ui` adds to the rag and ingest settings."""

    host: str = env("RAG_UI_HOST", "127.0.0.1", "interface to bind; 0.0.0.0 exposes the UI to the network (set a password)")
    port: int = env("RAG_UI_PORT", 7860, "TCP port of the web UI")
    user: str | None = env("RAG_UI_USER", None, "user name for the login page (with RAG_UI_PASSWORD)")
    password: str | None = env("RAG_UI_PASSWORD", None, "password for the login page (with RAG_UI_USER)")
    data_dir: str = env("RAG_DATA_DIR", "./data", "uploaded files are stored under DATA_DIR/uploads/<collection>/")
    backend: str | None = env("RAG_UI_BACKEND", None, "initial backend: deepseek, local or retrieval-only (unset: DeepSeek if DEEPSEEK_API_KEY is set, else local if LLM_BASE_URL is set, else retrieval-only)")
    deepseek_base_url: str = env("DEEPSEEK_BASE_URL", DEEPSEEK_BASE_URL, "DeepSeek API endpoint (change only for a proxy)")
    concurrency: int = env("RAG_UI_CONCURRENCY", 4, "chat answers streamed at the same time")
    max_zip_mb: float = env("RAG_UI_MAX_ZIP_MB", 50.0, "largest upload (a .zip, compressed)")
    max_unzipped_mb: float = env("RAG_UI_MAX_UNZIPPED_MB", 200.0, "largest total size of the files inside one .zip")
    max_zip_ratio: float = env("RAG_UI_MAX_ZIP_RATIO", 100.0, "largest compression ratio of a .zip member (zip-bomb guard)")
    max_zip_files: int = env("RAG_UI_MAX_ZIP_FILES", 2000, "most members one .zip may hold")
    status_every: float = env("RAG_UI_STATUS_EVERY", 30.0, "seconds between backend status checks (0 turns the timer off)")
    probe_timeout: float = env("RAG_UI_PROBE_TIMEOUT", 2.0, "seconds a backend may take to answer GET /models")
    warm_up: bool = env("RAG_UI_WARMUP", True, "load the embedding model at start-up so the first question is fast")

    def __post_init__(self) -> None:
        if bool(self.user) != bool(self.password):
            raise SettingsError("set both RAG_UI_USER and RAG_UI_PASSWORD (or neither) to turn the login page on")
        if self.backend is not None and self.backend not in BACKENDS:
            raise SettingsError(f"RAG_UI_BACKEND={self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.concurrency < 1:
            raise SettingsError(f"RAG_UI_CONCURRENCY must be >= 1 (got {self.concurrency})")
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"RAG_UI_PORT={self.port} is not a TCP port")
        for name in ("max_zip_mb", "max_unzipped_mb", "max_zip_ratio", "max_zip_files", "probe_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive (got {getattr(self, name)})")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> UIConfig:
        """Environment first, then CLI overrides (None means 'not given')."""
        return load_settings(cls, environ, **overrides)

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.user, self.password) if self.user and self.password else None

    @property
    def uploads_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"

    @property
    def history_path(self) -> Path:
        """The SQLite file of saved chats and answer feedback."""
        return Path(self.data_dir) / "ui.sqlite3"
