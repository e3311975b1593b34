"""`model-host serve --api-processes N`: the engine on this process's main thread, the OpenAI
routes in N spawned API processes (model_host/server/remote.py) that accept from one listening
socket and reach the engine through the hub (model_host/server/hub.py).

Why: with the routes on a thread of the engine's process, a wave of 128 arrivals is parsed and
tokenized one after another on one event loop (~1 ms of CPU each) that shares the GIL with the
engine; docs/benchmarks.md measures what N processes change.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
from argparse import Namespace

from model_host.server.hub import EngineHub
from model_host.server.remote import ApiSpec, api_main

log = logging.getLogger("model_host.server")


def serve_api_processes(served, args: Namespace, count: int, http_impl: str, loop_impl: str) -> int:
    """Serve `served` (server/cli.py's Served) until SIGTERM/SIGINT, with `count` API processes;
    returns like server/cli.py's serve (1 when the engine or an API process failed)."""
    import uvicorn

    try:  # bound here, before anything is spawned: a taken port is one clear error
        sock = uvicorn.Config(app=None, host=args.host, port=args.port).bind_socket()
    except SystemExit:  # uvicorn logs the OSError and exits
        raise SystemExit(f"model-host: could not serve on {args.host}:{args.port} (see the error above); "
                         f"pick a free --port") from None
    tmp = tempfile.mkdtemp(prefix="model-host-")
    hub = EngineHub(served.loop, served.metrics, os.path.join(tmp, "engine.sock"), os.urandom(32))
    hub.start()
    spec = ApiSpec(hub.address, hub.authkey, served.model_name, str(served.tokenizer_path), args.api_key,
                   args.shutdown_timeout, http_impl, loop_impl)
    spawn = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA state
    procs = [spawn.Process(target=api_main, args=(spec, sock, i), name=f"model-host-api-{i}")
             for i in range(count)]
    signals: list[int] = []
    failed: list[str] = []

    def stop_api() -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn's graceful shutdown, --shutdown-timeout long

    def on_signal(sig: int, frame) -> None:
        signals.append(sig)
        stop_api()

    def watch() -> None:
        """The engine runs until every API process has ended; one that ends unasked ends all."""
        try:
            ready = multiprocessing.connection.wait([p.sentinel for p in procs])
            if not signals and served.loop.error is None:
                # Its sentinel can be ready a moment before the process can be reaped: join it.
                gone = next(p for p in procs if p.sentinel in ready)
                gone.join()
                failed.append(f"API process {gone.name} exited with status {gone.exitcode}")
                log.error("%s; stopping the server", failed[0])
                stop_api()
            for p in procs:
                p.join()
        finally:
            served.loop.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    watcher = threading.Thread(target=watch, name="api-watch", daemon=True)
    try:
        for p in procs:
            p.start()
        watcher.start()
        log.info("serving %s on http://%s:%d/v1 (%d API processes, HTTP: %s on %s; Ctrl-C or SIGTERM stops it)",
                 served.model_name, args.host, args.port, len(procs), http_impl, loop_impl)
        served.loop.run()
        # A failed engine leaves the API processes answering /health with 503 until the
        # orchestrator stops us.
        watcher.join(timeout=None if served.loop.error is not None else args.shutdown_timeout + 10)
    finally:
        stop_api()
        for p in procs:
            p.join(timeout=args.shutdown_timeout + 5)
            if p.is_alive():
                p.kill()
        hub.close()
        served.close()
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if served.loop.error is not None or failed:
        return 1
    for sig in signals[-1:]:  # the exit status says which signal stopped the server (no traceback)
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)
    return 0
