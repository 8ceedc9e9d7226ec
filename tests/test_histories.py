"""History records end to end: ``mtrank load-histories`` writes each user's sequence-field lists
into Redis or the in-process store's file, and a real ``mtrank serve`` uses them for requests that
leave the history out, scoring like PyTorch on the same rows (PLE, MFH). A user without a record,
and a request sending ``[]``, get the empty-history scores; with Redis down requests are served,
degraded. Bad tables are one line and exit status 2.

The list data set and the trained, exported PLE and MFH come from tests/test_lists.py's fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrank import histories, store_keys
from mtrank.bench.server import RemoteServer
from mtrank.export.store_loader import load_embeddings
from tests import test_lists
from tests.cluster import LocalCluster, RedisNode, redis_binaries
from tests.server import build_toy_version
from tests.test_lists import MAX_LEN, TOLERANCE, _requests, _rows
from tests.test_raw_parity import _torch_scores

# The list data set and its trained, exported models (module-scoped fixtures of tests/test_lists.py).
list_data = test_lists.list_data
list_runs = test_lists.list_runs

HISTORY_FIELDS = ("hist_item_id", "hist_category")


def _load_histories(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``mtrank load-histories`` in a process of its own."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "mtrank.cli", "load-histories", *args], capture_output=True,
                          text=True, env=full_env, timeout=120)


def _history_table(rows: pd.DataFrame, path: Path, leave_out: set[str] = frozenset()) -> Path:
    """One row per user of ``rows`` (but ``leave_out``): the user id and the history columns."""
    users = rows.drop_duplicates("user_id")
    users = users[~users["user_id"].isin(leave_out)][["user_id", *HISTORY_FIELDS]]
    users.to_parquet(path)
    return path


def _cases(rows: pd.DataFrame) -> tuple[str, str]:
    """(a user left out of the history table, a user whose request sends ``[]``): both with a
    history of ``max_len`` entries in the data, so that empty histories score differently."""
    full = rows.loc[rows["hist_item_id"].map(len) == MAX_LEN, "user_id"].drop_duplicates().tolist()
    assert len(full) >= 2, full
    return full[0], full[1]


def _expected(run_dir: Path, rows: pd.DataFrame, empty_users: set[str]) -> tuple[dict, dict]:
    """PyTorch's scores on ``rows`` as they are, and with ``empty_users``' histories emptied."""
    emptied = rows.copy()
    for name in HISTORY_FIELDS:
        emptied[name] = [[] if u in empty_users else list(h) for u, h in zip(rows["user_id"], rows[name],
                                                                           strict=True)]
    return _torch_scores(run_dir, rows), _torch_scores(run_dir, emptied)


def _bodies_without_histories(rows: pd.DataFrame, explicit_empty: str) -> list[dict]:
    bodies = _requests(rows)
    for body in bodies:
        features = body["user"]["features"]
        for name in HISTORY_FIELDS:
            if body["user"]["user_id"] == explicit_empty:
                features[name] = []  # an explicit empty history, not "absent": the record is not used
            else:
                features.pop(name, None)
    return bodies


def _worst_diff(server: RemoteServer, bodies: list[dict], expected: dict) -> float:
    worst, offset = 0.0, 0
    for body in bodies:
        answer = server.post("/v1/rank", json=body)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["degraded"] is False, got
        position = {c["item_id"]: offset + i for i, c in enumerate(body["candidates"])}
        for item in got["items"]:
            for task, score in item["tasks"].items():
                worst = max(worst, abs(score - float(expected[task][position[item["item_id"]]])))
        offset += len(body["candidates"])
    return worst


def _missing_records(metrics_text: str) -> float:
    lines = [line for line in metrics_text.splitlines()
             if line.startswith('mtrank_embedding_missing_total{table="histories"}')]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.slow
@pytest.mark.parametrize("store", ["inprocess", "redis"])
@pytest.mark.parametrize("model", ["ple", "mfh"])
def test_histories_from_the_store_rank_like_pytorch(model, store, list_runs, list_data, tmp_path, request):
    run_dir, repo = list_runs(model)
    env: dict[str, str] = {}
    if store == "redis":
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        load_embeddings(repo, model, url, prefix=prefix, progress=False)
        env = {"MTRANK_STORE_URL": url, "MTRANK_STORE_PREFIX": prefix}
    _check_parity(model, run_dir, repo, _rows(list_data), env, tmp_path)
    if store == "inprocess":
        assert histories.local_path(repo / model / "1").is_file()


@pytest.mark.slow
@pytest.mark.redis
def test_histories_on_a_sharded_cluster_version_rank_like_pytorch(list_runs, list_data, tmp_path):
    """Each record lives under its user's shard tag, beside its shard's meta key (3 primaries)."""
    redis_binaries()
    run_dir, repo = list_runs("ple")
    cluster = LocalCluster(tmp_path / "cluster").start()
    try:
        assert load_embeddings(repo, "ple", cluster.url, progress=False, shards=3)["shards"] == 3
        env = {"MTRANK_STORE_URL": cluster.url}
        _check_parity("ple", run_dir, repo, _rows(list_data), env, tmp_path)
        metas = [k for node in cluster.primaries() for k in node.client().scan_iter(match="mtrank:meta:*@hist")]
        assert len(metas) == 3, metas
    finally:
        cluster.stop()


def _check_parity(model: str, run_dir: Path, repo: Path, rows: pd.DataFrame, env: dict[str, str],
                  tmp_path: Path) -> None:
    """Load the rows' histories (but one user's) with the CLI, send the requests without them and
    compare with PyTorch; one request sends ``[]`` and one user has no record: empty histories."""
    no_record, explicit_empty = _cases(rows)
    with_history, empty = _expected(run_dir, rows, {no_record, explicit_empty})
    # The user's scores depend on their history: the test can tell a record from none.
    mine = (rows["user_id"] == no_record).to_numpy()
    assert max(np.abs(with_history[t][mine] - empty[t][mine]).max() for t in with_history) > 10 * TOLERANCE
    expected = {task: np.where(rows["user_id"].isin([no_record, explicit_empty]).to_numpy(), empty[task], scores)
                for task, scores in with_history.items()}
    table = _history_table(rows, tmp_path / "histories.parquet", leave_out={no_record})
    done = _load_histories("--repo", str(repo), "--model", model, "--table", str(table), env=env)
    assert done.returncode == 0, done.stderr
    assert f"{rows['user_id'].nunique() - 1} users" in done.stdout, done.stdout
    with RemoteServer(repo, env=env) as server:
        worst = _worst_diff(server, _bodies_without_histories(rows, explicit_empty), expected)
        missing = _missing_records(server.metrics())
    assert worst <= TOLERANCE, f"{model} ({env.get('MTRANK_STORE_URL', 'in-process')}): max abs diff {worst}"
    assert missing == 1, f"one request's user has no record, {missing} counted"


@pytest.mark.slow
@pytest.mark.redis
def test_a_reload_replaces_the_records_and_an_incomplete_load_is_no_record(list_runs, list_data, redis_url,
                                                                           redis_prefix, tmp_path):
    import redis

    _, repo = list_runs("ple")
    rows = _rows(list_data)
    users = rows["user_id"].drop_duplicates().tolist()
    env = {"MTRANK_STORE_URL": redis_url, "MTRANK_STORE_PREFIX": redis_prefix}
    assert _load_histories("--repo", str(repo), "--model", "ple", "--table",
                           str(_history_table(rows, tmp_path / "all.parquet")), env=env).returncode == 0
    longest = rows.loc[rows["hist_item_id"].map(len) > MAX_LEN].iloc[0]
    kept = set(users[::2]) | {longest["user_id"]}
    done = _load_histories("--repo", str(repo), "--model", "ple", "--table",
                           str(_history_table(rows, tmp_path / "half.parquet", leave_out=set(users) - kept)), env=env)
    assert done.returncode == 0, done.stderr
    client = redis.Redis.from_url(redis_url)
    record_prefix = f"{redis_prefix}:{{ple:1}}:{store_keys.HISTORY_SEGMENT}:"
    stored = {k.decode()[len(record_prefix):] for k in client.scan_iter(match=record_prefix + "*", count=1000)}
    assert stored == kept
    meta = json.loads(client.get(f"{redis_prefix}:meta:{{ple:1}}:{store_keys.HISTORY_SEGMENT}"))
    assert meta["fields"] == list(HISTORY_FIELDS) and meta["users"] == len(kept) and meta["max_len"] == [MAX_LEN] * 2
    # The records are cut at max_len, most recent first.
    raw = client.get(record_prefix + longest["user_id"])
    assert histories.decode_record(raw, 2)[0] == list(longest["hist_item_id"][:MAX_LEN])


BAD_TABLES = [
    ("an unknown model", {"model": "nope"}, "no versions of model 'nope'"),
    ("an unknown version", {"version": "9"}, "has no version 9"),
    ("a missing column", {"drop": "hist_category"}, "no column 'hist_category'"),
    ("a missing user column", {"user_column": "uid"}, "no column 'uid'"),
    ("a non-list cell", {"cell": "v1"}, "column 'hist_item_id' row 1: must be a list, got a string"),
    ("a nested list", {"cell": [["v1"]]}, "column 'hist_item_id' row 1: list entries must be"),
    ("a CSV cell that is no JSON array", {"csv_cell": "v1,v2"}, "column 'hist_item_id' row 1: not a JSON array"),
    ("a repeated user", {"repeat": True}, "appears twice in column 'user_id'"),
]


@pytest.mark.parametrize(("what", "change", "words"), BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_bad_history_tables_are_one_line_and_exit_status_2(what, change, words, list_runs, tmp_path):
    _, repo = list_runs("ple")
    frame = pd.DataFrame({"user_id": ["u1", "u2"], "hist_item_id": [["v1", "v2"], []],
                          "hist_category": [["c1", "c2"], []]})
    if "drop" in change:
        frame = frame.drop(columns=[change["drop"]])
    if "cell" in change:
        frame["hist_item_id"] = pd.Series([change["cell"], []], dtype=object)
    if change.get("repeat"):
        frame = pd.concat([frame, frame.head(1)], ignore_index=True)
    if "csv_cell" in change:
        table = tmp_path / "histories.csv"
        pd.DataFrame({"user_id": ["u1"], "hist_item_id": [change["csv_cell"]], "hist_category": ["[]"]}).to_csv(
            table, index=False)
    elif "cell" in change:
        table = tmp_path / "histories.parquet"
        _write_object_column(frame, table)
    else:
        table = tmp_path / "histories.parquet"
        frame.to_parquet(table)
    args = ["--repo", str(repo), "--model", change.get("model", "ple"), "--table", str(table)]
    if "version" in change:
        args += ["--version", change["version"]]
    if "user_column" in change:
        args += ["--user-column", change["user_column"]]
    done = _load_histories(*args)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("mtrank load-histories: error: ") and words in done.stderr, done.stderr


def _write_object_column(frame: pd.DataFrame, path: Path) -> None:
    """A Parquet file whose ``hist_item_id`` holds what the test put there (a string, nested lists)."""
    import pyarrow as pa
    from pyarrow import parquet

    first = frame["hist_item_id"].iloc[0]
    if isinstance(first, str):
        column = pa.array([first, None], pa.string())
    else:
        column = pa.array([first, []], pa.list_(pa.list_(pa.string())))
    table = pa.table({"user_id": frame["user_id"], "hist_item_id": column,
                      "hist_category": pa.array(frame["hist_category"].tolist(), pa.list_(pa.string()))})
    parquet.write_table(table, path)


def test_a_model_without_sequence_fields_takes_no_histories(tmp_path):
    repo = tmp_path / "repo"
    build_toy_version(repo, "toy", 1)
    table = tmp_path / "histories.csv"
    table.write_text('user_id,hist_item_id\nu1,"[""v1""]"\n')
    done = _load_histories("--repo", str(repo), "--model", "toy", "--table", str(table))
    assert done.returncode == 2, done.stderr
    assert "has no sequence fields" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_csv_table_loads_like_parquet(list_runs, tmp_path):
    _, repo = list_runs("ple")
    table = tmp_path / "histories.csv"
    table.write_text('user_id,hist_item_id,hist_category\nu1,"[""v1"", 2, 3.0]","[""c1""]"\nu2,[],\n')
    out = tmp_path / "repo"
    subprocess.run(["cp", "-r", str(repo), str(out)], check=True)
    done = _load_histories("--repo", str(out), "--model", "ple", "--table", str(table))
    assert done.returncode == 0, done.stderr
    meta, records = histories.read_local(histories.local_path(out / "ple" / "1"))
    assert meta["fields"] == list(HISTORY_FIELDS) and meta["users"] == 2
    assert histories.decode_record(records["u1"], 2) == [["v1", "2", "3"], ["c1"]]
    assert histories.decode_record(records["u2"], 2) == [[], []]


@pytest.mark.slow
@pytest.mark.redis
def test_with_redis_down_requests_without_histories_are_served_degraded(list_runs, list_data, tmp_path):
    redis_binaries()
    _, repo = list_runs("ple")
    rows = _rows(list_data, users=4, per_user=5)
    node = RedisNode(tmp_path / "redis").start()
    try:
        load_embeddings(repo, "ple", node.url, prefix="mtrank", progress=False)
        env = {"MTRANK_STORE_URL": node.url, "MTRANK_STORE_RETRY_S": "0.2"}
        done = _load_histories("--repo", str(repo), "--model", "ple", "--table",
                               str(_history_table(rows, tmp_path / "h.parquet")), env=env)
        assert done.returncode == 0, done.stderr
        bodies = _bodies_without_histories(rows, explicit_empty="")
        with RemoteServer(repo, env=env) as server:
            first = server.post("/v1/rank", json=bodies[0])
            assert first.status_code == 200 and first.json()["degraded"] is False, first.text
            node.kill()
            for body in bodies * 3:
                r = server.post("/v1/rank", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["degraded"] is True and len(r.json()["items"]) == len(body["candidates"])
                time.sleep(0.05)
            ready = server.get("/readyz")
            assert ready.status_code == 200 and ready.json()["degraded"] is True, ready.text
            statuses = [line for line in server.metrics().splitlines()
                        if line.startswith("mtrank_requests_total{") and 'status="5' in line]
            assert not statuses, statuses
    finally:
        node.stop()
