"""Generate the settings and CLI reference tables of README.md and docs/ from the code.

Every setting is a field of a settings dataclass (`rag.settings.env`), and every command is an
argparse parser, so the tables are rendered from them instead of being written by hand:

    python tools/settings_table.py            # print the tables
    python tools/settings_table.py --write    # rewrite the marked blocks in README.md and docs/
    python tools/settings_table.py --check    # exit 1 when a marked block is stale (the tests do this)

A marked block sits between `<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->`.
Packages that are not importable yet (ui, model_host) are left out of the tables.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tools/settings_table.py` from anywhere
    sys.path.insert(0, str(REPO))

from rag.settings import settings_table  # noqa: E402

# (heading, module, class): the order of the tables in the docs.
SETTINGS = [
    ("Retrieval and answering", "rag.config", "RagConfig"),
    ("Ingest", "ingest.config", "IngestConfig"),
    ("Web UI", "ui.config", "UIConfig"),
]
# (command, module, parser factory): the CLI tables.
COMMANDS = [
    ("rag-ingest", "ingest.cli", "build_parser"),
    ("rag-ask", "rag.cli", "build_parser"),
    ("rag-ui", "ui.app", "build_parser"),
]
# Files that hold marked blocks, and which blocks each holds.
TARGETS = {
    "README.md": ("settings", "cli"),
    "docs/configuration.md": ("settings",),
    "docs/cli.md": ("cli",),
}
PLACEHOLDER_RE = re.compile(r"`?[\w:./-]*<[a-z_-]+>[\w:./-]*`?")


def _load(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def _cell(text: str) -> str:
    """A table cell: pipes escaped, `<placeholder>` words in code spans so HTML keeps them."""
    text = text.replace("%%", "%").replace("|", "\\|")  # argparse help doubles literal percent signs
    return PLACEHOLDER_RE.sub(lambda m: m.group(0) if m.group(0).startswith("`") else f"`{m.group(0)}`", text)


def _default(raw: str) -> str:
    if raw == "None":
        return "*(unset)*"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return f"`{raw}`"
    return f"`{value}`"


def settings_markdown() -> str:
    """One table per settings dataclass: variable, default, meaning."""
    parts = []
    for heading, module, name in SETTINGS:
        cls = _load(module, name)
        if cls is None:
            continue
        lines = [
            f"### {heading} settings",
            "",
            f"Read by `{module}.{name}`.",
            "",
            "| Variable | Default | Meaning |",
            "|---|---|---|",
        ]
        lines += [f"| `{var}` | {_default(default)} | {_cell(help)} |" for var, default, help in settings_table(cls)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _flag_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += f" {action.metavar or action.dest.upper()}"
            if action.choices:
                name = f"{', '.join(action.option_strings)} {{{','.join(map(str, action.choices))}}}"
        else:
            name = action.metavar or action.dest
            if action.nargs in ("+", "*"):
                name += "..."
        rows.append((name, action.help or "*(positional)*"))
    return rows


def cli_markdown() -> str:
    """One table per command: flag, meaning; the parser's description on top."""
    parts = []
    for command, module, factory in COMMANDS:
        make: Callable[[], argparse.ArgumentParser] | None = _load(module, factory)
        if make is None:
            continue
        parser = make()
        lines = [f"### `{command}`", "", _cell(parser.description or ""), "", "| Argument | Meaning |", "|---|---|"]
        lines += [f"| `{name}` | {_cell(help)} |" for name, help in _flag_rows(parser)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


BLOCKS: dict[str, Callable[[], str]] = {"settings": settings_markdown, "cli": cli_markdown}


def render(text: str, blocks: dict[str, str]) -> str:
    """`text` with every marked block replaced by its generated content."""
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- BEGIN generated:{name} [^>]*-->\n)(?:.*?\n)?(<!-- END generated:{name} -->)", re.DOTALL
        )
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def stale_files(write: bool = False) -> list[str]:
    """Files whose marked blocks differ from the generated tables (rewritten when `write`)."""
    generated = {name: fn() for name, fn in BLOCKS.items()}
    stale = []
    for rel, names in TARGETS.items():
        path = REPO / rel
        if not path.exists():
            stale.append(f"{rel} (missing)")
            continue
        text = path.read_text(encoding="utf-8")
        for name in names:
            if f"<!-- BEGIN generated:{name} " not in text:
                stale.append(f"{rel} (no generated:{name} block)")
        new = render(text, {n: generated[n] for n in names})
        if new != text:
            stale.append(rel)
            if write:
                path.write_text(new, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the marked blocks in place")
    g.add_argument("--check", action="store_true", help="exit 1 when a marked block is out of date")
    args = p.parse_args(argv)
    if not (args.write or args.check):
        print(settings_markdown() + "\n\n" + cli_markdown())
        return 0
    stale = stale_files(write=args.write)
    if args.write:
        print("rewrote: " + (", ".join(stale) if stale else "nothing (all up to date)"))
        return 0
    if stale:
        print("out of date: " + ", ".join(stale) + "; run `python tools/settings_table.py --write`", file=sys.stderr)
        return 1
    print("settings and CLI tables are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
