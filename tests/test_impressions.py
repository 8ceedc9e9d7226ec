"""The impression log (docs/impressions.md) and the ``mtrank_prediction`` histogram, through a real
``mtrank serve`` with the toy model, real Parquet files and real directories."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from mtrank.bench.impressions import holds_dac_override, read_only_directory
from mtrank.bench.server import RemoteServer
from mtrank.impression_log import FILE_GLOB, sampled
from mtrank.service import metrics
from mtrank.service.impressions import THREAD_NAME, ImpressionLog
from mtrank.service.ranking import RequestContext
from mtrank.service.schemas import ModelRef, RankedItem, RankResponse, decode_request
from tests.server import build_toy_version, rank_body


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    build_toy_version(repo)
    return repo


def _log_env(directory: Path, **settings: str) -> dict[str, str]:
    return {"MTRANK_IMPRESSION_LOG": str(directory), **{f"MTRANK_IMPRESSION_{k.upper()}": v
                                                        for k, v in settings.items()}}


def _samples(server: RemoteServer, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(server.metrics()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _metric(server: RemoteServer, name: str, **labels: str) -> float:
    return sum(v for k, v in _samples(server, name).items() if set(labels.items()) <= set(k))


def _wait_for(condition, timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob(FILE_GLOB))


def _records(directory: Path) -> list[dict]:
    """Every record of the directory's complete files, read as a dataset (temporary files hidden)."""
    return ds.dataset(str(directory), format="parquet").to_table().to_pylist() if _files(directory) else []


def _threads(pid: int) -> list[str]:
    return [(t / "comm").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir()]


def _rank(server: RemoteServer, body: dict | None, **kwargs) -> dict:
    r = server.post("/v1/rank", json=body, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


# -- records --------------------------------------------------------------------------------


def test_each_answered_request_is_one_record_with_what_was_received_and_answered(toy_repo, tmp_path):
    log_dir = tmp_path / "log"
    bodies = []
    for i in range(12):
        body = rank_body(f"u{i}", n=5 + i, offset=3 * i, account_age_days=2 + 40 * i)
        body["top_k"] = [None, 3, 1, 100][i % 4]
        body["return_task_scores"] = i % 3 != 0
        if i == 5:
            del body["request_id"]  # the id then comes from X-Request-ID
        if i == 7:
            del body["candidates"][1]["features"]
            body["user"]["features"]["device"] = "iPhone – ünïcode"
        bodies.append(body)
    # Body 7 goes indented, with raw UTF-8: the log keeps the request's text as it came.
    sent = [json.dumps(b, indent=2 if i == 7 else None, ensure_ascii=i != 7).encode() for i, b in enumerate(bodies)]
    with RemoteServer(toy_repo, env=_log_env(log_dir, rotate_s="0.3")) as server:
        assert THREAD_NAME in _threads(server.proc.pid)
        answers, times, scored = [], [], []
        for i, body in enumerate(bodies):
            before = time.time()
            answers.append(_rank(server, None, content=sent[i], headers={"X-Request-ID": f"hdr-{i}",
                                                                          "Content-Type": "application/json"}))
            times.append((before, time.time()))
            # The same candidates with every task's score in the answer: predictions to compare with.
            scored.append(_rank(server, {**body, "request_id": f"again-{i}", "return_task_scores": True}))
        bad = server.post("/v1/rank", json={**bodies[0], "candidates": []})
        assert bad.status_code == 422  # not answered: no record
        _wait_for(lambda: _metric(server, "mtrank_impressions_logged_total") == 2 * len(bodies), what="24 logged")
    records = {r["request_id"]: r for r in _records(log_dir)}
    assert len(records) == 2 * len(bodies)
    for i, (body, answer) in enumerate(zip(bodies, answers, strict=True)):
        rid = body.get("request_id", f"hdr-{i}")
        assert answer["request_id"] == rid
        rec = records[rid]
        assert times[i][0] * 1000 - 1 <= rec["time"].timestamp() * 1000 <= times[i][1] * 1000 + 1
        assert (rec["bucket"], rec["model"], rec["version"]) == ("default", "toy", 1)
        assert rec["user_group"] == answer["user_group"] and rec["user_id"] == body["user"]["user_id"]
        assert rec["request"].encode() == sent[i]  # the body byte for byte, whatever its layout
        assert [(it["item_id"], it["rank"], it["score"]) for it in rec["items"]] == [
            (it["item_id"], it["rank"], it["score"]) for it in answer["items"]]
        full = {it["item_id"]: it["tasks"] for it in scored[i]["items"]}
        for it in rec["items"]:
            assert dict(it["tasks"]) == {t: float(np.float32(v)) for t, v in full[it["item_id"]].items()}


def test_returned_predictions_fill_the_histogram_per_bucket_and_task(toy_repo):
    buckets = json.dumps([{"name": "a", "share": 50}, {"name": "b", "share": 50}])
    with RemoteServer(toy_repo, env={"MTRANK_BUCKETS": buckets}) as server:
        expected: dict[tuple[str, str], list[float]] = {}
        for i in range(16):
            body = rank_body(f"u{i}", n=12, offset=i)
            body["top_k"] = 7
            answer = _rank(server, body)
            for it in answer["items"]:
                for task, v in it["tasks"].items():
                    expected.setdefault((answer["bucket"], task), []).append(v)
        assert {b for b, _ in expected} == {"a", "b"}
        # Flushed to the histogram about once a second.
        _wait_for(lambda: _metric(server, "mtrank_prediction_count") == 16 * 7 * 3, what="336 predictions")
        for (bucket, task), values in expected.items():
            assert _metric(server, "mtrank_prediction_count", bucket=bucket, task=task) == len(values)
            assert _metric(server, "mtrank_prediction_sum", bucket=bucket, task=task) == pytest.approx(
                sum(values), rel=1e-9)
            below = _metric(server, "mtrank_prediction_bucket", bucket=bucket, task=task, le="0.5")
            assert below == sum(v <= 0.5 for v in values)


def test_bucketed_predictions_equal_one_observe_per_value():
    rng = np.random.default_rng(3)
    tasks = ("p", "watch")
    ranges = {"watch": (10.0, 60.0)}  # a regression output in seconds, counted as its range's fraction
    scores = {"p": rng.random(40).astype(np.float32), "watch": rng.uniform(0, 80, 40).astype(np.float32)}
    scores["p"][[0, 1, 2]] = [np.nan, -0.5, 1.5]  # a broken output, and values outside [0, 1]
    scores["p"][3:6] = [0.001, 0.5, 1.0]  # on bucket bounds
    rows = rng.permutation(40)[:25]
    registry = CollectorRegistry()
    reference = Histogram("ref", "", ["task"], buckets=metrics.PREDICTION_BUCKETS, registry=registry)
    for task in tasks:
        values = scores[task][rows].astype(np.float64)
        if task in ranges:
            values = (values - 10.0) / 50.0
        for v in values:
            reference.labels(task).observe(0.0 if math.isnan(v) else min(max(v, 0.0), 1.0))
    metrics.record_predictions("unit-test", "m", 1, scores, rows, ranges)
    metrics.flush_predictions()

    def series(name: str, families) -> dict:
        return {(s.labels["task"], s.labels.get("le")): s.value for family in families for s in family.samples
                if s.name == name and s.labels.get("bucket", "unit-test") == "unit-test"}

    ours, theirs = list(REGISTRY.collect()), list(registry.collect())
    for suffix in ("_bucket", "_count"):
        assert series(f"mtrank_prediction{suffix}", ours) == series(f"ref{suffix}", theirs)
    got, want = series("mtrank_prediction_sum", ours), series("ref_sum", theirs)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)


# -- sampling, rotation, workers ------------------------------------------------------------


def test_sampling_keeps_exactly_the_requests_whose_id_hashes_below_the_rate(toy_repo, tmp_path):
    log_dir = tmp_path / "log"
    ids = [f"sample-{i}" for i in range(80)]
    with RemoteServer(toy_repo, env=_log_env(log_dir, sample="0.3")) as server:
        for rid in ids:
            _rank(server, {**rank_body("u3", n=4), "request_id": rid})
    logged = {r["request_id"] for r in _records(log_dir)}
    assert logged == {rid for rid in ids if sampled(rid, 0.3)}
    assert 10 <= len(logged) <= 40


def test_files_appear_complete_and_renamed_never_half_written(toy_repo, tmp_path):
    log_dir = tmp_path / "log"
    seen_final: dict[str, bytes] = {}
    temp_inodes: set[int] = set()
    unreadable_temps = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal unreadable_temps
        while not stop.is_set():
            for path in list(log_dir.glob(".*.tmp")) if log_dir.exists() else []:
                with contextlib.suppress(FileNotFoundError):
                    temp_inodes.add(path.stat().st_ino)
                    try:
                        pq.ParquetFile(path)
                    except (pa.ArrowInvalid, OSError):
                        unreadable_temps += 1
            for path in _files(log_dir) if log_dir.exists() else []:
                if path.name not in seen_final:
                    seen_final[path.name] = path.read_bytes()
                    pq.read_table(path)  # whole at first sight
                    ds.dataset(str(log_dir), format="parquet").to_table()  # the directory reads, temps hidden
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    with RemoteServer(toy_repo, env=_log_env(log_dir, rotate_s="0.4")) as server:
        watcher.start()
        try:
            sent = 0
            started = time.monotonic()
            while time.monotonic() - started < 3.0:
                _rank(server, {**rank_body("u5", n=8, offset=sent), "request_id": f"rot-{sent}"})
                sent += 1
                time.sleep(0.01)
        finally:
            stop.set()
            watcher.join()
        final_inodes = {p.stat().st_ino for p in _files(log_dir)}
    files = _files(log_dir)
    assert len(files) >= 4  # rotated by time
    assert not list(log_dir.glob(".*"))  # the last file completed on SIGTERM, no temp left
    assert unreadable_temps > 0  # temps were seen mid-write, and unreadable as Parquet
    assert final_inodes & temp_inodes  # files appeared by renaming a temp
    for name, content in seen_final.items():
        assert (log_dir / name).read_bytes() == content  # never changed once visible
    assert sorted(r["request_id"] for r in _records(log_dir)) == sorted(f"rot-{i}" for i in range(sent))


def _records_by_file(directory: Path) -> dict[str, list[str]]:
    return {p.name: pq.read_table(p, columns=["request_id"]).column(0).to_pylist() for p in _files(directory)}


def test_size_rotation_completes_a_file_once_a_row_group_fills_it(tmp_path):
    body = json.dumps(rank_body("u1", n=3)).encode()
    query = decode_request(body, 100)
    rows = np.array([2, 1, 0])
    ctx = RequestContext("x", served_rows=rows, served_ids=[query.item_ids[r] for r in rows],
                         scores=np.array([0.5, 0.4, 0.3]), task_scores={"vtr": np.array([0.1, 0.2, 0.3], np.float32)})
    impressions = ImpressionLog(tmp_path, rotate_bytes=1, rotate_s=3600.0)

    def offer(count: int, prefix: str) -> None:
        for i in range(count):
            items = [RankedItem(f"v{r}", k + 1, 0.5) for k, r in enumerate(rows.tolist())]
            impressions.offer(ctx, body, query, RankResponse(f"{prefix}-{i}", ModelRef("toy", 1), "default", None,
                                                         False, 0, items))

    offer(5000, "big")  # more than a row group: written at once, and the file is over 1 byte
    _wait_for(lambda: _files(tmp_path), what="the first file")
    offer(10, "small")
    impressions.close()  # the rest, in a file of its own
    assert sorted(len(ids) for ids in _records_by_file(tmp_path).values()) == [10, 5000]


def test_each_worker_writes_its_own_file_set(toy_repo, tmp_path):
    log_dir = tmp_path / "log"
    ids = [f"w-{i}" for i in range(40)]
    with RemoteServer(toy_repo, env={**_log_env(log_dir), "MTRANK_WORKERS": "2"}, ready_timeout_s=120) as server:
        workers = set(server.pids()) - {server.proc.pid}
        assert len(workers) == 2
        for rid in ids:  # a connection each: the kernel spreads connections over the workers
            r = httpx.post(f"{server.url}/v1/rank", json={**rank_body("u7", n=4), "request_id": rid}, timeout=30)
            assert r.status_code == 200
    by_file = _records_by_file(log_dir)
    pids = {int(name.split("-")[-2]) for name in by_file}
    assert pids == workers
    assert sorted(rid for file_ids in by_file.values() for rid in file_ids) == sorted(ids)


# -- failures: ranking goes on, drops are counted --------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``: a disk that fills up."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_log_directory_drops_and_counts_records_and_every_request_is_answered(toy_repo, tmp_path):
    # Mode 0555; as root the server runs without CAP_DAC_OVERRIDE (setpriv), so the mode holds for it
    # as for a service account. The probe shows the directory really refuses a file to such a process.
    with read_only_directory(tmp_path / "ro") as (log_dir, wrapper, probe), \
            RemoteServer(toy_repo, env={**_log_env(log_dir), "MTRANK_LOG_LEVEL": "warning"}, wrapper=wrapper) as server:
        started = time.monotonic()
        assert probe == "EACCES"
        assert not holds_dac_override(server.proc.pid)
        for i in range(20):
            _rank(server, {**rank_body("u2", n=6), "request_id": f"ro-{i}"})
            time.sleep(0.05)  # over several writer passes: one warning sums them up
        # And concurrently, 100 candidates a request, as the bench sends them.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            def rank(i: int) -> int:
                body = {**rank_body(f"u{i % 50}", n=100, offset=i), "request_id": f"ro-c-{i}"}
                return client.post("/v1/rank", json=body).status_code

            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(rank, range(80)))
        assert statuses == [200] * 80
        _wait_for(lambda: _metric(server, "mtrank_impressions_dropped_total", reason="write_error") == 100,
                  what="100 drops")
        assert _metric(server, "mtrank_requests_total", route="/v1/rank", status="200") == 100
        assert _metric(server, "mtrank_impressions_logged_total") == 0
        assert _metric(server, "mtrank_impressions_dropped_total", reason="queue_full") == 0
        warnings = [line for line in server.log_lines() if "impression log: dropped" in line]
        assert 1 <= len(warnings) <= 1 + (time.monotonic() - started) // 10, warnings  # one every 10 s at most
        assert not list(log_dir.iterdir())


def test_a_full_disk_drops_and_counts_what_it_cannot_hold(toy_repo, tmp_path):
    with _small_tmpfs(tmp_path / "small", "96k") as log_dir, \
            RemoteServer(toy_repo, env=_log_env(log_dir, rotate_s="0.2")) as server:
        sent = 0
        while _metric(server, "mtrank_impressions_dropped_total", reason="write_error") == 0:
            for _ in range(20):
                body = rank_body("u4", n=60, offset=sent)
                body["candidates"][0]["features"]["category"] = f"c{sent}-{os.urandom(64).hex()}"  # incompressible
                _rank(server, {**body, "request_id": f"full-{sent}"})
                sent += 1
            assert sent < 3000, "the disk never filled"
        _wait_for(lambda: _metric(server, "mtrank_impressions_logged_total")
                  + _metric(server, "mtrank_impressions_dropped_total") == sent, what="every record accounted for")
        logged = _metric(server, "mtrank_impressions_logged_total")
        assert logged > 0
        assert len(_records(log_dir)) == logged  # what was counted as logged is in whole files


def test_a_full_queue_drops_and_counts_records(toy_repo, tmp_path):
    log_dir = tmp_path / "log"
    sent = 30
    with RemoteServer(toy_repo, env=_log_env(log_dir, queue_rows="20")) as server:
        for i in range(sent):  # far faster than the writer's four passes a second
            _rank(server, {**rank_body("u6", n=20), "request_id": f"q-{i}"})
        _wait_for(lambda: _metric(server, "mtrank_impressions_dropped_total", reason="queue_full") > 0,
                  what="queue_full drops")
        time.sleep(0.5)
        dropped = _metric(server, "mtrank_impressions_dropped_total", reason="queue_full")
    logged = len(_records(log_dir))
    assert logged + dropped == sent
    assert dropped >= sent // 2


def test_with_the_log_off_there_is_no_writer_no_arrow_and_no_file(toy_repo, tmp_path):
    with RemoteServer(toy_repo, cwd=tmp_path) as server:
        for i in range(5):
            _rank(server, rank_body("u8", n=4, offset=i))
        assert THREAD_NAME not in _threads(server.proc.pid)
        assert "libarrow" not in Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert _metric(server, "mtrank_impressions_logged_total") == 0
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob(".*.tmp"))


def test_the_sampling_rate_is_checked_at_start_up(monkeypatch):
    from mtrank.service.settings import ConfigError, load_settings

    monkeypatch.setenv("MTRANK_IMPRESSION_SAMPLE", "1.5")
    with pytest.raises(ConfigError, match="^MTRANK_IMPRESSION_SAMPLE: "):
        load_settings()


# -- join-log -------------------------------------------------------------------------------


def test_join_log_writes_one_row_per_shown_item_with_its_features_and_feedback_labels(toy_repo, tmp_path):
    import pandas as pd

    from mtrank.cli import main
    from mtrank.spec import FeatureSpec
    from mtrank.training.frames import conform_frame, validate_frame

    log_dir = tmp_path / "log"
    bodies = [{**rank_body(f"u{i}", n=6, offset=i), "request_id": f"j-{i}", "top_k": 3} for i in range(10)]
    with RemoteServer(toy_repo, env=_log_env(log_dir)) as server:
        answers = []
        for body in bodies:
            answers.append(_rank(server, body))
            time.sleep(0.002)  # distinct millisecond times: the split order is the sending order
    shown = [(a["request_id"], it["item_id"]) for a in answers for it in a["items"]]
    # Feedback for the first two shown items of every request, and one row for an item not shown.
    feedback = pd.DataFrame([{"request_id": rid, "item_id": item, "vtr": 1, "played": 1, "vcr": 0.25 + k * 0.01,
                              "like": k % 2} for k, (rid, item) in enumerate(shown) if k % 3 != 2]
                            + [{"request_id": "j-0", "item_id": "v999", "vtr": 1, "played": 1, "vcr": 0.5, "like": 1}])
    feedback.to_csv(tmp_path / "feedback.csv", index=False)
    spec = FeatureSpec.from_dict({**_toy_spec(), "tasks": [
        {"name": "vtr"}, {"name": "vcr", "type": "regression", "space": "played"}, {"name": "like"}]})
    spec.save(tmp_path / "spec.yaml")
    out = tmp_path / "data"
    assert main(["join-log", "--impressions", str(log_dir), "--feedback", str(tmp_path / "feedback.csv"),
                 "--out", str(out), "--spec", str(tmp_path / "spec.yaml"), "--valid-frac", "0.2",
                 "--test-frac", "0.1"]) == 0
    splits = {s: pd.read_parquet(out / f"{s}.parquet") for s in ("train", "valid", "test")}
    # Requests whole, in time order: 7 / 2 / 1 of 10.
    assert [sorted(set(f["request_id"])) for f in splits.values()] == [
        sorted(f"j-{i}" for i in range(7)), ["j-7", "j-8"], ["j-9"]]
    rows = pd.concat(splits.values(), ignore_index=True).set_index(["request_id", "item_id"])
    assert sorted(rows.index) == sorted(shown)
    fb = feedback.set_index(["request_id", "item_id"])
    for body, answer in zip(bodies, answers, strict=True):
        candidates = {c["item_id"]: c for c in body["candidates"]}
        for it in answer["items"]:
            row = rows.loc[(body["request_id"], it["item_id"])]
            assert (row["rank"], row["score"], row["bucket"], row["user_group"]) == (
                it["rank"], it["score"], answer["bucket"], answer["user_group"])
            assert row["user_id"] == body["user"]["user_id"] and row["device"] == body["user"]["features"]["device"]
            assert row["account_age_days"] == body["user"]["features"]["account_age_days"]
            c = candidates[it["item_id"]]
            assert (row["video_len"], row["author_id"], row["category"], row["item_age_days"]) == (
                c["video_len"], c["features"]["author_id"], c["features"]["category"], c["features"]["item_age_days"])
            key = (body["request_id"], it["item_id"])
            if key in fb.index:
                assert (row["vtr"], row["played"], row["vcr"], row["like"]) == tuple(
                    float(fb.loc[key, c]) for c in ("vtr", "played", "vcr", "like"))
            else:  # no feedback: a negative, outside the completion ratio's space
                assert (row["vtr"], row["played"], row["like"]) == (0.0, 0.0, 0.0) and math.isnan(row["vcr"])
    assert FeatureSpec.load(out / "spec.yaml") == spec
    for name, frame in splits.items():
        validate_frame(frame, spec, name)  # what the trainer checks every batch against
        assert len(conform_frame(frame, spec)) == len(frame)


def test_join_log_reads_the_spec_from_the_logged_versions_manifest(toy_repo, tmp_path):
    import pandas as pd

    from mtrank.impression_join import join_log

    log_dir = tmp_path / "log"
    with RemoteServer(toy_repo, env=_log_env(log_dir)) as server:
        answer = _rank(server, {**rank_body("u1", n=4), "request_id": "m-1"})
    items = [it["item_id"] for it in answer["items"]]
    pd.DataFrame({"request_id": ["m-1"] * 3, "item_id": items[:3], "vtr": [1, 0, 1], "vcr": [0.5, 0.1, 0.9],
                  "like": [0, 0, 1]}).to_parquet(tmp_path / "feedback.parquet")
    report = join_log(log_dir, tmp_path / "feedback.parquet", tmp_path / "data", repo=toy_repo,
                      valid_frac=0.0, test_frac=0.0)
    # vcr has no sample space in a manifest: the shown item without feedback has no label for it.
    assert report.left_out == {"vcr": 1} and report.splits == {"train": 3, "valid": 0, "test": 0}
    assert report.positives == {"vtr": 2, "like": 1}
    train = pd.read_parquet(tmp_path / "data" / "train.parquet")
    assert train["item_id"].tolist() == items[:3] and train["vcr"].tolist() == pytest.approx([0.5, 0.1, 0.9])


def _toy_spec() -> dict:
    """The toy model's features (tests/server.py) as a spec."""
    from tests.server import TOY_DENSE, TOY_GROUPS

    return {
        "name": "toy",
        "dense": [{"name": d.name, "side": d.side, "transform": d.transform, "default": d.default} for d in TOY_DENSE],
        "sparse": [{"name": "user_id", "side": "user", "location": "store"},
                   {"name": "device", "side": "user", "location": "graph"},
                   {"name": "item_id", "side": "item", "location": "store"},
                   {"name": "author_id", "side": "item", "location": "store"},
                   {"name": "category", "side": "item", "location": "graph"}],
        "user_groups": {"column": TOY_GROUPS.column, "values": list(TOY_GROUPS.values),
                        "rules": [{"value": r.value, "feature": r.feature, "op": r.op, "threshold": r.threshold}
                                  for r in TOY_GROUPS.rules], "default": TOY_GROUPS.default},
    }


# -- readers ----------------------------------------------------------------------------------


def test_duckdb_reads_the_log_with_the_documented_queries(toy_repo, tmp_path):
    """docs/impressions.md's DuckDB queries, on a real log: shown items with a task's prediction,
    and every candidate's features out of the request as received."""
    import duckdb

    log_dir = tmp_path / "log"
    body = {**rank_body("u3", n=4), "request_id": "d-1", "top_k": 3}
    with RemoteServer(toy_repo, env=_log_env(log_dir)) as server:
        answer = _rank(server, body)
    files = f"{log_dir}/*.parquet"
    shown = duckdb.sql(f"""
        SELECT r.request_id, r.bucket, it.item_id, it.rank, it.score, it.tasks['vtr'] AS vtr
        FROM read_parquet('{files}') r, unnest(r.items) AS u(it)
        ORDER BY r.request_id, it.rank""").fetchall()
    assert [(s[0], s[2], s[3], s[4]) for s in shown] == [
        ("d-1", it["item_id"], it["rank"], it["score"]) for it in answer["items"]]
    assert [s[5] for s in shown] == pytest.approx([it["tasks"]["vtr"] for it in answer["items"]], rel=1e-6)
    candidates = duckdb.sql(f"""
        SELECT r.request_id, c->>'item_id' AS item_id, (c->>'video_len')::DOUBLE AS video_len,
               c->'features'->>'author_id' AS author_id
        FROM read_parquet('{files}') r, unnest(from_json(r.request->'candidates', '["json"]')) AS u(c)""").fetchall()
    assert sorted(candidates) == sorted(("d-1", c["item_id"], c["video_len"], c["features"]["author_id"])
                                       for c in body["candidates"])


def test_readers_refuse_a_log_of_another_format_in_one_line(toy_repo, tmp_path, capsys):
    from mtrank.cli import main

    log_dir = tmp_path / "log"
    with RemoteServer(toy_repo, env=_log_env(log_dir)) as server:
        answer = _rank(server, {**rank_body("u1", n=4), "request_id": "f-1"})
    pq.write_table(pa.table({"request_id": ["f-1"], "item_id": [answer["items"][0]["item_id"]], "vtr": [1]}),
                   tmp_path / "feedback.parquet")
    (written,) = _files(log_dir)
    old = pq.read_table(written)
    old = old.replace_schema_metadata({"format": "mtrank.impressions/1"})
    pq.write_table(old, log_dir / "impressions-20261201T000000Z-host-1-000001.parquet")
    for argv in (["join-log", "--impressions", str(log_dir), "--feedback", str(tmp_path / "feedback.parquet"),
                  "--out", str(tmp_path / "data"), "--repo", str(toy_repo)],
                 ["ab-report", "--impressions", str(log_dir), "--feedback", str(tmp_path / "feedback.parquet"),
                  "--out", str(tmp_path / "ab")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "impressions-20261201T000000Z-host-1-000001.parquet: impression log format mtrank.impressions/1, " \
               "this mtrank reads mtrank.impressions/2" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "ab").exists()
