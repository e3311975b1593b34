"""The three answer backends the UI offers, and a cheap live check of each one.

- "deepseek": the DeepSeek API (needs DEEPSEEK_API_KEY);
- "local": any OpenAI-compatible server by URL, normally our own `model-host`;
- "retrieval-only": no LLM; the answer is the most relevant passages.

A status check is one GET {base_url}/models with a short timeout: it proves the server is up,
that the key is accepted, and names the model it serves, without spending any tokens.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from rag.config import RagConfig
from ui.config import DEFAULT_MODEL_HOST_URL, UIConfig

LABELS = {"deepseek": "DeepSeek API", "local": "Local model host", "retrieval-only": "Retrieval only"}


@dataclasses.dataclass(frozen=True)
class Backend:
    """One resolved choice: where to send chat requests, or nowhere (retrieval-only)."""

    kind: str  # "deepseek", "local" or "retrieval-only"
    base_url: str | None = None
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    problem: str | None = None  # why this backend cannot be used as configured

    @property
    def label(self) -> str:
        return LABELS[self.kind]


@dataclasses.dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str  # "serves deepseek-chat", "connection refused", ...
    models: tuple[str, ...] = ()


def default_backend(ui: UIConfig, rag: RagConfig) -> str:
    """RAG_UI_BACKEND if set; else DeepSeek when its key is set, then LLM_BASE_URL, then retrieval-only."""
    if ui.backend:
        return ui.backend
    if rag.deepseek_api_key:
        return "deepseek"
    if rag.llm_base_url:
        return "local"
    return "retrieval-only"


def default_local_url(rag: RagConfig) -> str:
    return rag.llm_base_url or DEFAULT_MODEL_HOST_URL


def resolve(kind: str, ui: UIConfig, rag: RagConfig, local_url: str | None = None) -> Backend:
    """Turn a UI choice (plus the URL typed in the sidebar) into a concrete endpoint."""
    if kind == "deepseek":
        if not rag.deepseek_api_key:
            return Backend(kind, ui.deepseek_base_url,
                           problem="needs DEEPSEEK_API_KEY (set it and restart rag-ui, or pick another backend)")
        # LLM_MODEL applies to DeepSeek only when no separate server is configured, as in rag-ask.
        model = (rag.llm_model if not rag.llm_base_url else None) or "deepseek-chat"
        return Backend(kind, ui.deepseek_base_url, model, rag.deepseek_api_key)
    if kind == "local":
        url = (local_url or "").strip() or default_local_url(rag)
        if not url.startswith(("http://", "https://")):
            return Backend(kind, url, problem=f"model host URL {url!r} must start with http:// or https://")
        url = url.rstrip("/")
        # LLM_API_KEY belongs to LLM_BASE_URL: a URL typed in the browser never receives it.
        same_host = rag.llm_base_url is not None and url == rag.llm_base_url.rstrip("/")
        key = (rag.llm_api_key or rag.deepseek_api_key) if same_host else None
        return Backend(kind, url, rag.llm_model, key or "not-needed")
    if kind == "retrieval-only":
        return Backend(kind)
    raise ValueError(f"unknown backend {kind!r}")


class Prober:
    """GET /models on each backend, cached for `ttl` seconds so many open tabs cost one request."""

    def __init__(self, timeout: float = 2.0, ttl: float = 10.0):
        self.timeout = timeout
        self.ttl = ttl
        self._cache: dict[tuple[str, str | None], tuple[float, Probe]] = {}
        self._lock = threading.Lock()

    def probe(self, backend: Backend) -> Probe:
        if backend.kind == "retrieval-only":
            return Probe(True, "no LLM; answers are the retrieved passages")
        if backend.problem:
            return Probe(False, backend.problem)
        assert backend.base_url
        key = (backend.base_url, backend.api_key)
        with self._lock:
            hit = self._cache.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        result = self._get_models(backend)
        with self._lock:
            self._cache[key] = (time.monotonic(), result)
        return result

    def probe_all(self, backends: list[Backend]) -> list[Probe]:
        """Check several backends in parallel: an unreachable host must not delay the others."""
        with ThreadPoolExecutor(max_workers=len(backends) or 1) as pool:
            return list(pool.map(self.probe, backends))

    def _get_models(self, backend: Backend) -> Probe:
        headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
        try:
            r = httpx.get(f"{backend.base_url}/models", headers=headers, timeout=self.timeout)
        except httpx.TimeoutException:
            return Probe(False, f"no answer within {self.timeout:g} s")
        except httpx.HTTPError as e:
            reason = str(e) or type(e).__name__
            if "refused" in reason.lower():
                reason = "connection refused (is it running?)"
            return Probe(False, f"unreachable: {reason}")
        if r.status_code in (401, 403):
            return Probe(False, f"reachable, but the API key was rejected (HTTP {r.status_code})")
        if r.status_code != 200:
            return Probe(False, f"GET /models answered HTTP {r.status_code}")
        try:
            models = tuple(m["id"] for m in r.json().get("data", []))
        except (ValueError, KeyError, TypeError, AttributeError):
            return Probe(False, "GET /models did not return an OpenAI-style model list")
        if not models:
            return Probe(False, "reachable, but serves no models")
        serving = backend.model if backend.model in models else models[0]
        if backend.model and backend.model not in models:
            return Probe(False, f"reachable, but does not serve {backend.model!r} (it serves {', '.join(models)})", models)
        return Probe(True, f"serves {serving}", models)

    def model_for(self, backend: Backend) -> str | None:
        """The model a request should name: the configured one, else the first one listed."""
        if backend.model or backend.kind == "retrieval-only":
            return backend.model
        probe = self.probe(backend)
        return probe.models[0] if probe.models else None
