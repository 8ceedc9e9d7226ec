"""The impression log in the bench: what logging every answer costs, and what a log directory that
cannot be written does to ranking.

Three ``mtrank serve`` processes with the same settings run side by side: the log off, the log on
(``MTRANK_IMPRESSION_LOG`` in a fresh directory) and the log on in a directory that cannot be
written. The log-on server samples half of the request ids (:data:`SPLIT_SAMPLE`), and the point's
request bodies come in two copies that differ only in their ids: ids it logs and ids it leaves out
(:func:`split_bodies`). Its points with the logged copy have every request logged; its points with
the other copy have the log off for every request, in the same process. The target compares those
two: two server processes with the same settings differ by more than the log costs (two log-on
servers of one run read 0.93 of each other over five rounds, the same one in four of them), and
the same process with the log on and off does not carry that difference. The server without the
log gives the cross-server figure beside it. Each round measures one closed-loop point of
``cfg.impressions_size`` candidates for each of :data:`POINTS`, the order rotating from round to
round, so that each ratio compares the same minutes of the host. Afterwards each server's own
counters say what was answered, logged and dropped.

A read-only directory is a directory of mode 0555. Modes do not stop a process that holds
``CAP_DAC_OVERRIDE`` (root, usually), so such a server runs under ``setpriv`` without that
capability, as a service account would; :func:`read_only_directory` checks with a probe process
under the same wrapper that a file really cannot be created there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from mtrank.bench.config import BenchConfig, BenchError
from mtrank.bench.loadgen import read_bodies, write_bodies
from mtrank.bench.measure import cpu_seconds, measure_point, say, server_under_test
from mtrank.bench.report import ImpressionLogPoint, ImpressionServer, LoadPoint, Report
from mtrank.bench.server import RemoteServer
from mtrank.impression_log import FILE_GLOB, sampled

LABELS = ("log_off", "log_on", "log_read_only")
"""The three servers of the point."""
POINTS = {"log_on": ("log_on", "logged"), "sampled_out": ("log_on", "sampled_out"),
          "log_off": ("log_off", "sampled_out"), "log_read_only": ("log_read_only", "logged")}
"""Each round's points, in the first round's order: point → (server, bodies)."""
SPLIT_SAMPLE = 0.5
"""``MTRANK_IMPRESSION_SAMPLE`` of the log-on server: the share of request ids it logs."""
CAP_DAC_OVERRIDE = 1
"""Bit of the capability that lets a process write where the file modes say it may not."""
_PROBE = ("import errno, os, sys\n"
          "path = os.path.join(sys.argv[1], '.mtrank-write-probe')\n"
          "try:\n"
          "    open(path, 'w').close()\n"
          "except OSError as e:\n"
          "    print(errno.errorcode.get(e.errno, e.errno))\n"
          "else:\n"
          "    os.unlink(path)\n"
          "    print('written')\n")


def holds_dac_override(pid: int | str = "self") -> bool:
    """Whether process ``pid``'s effective capabilities include ``CAP_DAC_OVERRIDE``."""
    status = Path(f"/proc/{pid}/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> CAP_DAC_OVERRIDE & 1)


def without_dac_override() -> list[str]:
    """The command prefix under which a child of this process obeys file modes: ``setpriv`` dropping
    ``CAP_DAC_OVERRIDE`` from its bounding and inheritable sets when this process holds it, else []."""
    if not holds_dac_override():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise BenchError("a read-only log directory needs setpriv (util-linux) to run the server without "
                         "CAP_DAC_OVERRIDE: this process holds it, and file modes do not stop it")
    return [setpriv, "--inh-caps=-dac_override", "--bounding-set=-dac_override", "--"]


def write_probe(directory: Path, wrapper: Sequence[str] = ()) -> str:
    """``written`` when a process started under ``wrapper`` can create a file in ``directory``, else the
    name of the error it got (``EACCES``, ``EROFS`` ...)."""
    proc = subprocess.run([*wrapper, sys.executable, "-c", _PROBE, str(directory)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"the write probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip()


@contextmanager
def read_only_directory(path: Path) -> Iterator[tuple[Path, list[str], str]]:
    """``path`` created with mode 0555, the command prefix a server needs for the mode to hold
    (:func:`without_dac_override`) and the error a probe process under it got creating a file there.
    Raises :class:`BenchError` when the probe could write. The mode goes back to 0755 afterwards."""
    path.mkdir(parents=True)
    path.chmod(0o555)
    try:
        wrapper = without_dac_override()
        probe = write_probe(path, wrapper)
        if probe == "written":
            raise BenchError(f"{path} (mode 0555) can still be written by the server's process")
        yield path, wrapper, probe
    finally:
        path.chmod(0o755)


def rank_statuses(metrics_text: str) -> dict[str, int]:
    """``/v1/rank`` answers by status, from a server's ``mtrank_requests_total``."""
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "mtrank_requests_total" and s.labels.get("route") == "/v1/rank":
                out[s.labels["status"]] = out.get(s.labels["status"], 0) + int(s.value)
    return out


def impression_counters(metrics_text: str) -> tuple[int, dict[str, int]]:
    """(records logged, records dropped by reason) from a server's metrics."""
    logged, dropped = 0, {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "mtrank_impressions_logged_total":
                logged += int(s.value)
            elif s.name == "mtrank_impressions_dropped_total":
                dropped[s.labels["reason"]] = dropped.get(s.labels["reason"], 0) + int(s.value)
    return logged, dropped


def logged_ids(directory: Path) -> list[str]:
    """The request ids of the records in the complete impression files of ``directory``."""
    import pyarrow.dataset as ds

    files = [str(f) for f in sorted(directory.glob(FILE_GLOB))]
    return ds.dataset(files, format="parquet").to_table(columns=["request_id"]).column(0).to_pylist() if files else []


def split_bodies(bodies: Path, out: Path, rate: float = SPLIT_SAMPLE) -> dict[str, Path]:
    """Two copies of the request bodies in ``bodies``: ``logged``, each id changed (a suffix) until a
    log sampling ``rate`` logs it, and ``sampled_out``, until it leaves it out. Files in ``out``."""
    copies: dict[str, list[bytes]] = {"logged": [], "sampled_out": []}
    for body in read_bodies(bodies):
        doc = orjson.loads(body)
        for name, logged in (("logged", True), ("sampled_out", False)):
            k = 0
            while sampled(f"{doc['request_id']}-{k}", rate) != logged:
                k += 1
            copies[name].append(orjson.dumps({**doc, "request_id": f"{doc['request_id']}-{k}"}))
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in copies.items():
        write_bodies(out / f"{name}.bodies", docs)
    return {name: out / f"{name}.bodies" for name in copies}


def writer_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the impression writer threads (``mtrank-implog``) of ``pids``."""
    from mtrank.service.impressions import THREAD_NAME

    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                if (task / "comm").read_text().strip() != THREAD_NAME:
                    continue
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _cpu(server: RemoteServer) -> tuple[float, float]:
    """(CPU seconds of the server's processes, of their impression writer threads) so far."""
    pids = server.pids()
    return cpu_seconds(pids), writer_cpu_seconds(pids)


def _settle(server: RemoteServer, label: str, cpu_before: tuple[float, float],
            timeout_s: float = 15.0) -> ImpressionServer:
    """The server's counters once every answered record is accounted for (logged, dropped or still
    in an open file: the writer completes files by size or age, so some wait there), with the CPU
    seconds since ``cpu_before``."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = server.metrics()
        statuses, (logged, dropped) = rank_statuses(text), impression_counters(text)
        if label != "log_read_only" or sum(dropped.values()) >= statuses.get("200", 0) or time.monotonic() > deadline:
            cpu, writer = _cpu(server)
            return ImpressionServer(statuses=statuses, logged=logged, dropped=dropped,
                                    cpu_s=round(cpu - cpu_before[0], 2), writer_cpu_s=round(writer - cpu_before[1], 2))
        time.sleep(0.25)


def _round_orders(rounds: int) -> list[list[str]]:
    """The points rotated by one each round, so that each goes first, second... in turn."""
    names = list(POINTS)
    return [[*names[i % len(names):], *names[: i % len(names)]] for i in range(rounds)]


def _ratios(points: dict[str, list[LoadPoint]], a: str, b: str) -> list[float]:
    return [round(x.throughput_rps / y.throughput_rps, 4) if y.throughput_rps else 0.0
            for x, y in zip(points[a], points[b], strict=True)]


def impression_log_point(report: Report, repo: Path, env: dict[str, str], bodies: Path, cfg: BenchConfig,
                         device: str, scratch: Path) -> ImpressionLogPoint:
    """The three servers, ``cfg.impressions_rounds`` rounds of :data:`POINTS`, and what each server's
    counters say afterwards. ``scratch`` holds the log directories and the bodies' copies (removed
    afterwards)."""
    size, concurrency = cfg.impressions_size, cfg.impressions_concurrency
    out = ImpressionLogPoint(size=size, concurrency=concurrency, sample=SPLIT_SAMPLE)
    copies = split_bodies(bodies, scratch / "bodies")
    with ExitStack() as stack:
        ro_dir, wrapper, probe = stack.enter_context(read_only_directory(scratch / "read-only"))
        out.read_only = {"mode": "0555", "server_wrapper": " ".join(wrapper) or "none (no CAP_DAC_OVERRIDE here)",
                         "probe_error": probe}
        envs = {"log_off": env,
                "log_on": env | {"MTRANK_IMPRESSION_LOG": str(scratch / "on"),
                                 "MTRANK_IMPRESSION_SAMPLE": str(SPLIT_SAMPLE)},
                "log_read_only": env | {"MTRANK_IMPRESSION_LOG": str(ro_dir), "MTRANK_IMPRESSION_SAMPLE": "1.0"}}
        servers = {label: stack.enter_context(server_under_test(
            report, label, repo, envs[label], device, wrapper=wrapper if label == "log_read_only" else ()))
            for label in LABELS}
        if wrapper and holds_dac_override(servers["log_read_only"].proc.pid):
            raise BenchError("the read-only log server still holds CAP_DAC_OVERRIDE")
        cpu_before = {label: _cpu(server) for label, server in servers.items()}
        points: dict[str, list[LoadPoint]] = {name: [] for name in POINTS}
        answered_logged = 0  # the log-on server's 200s to ids it logs, warm-ups included
        for i, order in enumerate(_round_orders(max(1, cfg.impressions_rounds))):
            for name in order:
                server, copy = POINTS[name]
                before = rank_statuses(servers[server].metrics()).get("200", 0)
                p = measure_point(servers[server], copies[copy], size, cfg, concurrency=concurrency)
                if name == "log_on":
                    answered_logged += rank_statuses(servers[server].metrics()).get("200", 0) - before
                points[name].append(p)
                say(f"impressions round {i + 1} {name:13s}: {p.throughput_rps:7.1f} req/s p50={p.p50_ms:6.2f} "
                    f"p99={p.p99_ms:6.2f} ms, {p.rows_per_server_cpu_s:,.0f} rows per server CPU-s"
                    f"{' errors=' + str(p.errors) if p.errors else ''}")
            out.orders.append(order)
        out.points = points
        out.servers = {label: _settle(server, label, cpu_before[label]) for label, server in servers.items()}
    # Stopped: the log-on server has completed its last file, and what it logged can be read.
    ids = logged_ids(scratch / "on")
    on = out.servers["log_on"]
    on.answered_logged = answered_logged
    on.records_in_files, on.records_sampled_out = len(ids), sum(not sampled(rid, SPLIT_SAMPLE) for rid in ids)
    out.on_vs_off = _ratios(points, "log_on", "sampled_out")
    out.on_vs_off_server = _ratios(points, "log_on", "log_off")
    out.sampled_out_vs_off_server = _ratios(points, "sampled_out", "log_off")
    shutil.rmtree(scratch / "on", ignore_errors=True)
    shutil.rmtree(scratch / "bodies", ignore_errors=True)
    say(f"impression log on ÷ off (one process), {size} candidates at concurrency {concurrency}, by round: "
        + ", ".join(f"{r:.3f}" for r in out.on_vs_off) + "; ÷ the server without the log: "
        + ", ".join(f"{r:.3f}" for r in out.on_vs_off_server) + f"; read-only server: {out.servers['log_read_only']}")
    return out
