"""The service as a real process (``mtrank serve``) over HTTP, with real Redis and ONNX Runtime."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtrank import kinds
from mtrank.bench.server import RemoteServer, free_port
from mtrank.fusion import BucketConfig, LengthFn, length_factor
from mtrank.manifest import load_manifest, version_dir, write_manifest
from mtrank.service.buckets import BucketTable
from tests.server import ROOT, rank_body

ADMIN_TOKEN = "test-admin-token"
SALT = "http-test-salt"
METRIC_NAMES = (  # docs/architecture.md §7, plus the store health metrics the dashboard uses
    "mtrank_requests_total", "mtrank_request_duration_seconds", "mtrank_candidates_per_request",
    "mtrank_queue_wait_seconds", "mtrank_batch_rows", "mtrank_inference_duration_seconds",
    "mtrank_embedding_lookup_duration_seconds", "mtrank_embedding_cache_hits_total",
    "mtrank_embedding_cache_misses_total", "mtrank_embedding_missing_total", "mtrank_rejected_total",
    "mtrank_inflight_requests", "mtrank_model_info", "mtrank_redis_errors_total",
    "mtrank_embedding_store_degraded", "mtrank_models_loaded", "mtrank_event_loop_lag_seconds",
)


def _buckets(tasks: list[str]) -> list[dict]:
    """Two buckets on model ``ple`` with different weights and length factors."""
    return [
        {"name": "control", "share": 50, "model": "ple",
         "weights": {tasks[0]: 1.0, tasks[1]: 1.0}, "length_fn": {"kind": "none"}},
        {"name": "treatment", "share": 50, "model": "ple",
         "weights": {tasks[0]: 1.0, tasks[1]: 2.0, tasks[-1]: -0.5},
         "length_fn": {"kind": "sigmoid", "center": 20.0, "width": 15.0}},
    ]


@pytest.fixture(scope="module")
def ple_repo(exported_repo, tmp_path_factory) -> Path:
    """A private copy of the exported PLE repository (tests add versions to it)."""
    repo = tmp_path_factory.mktemp("served-repo")
    shutil.copytree(exported_repo("ple") / "ple", repo / "ple")
    return repo


@pytest.fixture(scope="module")
def ple_tasks(ple_repo) -> list[str]:
    return load_manifest(version_dir(ple_repo, "ple")).task_names


@pytest.fixture(scope="module")
def server(ple_repo, ple_tasks):
    env = {
        "MTRANK_BUCKETS": json.dumps(_buckets(ple_tasks)),
        "MTRANK_BUCKET_SALT": SALT,
        "MTRANK_ADMIN_TOKEN": ADMIN_TOKEN,
        "MTRANK_MAX_CANDIDATES": "300",
        "MTRANK_MAX_QUEUE_DELAY_MS": "25",
        "MTRANK_MAX_BODY_BYTES": str(256 * 1024),
    }
    with RemoteServer(ple_repo, env=env) as s:
        yield s


def _metric_samples(text: str, name: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def _fused(item: dict, bucket: dict, video_len: float) -> float:
    weights = bucket["weights"]
    log_score = sum(w * math.log(min(max(item["tasks"][t], 1e-6), 1.0)) for t, w in weights.items())
    return math.exp(log_score) * float(length_factor(np.array([video_len]), LengthFn(**bucket["length_fn"]))[0])


# -- ranking -------------------------------------------------------------------------------


def test_order_equals_fusion_score_recomputed_from_task_scores(server, ple_tasks):
    buckets = {b["name"]: b for b in _buckets(ple_tasks)}
    seen = set()
    for u in range(12):
        body = rank_body(user_id=f"u{u}", n=60, offset=u * 11)
        r = server.post("/v1/rank", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        seen.add(out["bucket"])
        lengths = {c["item_id"]: c["video_len"] for c in body["candidates"]}
        recomputed = [_fused(it, buckets[out["bucket"]], lengths[it["item_id"]]) for it in out["items"]]
        assert [it["rank"] for it in out["items"]] == list(range(1, 61))
        assert all(a >= b * (1 - 1e-9) for a, b in zip(recomputed, recomputed[1:], strict=False))
        np.testing.assert_allclose([it["score"] for it in out["items"]], recomputed, rtol=1e-9)
        assert set(lengths) == {it["item_id"] for it in out["items"]}
    assert seen == {"control", "treatment"}


def test_response_has_the_design_fields_and_top_k(server):
    body = rank_body(user_id="u3", n=30)
    body["top_k"] = 5
    body["return_task_scores"] = False
    out = server.post("/v1/rank", json=body).json()
    assert set(out) == {"request_id", "model", "bucket", "user_group", "degraded", "missing_ids", "items"}
    assert out["request_id"] == body["request_id"] and out["model"] == {"name": "ple", "version": 1}
    assert out["degraded"] is False and len(out["items"]) == 5
    assert set(out["items"][0]) == {"item_id", "rank", "score"}


def test_bucket_is_the_salted_hash_of_the_user_and_labels_the_metrics(server, ple_tasks):
    table = BucketTable(tuple(BucketConfig(**b) for b in _buckets(ple_tasks)), SALT)
    for u in range(20):
        out = server.post("/v1/rank", json=rank_body(user_id=f"user-{u}", n=3)).json()
        assert out["bucket"] == table.assign(f"user-{u}").name
    samples = _metric_samples(server.metrics(), "mtrank_requests_total")
    labelled = {(s.labels["route"], s.labels["status"], s.labels["bucket"]) for s in samples}
    assert {("/v1/rank", "200", "control"), ("/v1/rank", "200", "treatment")} <= labelled


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server):
    bodies = [rank_body(user_id=f"u{40 + i}", n=20, offset=100 + 20 * i) for i in range(12)]
    alone = [server.post("/v1/rank", json=b).json() for b in bodies]
    before = _metric_samples(server.metrics(), "mtrank_batch_requests_sum")
    barrier = threading.Barrier(len(bodies))

    def send(body):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            barrier.wait()
            return c.post("/v1/rank", json=body).json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(send, bodies))
    for body, a, t in zip(bodies, alone, together, strict=True):
        assert [it["item_id"] for it in t["items"]] == [it["item_id"] for it in a["items"]]
        assert {it["item_id"] for it in t["items"]} == {c["item_id"] for c in body["candidates"]}
        for ia, it in zip(a["items"], t["items"], strict=True):
            for task, p in ia["tasks"].items():
                assert abs(it["tasks"][task] - p) <= 1e-6
    text = server.metrics()
    rows_le_20 = sum(s.value for s in _metric_samples(text, "mtrank_batch_rows_bucket") if s.labels["le"] == "20.0")
    rows_total = sum(s.value for s in _metric_samples(text, "mtrank_batch_rows_count"))
    assert rows_total > rows_le_20, "no inference call had more rows than one request"
    after = _metric_samples(text, "mtrank_batch_requests_sum")
    calls = sum(s.value for s in _metric_samples(text, "mtrank_batch_requests_count"))
    assert sum(s.value for s in after) - sum(s.value for s in before) == len(bodies)
    assert calls < sum(s.value for s in after), "every batch held one request"


# -- bad input -----------------------------------------------------------------------------


def _body(**changes):
    b = rank_body(n=3)
    b.update(changes)
    return b


def _cand(**changes):
    c = {"item_id": "v1", "video_len": 10.0}
    c.update(changes)
    return c


BAD_INPUTS = [
    ("malformed JSON", b'{"user": {"user_id": "u1"}, "candidates": [', 422, "malformed JSON"),
    ("not an object", b"[1, 2, 3]", 422, "invalid request"),
    ("NaN literal", b'{"user": {"user_id": "u1"}, "candidates": [{"item_id": "v", "video_len": NaN}]}', 422, "JSON"),
    ("null user", _body(user=None), 422, "user"),
    ("no user key", {"candidates": [_cand()]}, 422, "user"),
    ("negative video_len", _body(candidates=[_cand(video_len=-1.0)]), 422, "video_len"),
    ("huge video_len", _body(candidates=[_cand(video_len=1e12)]), 422, "video_len"),
    ("string video_len", _body(candidates=[_cand(video_len="31")]), 422, "video_len"),
    ("infinite video_len", b'{"user": {"user_id": "u"}, "candidates": [{"item_id": "v", "video_len": 1e999}]}',
     422, "finite"),
    ("zero candidates", _body(candidates=[]), 422, "candidates"),
    ("too many candidates", _body(candidates=[_cand(item_id=f"v{i}") for i in range(301)]), 413,
     "MTRANK_MAX_CANDIDATES"),
    ("numeric user_id", _body(user={"user_id": 42}), 422, "user_id"),
    ("list feature", _body(user={"user_id": "u", "features": {"device": ["ios"]}}), 422, "device"),
    ("string for a number feature", _body(user={"user_id": "u", "features": {"account_age_days": "old"}}),
     422, "account_age_days"),
    ("duplicate item ids", _body(candidates=[_cand(), _cand()]), 422, "duplicate item_id"),
    ("unknown field", _body(candidate_count=3), 422, "candidate_count"),
    ("huge item id", _body(candidates=[_cand(item_id="x" * 5000)]), 422, "item_id"),
    ("huge feature string", _body(user={"user_id": "u", "features": {"device": "y" * 5000}}), 422, "device"),
    ("body over the limit", _body(request_id="z" * 300_000), 413, "MTRANK_MAX_BODY_BYTES"),
    ("unknown user group", _body(user={"user_id": "u", "group": "martians"}), 422, "martians"),
    ("top_k zero", _body(top_k=0), 422, "top_k"),
    ("bool top_k", _body(top_k=True), 422, "top_k"),
]


@pytest.mark.parametrize(("body", "status", "words"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_4xx_with_a_message(server, body, status, words):
    if isinstance(body, bytes):
        r = server.post("/v1/rank", content=body, headers={"content-type": "application/json"})
    else:
        r = server.post("/v1/rank", json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"] + json.dumps(r.json().get("detail", []))
    assert words in message, message


def test_bad_input_never_crashes_the_server(server):
    assert server.get("/healthz").status_code == 200
    assert server.proc.poll() is None


# -- endpoints and metrics ----------------------------------------------------------------


def test_every_design_metric_is_exported(server):
    server.post("/v1/rank", json=rank_body(n=4))
    text = server.metrics()
    for name in METRIC_NAMES:
        assert f"\n{name}" in text, name
    info = _metric_samples(text, "mtrank_model_info")
    assert {(s.labels["model"], s.labels["version"], s.labels["device"]) for s in info} == {("ple", "1", "cpu")}
    buckets = {s.labels["le"] for s in _metric_samples(text, "mtrank_request_duration_seconds_bucket")}
    assert {"0.0005", "0.001", "0.002", "0.005"} <= buckets  # millisecond resolution


def test_models_endpoint_lists_versions_groups_tasks_device_and_buckets(server, ple_tasks):
    out = server.get("/v1/models").json()
    (model,) = out["models"]
    (version,) = model["versions"]
    assert model["name"] == "ple" and version["version"] == 1 and version["tasks"] == ple_tasks
    assert version["device"] == "cpu" and version["provider"] == "CPUExecutionProvider"
    assert [b["name"] for b in out["buckets"]] == ["control", "treatment"]
    assert out["store"] == {"kind": "inprocess", "degraded": False}


def test_health_and_readiness(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    assert server.get("/readyz").json() == {"ready": True}


def test_admin_reload_needs_the_token(server):
    assert server.post("/admin/reload").status_code == 401
    assert server.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = server.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200 and r.json()["served"] == {"ple": [1]}


def test_import_keeps_torch_out():
    code = "import mtrank.service.app, mtrank.service.main, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- hot reload, restarts, shutdown ---------------------------------------------------------


def _add_version(repo: Path, model: str, version: int) -> Path:
    """A copy of version 1 published as ``version`` (manifest rewritten with its number)."""
    src = repo / model / "1"
    dst = repo / model / str(version)
    shutil.copytree(src, dst)
    manifest = load_manifest(dst)
    manifest.version = version
    write_manifest(dst, manifest)
    return dst


def test_hot_reload_serves_a_new_version_and_keeps_it_when_a_newer_one_is_broken(ple_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ple_repo / "ple" / "1", repo / "ple" / "1")
    with RemoteServer(repo, env={"MTRANK_ADMIN_TOKEN": ADMIN_TOKEN}) as s:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        before = s.post("/v1/rank", json=rank_body(n=5)).json()
        _add_version(repo, "ple", 2)
        r = s.post("/admin/reload", headers=auth)
        assert r.status_code == 200 and r.json()["served"] == {"ple": [2]}, r.text
        after = s.post("/v1/rank", json=rank_body(n=5)).json()
        assert after["model"] == {"name": "ple", "version": 2}
        assert [i["item_id"] for i in after["items"]] == [i["item_id"] for i in before["items"]]
        broken = _add_version(repo, "ple", 3)
        onnx_file = next(broken.rglob("*.onnx"))
        onnx_file.write_bytes(onnx_file.read_bytes()[:-10])  # truncated after the checksum was taken
        r = s.post("/admin/reload", headers=auth)
        assert r.status_code == 200 and r.json()["served"] == {"ple": [2]}, r.text
        assert r.json()["refused"] == {"ple v3": f"ple/3: checksum mismatch for {onnx_file.relative_to(broken)} "
                                                 "(file changed or truncated)"}
        assert s.post("/v1/rank", json=rank_body(n=5)).json()["model"]["version"] == 2
        assert s.get("/readyz").status_code == 200
        assert "ple v3" in s.get("/v1/models").json()["errors"]


def test_two_workers_share_the_port_sum_their_metrics_reload_together_and_drain(ple_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ple_repo / "ple" / "1", repo / "ple" / "1")
    env = {"MTRANK_WORKERS": "2", "MTRANK_ADMIN_TOKEN": ADMIN_TOKEN, "MTRANK_LOG_FORMAT": "json",
           "MTRANK_LOG_LEVEL": "info"}
    with RemoteServer(repo, env=env) as s:

        def fresh(user: str) -> httpx.Response:
            # A new connection each time: the kernel spreads connections over the workers, not requests.
            with httpx.Client(base_url=s.url, timeout=30.0) as client:
                return client.post("/v1/rank", json=rank_body(user_id=user, n=3))

        answers = [fresh(f"worker-{i}") for i in range(40)]
        assert [a.status_code for a in answers] == [200] * 40
        ranked = [x.value for x in _metric_samples(s.metrics(), "mtrank_requests_total")
                  if x.labels["route"] == "/v1/rank" and x.labels["status"] == "200"]
        assert ranked == [40.0]  # both workers' counts, whichever answers /metrics
        _add_version(repo, "ple", 2)
        r = s.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200 and r.json()["served"] == {"ple": [2]}, r.text
        deadline = time.monotonic() + 20
        while True:  # the other worker reloads on the supervisor's SIGHUP, a moment later
            versions = {fresh("after").json()["model"]["version"] for _ in range(20)}
            if versions == {2} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert versions == {2}
        assert [x.value for x in _metric_samples(s.metrics(), "mtrank_models_loaded")] == [1.0]
    assert s.proc.returncode == 0, s.output()
    records = [json.loads(line) for line in s.output().splitlines() if line.startswith("{")]
    rank_pids = {r["pid"] for r in records if r.get("path") == "/v1/rank"}
    assert len(rank_pids) == 2 and s.proc.pid not in rank_pids, rank_pids
    reloads = [r for r in records if r.get("event") == "reload"]
    assert len(reloads) >= 2 and {r["pid"] for r in reloads} == rank_pids


def test_the_default_runs_one_worker_per_core_of_mtrank_cpus(ple_repo):
    env = {"MTRANK_WORKERS": "0", "MTRANK_CPUS": "2", "MTRANK_LOG_LEVEL": "info"}
    with RemoteServer(ple_repo, env=env) as s:
        assert s.post("/v1/rank", json=rank_body(n=3)).status_code == 200
        assert len(s.pids()) == 3, s.pids()  # the supervisor and two workers
    assert "starting 2 workers (one per available core)" in s.output()


def _listening_sockets(port: int) -> int:
    """TCP sockets listening on ``port`` (one per worker with SO_REUSEPORT), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def test_ctrl_c_drains_each_worker_once_and_a_killed_supervisor_takes_its_workers(ple_repo):
    """A terminal's Ctrl-C goes to the supervisor's process group: each worker must drain once,
    without the traceback of a second signal; a supervisor killed outright leaves no worker behind."""
    env = {"MTRANK_WORKERS": "2", "MTRANK_LOG_LEVEL": "info"}

    def start() -> RemoteServer:
        s = RemoteServer(ple_repo, env=env, wait_ready=False, cwd=ROOT, new_session=True)
        deadline = time.monotonic() + 120
        while _listening_sockets(s.port) < 2:  # both workers serve
            assert time.monotonic() < deadline and s.proc.poll() is None, s.output()
            time.sleep(0.2)
        return s

    with start() as s:
        assert len(s.pids()) == 3
        supervisor, *workers = s.pids()
        # Each worker in a process group of its own (Ctrl-C skips it) but in the supervisor's session:
        # Linux schedules each session as a group (autogroup), where the batch threads' niceness
        # would stop counting against the other worker's event loop.
        assert [os.getsid(w) for w in workers] == [os.getsid(supervisor)] * 2
        assert [os.getpgid(w) for w in workers] == workers
        os.killpg(s.proc.pid, signal.SIGINT)  # what the terminal does
        s.proc.wait(60)
        output = s.output()
        assert s.proc.returncode == 0, output
        assert "Traceback" not in output and output.count("draining in-flight requests") == 2, output

    with start() as s:
        workers = s.pids()[1:]
        s.proc.kill()
        s.proc.wait()

        def alive() -> list[int]:
            return [p for p in workers
                    if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()]

        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(), f"workers {alive()} outlived their supervisor"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{s.url}/readyz", timeout=2)


def test_two_workers_stop_together_with_the_first_ones_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env |= {"MTRANK_WORKERS": "2", "MTRANK_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "mtrank.cli", "serve", "--repo", str(tmp_path / "missing"), "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mtrank serve: error:")]
    assert errors and all(str(tmp_path / "missing") in line for line in errors), proc.stderr


def _rank_with(s: RemoteServer, n: int):
    return lambda user: s.post("/v1/rank", json=rank_body(user_id=user, n=n))


def test_buckets_are_stable_across_restarts_and_sigterm_drains_in_flight_requests(ple_repo, ple_tasks):
    # 6 × 2000 rows on one intra-op thread: with the default 1 s deadline, admission may refuse the last
    # of them on a slow or busy host (a 503 that is right, but not what this test is about).
    env = {"MTRANK_BUCKETS": json.dumps(_buckets(ple_tasks)), "MTRANK_BUCKET_SALT": SALT,
           "MTRANK_REQUEST_TIMEOUT_MS": "10000"}
    users = [f"restart-{i}" for i in range(25)]
    port = free_port()
    runs = []
    for _ in range(2):
        with RemoteServer(ple_repo, env=env, port=port) as s, ThreadPoolExecutor(len(users)) as pool:
            runs.append([r.json()["bucket"] for r in pool.map(_rank_with(s, 2), users)])
            in_flight = [pool.submit(_rank_with(s, 2000), f"d{i}") for i in range(6)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                gauge = _metric_samples(s.metrics(), "mtrank_inflight_requests")
                if gauge and gauge[0].value >= 3:
                    break
            s.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in in_flight]
            # uvicorn re-raises the signal once it has drained: -SIGTERM is a clean exit too.
            assert s.proc.wait(30) in (0, -signal.SIGTERM), s.output()
            assert [a.status_code for a in answers] == [200] * 6, [(a.status_code, a.text[:200]) for a in answers]
    assert runs[0] == runs[1] and set(runs[0]) == {"control", "treatment"}


SLOW_CALL_S = 0.6
"""Target wall time of one inference call of the slow toy model (measured at the fixture, not assumed)."""


@pytest.fixture(scope="module")
def slow_engine(tmp_path_factory) -> tuple[Path, float]:
    """A toy model whose every inference call takes about :data:`SLOW_CALL_S`, whatever its rows, on
    this host (the work per call is chosen from a timed probe), and the measured seconds of one call."""
    from tests.server import build_slow_version

    repo = tmp_path_factory.mktemp("slow-repo")
    call_s = build_slow_version(repo, SLOW_CALL_S)
    assert call_s > 0.25, f"the slow toy model's call took {call_s:.3f} s: the tests below need one far over 0.1 s"
    return repo, call_s


SLOW_ENV = {"MTRANK_MAX_CANDIDATES": "50", "MTRANK_MAX_QUEUE_ROWS": "100", "MTRANK_MAX_CONCURRENT_BATCHES": "1",
            "MTRANK_MAX_BATCH_ROWS": "100", "MTRANK_REQUEST_TIMEOUT_MS": "1000"}


def _metric_sum(s: RemoteServer, name: str) -> float:
    return sum(x.value for x in _metric_samples(s.metrics(), name))


def _wait_for_metric(s: RemoteServer, name: str, at_least: float, timeout_s: float = 10.0) -> None:
    """Poll /metrics until ``name`` (summed over its labels) reaches ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while _metric_sum(s, name) < at_least:
        assert time.monotonic() < deadline, f"{name} did not reach {at_least} within {timeout_s} s"
        time.sleep(0.005)


def _batches_started(s: RemoteServer, n: int) -> None:
    """Wait until ``n`` requests have left the queue for a batch (counted when the batch starts)."""
    _wait_for_metric(s, "mtrank_queue_wait_seconds_count", n)


def _batches_done(s: RemoteServer, n: int) -> None:
    """Wait until ``n`` batches have finished (counted when the batch ends, even for a request
    answered 504 long before)."""
    _wait_for_metric(s, "mtrank_batch_rows_count", n)


def _wait_inflight(s: RemoteServer, n: int) -> None:
    _wait_for_metric(s, "mtrank_inflight_requests", n)
    time.sleep(0.02)  # from admitted to queued: decoding a 50-candidate body (well under a millisecond)


def test_full_queue_answers_503_with_retry_after(slow_engine):
    repo, _ = slow_engine
    # A deadline so long that only MTRANK_MAX_QUEUE_ROWS can refuse.
    with RemoteServer(repo, env=SLOW_ENV | {"MTRANK_REQUEST_TIMEOUT_MS": "30000"}) as s, \
            ThreadPoolExecutor(3) as pool:
        running = pool.submit(_rank_with(s, 50), "q0")  # an idle graph runs it at once
        _batches_started(s, 1)
        queued = [pool.submit(_rank_with(s, 50), f"q{i}") for i in (1, 2)]  # 100 rows: the queue is full
        _wait_inflight(s, 3)
        assert _metric_sum(s, "mtrank_batch_rows_count") == 0, "the first batch ended before the queue filled"
        fourth = s.post("/v1/rank", json=rank_body(user_id="q3", n=50))
        assert fourth.status_code == 503 and int(fourth.headers["retry-after"]) >= 1, fourth.text[:300]
        assert "MTRANK_MAX_QUEUE_ROWS" in fourth.json()["error"]
        assert [f.result().status_code for f in (running, *queued)] == [200, 200, 200]
        reasons = {x.labels["reason"]: x.value for x in _metric_samples(s.metrics(), "mtrank_rejected_total")}
        assert reasons["overloaded"] == 1


def test_a_passed_deadline_answers_504(slow_engine):
    repo, call_s = slow_engine
    # One inference call takes four times the whole deadline.
    deadline_ms = int(call_s * 1000 / 4)
    with RemoteServer(repo, env=SLOW_ENV | {"MTRANK_REQUEST_TIMEOUT_MS": str(deadline_ms)}) as s:
        r = s.post("/v1/rank", json=rank_body(n=10))
        assert r.status_code == 504 and "deadline" in r.json()["error"], r.text[:300]
        reasons = {x.labels["reason"]: x.value for x in _metric_samples(s.metrics(), "mtrank_rejected_total")}
        assert reasons["deadline"] == 1


def _read_response(conn: socket.socket) -> str:
    """One whole HTTP response (headers and the Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_request_that_cannot_finish_in_time_is_refused_before_its_body_is_read(slow_engine):
    repo, call_s = slow_engine
    # The deadline is a quarter of one inference call: a request behind a running batch cannot make it.
    deadline_ms = int(call_s * 1000 / 4)
    with RemoteServer(repo, env=SLOW_ENV | {"MTRANK_REQUEST_TIMEOUT_MS": str(deadline_ms)}) as s, \
            ThreadPoolExecutor(1) as pool:
        s.post("/v1/rank", json=rank_body(n=50))  # the body size per candidate is learnt (answer: 504)
        _batches_done(s, 1)  # its batch runs on after the 504: wait until the graph is idle again
        busy = pool.submit(_rank_with(s, 50), "busy")  # an idle graph runs it at once
        _batches_started(s, 2)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as conn:
            # Headers only: the body is never sent, so only an answer before reading it can be a 503.
            conn.sendall(b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 600000\r\n\r\n")
            answer = _read_response(conn)
        assert _metric_sum(s, "mtrank_batch_rows_count") == 1, "the busy batch ended before the refusal"
        assert answer.startswith("HTTP/1.1 503"), answer
        assert "retry-after" in answer.lower() and "deadline" in answer, answer
        assert busy.result().status_code == 504


def test_clients_that_resend_at_once_on_503_get_paced_refusals(slow_engine):
    # Eight clients resend the moment they are refused, for 1.5 s, while the only batch slot is busy
    # for four times the deadline: answered at once, they would get thousands of 503s.
    from mtrank.service.admission import BURST_S, REFUSAL_FLOOR_PER_S, REFUSALS_PER_ANSWER

    repo, call_s = slow_engine
    deadline_ms = int(call_s * 1000 / 4)
    spin_s, clients = 1.5, 8
    env = SLOW_ENV | {"MTRANK_REQUEST_TIMEOUT_MS": str(deadline_ms), "MTRANK_LOG_LEVEL": "info"}
    with RemoteServer(repo, env=env) as s:
        s.post("/v1/rank", json=rank_body(n=50))  # the body size per candidate is learnt (answer: 504)
        _batches_done(s, 1)
        body = json.dumps(rank_body(n=50)).encode()

        def spin(_: int) -> list[tuple[int, float, str | None]]:
            out = []
            with httpx.Client(base_url=s.url, timeout=5.0) as client:
                end = time.monotonic() + spin_s
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    r = client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
                    out.append((r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")))
            return out

        with ThreadPoolExecutor(clients) as pool:
            answers = [a for part in pool.map(spin, range(clients)) for a in part]
    refused = [a for a in answers if a[0] == 503]
    others = [a for a in answers if a[0] != 503]
    assert {a[0] for a in others} <= {200, 504}, others[:5]
    assert all(a[2] is not None and int(a[2]) >= 1 for a in refused)
    # At most BURST_S's worth at once, then the floor rate plus a multiple of the few answers; a
    # held refusal waits at most until its deadline, so each client adds at most one per deadline.
    allowed = (REFUSAL_FLOOR_PER_S * (spin_s + BURST_S) + REFUSALS_PER_ANSWER * len(others)
               + clients * spin_s / (deadline_ms / 1000))
    assert 20 <= len(refused) <= 1.5 * allowed, (len(refused), len(others))
    assert max(a[1] for a in refused) >= 0.02, "no refusal was held"


def test_a_client_that_hangs_up_while_queued_is_dropped(slow_engine):
    repo, _ = slow_engine
    with RemoteServer(repo, env=SLOW_ENV | {"MTRANK_REQUEST_TIMEOUT_MS": "5000"}) as s, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(_rank_with(s, 50), "first")  # occupies the only batch slot
        _batches_started(s, 1)
        with pytest.raises(httpx.ReadTimeout):
            s.post("/v1/rank", json=rank_body(user_id="impatient", n=5), timeout=0.1)
        assert _metric_sum(s, "mtrank_batch_rows_count") == 0, "the first batch ended before the client hung up"
        assert first.result().status_code == 200
        # Queued behind the abandoned request: once this one is answered, the abandoned one's batch,
        # had it run, would have been counted.
        assert s.post("/v1/rank", json=rank_body(user_id="after", n=20)).status_code == 200
        gone = [x.value for x in _metric_samples(s.metrics(), "mtrank_rejected_total")
                if x.labels["reason"] == "client_gone"]
        assert gone == [1.0], gone
        assert _metric_sum(s, "mtrank_batch_rows_sum") == 50 + 20, "the abandoned request's rows ran"


# -- start-up errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MTRANK_BUCKETS": '[{"name": "a", "share": 60, "model": "ple"}, {"name": "b", "share": 30, "model": "ple"}]'},
         "MTRANK_BUCKETS: shares add up to 90, not 100"),
        ({"MTRANK_BUCKETS": '[{"name": "a", "share": 100, "model": "ple", "weights": {"dwell": 1}}]'},
         "MTRANK_BUCKETS: bucket 'a' weighs tasks ['dwell']"),
        ({"MTRANK_BUCKETS": '[{"name": "a", "share": 100, "model": "nope"}]'},
         "MTRANK_BUCKETS: bucket 'a' serves model"),
        ({"MTRANK_DEVICE": "cuda"}, "MTRANK_DEVICE"),
    ],
    ids=["shares", "unknown task", "unknown model", "cuda without gpu"],
)
def test_bad_configuration_stops_start_up_with_one_line(ple_repo, env, words):
    if env.get("MTRANK_DEVICE") == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            pytest.skip("this machine may have a usable GPU")
    with pytest.raises(RuntimeError) as e:
        RemoteServer(ple_repo, env=env, ready_timeout_s=60)
    lines = [ln for ln in str(e.value).splitlines() if ln.startswith("mtrank serve: error:")]
    assert "exited with 2" in str(e.value) and len(lines) == 1 and words in lines[0], str(e.value)


# -- user-group routing --------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_repo(exported_repo, tmp_path_factory) -> tuple[Path, str]:
    """An MFH export (one graph per user group) when MFH is registered, else a hand-assembled
    repository whose per-group graphs are different toy graphs."""
    from mtrank.training.models.registry import model_names

    if "mfh" in model_names():
        return exported_repo("mfh"), "mfh"
    from tests.server import build_toy_version

    repo = tmp_path_factory.mktemp("grouped-repo")
    build_toy_version(repo, "grouped", 1, grouped=True, seed=5)
    return repo, "grouped"


def _direct_group_outputs(vdir: Path, body: dict, group: str) -> dict[str, np.ndarray]:
    """Run one group's ONNX graph directly on the request's features, outside the service."""
    import onnxruntime as ort

    from mtrank.service.stores import InProcessStore, LocalTable
    from mtrank.transform import FeatureTransform

    m = load_manifest(vdir)
    transform = FeatureTransform.from_manifest(m)
    user, cands = body["user"], body["candidates"]
    user_values, columns = {}, {}
    for f in (*transform.dense, *transform.sparse):
        if f.side == "user":
            user_values[f.name] = user["user_id"] if f.name == "user_id" else user["features"].get(f.name)
        elif f.name in ("item_id", "video_len"):
            columns[f.name] = [c[f.name] for c in cands]
        else:
            columns[f.name] = [c["features"].get(f.name) for c in cands]
    info = m.graph_for(group)
    session = ort.InferenceSession(str(vdir / info.file), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed = kinds.feed(transform, kinds.Rows.one_request(user_values, columns, len(cands)), wanted)
    found = {}
    for need in feed.needs:
        table = LocalTable(m.name, m.version, m.tables[need.table], vdir)
        found[need.input] = InProcessStore.lookup_sync(table, need.keys).vectors
    feed = feed.resolve(found)
    outputs = session.run([o.name for o in info.outputs], feed)
    return dict(zip(info.tasks, outputs, strict=True))


def test_each_user_group_gets_its_own_graphs_outputs(grouped_repo):
    repo, model = grouped_repo
    vdir = version_dir(repo, model)
    groups = load_manifest(vdir).graphs
    assert {"new", "high"} <= set(groups), f"{model} has no per-group graphs: {sorted(groups)}"
    new_user = rank_body(user_id="u7", n=25, account_age_days=2, watch_minutes_30d=20.0)
    high_user = rank_body(user_id="u8", n=25, account_age_days=900, watch_minutes_30d=5000.0)
    high_user["candidates"] = new_user["candidates"]
    with RemoteServer(repo) as s:
        got = {"new": s.post("/v1/rank", json=new_user).json(), "high": s.post("/v1/rank", json=high_user).json()}
        forced = s.post("/v1/rank", json=new_user | {"user": {**new_user["user"], "group": "high"}}).json()
    for group, body, out in (("new", new_user, got["new"]), ("high", high_user, got["high"]),
                             ("high", new_user, forced)):
        assert out["user_group"] == group
        mine = _direct_group_outputs(vdir, body, group)
        other = _direct_group_outputs(vdir, body, "high" if group == "new" else "new")
        index = {c["item_id"]: i for i, c in enumerate(body["candidates"])}
        rows = [index[it["item_id"]] for it in out["items"]]
        for task in mine:
            served = np.array([it["tasks"][task] for it in out["items"]])
            np.testing.assert_allclose(served, mine[task][rows], atol=1e-6, rtol=0)
        assert any(np.abs(mine[t] - other[t]).max() > 1e-4 for t in mine), "group graphs are identical"


# -- Redis ---------------------------------------------------------------------------------


class RedisProcess:
    """A redis-server of the test's own (no persistence), so it can be killed and restarted."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_redis():
    r = RedisProcess().start()
    yield r
    r.kill()


@pytest.mark.redis
def test_redis_outage_degrades_answers_and_recovers_without_restart(ple_repo, server, own_redis):
    from mtrank.export.store_loader import load_embeddings

    redis_prefix = "mtrank-outage-test"

    env = {"MTRANK_STORE_URL": own_redis.url, "MTRANK_STORE_PREFIX": redis_prefix, "MTRANK_STORE_RETRY_S": "0.2"}
    with RemoteServer(ple_repo, env=env, wait_ready=False) as s:
        # Nothing loaded in Redis yet: up, but not ready, and it says why.
        deadline = time.monotonic() + 30
        while True:
            try:
                r = s.get("/readyz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and s.proc.poll() is None, s.output()
                time.sleep(0.1)
        assert r.status_code == 503 and "not loaded in Redis" in r.json()["reason"], r.text
        load_embeddings(ple_repo, "ple", own_redis.url, prefix=redis_prefix, progress=False)
        s.wait_ready(30)  # picked up by the retry loop, no restart

        body = rank_body(user_id="u5", n=40, offset=0)
        healthy = s.post("/v1/rank", json=body).json()
        assert healthy["degraded"] is False
        in_process = server.post("/v1/rank", json=body).json()  # same model, in-process store
        assert {i["item_id"]: i["tasks"] for i in healthy["items"]} == {
            i["item_id"]: i["tasks"] for i in in_process["items"]
        }

        own_redis.kill()
        r = s.post("/v1/rank", json=rank_body(user_id="u6", n=40, offset=300))
        assert r.status_code == 200 and r.json()["degraded"] is True, r.text
        ready = s.get("/readyz")
        # Still in rotation (degraded answers beat no answers), and it says why.
        assert ready.status_code == 200 and ready.json()["degraded"] is True and "Redis" in ready.json()["reason"]
        text = s.metrics()
        assert _metric_samples(text, "mtrank_embedding_store_degraded")[0].value == 1
        assert _metric_samples(text, "mtrank_redis_errors_total")[0].value >= 1
        assert s.get("/v1/models").json()["store"] == {"kind": "redis", "degraded": True}

        own_redis.start()  # same port, empty: the tables must be loaded again
        load_embeddings(ple_repo, "ple", own_redis.url, prefix=redis_prefix, progress=False)
        deadline = time.monotonic() + 15
        offset = 400
        while True:
            out = s.post("/v1/rank", json=rank_body(user_id="u6", n=40, offset=offset)).json()
            if out["degraded"] is False:
                break
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            offset += 40
            time.sleep(0.1)
        assert s.get("/readyz").status_code == 200
        assert _metric_samples(s.metrics(), "mtrank_embedding_store_degraded")[0].value == 0
        assert s.proc.poll() is None


def test_missing_repository_stops_start_up_with_one_line(tmp_path):
    for repo, words in ((None, "MTRANK_MODEL_REPO: not set"), (tmp_path / "nowhere", "is not a directory")):
        with pytest.raises(RuntimeError) as e:
            RemoteServer(repo)
        assert "exited with 2" in str(e.value) and words in str(e.value), str(e.value)


def test_a_port_in_use_stops_start_up_with_one_line(ple_repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as e:
            RemoteServer(ple_repo, port=port, ready_timeout_s=60, env={"MTRANK_LOG_LEVEL": "info"})
    lines = [ln for ln in str(e.value).splitlines() if ln.startswith("mtrank serve: error:")]
    assert "exited with 2" in str(e.value) and len(lines) == 1, str(e.value)
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines[0]
    # The log lines before it (written in blocks) come out before the error, which is the last line.
    output = [ln for ln in str(e.value).splitlines() if ln.strip()]
    assert output[-1] == lines[0] and any(" INFO mtrank.main: serving " in ln for ln in output), output
