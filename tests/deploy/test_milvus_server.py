"""Runs tests/deploy/server_suite against a real Milvus 2.3 server, inside a loopback-only network namespace.

The `milvus` package (`pip install --no-deps milvus==2.3.5`) is a full standalone server with
embedded etcd and rocksmq; it binds every interface. So the server and the suite's client run
in a fresh network namespace (`unshare -n`) whose only interface is `lo`: nothing outside the
test can reach it, and it cannot collide with other Milvus instances on this machine.
Where that is not possible the test skips and prints why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

SUITE = "tests/deploy/server_suite"


def _namespace_prefix() -> list[str]:
    """`unshare -n` (root), else `unshare -rn` (unprivileged user namespaces); skip when neither works."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("`unshare` or `ip` is not installed (util-linux, iproute2); cannot isolate the Milvus server")
    tried = []
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        r = subprocess.run([*prefix, "--", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
        if r.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {r.stderr.strip() or r.returncode}")
    pytest.skip("network namespaces are not permitted here (" + "; ".join(tried) + "); the Milvus server checks need one")


@pytest.mark.slow
def test_server_suite_in_network_namespace():
    spec = importlib.util.find_spec("milvus")
    if spec is None or not (spec.origin or "").endswith("__init__.py"):
        pytest.skip("the Milvus server package is missing: .venv/bin/pip install --no-deps milvus==2.3.5")
    prefix = _namespace_prefix()
    env = {k: v for k, v in os.environ.items() if k not in ("MILVUS_URI", "MILVUS_TOKEN", "PYTEST_ADDOPTS")}
    env["RAG_SERVER_SUITE"] = "1"
    inner = f'ip link set lo up && exec "{sys.executable}" -m pytest {SUITE} -q -ra -p no:cacheprovider'
    t0 = time.perf_counter()
    r = subprocess.run([*prefix, "--", "bash", "-c", inner], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=420)
    print(f"server suite in {' '.join(prefix)} ({time.perf_counter() - t0:.0f} s):\n{r.stdout[-6000:]}{r.stderr[-3000:]}")
    assert r.returncode == 0, f"server suite failed (exit {r.returncode}); output above"
