"""Typed settings read from environment variables, then overridden by CLI flags.

Every package keeps one frozen dataclass of its settings. A field names its environment
variable in `metadata={"env": ...}`; `load_settings` fills the dataclass from the environment
and then from explicit overrides (CLI flags), coercing strings to the field's type.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable and the fix."""


def env(name: str, default: Any = None, help: str = "") -> Any:
    """Declare a dataclass field backed by the environment variable `name`."""
    return dataclasses.field(default=default, metadata={"env": name, "help": help})


def _coerce(raw: str, typ: Any, var: str) -> Any:
    origin = typing.get_origin(typ)
    # Optional[X] / X | None. `X | None` has origin types.UnionType, whose str() is
    # "<class 'types.UnionType'>": comparing with "types.UnionType" never matched, and every
    # optional number (RAG_SCORE_FLOOR, RAG_EMBED_DIM) stayed a string.
    if origin is typing.Union or origin is getattr(types, "UnionType", typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw == "":
            return None
        typ = args[0]
    try:
        if typ is bool:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if typ in (int, float):
            return typ(raw)
    except ValueError:
        raise SettingsError(f"{var}={raw!r} is not a valid {typ.__name__}; fix or unset it") from None
    return raw


def load_settings(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build `cls` from the environment, then apply non-None `overrides` (CLI flags win)."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        var = f.metadata.get("env")
        if var and var in environ:
            values[f.name] = _coerce(environ[var], hints[f.name], var)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def settings_table(cls: type) -> list[tuple[str, str, str]]:
    """(variable, default, help) rows, for the README and `--help` epilogues."""
    rows = []
    for f in dataclasses.fields(cls):
        if "env" in f.metadata:
            rows.append((f.metadata["env"], repr(f.default), f.metadata.get("help", "")))
    return rows
