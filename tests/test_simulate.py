"""The synthetic world's ground truth for any (user, item) pair, and ``mtrank simulate``."""

from __future__ import annotations

import numpy as np

from mtrank.training.synth import TASKS, build_world, simulate


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
