"""A real Milvus server for the server suite.

Either an external server (`MILVUS_URI=http://host:19530`; restarts are then skipped), or a
Milvus 2.3 standalone server from the `milvus` package (`pip install --no-deps milvus==2.3.5`),
started here. That server binds every interface, so this conftest refuses to start it unless
the process runs in a network namespace whose only interface is loopback; `test_milvus_server.py`
provides one with `unshare -n`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT = 180.0


def loopback_only() -> bool:
    return {name for _index, name in socket.if_nameindex()} == {"lo"}


class LocalMilvus:
    """The `milvus` package's standalone server (embedded etcd and rocksmq) in `data_dir`."""

    restartable = True

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.server = None

    def start(self) -> None:
        from milvus import MilvusServer

        t0 = time.monotonic()
        server = MilvusServer(wait_for_started=False)
        server.set_base_dir(str(self.data_dir))
        # Test-speed settings; consistency and recovery behave as with the defaults:
        # - time ticks every 50 ms instead of 200: Strong reads wait for the next tick;
        # - etcd sessions expire after 5 s instead of 30: a restarted server waits for its
        #   previous session to expire before it serves;
        # - a stop forces its way out after 3 s instead of 30 minutes.
        server.config.set("proxy.timeTickInterval", 50)
        server.config.set("common.session.ttl", 5)
        server.config.set("common.gracefulStopTimeout", 3)
        server.start()  # writes the config, unpacks the binary, launches `milvus run standalone`
        self.server = server
        health = f"http://127.0.0.1:{server.webservice_port}/healthz"
        while time.monotonic() - t0 < START_TIMEOUT:
            if server.server_proc.poll() is not None:
                raise RuntimeError(f"milvus exited with {server.server_proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if b"OK" in r.read():
                        self.started_in = time.monotonic() - t0
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"milvus not healthy after {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a graceful stop, forced after gracefulStopTimeout), SIGKILL after `grace` seconds."""
        if self.server is None or self.server.server_proc is None:
            return
        proc = self.server.server_proc
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        self.server.server_proc = None
        self.server.stop()  # closes its log files
        self.server = None

    def restart(self) -> float:
        t0 = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - t0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.listen_port}"

    def log_tail(self, n: int = 4000) -> str:
        logs = sorted((self.data_dir / "logs").glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in logs)


class ExternalMilvus:
    restartable = False
    started_in = 0.0

    def __init__(self, uri: str):
        self.uri = uri


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    uri = os.environ.get("MILVUS_URI", "")
    if uri.startswith(("http://", "https://")):
        yield ExternalMilvus(uri)
        return
    if not loopback_only():
        pytest.fail(
            "refusing to start a Milvus server that binds every interface outside a loopback-only "
            "network namespace; run tests/deploy/test_milvus_server.py, or set MILVUS_URI to a server"
        )
    try:
        import milvus  # noqa: F401
    except ImportError:
        pytest.skip("the `milvus` package is missing: pip install --no-deps milvus==2.3.5")
    server = LocalMilvus(tmp_path_factory.mktemp("milvus-server"))
    server.start()
    print(f"\nMilvus server healthy after {server.started_in:.1f} s at {server.uri}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_version(milvus_server) -> tuple[int, int]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus_server.uri, token=os.environ.get("MILVUS_TOKEN", ""))
    try:
        version = client.get_server_version()
    finally:
        client.close()
    m = re.search(r"(\d+)\.(\d+)", version)
    assert m, version
    print(f"\nMilvus server version {version}")
    return int(m.group(1)), int(m.group(2))


@pytest.fixture
def collection(request, milvus_server) -> str:
    """A fresh collection name per test, dropped afterwards."""
    from pymilvus import MilvusClient

    name = "t_" + re.sub(r"\W", "_", request.node.name)[:50]
    token = os.environ.get("MILVUS_TOKEN", "")
    client = MilvusClient(uri=milvus_server.uri, token=token)
    if client.has_collection(name):
        client.drop_collection(name)
    client.close()
    yield name
    client = MilvusClient(uri=milvus_server.uri, token=token)  # the port can change across a restart
    try:
        if client.has_collection(name):
            client.drop_collection(name)
    finally:
        client.close()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Three small markdown files with distinct topics."""
    docs = tmp_path / "corpus"
    docs.mkdir()
    (docs / "install.md").write_text(
        "# Installing the widget\n\n## On Linux\n\nRun `pip install widget` and then `widget init` to create "
        "the configuration file in your home directory.\n\n## On macOS\n\nUse Homebrew: `brew install widget`.\n",
        encoding="utf-8",
    )
    (docs / "backup.md").write_text(
        "# Backups\n\n## Schedule\n\nThe database is backed up every night at 02:00 UTC to object storage.\n\n"
        "## Restore\n\nTo restore, stop the service and run `widget restore --from latest`.\n",
        encoding="utf-8",
    )
    (docs / "oncall.md").write_text(
        "# On-call\n\nThe on-call engineer rotates every Monday. Pages go to the phone first, then to chat.\n",
        encoding="utf-8",
    )
    return docs
