"""OpenAI wire protocol: request models, validation into SamplingParams, error bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_host.sampler import MAX_TOP_LOGPROBS, SamplingParams

DEFAULT_MAX_TOKENS = 1024


class APIError(Exception):
    """Becomes an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of the OpenAI API that change the answer and that this server does not implement: a
# request that sets one gets a 400 naming it instead of an answer that silently ignores it.
# Each with the values that mean "off", which clients may send explicitly.
_NO_TOOLS = ("function calling is not implemented", (None, [], "none"))
_NO_PENALTY = ("repetition penalties are not implemented", (None, 0))
UNSUPPORTED = {
    "tools": _NO_TOOLS, "tool_choice": _NO_TOOLS, "functions": _NO_TOOLS, "function_call": _NO_TOOLS,
    "presence_penalty": _NO_PENALTY, "frequency_penalty": _NO_PENALTY,
    "logit_bias": ("logit_bias is not implemented", (None, {})),
    "best_of": ("best_of is not implemented; send separate requests", (None, 1)),
    "suffix": ("suffix (insertion) is not implemented", (None, "")),
}


class ResponseFormat(BaseModel):
    type: str


class _Sampling(BaseModel):
    # Strict: "10" is not a number. Unknown fields (user, metadata...) do not change the answer
    # and are ignored; the ones that would are in UNSUPPORTED.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as in vLLM
    seed: int | None = Field(None, ge=0, lt=2**64)  # a torch.Generator seed
    stop: str | list[str] | None = None
    n: int = 1
    ignore_eos: bool = False  # extension, for benchmarks
    response_format: ResponseFormat | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    best_of: Any = None
    suffix: Any = None

    def num_logprobs(self) -> int | None:
        """None: no logprobs; n: the chosen token's and the n most likely ones."""
        return None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def sampling(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        """Validate against the context and build SamplingParams; raises APIError (400)."""
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported; send {self.n} separate requests", param="n")
        for name, (why, off) in UNSUPPORTED.items():
            if getattr(self, name) not in off:
                raise APIError(400, f"{name} is not supported by this server ({why}); remove it", param=name)
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(400, f"response_format type {self.response_format.type!r} is not supported: JSON mode "
                           "is not implemented; ask for JSON in the prompt, or send type 'text'",
                           param="response_format")
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if requested is not None and requested <= 0:
            raise APIError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        room = max_model_len - prompt_len
        if room <= 0 or (requested is not None and requested > room):
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + (requested or 1)} tokens ({prompt_len} in the messages, {requested or 1} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="max_tokens", code="context_length_exceeded",
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return SamplingParams(
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                max_tokens=requested or min(DEFAULT_MAX_TOKENS, room), stop=stop, ignore_eos=self.ignore_eos,
                logprobs=self.num_logprobs(),
            )
        except ValueError as e:  # the fields above are validated; this is the backstop
            raise APIError(400, str(e)) from None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's limit

    def num_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v
