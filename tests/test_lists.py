"""List features end to end: ``multi`` (an item's tags) and ``sequence`` (the user's history) fields.

The shared synthetic data set gets three list columns: ``tags`` per item (own vocabulary, mean
pooled), ``hist_item_id`` per user (the candidates' store-held ``item_id`` table, target attention)
and ``hist_category`` (the graph-held ``category`` table, mean pooled), with history lengths 0, 1,
``max_len`` and beyond it. PLE and MFH are trained on it, exported, and served by a real
``mtrank serve``; raw requests carrying the lists must score like PyTorch on the same raw rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import yaml

from mtrank import kinds
from mtrank.bench.server import RemoteServer
from mtrank.manifest import BATCH_AXIS, REQUESTS_AXIS, load_manifest, version_dir
from mtrank.transform import FeatureTransform
from tests.conftest import FAST_MODEL_CONFIGS
from tests.test_raw_parity import _json_value, _torch_scores

MAX_LEN = 8
HISTORY_LENGTHS = (0, 1, MAX_LEN, MAX_LEN + 4)
LIST_SPEC = {
    "multi": [{"name": "tags", "side": "item", "pooling": "mean", "max_len": 4}],
    "sequence": [
        {"name": "hist_item_id", "share": "item_id", "max_len": MAX_LEN, "pooling": "attention"},
        {"name": "hist_category", "share": "category", "max_len": MAX_LEN, "pooling": "mean"},
    ],
}
TOLERANCE = 1e-5
USER_FEATURES = ("account_age_days", "watch_minutes_30d", "device", "hist_item_id", "hist_category")
ITEM_FEATURES = ("author_id", "category", "item_age_days", "tags")


def _tags(item: str) -> list[str]:
    """0 to 5 tags per item, fixed by its id (the most recent first makes no difference here)."""
    k = int(item[1:])
    return [f"t{(k * 7 + j * 13) % 40}" for j in range(k % 6)]


def _history(user: str, items: np.ndarray, categories: dict[str, str]) -> tuple[list[str], list[str]]:
    k = int(user[1:])
    n = HISTORY_LENGTHS[k % len(HISTORY_LENGTHS)]
    watched = [str(items[(k * 31 + j * 17) % len(items)]) for j in range(n)]
    if n and k % 3 == 0:
        watched[-1] = "v-never-seen"  # an id outside the store: the default vector, counted as missing
    return watched, [categories.get(i, "c-never-seen") for i in watched]


@pytest.fixture(scope="module")
def list_data(synth_dir: Path, tmp_path_factory) -> Path:
    """The shared synthetic data set with tags and per-user histories (Parquet list columns)."""
    out = tmp_path_factory.mktemp("lists")
    train = pd.read_parquet(synth_dir / "train.parquet")
    items = np.sort(train["item_id"].unique())
    categories = dict(zip(train["item_id"], train["category"], strict=True))
    for split in ("train", "valid", "test"):
        frame = pd.read_parquet(synth_dir / f"{split}.parquet")
        frame["tags"] = [_tags(i) for i in frame["item_id"]]
        histories = {u: _history(u, items, categories) for u in frame["user_id"].unique()}
        frame["hist_item_id"] = [histories[u][0] for u in frame["user_id"]]
        frame["hist_category"] = [histories[u][1] for u in frame["user_id"]]
        frame.to_parquet(out / f"{split}.parquet")
    spec = yaml.safe_load((synth_dir / "spec.yaml").read_text())
    (out / "spec.yaml").write_text(yaml.safe_dump({**spec, **LIST_SPEC}, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def list_runs(list_data: Path, tmp_path_factory):
    """``get(model)`` → (run dir, repository), trained and exported on the list data (cached)."""
    from mtrank.export.exporter import export_run
    from mtrank.training.trainer import train

    cache: dict[str, tuple[Path, Path]] = {}

    def get(model: str) -> tuple[Path, Path]:
        if model not in cache:
            run = tmp_path_factory.mktemp(f"lists-{model}")
            config = run / "config.yaml"
            config.write_text(yaml.safe_dump(FAST_MODEL_CONFIGS))
            train(model, list_data, run / "run", config_path=config, progress=False)
            repo = tmp_path_factory.mktemp(f"lists-repo-{model}")
            export_run(run / "run", repo, name=model, progress=False)
            cache[model] = (run / "run", repo)
        return cache[model]

    return get


def _rows(data_dir: Path, users: int = 12, per_user: int = 15) -> pd.DataFrame:
    """Test rows of users of every history length, the rows of a user contiguous."""
    frame = pd.read_parquet(data_dir / "test.parquet")
    lengths = frame["hist_item_id"].map(len)
    chosen = []
    for n in HISTORY_LENGTHS:
        chosen += frame.loc[lengths == n, "user_id"].drop_duplicates().head(users // len(HISTORY_LENGTHS)).tolist()
    rows = frame[frame["user_id"].isin(chosen)].drop_duplicates(["user_id", "item_id"])
    rows = rows.groupby("user_id").head(per_user).sort_values("user_id", kind="stable").reset_index(drop=True)
    return rows.drop(columns=["user_group", "item_state"])


def _value(name: str, v, i: int):
    if isinstance(v, np.ndarray | list):
        return [str(x) for x in v]
    return _json_value(name, v, i)


def _requests(rows: pd.DataFrame) -> list[dict]:
    bodies = []
    for user_id, part in rows.groupby("user_id", sort=False):
        first = part.iloc[0]
        candidates = [
            {"item_id": r["item_id"], "video_len": float(r["video_len"]),
             "features": {k: _value(k, r[k], i) for k in ITEM_FEATURES if _value(k, r[k], i) is not None}}
            for i, (_, r) in enumerate(part.iterrows())
        ]
        user = {k: _value(k, first[k], 1) for k in USER_FEATURES}
        bodies.append({"user": {"user_id": user_id, "features": {k: v for k, v in user.items() if v is not None}},
                       "candidates": candidates, "return_task_scores": True})
    return bodies


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ple", "mfh", "stem"])
def test_lists_from_the_request_rank_like_pytorch(model, list_runs, list_data):
    run_dir, repo = list_runs(model)
    rows = _rows(list_data)
    assert set(rows["hist_item_id"].map(len)) == set(HISTORY_LENGTHS)
    expected = _torch_scores(run_dir, rows)
    worst, offset = 0.0, 0
    with RemoteServer(repo) as server:
        for body in _requests(rows):
            answer = server.post("/v1/rank", json=body)
            assert answer.status_code == 200, answer.text
            position = {c["item_id"]: offset + i for i, c in enumerate(body["candidates"])}
            for item in answer.json()["items"]:
                for task, score in item["tasks"].items():
                    worst = max(worst, abs(score - float(expected[task][position[item["item_id"]]])))
            offset += len(body["candidates"])
        metrics = server.metrics()
    assert offset == len(rows)
    assert worst <= TOLERANCE, f"{model}: max abs diff {worst}"
    # Histories beyond max_len were cut, and counted per field.
    truncated = [line for line in metrics.splitlines() if line.startswith("mtrank_list_truncated_total{")]
    assert any('field="hist_item_id"' in line and float(line.split()[-1]) > 0 for line in truncated), truncated


def test_graph_inputs_come_from_the_kinds_and_the_users_side_is_per_request(list_runs):
    _, repo = list_runs("ple")
    vdir = version_dir(repo, "ple")
    manifest = load_manifest(vdir)
    transform = FeatureTransform.from_manifest(manifest)
    derived = kinds.graph_inputs(transform, {f: t.width for f, t in manifest.tables.items()})
    graph = manifest.graphs["all"]
    session = ort.InferenceSession(str(vdir / graph.file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in derived] == [t.name for t in graph.inputs]
    user = {f.name for f in (*transform.dense, *transform.sparse, *transform.lists) if f.side == "user"}
    for meta, want in zip(session.get_inputs(), derived, strict=True):
        axis = meta.shape[0]
        assert axis == (REQUESTS_AXIS if set(want.fields) & user else BATCH_AXIS), (meta.name, axis)
    per_request = {i.name for i in derived if i.per_request}
    assert {"user_dense", "user_ids", "emb.user_id", "emb.hist_item_id", "list.hist_category"} <= per_request
    assert {"dense", "ids", "emb.item_id", "list.tags"} <= {i.name for i in derived if not i.per_request}
    # Every input belongs to exactly one kind (or is the row → request index).
    owners = [i.name for kind in kinds.KINDS for i in kind.inputs(transform, {f: t.width for f, t in
                                                                            manifest.tables.items()})]
    assert sorted(owners + ["request_index"]) == sorted(i.name for i in derived)


def test_requests_batched_together_score_as_they_do_alone(list_runs, list_data):
    """Two requests in one feed (stacked as the batcher stacks them) give each its own answer."""
    from mtrank.service.batcher import merge_feeds
    from mtrank.service.stores import InProcessStore, LocalTable

    _, repo = list_runs("ple")
    vdir = version_dir(repo, "ple")
    manifest = load_manifest(vdir)
    transform = FeatureTransform.from_manifest(manifest)
    graph = manifest.graphs["all"]
    inputs = {i.name: i for i in kinds.graph_inputs(transform, {f: t.width for f, t in manifest.tables.items()})}
    session = ort.InferenceSession(str(vdir / graph.file), providers=["CPUExecutionProvider"])
    feeds = []
    for body in _requests(_rows(list_data))[:3]:
        item = {k: [c["features"].get(k) for c in body["candidates"]] for k in ITEM_FEATURES}
        item |= {"item_id": [c["item_id"] for c in body["candidates"]],
                 "video_len": [c["video_len"] for c in body["candidates"]]}
        user = {"user_id": body["user"]["user_id"], **body["user"]["features"]}
        feed = kinds.feed(transform, kinds.Rows.one_request(user, item, len(body["candidates"])), inputs)
        found = {n.input: InProcessStore.lookup_sync(LocalTable(manifest.name, manifest.version,
                                                                manifest.tables[n.table], vdir), n.keys).vectors
                 for n in feed.needs}
        feeds.append(feed.resolve(found))
    alone = [session.run(graph.tasks, f) for f in feeds]
    together = session.run(graph.tasks, merge_feeds(feeds, frozenset(n for n, i in inputs.items() if i.per_request)))
    starts = np.cumsum([0] + [len(f["request_index"]) for f in feeds])
    for k, out in enumerate(alone):
        for task, a, b in zip(graph.tasks, out, together, strict=True):
            np.testing.assert_allclose(b[starts[k] : starts[k + 1]], a, atol=1e-6, err_msg=task)
    assert len({float(o[0][0]) for o in alone}) == len(alone), "the requests differ"


BAD_LISTS = [
    ("a string for a history", {"user": {"hist_item_id": "v1"}}, 422,
     "user.features.hist_item_id: must be a list, got a string"),
    ("a number for tags", {"item": {"tags": 3}}, 422, "candidates[].features.tags: must be a list, got a number"),
    ("a nested list", {"user": {"hist_item_id": [["v1"]]}}, 422, "user.features.hist_item_id[0]: list entries"),
    ("an object in a list", {"item": {"tags": [{"t": 1}]}}, 422, "tags[0]: list entries"),
    ("a list for a single value", {"user": {"device": ["ios"]}}, 422, "user.features.device: must be a single value"),
    ("a list over MTRANK_MAX_LIST_LEN", {"user": {"hist_category": ["c1"] * 1001}}, 413,
     "user.features.hist_category: a list of 1001 values, more than the limit of 1000 (MTRANK_MAX_LIST_LEN)"),
]


@pytest.mark.parametrize(("what", "change", "status", "words"), BAD_LISTS, ids=[b[0] for b in BAD_LISTS])
def test_bad_lists_get_a_clear_4xx(what, change, status, words, list_runs, list_data, list_server):
    body = _requests(_rows(list_data, users=4, per_user=3))[0]
    body["user"]["features"].update(change.get("user", {}))
    for c in body["candidates"]:
        c["features"].update(change.get("item", {}))
    r = list_server.post("/v1/rank", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()


def test_empty_and_missing_lists_are_served(list_data, list_server):
    body = _requests(_rows(list_data, users=4, per_user=3))[0]
    body["user"]["features"]["hist_item_id"] = []
    body["user"]["features"].pop("hist_category", None)
    for c in body["candidates"]:
        c["features"].pop("tags", None)
    r = list_server.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == len(body["candidates"])


@pytest.fixture(scope="module")
def list_server(list_runs):
    _, repo = list_runs("ple")
    with RemoteServer(repo) as server:
        yield server


INPUT_NAMES = {"DENSE_INPUT", "USER_DENSE_INPUT", "IDS_INPUT", "USER_IDS_INPUT", "EMB_PREFIX", "LIST_PREFIX",
               "LEN_PREFIX", "emb_input"}


def test_the_service_and_the_exporter_never_name_a_graph_input():
    """They take the inputs the kinds derive and handle each by its role: no module of theirs imports
    an input name or spells one (``"dense"``, ``"emb.…"``) outside a role comparison."""
    import ast

    root = Path(__file__).resolve().parents[1] / "mtrank"
    offenders = []
    for path in [*root.glob("service/**/*.py"), *root.glob("export/*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "mtrank.manifest":
                offenders += [f"{path.name}: imports {a.name}" for a in node.names if a.name in INPUT_NAMES]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value.startswith(("emb.", "list.", "len.")) or node.value in ("user_dense", "user_ids")):
                offenders.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert offenders == []
