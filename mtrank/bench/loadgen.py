"""The bench's load generator: a minimal HTTP/1.1 keep-alive client, run in its own process.

The client must not be what limits the measurement, and on a 2-core machine it shares the cores
with the server, so it does as little as it can: request bodies are encoded once (orjson, in the
parent) into complete HTTP requests, a request is one ``write`` on a kept-alive connection, and a
response is read by its ``Content-Length`` without parsing the JSON. It reports its own CPU time
so the bench can show what the client took from the server.

Two modes, each measured in windows until stable (perf_analyzer's rule: the last ``stable_windows``
windows have throughput and p50 latency within ``stability`` of their mean):

- closed loop (``concurrency``): that many connections, each sending its next request as soon as
  the previous answer is in;
- open loop (``rate``): requests start on a fixed schedule (constant inter-arrival time, as
  perf_analyzer's ``--request-rate-range``), on as many connections as are needed; latency is
  counted from the scheduled start, so a stalled server is not hidden (no coordinated omission).

``python -m mtrank.bench.loadgen SPEC.json`` prints one JSON result line; :func:`run_point` does the
same from Python (in a subprocess, so the client never shares an interpreter with the caller).
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MAX_OPEN_CONNECTIONS = 512
"""Open loop: most connections in use at once (more means the server is far past saturation)."""


@dataclass
class PointSpec:
    """One load point."""

    host: str
    port: int
    bodies_file: str
    """The JSON bodies to send, round robin, one per line (:func:`write_bodies`)."""
    concurrency: int = 0
    """Closed loop: connections sending back to back (0: open loop at ``rate``)."""
    rate: float = 0.0
    """Open loop: requests per second."""
    path: str = "/v1/rank"
    warmup_s: float = 1.0
    window_s: float = 1.0
    stable_windows: int = 3
    max_windows: int = 8
    stability: float = 0.10
    min_requests: int = 20
    """A window lasts at least ``window_s`` and until this many answers are in (at most 5 × ``window_s``)."""
    timeout_s: float = 30.0


@dataclass
class PointResult:
    mode: str
    concurrency: int
    rate: float
    requests: int
    """Answered requests inside the measured windows."""
    errors: int
    """Answers that were not 200 (and connection failures) inside the measured windows."""
    seconds: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    windows: int
    stable: bool
    client_cpu_s: float
    """User + system CPU the client process used during the measured windows."""
    window_rps: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    non_200: dict[str, dict[str, float]] = field(default_factory=dict)
    """Status (\"0\": no answer) → ``{"count", "p50_ms", "p99_ms", "max_ms"}`` of the answers that were not 200."""


def http_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status code, whether the connection stays open) of one response; its body is read and dropped.

    A server that refuses a request before reading its body (admission control) may close the
    connection after the answer; the caller then opens a new one.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep_alive = b"\r\nconnection: close" not in lower
    at = lower.find(b"content-length:")
    if at < 0:
        raise ValueError("response without Content-Length (chunked answers are not expected here)")
    end = lower.find(b"\r\n", at)
    length = int(lower[at + 15 : end])
    if length:
        await reader.readexactly(length)
    return status, keep_alive


class _Recorder:
    """Latencies and statuses of answers, per window."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.other: dict[int, list[float]] = {}
        self.errors = 0
        self.recording = False

    def add(self, latency_s: float, status: int) -> None:
        if not self.recording:
            return
        if status == 200:
            self.latencies.append(latency_s)
        else:
            self.errors += 1
            self.other.setdefault(status, []).append(latency_s)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def take(self) -> tuple[list[float], int, dict[int, int], dict[int, list[float]]]:
        out = self.latencies, self.errors, self.statuses, self.other
        self.latencies, self.errors, self.statuses, self.other = [], 0, {}, {}
        return out


async def _closed_worker(spec: PointSpec, requests: list[bytes], start: int, rec: _Recorder,
                         stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(spec.host, spec.port)
    i = start
    n = len(requests)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            writer.write(requests[i % n])
            try:
                async with asyncio.timeout(spec.timeout_s):
                    status, keep_alive = await _read_response(reader)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                rec.add(time.perf_counter() - t0, 0)
                writer.close()
                reader, writer = await asyncio.open_connection(spec.host, spec.port)
                continue
            rec.add(time.perf_counter() - t0, status)
            i += 1
            if not keep_alive:
                writer.close()
                reader, writer = await asyncio.open_connection(spec.host, spec.port)
    finally:
        writer.close()


class _OpenLoop:
    """Requests started on a fixed schedule over a pool of kept-alive connections."""

    def __init__(self, spec: PointSpec, requests: list[bytes], rec: _Recorder):
        self.spec, self.requests, self.rec = spec, requests, rec
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open = 0
        self.tasks: set[asyncio.Task] = set()

    async def _one(self, request: bytes, scheduled: float) -> None:
        conn, reused = self._connection(), True
        if conn is None:
            self.open += 1
            conn, reused = await asyncio.open_connection(self.spec.host, self.spec.port), False
        while True:
            reader, writer = conn
            writer.write(request)
            try:
                async with asyncio.timeout(self.spec.timeout_s):
                    status, keep_alive = await _read_response(reader)
            except asyncio.IncompleteReadError as e:
                writer.close()
                if reused and not e.partial:
                    # A kept-alive connection the server closed (idle timeout) just before this request
                    # reached it: nothing was processed. Sent again on a new connection, as HTTP clients
                    # do; the latency still counts from the scheduled start.
                    conn, reused = await asyncio.open_connection(self.spec.host, self.spec.port), False
                    continue
                self._failed(scheduled)
                return
            except (TimeoutError, ConnectionError):
                writer.close()
                self._failed(scheduled)
                return
            break
        self.rec.add(time.perf_counter() - scheduled, status)
        if keep_alive:
            self.idle.append(conn)
        else:
            writer.close()
            self.open -= 1

    def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """An idle kept-alive connection the server has not closed, or None."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
            self.open -= 1
        return None

    def _failed(self, scheduled: float) -> None:
        self.rec.add(time.perf_counter() - scheduled, 0)
        self.open -= 1

    async def run(self, stop: asyncio.Event) -> None:
        interval = 1.0 / self.spec.rate
        start = time.perf_counter()
        k = 0
        while not stop.is_set():
            now = time.perf_counter()
            while start + k * interval <= now:
                if self.open - len(self.idle) >= MAX_OPEN_CONNECTIONS:
                    # Past saturation: the request counts as failed at its scheduled time.
                    self.rec.add(0.0, 0)
                else:
                    task = asyncio.ensure_future(self._one(self.requests[k % len(self.requests)], start + k * interval))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                k += 1
            # Until the next request is due (a poll every millisecond cost the client more wake-ups
            # than requests below 1 000 requests/s); at most 50 ms, to notice the stop.
            await asyncio.sleep(max(0.0, min(0.05, start + k * interval - time.perf_counter())))
        for task in list(self.tasks):
            task.cancel()
        for _, writer in self.idle:
            writer.close()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _stable(values: list[float], tolerance: float) -> bool:
    mean = sum(values) / len(values)
    return mean > 0 and all(abs(v - mean) <= tolerance * mean for v in values)


async def measure(spec: PointSpec) -> PointResult:
    """Warm up, then measure windows until the last few are stable (or ``max_windows``)."""
    bodies = read_bodies(Path(spec.bodies_file))
    requests = [http_request(spec.host, spec.port, spec.path, b) for b in bodies]
    rec = _Recorder()
    stop = asyncio.Event()
    if spec.concurrency > 0:
        workers = [
            asyncio.ensure_future(_closed_worker(spec, requests, j * 7919, rec, stop)) for j in range(spec.concurrency)
        ]
    else:
        workers = [asyncio.ensure_future(_OpenLoop(spec, requests, rec).run(stop))]
    await asyncio.sleep(spec.warmup_s)
    rec.recording = True
    rec.take()
    windows: list[tuple[float, list[float], int, dict[int, int], float, dict[int, list[float]]]] = []
    stable = False
    while len(windows) < spec.max_windows:
        cpu0, t0 = _cpu_s(), time.perf_counter()
        await asyncio.sleep(spec.window_s)
        while len(rec.latencies) + rec.errors < spec.min_requests and time.perf_counter() - t0 < 5 * spec.window_s:
            await asyncio.sleep(0.02)
        lat, err, statuses, other = rec.take()
        windows.append((time.perf_counter() - t0, lat, err, statuses, _cpu_s() - cpu0, other))
        if len(windows) >= spec.stable_windows:
            last = windows[-spec.stable_windows :]
            rps = [len(w[1]) / w[0] for w in last]
            p50 = [float(np.median(w[1])) if w[1] else 0.0 for w in last]
            if _stable(rps, spec.stability) and _stable(p50, spec.stability):
                stable = True
                break
    stop.set()
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    used = windows[-spec.stable_windows :]
    seconds = sum(w[0] for w in used)
    lat_ms = np.array([x for w in used for x in w[1]]) * 1000.0
    statuses: dict[str, int] = {}
    other: dict[int, list[float]] = {}
    for w in used:
        for s, c in w[3].items():
            statuses[str(s)] = statuses.get(str(s), 0) + c
        for s, lat in w[5].items():
            other.setdefault(s, []).extend(lat)

    def pct(q: float) -> float:
        return float(np.percentile(lat_ms, q)) if len(lat_ms) else float("nan")

    return PointResult(
        mode="closed" if spec.concurrency > 0 else "open",
        concurrency=spec.concurrency,
        rate=spec.rate,
        requests=len(lat_ms),
        errors=sum(w[2] for w in used),
        seconds=round(seconds, 4),
        throughput_rps=len(lat_ms) / seconds if seconds else 0.0,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        mean_ms=float(lat_ms.mean()) if len(lat_ms) else float("nan"),
        windows=len(windows),
        stable=stable,
        client_cpu_s=sum(w[4] for w in used),
        window_rps=[round(len(w[1]) / w[0], 2) for w in windows],
        statuses=statuses,
        non_200={str(s): _summary_ms(lat) for s, lat in sorted(other.items())},
    )


def _summary_ms(latencies_s: list[float]) -> dict[str, float]:
    a = np.array(latencies_s) * 1000.0
    return {"count": len(a), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "max_ms": round(float(a.max()), 3)}


def write_bodies(path: Path, bodies: list[bytes]) -> None:
    """Request bodies, one JSON document per line (compact JSON has no raw newlines)."""
    path.write_bytes(b"\n".join(bodies))


def read_bodies(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def run_point(spec: PointSpec) -> PointResult:
    """:func:`measure` in a fresh client process."""
    budget = spec.warmup_s + spec.window_s * spec.max_windows + spec.timeout_s + 30
    proc = subprocess.run(
        [sys.executable, "-m", "mtrank.bench.loadgen", json.dumps(asdict(spec))],
        capture_output=True, text=True, timeout=budget,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return PointResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> None:
    spec = PointSpec(**json.loads(argv[0]))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(measure(spec))
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
