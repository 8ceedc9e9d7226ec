"""The service under faults, as a real ``mtrank serve``: clients that hang up or send slowly, an
overload burst, and a corrupt newest model version at start-up."""

from __future__ import annotations

import asyncio
import gc
import select
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtrank.bench.server import RemoteServer
from tests.server import build_toy_version, rank_body

ADMIN_TOKEN = "hardening-token"


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("hardening-repo")
    build_toy_version(repo, "toy", 1)
    return repo


def _samples(server: RemoteServer, name: str) -> list:
    return [s for fam in text_string_to_metric_families(server.metrics()) for s in fam.samples if s.name == name]


def _rank_statuses(server: RemoteServer) -> dict[str, float]:
    return {s.labels["status"]: s.value for s in _samples(server, "mtrank_requests_total")
            if s.labels["route"] == "/v1/rank"}


def _request_head(length: int) -> bytes:
    return (f"POST /v1/rank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_hang_up_mid_body_is_a_499_without_traceback(toy_repo):
    s = RemoteServer(toy_repo, env={"MTRANK_LOG_LEVEL": "info"})
    try:
        body = orjson.dumps(rank_body(n=40))
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(_request_head(len(body)) + body[: len(body) // 2])
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while _rank_statuses(s).get("499", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        statuses = _rank_statuses(s)
        assert s.post("/v1/rank", json=rank_body(n=5)).status_code == 200
    finally:
        s.stop()
    log = s.output()
    assert statuses == {"499": 1.0}, statuses
    assert "Traceback" not in log and " ERROR " not in log, log
    (line,) = [ln for ln in log.splitlines() if " 499 " in ln]
    assert " INFO mtrank.access: POST /v1/rank 499 " in line, line


def test_slow_clients_get_408_and_are_closed_while_others_are_served(toy_repo):
    deadline_s = 1.0
    s = RemoteServer(toy_repo, env={"MTRANK_REQUEST_TIMEOUT_MS": str(int(deadline_s * 1000))})
    try:
        body = orjson.dumps(rank_body(n=20))
        slow = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(_request_head(len(body)))
            slow.append(sock)
        opened = time.monotonic()
        answers: dict[socket.socket, tuple[bytes, float]] = {}

        def normal_traffic() -> list[int]:
            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(lambda i: s.post("/v1/rank", json=rank_body(f"n{i}", n=20)).status_code,
                                     range(60)))

        with ThreadPoolExecutor(1) as runner:
            normal = runner.submit(normal_traffic)
            sent = 0
            while len(answers) < len(slow) and time.monotonic() - opened < deadline_s + 4:
                # One byte every 0.5 s from each slow client still open.
                for sock in slow:
                    if sock not in answers:
                        try:
                            sock.send(body[sent : sent + 1])
                        except OSError:
                            answers[sock] = (b"", time.monotonic() - opened)
                sent += 1
                tick_end = time.monotonic() + 0.5
                while (left := tick_end - time.monotonic()) > 0:
                    readable, _, _ = select.select([x for x in slow if x not in answers], [], [], left)
                    for sock in readable:
                        try:
                            data = sock.recv(4096)
                        except OSError:
                            data = b""
                        answers[sock] = (data, time.monotonic() - opened)
                    if not readable:
                        break
            normal_statuses = normal.result()
        for sock in slow:
            sock.close()
        statuses = _rank_statuses(s)
    finally:
        s.stop()
    assert len(answers) == 50, f"{50 - len(answers)} slow clients still connected"
    got_408 = [t for data, t in answers.values() if data.startswith(b"HTTP/1.1 408")]
    assert len(got_408) == 50, [data[:40] for data, _ in answers.values()]
    assert all(b"connection: close" in data.lower() for data, _ in answers.values())
    # Within the deadline plus the 0.5 s byte granularity and this machine's scheduling.
    assert max(got_408) < deadline_s + 1.0, max(got_408)
    assert normal_statuses == [200] * 60, normal_statuses
    assert statuses.get("408") == 50 and statuses.get("200") == 60 and "500" not in statuses, statuses


async def _burst(url: str, requests: int, concurrency: int) -> list[int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        async def one(i: int) -> int:
            return (await client.post("/v1/rank", json=rank_body(f"b{i}", n=50))).status_code

        return await asyncio.gather(*(one(i) for i in range(requests)))


def test_overload_burst_logs_no_unretrieved_task_exception_and_no_error(toy_repo):
    env = {"MTRANK_LOG_LEVEL": "info", "MTRANK_REQUEST_TIMEOUT_MS": "15", "MTRANK_MAX_CANDIDATES": "50",
           "MTRANK_MAX_QUEUE_ROWS": "150", "MTRANK_MAX_QUEUE_DELAY_MS": "5"}
    s = RemoteServer(toy_repo, env=env)
    try:
        statuses = asyncio.run(_burst(s.url, 600, 64))
        time.sleep(0.5)  # let the last abandoned work finish inside the server
    finally:
        s.stop()
    log = s.output()
    # 408: on a loop this busy, a body can miss a 15 ms deadline before the handler reads it.
    assert set(statuses) <= {200, 408, 503, 504}, sorted(set(statuses))
    assert statuses.count(503) + statuses.count(504) > 0, "the burst did not overload the server"
    assert "never retrieved" not in log, log
    errors = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert errors == [], errors


def test_corrupt_newest_version_at_start_up_falls_back_to_the_previous_one(toy_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(toy_repo / "toy" / "1", repo / "toy" / "1")
    broken = build_toy_version(repo, "toy", 2, seed=3)
    onnx_file = next(broken.rglob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])  # truncated after the checksum was taken
    with RemoteServer(repo, env={"MTRANK_ADMIN_TOKEN": ADMIN_TOKEN}) as s:
        r = s.post("/v1/rank", json=rank_body(n=5))
        assert r.status_code == 200 and r.json()["model"] == {"name": "toy", "version": 1}, r.text
        ready = s.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert "toy v2 refused" in ready.json()["reason"] and "checksum" in ready.json()["reason"], ready.text
        models = s.get("/v1/models").json()
        (toy,) = models["models"]
        assert toy["newest"] == 1 and [v["version"] for v in toy["versions"]] == [1]
        assert [x["version"] for x in toy["refused"]] == [2] and "checksum mismatch" in toy["refused"][0]["reason"]
        assert "checksum mismatch" in models["errors"]["toy v2"]
        refused = {(x.labels["model"], x.labels["version"]): x.value
                   for x in _samples(s, "mtrank_model_versions_refused")}
        assert refused == {("toy", "2"): 1.0}

        # The fixed version is served on the next reload and the refusal disappears.
        shutil.rmtree(broken)
        build_toy_version(repo, "toy", 2, seed=3)
        r = s.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200 and r.json()["served"] == {"toy": [2]}, r.text
        assert s.post("/v1/rank", json=rank_body(n=5)).json()["model"]["version"] == 2
        assert s.get("/readyz").json() == {"ready": True}
        assert _samples(s, "mtrank_model_versions_refused") == []
        assert "refused" not in s.get("/v1/models").json()["models"][0]


@pytest.mark.parametrize("when", ["fails as the timeout fires", "fails when cancelled"])
def test_work_of_a_cancelled_request_never_leaves_an_unretrieved_exception(when):
    """The races behind "Task exception was never retrieved": the ranking work fails (a batcher
    deadline) in the same loop iteration as the request's timeout cancels the handler, or it
    turns its cancellation into an error of its own (as client libraries do when interrupted)."""
    from mtrank.service.errors import DeadlineExceeded
    from mtrank.service.http.disconnect import unless_disconnected

    async def scenario() -> list[dict]:
        loop = asyncio.get_running_loop()
        reported: list[dict] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        never = asyncio.Event()

        async def receive() -> dict:
            await never.wait()
            return {"type": "http.disconnect"}

        outcome = loop.create_future()

        async def work() -> None:
            try:
                await outcome
            except asyncio.CancelledError:
                raise DeadlineExceeded("interrupted") from None

        handler = asyncio.ensure_future(unless_disconnected(receive, work()))
        for _ in range(3):  # the handler, its work and its disconnect watcher are all waiting
            await asyncio.sleep(0)
        if when == "fails as the timeout fires":
            outcome.set_exception(DeadlineExceeded("deadline passed while queued"))
            await asyncio.sleep(0)  # the work task fails; the handler has not seen it yet
        handler.cancel()  # the request's timeout fires
        try:
            await handler
        except (asyncio.CancelledError, DeadlineExceeded):
            pass  # not pytest.raises: its traceback would keep the work alive past gc.collect()
        else:
            raise AssertionError("the handler was not cancelled")
        del handler
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        return reported

    reported = asyncio.run(scenario())
    assert [c.get("message") for c in reported] == []
