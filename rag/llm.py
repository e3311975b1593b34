"""Streaming chat client for any OpenAI-compatible endpoint: the DeepSeek API or our model host."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import openai


class LLMError(RuntimeError):
    """The LLM could not answer; the message is one line that says why and what to check."""


@dataclasses.dataclass(frozen=True)
class Delta:
    kind: str  # "answer" or "reasoning" (DeepSeek-R1 style `reasoning_content`, kept apart)
    text: str


@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None


class LLMClient:
    """Thin wrapper over the `openai` SDK that streams deltas and maps failures to `LLMError`."""

    def __init__(self, base_url: str, model: str | None, api_key: str, timeout: float = 60.0):
        self.base_url = base_url
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=1)
        self._model = model
        self.usage = Usage()

    @property
    def model(self) -> str:
        """The configured model, else the first one the server lists (a self-hosted model host)."""
        if self._model is None:
            with _llm_errors(self.base_url):
                models = self._client.models.list().data
            if not models:
                raise LLMError(f"{self.base_url} serves no models; set LLM_MODEL")
            self._model = models[0].id
        return self._model

    def stream(
        self, messages: list[dict[str, str]], max_tokens: int = 1024, temperature: float = 0.3,
    ) -> Iterator[Delta]:
        """Yield answer and reasoning deltas as they arrive; `self.usage` is filled at the end."""
        self.usage = Usage()
        with _llm_errors(self.base_url):
            stream = self._client.chat.completions.create(
                model=self.model, messages=messages, stream=True, max_tokens=max_tokens,
                temperature=temperature, stream_options={"include_usage": True},
            )
            try:
                for event in stream:
                    if event.usage:
                        u = event.usage
                        details = getattr(u, "prompt_tokens_details", None)
                        self.usage.prompt_tokens = u.prompt_tokens
                        self.usage.completion_tokens = u.completion_tokens
                        self.usage.cached_tokens = getattr(details, "cached_tokens", 0) or 0
                    for choice in event.choices:
                        if choice.finish_reason:
                            self.usage.finish_reason = choice.finish_reason
                        reasoning = getattr(choice.delta, "reasoning_content", None)
                        if reasoning:
                            yield Delta("reasoning", reasoning)
                        if choice.delta.content:
                            yield Delta("answer", choice.delta.content)
            finally:
                stream.close()  # on early exit too: the server frees the sequence at once

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 256, temperature: float = 0.0) -> str:
        """Non-streamed answer text (used for short helper calls such as question rewriting)."""
        return "".join(d.text for d in self.stream(messages, max_tokens, temperature) if d.kind == "answer")


@contextlib.contextmanager
def _llm_errors(where: str) -> Iterator[None]:
    """SDK exceptions become one clear `LLMError` line that says what to check."""
    try:
        yield
    except openai.APITimeoutError as e:
        raise LLMError(f"LLM at {where} timed out; raise LLM_TIMEOUT or check the server load") from e
    except openai.APIConnectionError as e:
        raise LLMError(f"cannot connect to the LLM at {where}; start it or fix LLM_BASE_URL") from e
    except openai.AuthenticationError as e:
        raise LLMError(f"LLM at {where} rejected the API key; check LLM_API_KEY / DEEPSEEK_API_KEY") from e
    except openai.NotFoundError as e:
        raise LLMError(
            f"LLM at {where} does not know this model or path; check LLM_MODEL and LLM_BASE_URL (it usually ends in /v1)"
        ) from e
    except openai.APIStatusError as e:
        raise LLMError(f"LLM at {where} answered HTTP {e.status_code}: {e.message}") from e
    except openai.OpenAIError as e:
        raise LLMError(f"LLM at {where} failed: {e}") from e
