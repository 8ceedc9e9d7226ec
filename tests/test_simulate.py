"""The synthetic world's ground truth for any (user, item) pair, and ``mtrank simulate``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

from mtrank.bench.server import RemoteServer
from mtrank.cli import main
from mtrank.training.simulate import position_discount
from mtrank.training.synth import BINARY_TASKS, TASKS, build_world, simulate
from tests.conftest import FAST_MODEL_CONFIGS, SYNTH_ROWS, SYNTH_SEED


def _index(ids) -> np.ndarray:
    return np.asarray([int(x[1:]) for x in ids])


def test_the_world_rebuilt_from_rows_and_seed_gives_the_data_sets_oracles_exactly():
    frame = simulate(4000, seed=5)
    world = build_world(4000, seed=5)
    oracles = world.oracles(_index(frame["user_id"]), _index(frame["item_id"]))
    for name in TASKS:
        np.testing.assert_array_equal(oracles[name], frame[f"oracle_{name}"].to_numpy())


def test_the_world_gives_the_truth_of_pairs_that_were_never_logged():
    world = build_world(4000, seed=5)
    u = np.repeat(np.arange(world.n_users), 3)
    i = np.tile(np.arange(3), world.n_users)
    p_play, q = world.truth(u, i)
    assert p_play.shape == (len(u),) and np.all((p_play > 0) & (p_play < 1))
    assert all(np.all((q[name] > 0) & (q[name] < 1)) for name in TASKS)
    assert not np.allclose(q["vtr"][0::3], q["vtr"][1::3])  # the item matters


def test_the_generators_draws_keep_their_order():
    """Figures of ``simulate(3000, seed=11)`` from before the world became an object: moving a
    random draw changes them (every data set's bytes and the docs' figures with them)."""
    from mtrank.training.synth import SynthParams, _simulate

    frame, intercepts = _simulate(3000, 11, SynthParams())
    assert intercepts == {"played": 1.652822, "vtr": 0.264338, "vcr": 0.467055, "finish": -0.041154,
                          "skip": -1.504485, "like": -4.815061, "share": -4.58723}
    sums = {c: int(frame[c].sum()) for c in ["played", "vtr", "finish", "skip", "like", "share"]}
    assert sums == {"played": 2581, "vtr": 1751, "finish": 1281, "skip": 924, "like": 134, "share": 70}
    assert round(float(frame["vcr"].sum()), 4) == 1632.3231
    assert frame["user_id"].iloc[:3].tolist() == ["u66", "u69", "u11"]
    assert frame["item_id"].iloc[:3].tolist() == ["v58", "v21", "v21"]


# -- mtrank simulate against a real mtrank serve --------------------------------------------


def test_position_discounts():
    r = np.array([1, 2, 3, 7])
    np.testing.assert_allclose(position_discount("log2")(r), 1 / np.log2(r + 1))
    np.testing.assert_allclose(position_discount("none")(r), 1.0)
    np.testing.assert_allclose(position_discount("geometric:0.5")(r), [1, 0.5, 0.25, 0.5**6])
    np.testing.assert_allclose(position_discount("power:1")(r), 1 / r)
    for bad in ("log3", "geometric:1.5", "power:-1", "geometric:x", "none:2"):
        with pytest.raises(ValueError, match="--position-discount"):
            position_discount(bad)


def test_simulate_refuses_a_data_set_that_synth_did_not_make(tmp_path, synth_dir, capsys):
    spec = yaml.safe_load((synth_dir / "spec.yaml").read_text())
    spec["extra"]["intercepts"]["vtr"] += 0.01
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    argv = ["simulate", "--url", "http://127.0.0.1:9", "--data", str(tmp_path), "--requests", "1",
            "--out", str(tmp_path / "fb.parquet")]
    assert main(argv) == 2
    assert "another version" in capsys.readouterr().err


REQUESTS, CANDIDATES = 600, 10


def test_simulated_traffic_gives_feedback_of_shown_items_discounted_by_rank(exported_repo, synth_dir, tmp_path):
    log_dir, fb_path = tmp_path / "log", tmp_path / "feedback.parquet"
    with RemoteServer(exported_repo("ple"), env={"MTRANK_IMPRESSION_LOG": str(log_dir)}) as server:
        assert main(["simulate", "--url", server.url, "--data", str(synth_dir), "--requests", str(REQUESTS),
                     "--candidates", str(CANDIDATES), "--out", str(fb_path), "--seed", "4"]) == 0
    # SIGTERM drained the service and completed its last impression file.
    log = ds.dataset(str(log_dir), format="parquet").to_table().to_pandas()
    assert len(log) == REQUESTS and log["request_id"].is_unique
    shown = log[["request_id", "user_id", "items"]].explode("items", ignore_index=True)
    shown = shown.join(pd.json_normalize(shown.pop("items").tolist()))[["request_id", "user_id", "item_id", "rank"]]
    assert len(shown) == REQUESTS * CANDIDATES
    feedback = pd.read_parquet(fb_path)

    # Feedback only for shown items, at the rank they were shown.
    merged = shown.merge(feedback, on=["request_id", "item_id"], how="left", suffixes=("", "_fb"),
                         validate="one_to_one", indicator=True)
    assert (merged["_merge"] != "right_only").all() and merged["_merge"].eq("both").sum() == len(feedback)
    seen = merged[merged["_merge"] == "both"]
    assert (seen["rank_fb"] == seen["rank"]).all()

    # The share of shown items with feedback at rank r is the discount 1/log2(r+1), within 4 SE.
    by_rank = merged.assign(seen=merged["_merge"] == "both").groupby("rank")["seen"].agg(["mean", "count"])
    d = 1 / np.log2(by_rank.index.to_numpy() + 1.0)
    se = np.sqrt(d * (1 - d) / by_rank["count"].to_numpy()) + 1e-9
    assert np.all(np.abs(by_rank["mean"].to_numpy() - d) < 4 * se + (d == 1)), by_rank

    # Seen items' labels are drawn from the truth of their (user, item) pair; vtr per shown item
    # falls with rank as discount(r) × the truth of what was shown there.
    world = build_world(SYNTH_ROWS, SYNTH_SEED)
    truth = world.oracles(_index(merged["user_id"]), _index(merged["item_id"]))
    on = merged["_merge"].eq("both").to_numpy()
    for name in BINARY_TASKS:
        y, p = merged[name].fillna(0).to_numpy()[on], truth[name][on]
        assert abs(y.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum()) + 1, name
    expected = pd.Series(truth["vtr"] * 1 / np.log2(merged["rank"] + 1.0)).groupby(merged["rank"]).mean()
    observed = merged["vtr"].fillna(0).groupby(merged["rank"]).mean()
    assert np.all(np.abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / REQUESTS))
    assert observed.iloc[:3].mean() > observed.iloc[-3:].mean() + 0.1
    played = merged["played"].eq(1)
    assert merged.loc[played, "vcr"].notna().all() and merged.loc[on & ~played, "vcr"].isna().all()

    # join-log and the A/B report read the impressions and the feedback.
    assert main(["join-log", "--impressions", str(log_dir), "--feedback", str(fb_path), "--out",
                 str(tmp_path / "joined"), "--spec", str(synth_dir / "spec.yaml")]) == 0
    joined = pd.concat([pd.read_parquet(tmp_path / "joined" / f"{s}.parquet") for s in ("train", "valid", "test")])
    assert len(joined) == len(shown) and joined["vtr"].sum() == feedback["vtr"].sum()
    assert main(["ab-report", "--impressions", str(log_dir), "--feedback", str(fb_path),
                 "--out", str(tmp_path / "ab"), "--value", "vtr=1,finish=2"]) == 0
    report = json.loads((tmp_path / "ab" / "report.json").read_text())
    assert "default" in json.dumps(report)


def test_simulated_feedback_is_the_same_at_any_concurrency(exported_repo, synth_dir, tmp_path, capsys):
    with RemoteServer(exported_repo("ple")) as server:
        for concurrency in (1, 6):
            assert main(["simulate", "--url", server.url, "--data", str(synth_dir), "--requests", "300",
                         "--candidates", "8", "--out", str(tmp_path / f"fb{concurrency}.parquet"), "--seed", "9",
                         "--concurrency", str(concurrency)]) == 0
        capsys.readouterr()
        assert main(["simulate", "--url", server.url, "--data", str(synth_dir), "--requests", "3",
                     "--out", str(tmp_path / "x.parquet"), "--concurrency", "0"]) == 2
        assert "--concurrency must be at least 1" in capsys.readouterr().err
    one, six = (pd.read_parquet(tmp_path / f"fb{c}.parquet") for c in (1, 6))
    assert len(one) > 300
    pd.testing.assert_frame_equal(one, six)


# -- a data set with behaviour histories ----------------------------------------------------

HISTORY_ROWS, HISTORY_SEED = 3000, 6


@pytest.fixture(scope="module")
def history_data(tmp_path_factory):
    from mtrank.training.synth import generate

    out = tmp_path_factory.mktemp("synth-history")
    generate(out, rows=HISTORY_ROWS, seed=HISTORY_SEED, progress=False, history=True)
    return out


def test_a_history_world_rebuilt_by_simulate_gives_the_data_sets_oracles_exactly(history_data):
    """simulate's world of a --history data set, given each row's history as the data holds it,
    has the data set's oracle of every row: the history term included, as the labels were drawn."""
    from mtrank.training.frames import read_table
    from mtrank.training.simulate import load_world
    from mtrank.training.synth_history import histories_from_frame

    frame = pd.concat([read_table(history_data / f"{s}.parquet") for s in ("train", "valid", "test")],
                      ignore_index=True)
    world = load_world(history_data)
    assert world.taste is not None
    u, i = _index(frame["user_id"]), _index(frame["item_id"])
    with_history = world.oracles(u, i, histories_from_frame(frame))
    for name in TASKS:
        np.testing.assert_array_equal(with_history[name], frame[f"oracle_{name}"].to_numpy())
    # The term is there to be found: without the histories most rows' oracles differ.
    assert np.mean(world.oracles(u, i)["vtr"] != with_history["vtr"]) > 0.5


def test_simulated_traffic_of_a_history_world_carries_each_users_history_and_tags(history_data, tmp_path):
    """A model with target attention over the history serves simulate's requests: each body carries
    a history drawn for its user and the candidates' tags as the data set spells them, and the
    feedback is drawn from the truth given that request's history."""
    from mtrank.export.exporter import export_run
    from mtrank.training.simulate import draw_requests, feedback, load_world, position_discount
    from mtrank.training.trainer import train

    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST_MODEL_CONFIGS))
    train("ple", history_data, tmp_path / "run", config_path=config, seed=1, progress=False)
    repo = tmp_path / "repo"
    export_run(tmp_path / "run", repo, name="ple")
    log_dir, fb_path = tmp_path / "log", tmp_path / "feedback.parquet"
    with RemoteServer(repo, env={"MTRANK_IMPRESSION_LOG": str(log_dir)}) as server:
        assert main(["simulate", "--url", server.url, "--data", str(history_data), "--requests", "200",
                     "--candidates", "6", "--out", str(fb_path), "--seed", "3",
                     "--position-discount", "none"]) == 0
    log = ds.dataset(str(log_dir), format="parquet").to_table().to_pylist()
    sent = {r["request_id"]: json.loads(r["request"]) for r in log}
    assert len(sent) == 200

    world = load_world(history_data)
    taste = world.taste
    rng = np.random.default_rng([3, 30])  # run_simulation's stream for --seed 3
    drawn, histories = draw_requests(world, rng, 200, 6, prefix="sim3")
    lengths = []
    for k, (_, body) in enumerate(drawn):
        assert sent[body["request_id"]] == body  # what simulate sent is what the world drew
        features = body["user"]["features"]
        entries = histories.items[histories.offsets[k]:histories.offsets[k + 1]]
        assert features["hist_item_id"] == [f"v{e}" for e in entries]
        assert features["hist_category"] == [f"c{taste.item_category[e]}" for e in entries]
        for c in body["candidates"]:
            i = int(c["item_id"][1:])
            assert c["features"]["tags"] == [f"t{t}" for t in taste.tags[taste.tag_offsets[i]:taste.tag_offsets[i + 1]]]
        lengths.append(len(entries))
    assert max(lengths) > 10 and min(lengths) == 0  # long histories, and some users without one

    # The feedback is the truth given each request's history: drawn again from the same stream with
    # the answers' ranks it is the same table, and without the histories it is not.
    rows = [(r["request_id"], it["item_id"], it["rank"], int(sent[r["request_id"]]["user"]["user_id"][1:]),
             int(it["item_id"][1:]), int(r["request_id"].rsplit("-", 1)[1])) for r in log for it in r["items"]]
    shown = pd.DataFrame(rows, columns=["request_id", "item_id", "rank", "user", "item", "request"])
    shown = shown.sort_values(["request", "rank"]).reset_index(drop=True)  # as simulate lists them
    got = pd.read_parquet(fb_path)
    again, _ = feedback(world, rng, shown, position_discount("none"), histories)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), again.astype(got.dtypes.to_dict()), check_dtype=False)
    rng_without = np.random.default_rng([3, 30])
    draw_requests(world, rng_without, 200, 6, prefix="sim3")
    without, _ = feedback(world, rng_without, shown, position_discount("none"))
    assert not without["vtr"].equals(got["vtr"])
