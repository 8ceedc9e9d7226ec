"""``mtrank serve``: settings, start-up, the worker processes, uvicorn and a draining shutdown.

Start-up problems (bad settings, a CUDA device that is not there, buckets that do not fit the
models) end the process with one line naming the variable and exit status 2.

On SIGTERM (or SIGINT) readiness turns 503 at once, the listening socket closes, requests in
flight finish (up to ``MTRANK_DRAIN_TIMEOUT_S``), then the lifespan releases the models, the
batchers and the Redis client.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from mtrank.service import listener, tracing
from mtrank.service.app import create_app, served_app
from mtrank.service.logs import configure_logging, flush_logs
from mtrank.service.repository import StartupError
from mtrank.service.runner import DeviceError
from mtrank.service.serving import ServingState
from mtrank.service.settings import ConfigError, Settings, deprecated_variables, load_settings, unknown_variables
from mtrank.service.workers import follow_supervisor, supervise, worker_index

log = logging.getLogger("mtrank.main")

GC_YOUNG_THRESHOLD = 20_000
"""Container allocations (net of frees) between young-generation collections (CPython's default: 700)."""


class _DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the service as draining before it stops accepting."""

    def __init__(self, config: uvicorn.Config, serving: ServingState):
        super().__init__(config)
        self.serving = serving

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        if not self.serving.draining:
            log.info("signal %d: draining in-flight requests (up to %.0f s)", sig,
                     self.serving.settings.drain_timeout_s)
        self.serving.draining = True
        super().handle_exit(sig, frame)


def serve(repo: str | Path | None = None, host: str | None = None, port: int | None = None,
          store_url: str | None = None) -> None:
    """Serve the model repository; arguments given here override the environment."""
    try:
        settings = load_settings(model_repo=repo, host=host, port=port, store_url=store_url)
    except ConfigError as e:
        _die(str(e))
    worker = worker_index()
    if worker is not None:
        # A reload signal may come from a sibling before this worker can reload: not fatal meanwhile.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        follow_supervisor()
    configure_logging(settings.log_level, settings.log_format, settings.log_flush_ms / 1000.0)
    for message in deprecated_variables():  # once: the workers get the new names
        log.warning(message)
    count = settings.worker_count() if worker is None else 1
    if count > 1 and not hasattr(socket, "SO_REUSEPORT"):
        if settings.workers:
            _die("MTRANK_WORKERS: more than one worker needs SO_REUSEPORT (Linux)")
        count = 1
    if count > 1:
        auto = "" if settings.workers else " (one per available core)"
        log.info("starting %d workers%s on http://%s:%d", count, auto, settings.host, settings.port)
        raise SystemExit(supervise(settings, count))
    try:
        if tracing.configure(settings.otel_endpoint):
            log.info("tracing to %s", settings.otel_endpoint or "OTEL_EXPORTER_OTLP_ENDPOINT")
    except tracing.TracingError as e:
        _die(str(e))
    for message in unknown_variables():
        log.warning(message)
    try:
        with asyncio.Runner(loop_factory=listener.loop_factory()) as runner:
            runner.run(_serve(settings))
    finally:
        tracing.shutdown()  # flushes the spans still buffered


async def _serve(settings: Settings) -> None:
    try:
        serving = await ServingState.start(settings)
    except (StartupError, DeviceError, ConfigError) as e:
        _die(str(e))
    app = create_app(settings, serving=serving)
    config = uvicorn.Config(
        served_app(app), host=settings.host, port=settings.port, workers=1, lifespan="on", access_log=False,
        log_config=None, log_level=settings.log_level, timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        timeout_keep_alive=5,
    )
    # Start-up leaves ~60k long-lived objects (modules, the framework, the models); a full collection
    # walks them all, 15-35 ms here, which was the p99 of 1000-candidate requests at concurrency 1
    # (47 ms against 18 ms with the collector off). Frozen, they are never walked again.
    gc.collect()
    gc.freeze()
    # A 500-candidate request allocates ~2 000 container objects (decoded candidates, feature
    # dicts, response items) that reference counting frees when it is answered. At the default
    # young-generation threshold (700) the collector runs two or three times inside each request
    # and walks, then promotes, that request's live objects; at 20 000 most are gone by then.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    reason = await serving.not_ready_reason()
    notices = serving.repository.refusal_notice()
    log.info("serving %s on http://%s:%d (%s)%s", settings.model_repo, settings.host, settings.port,
             "ready" if reason is None else f"not ready: {reason}", f"; {notices}" if notices else "",
             extra={"event": "startup", "ready": reason is None, "served": serving.repository.served()})
    worker = worker_index() is not None
    try:
        # Our own socket (the workers share it by SO_REUSEPORT); the loop accepts on it in bursts.
        sock = listener.listening_socket(settings.host, settings.port, reuse_port=worker)
    except OSError as e:
        await serving.close()
        _die(f"cannot listen on {settings.host}:{settings.port} (MTRANK_HOST, MTRANK_PORT): {e.strerror or e}")
    if worker:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload(serving)))
    await _DrainingServer(config, serving).serve(sockets=[sock])


async def _reload(serving: ServingState) -> None:
    """SIGHUP in a worker: reload the repository, as POST /admin/reload does."""
    report = await serving.repository.reload()
    log.info("reloaded on SIGHUP: %s", report.to_dict(), extra={"event": "reload"})


def _die(message: str) -> None:
    flush_logs()  # the lines logged so far (written in blocks) come before the error
    print(f"mtrank serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    serve()
