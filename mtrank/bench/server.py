"""A real ``mtrank serve`` process for tests and benchmarks.

:class:`RemoteServer` starts ``mtrank serve`` in a subprocess on a free port, waits for
``/readyz`` and stops it with SIGTERM (draining), like vLLM's ``RemoteOpenAIServer``. It is
package code so that ``mtrank bench`` works from any install, not only from a checkout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_and_children(pid: int) -> list[int]:
    """``pid`` and its child processes (Linux; only ``pid`` once it has exited)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


class RemoteServer:
    """``mtrank serve`` in a subprocess. Use as a context manager; ``url`` is its base URL."""

    def __init__(
        self,
        repo: Path | str | None,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
        ready_timeout_s: float = 60.0,
        wait_ready: bool = True,
        cwd: Path | str | None = None,
        new_session: bool = False,
        wrapper: Sequence[str] = (),
    ):
        """``wrapper``: a command prefix that execs the server (e.g. ``setpriv ... --``), so that
        ``proc.pid`` is still the server's."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
        full_env.update({"MTRANK_DEVICE": "cpu", "MTRANK_INTRA_OP_THREADS": "1", "MTRANK_WORKERS": "1",
                         "MTRANK_LOG_LEVEL": "warning"})
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "mtrank.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if repo is not None:
            cmd += ["--repo", str(repo)]
        self.proc = subprocess.Popen(
            [*wrapper, *cmd, *args], env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=new_session,  # a process group of its own, as a terminal gives it
        )
        self._log: list[str] = []
        # Drained all along: a full pipe would block the server at its next log line.
        self._log_reader = threading.Thread(target=self._read_log, daemon=True)
        self._log_reader.start()
        self.client = httpx.Client(base_url=self.url, timeout=30.0)
        if wait_ready:
            self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = self.client.get("/readyz", timeout=2.0)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s} s (last: {last}):\n{self.output()}")

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            self._log.append(line)

    def output(self) -> str:
        """Everything the process printed (only once it has exited)."""
        if self.proc.poll() is None:
            return ""
        self._log_reader.join(timeout=10.0)
        return "".join(self._log)

    def log_lines(self) -> list[str]:
        """What the process printed so far (stdout and stderr), line by line."""
        return list(self._log)

    def pids(self) -> list[int]:
        """The server process and its children (the workers, with ``MTRANK_WORKERS`` > 1)."""
        return process_and_children(self.proc.pid)

    def rss_kib(self) -> int:
        """Resident set size of the server (``VmRSS`` of /proc/PID/status, workers included), KiB; 0 once
        it has exited."""
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            line = next((s for s in status.splitlines() if s.startswith("VmRSS:")), "VmRSS: 0 kB")
            total += int(line.split()[1])
        return total

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def metrics(self) -> str:
        return self.get("/metrics").text

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL if it hangs. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        return self.proc.returncode

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
