"""Several serving processes behind one port (``MTRANK_WORKERS``: N, or 0 for one per available core; Linux).

Each worker is a whole ``mtrank serve`` of its own (event loop, batchers, models, Redis client) that
binds the same address with ``SO_REUSEPORT``, so the kernel spreads connections over them. One
process has one event loop and one GIL, which limit what it can do with small requests (decoding,
features and responses are Python); more processes use more cores for that work.

This process (the supervisor) loads nothing: it starts the workers, gives each its share of the
cores (batches in flight and intra-op threads, unless those are set), forwards SIGTERM/SIGINT (each
worker drains) and SIGHUP (each worker reloads its repository: a worker that answers
``POST /admin/reload`` sends SIGHUP here so that the others reload too), and stops them all when
one exits unexpectedly, with its exit status, so the orchestrator restarts the pod.

Metrics: the workers write theirs to a directory of their own (``PROMETHEUS_MULTIPROC_DIR``, the
Prometheus client's multiprocess mode) and any of them answers ``/metrics`` with the sum over all.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from mtrank.service.logs import flush_logs
from mtrank.service.settings import DEPRECATED_VARIABLES, Settings

WORKER_VARIABLE = "_MTRANK_WORKER"
"""Set in a worker's environment to ``INDEX/COUNT``: it binds with SO_REUSEPORT and reports reloads here."""
SUPERVISOR_VARIABLE = "_MTRANK_SUPERVISOR"
"""The supervisor's pid, in a worker's environment."""
WARM_UP_LOCK_VARIABLE = "_MTRANK_WARM_UP_LOCK"
"""A file the workers lock while they time their graphs: one at a time, so that no worker's timing
is taken while another's runs on the same cores."""
PR_SET_PDEATHSIG = 1


def worker_index() -> tuple[int, int] | None:
    """(index, count) when this process is a supervised worker, else None."""
    value = os.environ.get(WORKER_VARIABLE)
    if not value:
        return None
    index, count = value.split("/")
    return int(index), int(count)


def follow_supervisor() -> None:
    """In a worker: get SIGTERM when the supervisor dies, however it dies (Linux ``prctl``), and
    leave at once if it is already gone. Workers run in a process group of their own, so a terminal's
    Ctrl-C reaches only the supervisor, which forwards it once (twice, uvicorn skips the drain)."""
    supervisor = int(os.environ.get(SUPERVISOR_VARIABLE, "0"))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if supervisor and os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def warm_up_turn() -> Iterator[None]:
    """Hold the workers' warm-up lock (no lock outside a supervised worker)."""
    path = os.environ.get(WARM_UP_LOCK_VARIABLE)
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def supervise(settings: Settings, count: int) -> int:
    """Run ``count`` workers until a signal stops them or one fails; the exit status."""
    metrics_dir = tempfile.mkdtemp(prefix="mtrank-metrics-")
    share = max(1, settings.cores() // count)
    batches, threads = settings.concurrency(share)
    env = os.environ | {
        "MTRANK_WORKERS": "1", "MTRANK_CPUS": str(share),
        "MTRANK_HOST": settings.host, "MTRANK_PORT": str(settings.port),
        "MTRANK_MAX_CONCURRENT_BATCHES": str(batches), "MTRANK_INTRA_OP_THREADS": str(threads),
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir, SUPERVISOR_VARIABLE: str(os.getpid()),
        WARM_UP_LOCK_VARIABLE: os.path.join(metrics_dir, "warm-up.lock"),
    }
    if settings.model_repo is not None:
        env["MTRANK_MODEL_REPO"] = str(settings.model_repo)
    # The store settings under their new names only: each deprecated name is warned about once, here.
    for old in DEPRECATED_VARIABLES:
        env.pop(old, None)
    env |= {"MTRANK_STORE_PREFIX": settings.store_prefix, "MTRANK_STORE_TIMEOUT_MS": str(settings.store_timeout_ms),
            "MTRANK_STORE_RETRY_S": str(settings.store_retry_s)}
    if settings.store_url is not None:
        env["MTRANK_STORE_URL"] = settings.store_url_text()
    children: list[subprocess.Popen] = []
    stopping = threading.Event()

    def forward(sig: int, _frame: object) -> None:
        if sig != signal.SIGHUP:
            stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        for i in range(count):
            children.append(subprocess.Popen(
                [sys.executable, "-m", "mtrank.cli", "serve"], env=env | {WORKER_VARIABLE: f"{i}/{count}"},
                # A process group of its own keeps a terminal's Ctrl-C away from the workers. Not a
                # session of its own: Linux's scheduler gives each session its own group (autogroup),
                # which shares the cores between sessions first and applies niceness only inside
                # each; the batch threads' +10 then no longer yields to the other worker's event loop
                # or to anything else on the machine. Measured on 2 cores at 4 x overload, alternating:
                # 503 p99 89, 48 and 64 ms with a session per worker, 21, 13 and 14 ms without; a
                # same-host client's event loop waited up to 51-112 ms for a core against 11-14 ms.
                process_group=0,
            ))
        return _wait(children, stopping, metrics_dir)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _wait(children: list[subprocess.Popen], stopping: threading.Event, metrics_dir: str) -> int:
    """Until every worker has exited: the first unexpected exit stops the others."""
    from prometheus_client import multiprocess

    status = 0
    running = list(children)
    while running:
        time.sleep(0.2)
        for child in [c for c in running if c.poll() is not None]:
            running.remove(child)
            multiprocess.mark_process_dead(child.pid, metrics_dir)
            if not stopping.is_set() and status == 0:
                status = child.returncode or 1
                flush_logs()
                print(f"mtrank serve: worker {child.pid} exited with status {child.returncode}; stopping the others",
                      file=sys.stderr, flush=True)
                for other in running:
                    other.send_signal(signal.SIGTERM)
    return status
