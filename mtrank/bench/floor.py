"""The serving floor: what HTTP, batching and ONNX Runtime alone reach on this machine.

An ASGI app under the service's HTTP stack (uvicorn with uvloop and httptools, one process per core as
the service runs) that reads each request's body, puts a fixed feed of as many rows as the request has
candidates through the service's own :class:`mtrank.service.batcher.Batcher` and ONNX Runtime session
settings, and answers a fixed body of that many items. No decoding, features, lookups, fusion,
metrics or log line: every figure the service reaches is below this one, so the floor says how much
of a target is left for the ranking path on this machine (the bench reports it beside the targets).

Configured by environment (``FLOOR_VERSION_DIR``, ``FLOOR_GRAPH``); ``GET`` answers at once with the
process id (readiness).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from mtrank.bench.engine import random_feed
from mtrank.bench.server import free_port, process_and_children
from mtrank.manifest import load_manifest
from mtrank.service.batcher import Batcher
from mtrank.service.runner import BATCH_SIZES, GraphRunner, best_batch_rows
from mtrank.service.settings import Settings

_STATE: dict[str, Any] = {}


def _start() -> None:
    vdir = Path(os.environ["FLOOR_VERSION_DIR"])
    manifest = load_manifest(vdir, verify=False)
    graph = os.environ["FLOOR_GRAPH"]
    batches, threads = Settings.model_construct().concurrency()
    runner = GraphRunner(vdir / manifest.graphs[graph].file, "cpu", threads)
    batch_rows = best_batch_rows(runner.warm_up(BATCH_SIZES))  # as the service sizes its batches
    per_request = frozenset(i.name for i in runner.inputs if i.per_request)
    _STATE.update(
        manifest=manifest, runner=runner, feeds={}, answers={}, rng=np.random.default_rng(0),
        batcher=Batcher(runner.run, runner.output_names, manifest.name, graph, "cpu", max_batch_rows=batch_rows,
                        max_concurrent=batches, request_inputs=per_request),
    )


def _fixed(rows: int) -> tuple[dict[str, np.ndarray], bytes]:
    """The feed and the answer for a request of ``rows`` candidates (made once per size)."""
    feed = _STATE["feeds"].get(rows)
    if feed is None:
        feed = _STATE["feeds"][rows] = random_feed(_STATE["runner"], _STATE["manifest"], rows, _STATE["rng"])
        items = [{"item_id": f"v{i}", "rank": i + 1, "score": 0.5} for i in range(rows)]
        _STATE["answers"][rows] = orjson.dumps({"items": items})
    return feed, _STATE["answers"][rows]


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _start()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer = b"%d" % os.getpid()  # GET: which process answered (the readiness check waits for each)
    if scope["method"] == "POST":
        # The candidates are counted, not parsed: a candidate object is the only place "item_id" occurs.
        feed, answer = _fixed(max(1, body.count(b'"item_id"')))
        await _STATE["batcher"].submit(feed, time.monotonic() + 30.0)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


class FloorServer:
    """The floor app under uvicorn in a process group of its own; ``port``, ``pids()``, ``stop()``."""

    def __init__(self, version_dir: Path, graph: str, workers: int, ready_timeout_s: float = 120.0):
        self.port = free_port()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        env = os.environ | {"FLOOR_VERSION_DIR": str(Path(version_dir).resolve()), "FLOOR_GRAPH": graph}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "mtrank.bench.floor:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
             "--log-level", "warning", "--timeout-keep-alive", "5"],
            env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        deadline, answered = time.monotonic() + ready_timeout_s, set()
        while len(answered) < workers:  # every worker has loaded its session
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"floor server exited with {self.proc.returncode}: {self._log.read()[-2000:]!r}")
            try:
                with httpx.Client(timeout=1.0) as client:  # a new connection each time: any worker may take it
                    answered.add(client.get(f"http://127.0.0.1:{self.port}/").text)
            except httpx.HTTPError:
                time.sleep(0.2)
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"floor server: {len(answered)} of {workers} workers ready in {ready_timeout_s} s")

    def pids(self) -> list[int]:
        return process_and_children(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
