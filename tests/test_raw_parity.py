"""Raw rows → ``POST /v1/rank`` of a real ``mtrank serve`` → the same task scores as PyTorch.

The requests are built as a frontend would send them: integers stay integers (an id field sent
as the JSON number ``6``, or ``6.0``), strings stay strings, floats are floats, features a row
lacks are left out, and some ids and categories were never seen in training. PyTorch scores the
same raw rows through the trainer's reader and preprocessing. Both sides share one transform
(:mod:`mtrank.transform`); this test is what keeps them from drifting apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mtrank.bench.server import RemoteServer
from tests.conftest import FAST_MODEL_CONFIGS

TOLERANCE = 1e-5
USERS_PER_MODEL = 40
ROWS_PER_USER = 30
INT_ID_FIELDS = ("user_id", "item_id", "author_id")
"""Ids rewritten as integers (``a6`` → 6) so the data set has integer-valued ids."""
ITEM_FEATURES = ("author_id", "category", "item_age_days")
USER_FEATURES = ("account_age_days", "watch_minutes_30d", "device")
CASES = {
    "ple": ("ple", {}),
    "mfh": ("mfh", {}),
    # Three facets: each group graph also takes the item facet, derived from item_age_days.
    "mfh_item_facet": ("mfh", {"item_facet": True, "orders": [["user_group", "behaviour", "item"]]}),
}


@pytest.fixture(scope="module")
def int_id_data(synth_dir: Path, tmp_path_factory) -> Path:
    """The shared synthetic data set with integer id columns (Parquet int64)."""
    out = tmp_path_factory.mktemp("int-ids")
    for split in ("train", "valid", "test"):
        frame = pd.read_parquet(synth_dir / f"{split}.parquet")
        for name in INT_ID_FIELDS:
            frame[name] = frame[name].str.slice(1).astype(np.int64)
        frame.to_parquet(out / f"{split}.parquet")
    (out / "spec.yaml").write_text((synth_dir / "spec.yaml").read_text())
    return out


@pytest.fixture(scope="module")
def served_runs(int_id_data: Path, tmp_path_factory):
    """``get(case)`` → (run dir, repository) trained and exported on the integer-id data (cached)."""
    from mtrank.export.exporter import export_run
    from mtrank.training.trainer import train

    cache: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in cache:
            model, model_config = CASES[case]
            run = tmp_path_factory.mktemp(f"raw-{case}")
            config = run / "config.yaml"
            config.write_text(yaml.safe_dump({**FAST_MODEL_CONFIGS, "model": model_config}))
            train(model, int_id_data, run / "run", config_path=config, progress=False)
            repo = tmp_path_factory.mktemp(f"raw-repo-{case}")
            export_run(run / "run", repo, name=model, progress=False)
            cache[case] = (run / "run", repo)
        return cache[case]

    return get


def _raw_rows(data_dir: Path, seed: int) -> pd.DataFrame:
    """Test rows of a few users, with features knocked out and unseen ids, as a frontend has them."""
    frame = pd.read_parquet(data_dir / "test.parquet")
    users = frame["user_id"].drop_duplicates().sample(USERS_PER_MODEL, random_state=seed)
    rows = frame[frame["user_id"].isin(users)].drop_duplicates(["user_id", "item_id"])
    # One request per user: each user's rows contiguous, in the order the requests list them.
    rows = rows.groupby("user_id").head(ROWS_PER_USER).sort_values("user_id", kind="stable").reset_index(drop=True)
    rows = rows.drop(columns=["user_group", "item_state"])  # both sides derive them from the rules
    rng = np.random.default_rng(seed)
    n = len(rows)
    for name in ("item_id", "author_id", "category"):  # they take ids of another type below
        rows[name] = rows[name].astype(object)
    rows.loc[rng.random(n) < 0.15, "author_id"] = 10**6 + 7  # an author nobody has seen
    rows.loc[rng.random(n) < 0.1, "author_id"] = None
    rows.loc[rng.random(n) < 0.1, "category"] = "c-never-seen"
    rows.loc[rng.random(n) < 0.1, "category"] = None
    rows.loc[rng.random(n) < 0.1, "item_age_days"] = np.nan
    unseen = rng.random(n) < 0.05
    rows.loc[unseen, "item_id"] = 10**7 + np.flatnonzero(unseen)  # items outside the store
    first = rows["user_id"].iloc[0]
    rows.loc[rows["user_id"] == first, "account_age_days"] = np.nan  # → default 0 → the "new" group
    rows.loc[rows["user_id"] == first, "device"] = None
    return rows


def _json_value(name: str, v, row_index: int):
    """A frontend's JSON value: ints stay ints (every third integer id is sent as a float)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.integer | int):
        return float(v) if name == "author_id" and row_index % 3 == 0 else int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _integer_id(v) -> str:
    return str(int(v))


def _requests(rows: pd.DataFrame, id_text=_integer_id) -> list[dict]:
    """One request per user of ``rows``; ``id_text`` spells a user or item id (default: the integer
    ids of the synthetic data; ``str`` for ids that are strings already, ``u12``)."""
    bodies = []
    for user_id, part in rows.groupby("user_id", sort=False):
        first = part.iloc[0]
        user_features = {k: _json_value(k, first[k], 1) for k in USER_FEATURES}
        candidates = []
        for i, (_, r) in enumerate(part.iterrows()):
            features = {k: _json_value(k, r[k], i) for k in ITEM_FEATURES}
            candidates.append({
                "item_id": id_text(r["item_id"]),
                "video_len": float(r["video_len"]),
                "features": {k: v for k, v in features.items() if v is not None},
            })
        features = {k: v for k, v in user_features.items() if v is not None}
        bodies.append({
            "user": {"user_id": id_text(user_id), "features": features},
            "candidates": candidates,
            "return_task_scores": True,
        })
    return bodies


def _torch_scores(run_dir: Path, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    from mtrank.training.checkpoint import load_run
    from mtrank.training.evaluate import predict_frame
    from mtrank.training.frames import conform_frame

    run = load_run(run_dir)
    preds, _ = predict_frame(run, conform_frame(rows, run.spec))
    return preds


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_raw_rows_rank_like_pytorch(case, served_runs, int_id_data):
    run_dir, repo = served_runs(case)
    rows = _raw_rows(int_id_data, seed=len(case))
    expected = _torch_scores(run_dir, rows)
    bodies = _requests(rows)
    groups = set()
    worst = 0.0
    with RemoteServer(repo) as server:
        offset = 0
        for body in bodies:
            answer = server.post("/v1/rank", json=body)
            assert answer.status_code == 200, answer.text
            got = answer.json()
            groups.add(got["user_group"])
            position = {c["item_id"]: offset + i for i, c in enumerate(body["candidates"])}
            for item in got["items"]:
                row = position[item["item_id"]]
                for task, score in item["tasks"].items():
                    diff = abs(score - float(expected[task][row]))
                    worst = max(worst, diff)
                    assert diff <= TOLERANCE, (case, task, item["item_id"], score, float(expected[task][row]))
            offset += len(body["candidates"])
    assert offset == len(rows)
    if case.startswith("mfh"):
        assert "new" in groups and len(groups) >= 2, groups  # several group graphs were exercised
    print(f"{case}: {len(rows)} rows in {len(bodies)} requests, max abs diff {worst:.2g}")
