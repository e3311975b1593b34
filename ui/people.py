"""Who is asking: the login's user, or, with no login, the browser (an id kept in localStorage).

Gradio's `BrowserState` encrypts what it stores with a secret; a random secret per process would
make every browser a stranger after a restart, so the secret lives in the data dir (mode 0600).
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path
from typing import Any

SECRET_FILE = "ui-secret"
BROWSER_KEY = "rag-ui-browser-id"  # the localStorage key


def browser_secret(data_dir: Path) -> str:
    """The data dir's BrowserState secret, created on first use."""
    path = Path(data_dir) / SECRET_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def new_browser_id(current: str | None) -> str:
    """Keep a browser's id; give a new browser one."""
    return current if current else uuid.uuid4().hex


def user_of(request: Any, browser_id: str | None) -> str:
    """"user:<login>" with a login page; else "browser:<id>"; an API client without either is
    its Gradio session (its chats last as long as the client)."""
    name = getattr(request, "username", None)
    if name:
        return f"user:{name}"
    if browser_id:
        return f"browser:{browser_id}"
    return f"session:{getattr(request, 'session_hash', None) or 'anonymous'}"
