"""Synthetic short-video platform: impressions with six feedback tasks and their ground truth.

Each row is one impression of a video (item) to a user: users (``rows / 40``, 9 % new) drawn by
activity, items (``rows / 50``, 40 categories) drawn Zipf-like. For task k, given a play,
``z_k = bias_k + engagement_k * (E_obs + E_id) + length_k(L) + activity_k * A + cat_k[c] + id_k``;
``played`` has logit ``bias_play + 0.5 * (E_obs + E_id) + device term``; the intercepts are solved
per data set for the target rates, and the labels are drawn from the truth (``draw_labels``).
With ``history`` (``mtrank synth --history``), :mod:`mtrank.training.synth_history` adds users'
interests, each row's behaviour history, items' tags and a history term to the engagement.

``docs/data.md`` gives the model in full; every number is a field of ``SynthParams`` (saved in
``spec.extra["params"]``). Oracle columns hold the truth of every row (P(label = 1), play
included; E[vcr | played] for vcr), so ``auc(label, oracle)`` is what a perfect model reaches.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtrank.spec import DenseField, Facet, FacetRule, FeatureSpec, SparseField, Task
from mtrank.training import synth_history
from mtrank.training.metrics import auc, mse
from mtrank.training.synth_history import Histories, HistoryParams, Taste

TASKS = ("vtr", "vcr", "finish", "skip", "like", "share")
BINARY_TASKS = ("vtr", "finish", "skip", "like", "share")
DEVICES = ("ios", "android", "web")
GROUPS = ("new", "low", "high")
SPLITS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))


@dataclass(frozen=True)
class TaskEffect:
    """Coefficients of one task's logit given a play (see the module docstring)."""

    rate: float
    """Mean of q_k over played impressions; the logit's intercept is solved for it per data set."""
    engagement: float
    """Weight of the shared engagement score E_obs + E_id."""
    length: float
    """Slope per unit of L = log(video_len / 30 s) for low/high users."""
    length_sq: float
    """Curvature in L (negative: medium lengths are best), low/high users."""
    length_new: float
    """Slope in L for new users."""
    activity: float
    """Slope per unit of standardised log1p(watch_minutes_30d)."""
    category: float
    """Std of the task's own category appeal."""
    user_bias: float
    """Std of the task-specific user bias."""
    item_bias: float
    """Std of the task-specific item bias."""
    affinity: float
    """Std of the task-specific user·item affinity."""


@dataclass(frozen=True)
class SynthParams:
    """Every knob of the generator; saved to ``spec.extra['params']``."""

    rows_per_user: float = 40.0
    rows_per_item: float = 50.0
    items_per_author: float = 8.0
    n_categories: int = 40
    latent_dim: int = 4
    new_user_share: float = 0.09
    """Share of users that are new (account younger than 7 days)."""
    new_row_share: float = 0.04
    """Share of impressions that go to new users."""
    device_probs: tuple[float, float, float] = (0.4, 0.5, 0.1)
    account_age_median_days: float = 300.0
    account_age_sigma: float = 0.9
    watch_minutes_median: float = 100.0
    watch_minutes_median_new: float = 40.0
    watch_minutes_sigma: float = 1.4
    user_weight_power: float = 0.6
    """Impression weight of a low/high user is (watch_minutes + 5) ** user_weight_power."""
    video_len_median_s: float = 30.0
    video_len_sigma: float = 1.0
    video_len_range_s: tuple[float, float] = (3.0, 1800.0)
    item_age_mean_days: float = 25.0
    item_zipf_power: float = 0.8
    author_home_category: float = 0.7
    category_appeal: float = 1.0
    device_bias: tuple[float, float, float] = (0.2, 0.0, -0.5)
    device_category: float = 0.3
    activity_engagement: float = 0.2
    fresh_activity: float = 0.4
    """Engagement bonus per unit of activity times freshness exp(-item_age_days / 7)."""
    new_category_appeal: float = 1.0
    new_category_corr: float = 0.5
    """Correlation between new users' category appeal and everyone else's."""
    new_device_bias: tuple[float, float, float] = (0.3, -0.1, -0.6)
    new_id_scale: float = 0.3
    """Multiplier of every id-driven term for new users."""
    affinity: float = 0.12
    user_bias: float = 0.1
    item_quality: float = 0.15
    popularity_quality: float = 0.5
    """Correlation between an item's quality and its popularity rank (log scale)."""
    author_bias: float = 0.08
    web_length_tolerance: float = 0.7
    activity_length_tolerance: float = 0.15
    play_rate: float = 0.86
    """Share of impressions played; the intercept of the play logit is solved for it."""
    play_engagement: float = 0.5
    play_device: tuple[float, float, float] = (0.1, 0.0, -0.6)
    vcr_concentration: float = 2.5
    tasks: dict[str, TaskEffect] = field(
        default_factory=lambda: {
            "vtr": TaskEffect(0.68, 1.0, 0.6, -0.4, -0.7, 0.25, 0.4, 0.05, 0.05, 0.05),
            "vcr": TaskEffect(0.63, 0.8, -1.2, 0.0, -1.5, 0.2, 0.3, 0.05, 0.05, 0.05),
            "finish": TaskEffect(0.5, 0.9, -1.6, 0.0, -2.0, 0.2, 0.3, 0.05, 0.05, 0.05),
            "skip": TaskEffect(0.2, -1.0, 0.9, 0.15, 1.1, -0.3, 0.4, 0.05, 0.05, 0.05),
            "like": TaskEffect(0.055, 0.9, 0.3, -0.15, -0.5, 0.5, 0.6, 0.05, 0.05, 0.1),
            "share": TaskEffect(0.027, 1.0, 0.3, -0.15, 0.5, 0.3, 0.4, 0.05, 0.05, 0.1),
        }
    )


def feature_spec(
    params: SynthParams | None = None, rows: int = 0, seed: int = 0, intercepts: dict[str, float] | None = None,
    history: HistoryParams | None = None,
) -> FeatureSpec:
    """The feature spec of the synthetic data; ``extra`` documents the generator.

    ``intercepts`` are the logit intercepts ``generate`` solved for the target rates; ``history``
    adds the list fields and is saved as ``extra["history"]``.
    """
    params = params or SynthParams()
    extra: dict[str, Any] = {
        "generator": "mtrank.training.synth",
        "rows": int(rows),
        "seed": int(seed),
        "params": json.loads(json.dumps(asdict(params))),  # tuples -> lists, as after a YAML load
        "intercepts": dict(intercepts or {}),
        "oracles": {t: f"oracle_{t}" for t in TASKS},
        "notes": (
            "oracle_<task> is the true P(label = 1) on every row for binary tasks (the play "
            "included) and E[vcr | played] for vcr; skip = 1 on unplayed rows; see docs/data.md"
        ),
    }
    multi, sequence = ((), ()) if history is None else synth_history.list_fields(history)
    if history is not None:
        extra["history"] = asdict(history)
    return FeatureSpec(
        name="synth_short_video",
        dense=(
            DenseField("account_age_days", side="user", transform="log1p", default=0.0),
            DenseField("watch_minutes_30d", side="user", transform="log1p", default=0.0),
            DenseField("video_len", side="item", transform="log1p", default=params.video_len_median_s),
            DenseField("item_age_days", side="item", transform="log1p", default=0.0),
        ),
        sparse=(
            SparseField("user_id", side="user", location="store", min_count=2),
            SparseField("device", side="user", location="graph"),
            SparseField("item_id", side="item", location="store", min_count=2),
            SparseField("author_id", side="item", location="store"),
            SparseField("category", side="item", location="graph"),
        ),
        tasks=(
            Task("vtr"),
            Task("vcr", type="regression", space="played"),
            Task("finish"),
            Task("skip"),
            Task("like"),
            Task("share"),
        ),
        user_groups=Facet(
            column="user_group",
            values=GROUPS,
            rules=(
                FacetRule("new", "account_age_days", "lt", 7.0),
                FacetRule("low", "watch_minutes_30d", "lt", 60.0),
            ),
            default="high",
        ),
        item_facet=Facet(
            column="item_state",
            values=("cold", "warm"),
            rules=(FacetRule("cold", "item_age_days", "lt", 2.0),),
            default="warm",
        ),
        multi=multi,
        sequence=sequence,
        extra=extra,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lognormal(rng: np.random.Generator, median: float, sigma: float, size: int) -> np.ndarray:
    return median * np.exp(sigma * rng.standard_normal(size))


def _standardised(x: np.ndarray) -> np.ndarray:
    """Zero mean and unit std over the last axis: a seed changes which category gets which
    effect, not how strong category effects are."""
    return (x - x.mean(axis=-1, keepdims=True)) / x.std(axis=-1, keepdims=True)


def _ids(prefix: str, n: int) -> np.ndarray:
    return np.array([f"{prefix}{k}" for k in range(n)], dtype=object)


def _draw_users(rng: np.random.Generator, n: int, p: SynthParams) -> dict[str, np.ndarray]:
    is_new = rng.permutation(n) < round(p.new_user_share * n)  # an exact share of users
    account_age = np.where(
        is_new, rng.random(n) * 7.0, 7.0 + _lognormal(rng, p.account_age_median_days, p.account_age_sigma, n)
    )
    minutes_median = np.where(is_new, p.watch_minutes_median_new, p.watch_minutes_median)
    return {
        "is_new": is_new,
        "account_age": account_age,
        "watch_minutes": minutes_median * np.exp(p.watch_minutes_sigma * rng.standard_normal(n)),
        "device": rng.choice(len(DEVICES), size=n, p=np.asarray(p.device_probs)),
        "factor": rng.standard_normal((n, p.latent_dim)),
        "bias": rng.standard_normal(n),
    }


def _draw_items(rng: np.random.Generator, n: int, n_authors: int, p: SynthParams) -> dict[str, np.ndarray]:
    n_cat, d = p.n_categories, p.latent_dim
    author_home = rng.integers(0, n_cat, n_authors)
    author = rng.integers(0, n_authors, n)
    category = np.where(rng.random(n) < p.author_home_category, author_home[author], rng.integers(0, n_cat, n))
    lo, hi = p.video_len_range_s
    video_len = np.clip(_lognormal(rng, p.video_len_median_s, p.video_len_sigma, n), lo, hi)
    item_age = rng.exponential(p.item_age_mean_days, n)
    popularity_rank = rng.permutation(n) + 1
    log_pop = -np.log(popularity_rank)
    pop_z = (log_pop - log_pop.mean()) / (log_pop.std() + 1e-12)
    quality = p.popularity_quality * pop_z + np.sqrt(1 - p.popularity_quality**2) * rng.standard_normal(n)
    centroid = rng.standard_normal((n_cat, d))
    return {
        "author": author,
        "category": category,
        "video_len": video_len,
        "item_age": item_age,
        "popularity_rank": popularity_rank,
        "quality": quality,
        "factor": np.sqrt(0.5) * centroid[category] + np.sqrt(0.5) * rng.standard_normal((n, d)),
        "author_bias": rng.standard_normal(n_authors),
    }


def _draw_impressions(
    rng: np.random.Generator, rows: int, users: dict[str, np.ndarray], items: dict[str, np.ndarray], p: SynthParams
) -> tuple[np.ndarray, np.ndarray]:
    """User and item index per row: users by activity (new users' share fixed), items Zipf-like."""
    user_p, item_p = exposure(users, items, p)
    u = rng.choice(len(user_p), size=rows, p=user_p)
    i = rng.choice(len(item_p), size=rows, p=item_p)
    return u, i


def exposure(
    users: dict[str, np.ndarray], items: dict[str, np.ndarray], p: SynthParams
) -> tuple[np.ndarray, np.ndarray]:
    """The probability that an impression goes to each user and shows each item (step 3)."""
    weight = (users["watch_minutes"] + 5.0) ** p.user_weight_power
    new_mass = weight * users["is_new"]
    old_mass = weight * ~users["is_new"]
    user_p = p.new_row_share * new_mass / max(new_mass.sum(), 1e-12)
    user_p += (1 - p.new_row_share) * old_mass / max(old_mass.sum(), 1e-12)
    item_p = items["popularity_rank"].astype(np.float64) ** -p.item_zipf_power
    return user_p / user_p.sum(), item_p / item_p.sum()


def _intercept(z: np.ndarray, weight: np.ndarray, rate: float) -> float:
    """The b with mean(sigmoid(b + z)) = rate under ``weight`` (Newton steps on a monotone function).

    Solving the intercept per data set keeps positive rates at their targets whatever the random
    category and item effects of a seed are.
    """
    b = float(np.log(rate / (1.0 - rate)))
    for _ in range(50):
        s = _sigmoid(b + z)
        gap = np.average(s, weights=weight) - rate
        if abs(gap) < 1e-9:
            break
        slope = max(float(np.average(s * (1.0 - s), weights=weight)), 1e-6)
        b -= float(np.clip(gap / slope, -2.0, 2.0))
    return b


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product scaled to unit variance for standard normal factors."""
    return np.einsum("nd,nd->n", a, b) / np.sqrt(a.shape[1])


def _task_effects(rng: np.random.Generator, n_users: int, n_items: int, p: SynthParams) -> dict[str, dict]:
    """Each task's own random effects, drawn task by task in ``TASKS`` order."""
    effects: dict[str, dict] = {}
    for name in TASKS:
        effects[name] = {
            "user": rng.standard_normal(n_users),
            "item": rng.standard_normal(n_items),
            "user_factor": rng.standard_normal((n_users, p.latent_dim)),
            "item_factor": rng.standard_normal((n_items, p.latent_dim)),
            "category": p.tasks[name].category * _standardised(rng.standard_normal(p.n_categories)),
        }
    return effects


@dataclass
class World:
    """The synthetic world behind a data set: users, items, category and device effects, each task's
    random effects and the solved logit intercepts. :meth:`truth` gives the ground truth of any
    (user, item) pairs, logged or not; :func:`build_world` rebuilds the world of ``mtrank synth``'s
    ``rows`` and ``seed``. Users are indexed as ``u<k>``, items as ``v<k>``.
    """

    params: SynthParams
    users: dict[str, np.ndarray]
    items: dict[str, np.ndarray]
    cat_appeal: np.ndarray
    cat_appeal_new: np.ndarray
    dev_cat: np.ndarray
    effects: dict[str, dict]
    intercepts: dict[str, float] = field(default_factory=dict)
    """Unrounded; ``played`` and one per task (``generate`` saves them rounded in the spec)."""
    taste: Taste | None = None
    """Users' interests and items' tags: set in a world with behaviour histories (``synth --history``)."""

    @property
    def n_users(self) -> int:
        return len(self.users["bias"])

    @property
    def n_items(self) -> int:
        return len(self.items["quality"])

    def draw_histories(self, u: np.ndarray, rng: np.random.Generator) -> Histories:
        """A session's recent history for each row of users ``u`` (a world with histories only)."""
        if self.taste is None:
            raise ValueError("this world has no behaviour histories (made without --history)")
        return self.taste.draw(self.users, u, rng)

    def logits(self, u: np.ndarray, i: np.ndarray,
               history: Histories | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The play logit and each task's logit given a play, both without their intercepts.
        ``history`` (one per row): add the history term; without it the term is left out."""
        p, users, items = self.params, self.users, self.items
        new = users["is_new"][u]
        old = ~new
        dev = users["device"][u]
        cat = items["category"][i]
        L = np.log(items["video_len"][i] / p.video_len_median_s)
        log_minutes = np.log1p(users["watch_minutes"])
        A = (log_minutes[u] - log_minutes.mean()) / log_minutes.std()
        fresh = np.exp(-items["item_age"][i] / 7.0)
        id_scale = np.where(new, p.new_id_scale, 1.0)
        tolerance = np.exp(-p.activity_length_tolerance * A) * np.where(dev == 2, p.web_length_tolerance, 1.0)
        e_obs = (
            np.where(
                new,
                self.cat_appeal_new[cat] + np.asarray(p.new_device_bias)[dev],
                self.cat_appeal[cat] + np.asarray(p.device_bias)[dev] + self.dev_cat[dev, cat]
                + p.fresh_activity * A * fresh,
            )
            + p.activity_engagement * A * old
        )
        e_id = id_scale * (
            p.affinity * _dot(users["factor"][u], items["factor"][i])
            + p.user_bias * users["bias"][u]
            + p.item_quality * items["quality"][i]
            + p.author_bias * items["author_bias"][items["author"][i]]
        )
        engagement = e_obs + e_id
        if history is not None:
            engagement = engagement + self.taste.engagement(i, history)
        play_logit = p.play_engagement * engagement + np.asarray(p.play_device)[dev]
        z: dict[str, np.ndarray] = {}
        for name in TASKS:
            t, eff = p.tasks[name], self.effects[name]
            length = np.where(new, t.length_new * L, (t.length * L + t.length_sq * L**2) * tolerance)
            id_k = id_scale * (
                t.user_bias * eff["user"][u]
                + t.item_bias * eff["item"][i]
                + t.affinity * _dot(eff["user_factor"][u], eff["item_factor"][i])
            )
            z[name] = t.engagement * engagement + length + t.activity * A * old + eff["category"][cat] + id_k
        return play_logit, z

    def solve_intercepts(self, u: np.ndarray, i: np.ndarray, history: Histories | None = None) -> None:
        """Intercepts that put the play rate and each task's rate given a play on their targets
        over the impressions ``(u, i)``."""
        play_logit, z = self.logits(u, i, history)
        self.intercepts = {"played": _intercept(play_logit, np.ones(len(u)), self.params.play_rate)}
        p_play = _sigmoid(self.intercepts["played"] + play_logit)
        for name in TASKS:
            self.intercepts[name] = _intercept(z[name], p_play, self.params.tasks[name].rate)

    def truth(self, u: np.ndarray, i: np.ndarray,
              history: Histories | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``p_play`` and, per task, P(label = 1 | played) (binary) or E[vcr | played] (vcr)."""
        play_logit, z = self.logits(u, i, history)
        p_play = _sigmoid(self.intercepts["played"] + play_logit)
        return p_play, {name: _sigmoid(self.intercepts[name] + z[name]) for name in TASKS}

    def oracles(self, u: np.ndarray, i: np.ndarray, history: Histories | None = None) -> dict[str, np.ndarray]:
        """The ``oracle_<task>`` values of the pairs, as in the data set's oracle columns."""
        p_play, q = self.truth(u, i, history)
        return {
            "vtr": p_play * q["vtr"],
            "vcr": np.clip(q["vcr"], 1e-4, 1 - 1e-4),
            "finish": p_play * q["finish"],
            "skip": 1.0 - p_play + p_play * q["skip"],
            "like": p_play * q["like"],
            "share": p_play * q["share"],
        }


def _world(rng: np.random.Generator, rows: int, p: SynthParams) -> tuple[World, np.ndarray, np.ndarray]:
    """The world and its impressions (user and item index per row), in the generator's draw order."""
    n_users = max(2, round(rows / p.rows_per_user))
    n_items = max(2, round(rows / p.rows_per_item))
    n_authors = max(1, round(n_items / p.items_per_author))
    n_cat = p.n_categories
    users = _draw_users(rng, n_users, p)
    items = _draw_items(rng, n_items, n_authors, p)
    appeal = _standardised(rng.standard_normal(n_cat))
    c = p.new_category_corr
    cat_appeal = p.category_appeal * appeal
    own_appeal = _standardised(rng.standard_normal(n_cat))
    cat_appeal_new = p.new_category_appeal * (c * appeal + np.sqrt(1 - c**2) * own_appeal)
    dev_cat = p.device_category * _standardised(rng.standard_normal((len(DEVICES), n_cat)))
    u, i = _draw_impressions(rng, rows, users, items, p)
    effects = _task_effects(rng, n_users, n_items, p)
    world = World(p, users, items, cat_appeal, cat_appeal_new, dev_cat, effects)
    world.solve_intercepts(u, i)
    return world, u, i


def _impressions(rows: int, seed: int, p: SynthParams, history: HistoryParams | None) -> tuple[
        np.random.Generator, World, np.ndarray, np.ndarray, Histories | None]:
    """The label stream, the world, its impressions and, with ``history``, each row's history:
    drawn from the stream ``[seed, 2]``, so the world's other draws are those made without it."""
    rng = np.random.default_rng(seed)
    world, u, i = _world(rng, rows, p)
    if history is None:
        return rng, world, u, i, None
    taste_rng = np.random.default_rng([seed, 2])
    world.taste = synth_history.draw_taste(taste_rng, world.users, world.items,
                                           exposure(world.users, world.items, p)[1], p.n_categories, history)
    hist = world.draw_histories(u, taste_rng)
    i = world.taste.retarget(i, hist, taste_rng)
    world.solve_intercepts(u, i, hist)
    return rng, world, u, i, hist


def build_world(rows: int, seed: int, params: SynthParams | None = None,
                history: HistoryParams | None = None) -> World:
    """The world behind ``mtrank synth --rows ROWS --seed SEED [--history]`` (intercepts solved as
    it solved them); ``history``: ``HistoryParams(**spec.extra["history"])`` of a data set with histories."""
    return _impressions(rows, seed, params or SynthParams(), history)[1]


def draw_labels(rng: np.random.Generator, p_play: np.ndarray, q: dict[str, np.ndarray],
                concentration: float) -> dict[str, np.ndarray]:
    """``played`` and every task's label drawn from the truth (module docstring, step 5)."""
    n = len(p_play)
    played = rng.random(n) < p_play
    e = rng.random(n)  # one engagement draw per play couples vtr, finish and skip
    like = played & (rng.random(n) < q["like"])
    share = played & (rng.random(n) < q["share"])
    m = np.clip(q["vcr"], 1e-4, 1 - 1e-4)
    k = concentration
    vcr = np.where(played, rng.beta(m * k, (1.0 - m) * k), np.nan)
    return {
        "played": played.astype(np.int8),
        "vtr": (played & (e > 1.0 - q["vtr"])).astype(np.int8),
        "vcr": vcr,
        "finish": (played & (e > 1.0 - q["finish"])).astype(np.int8),
        "skip": (~played | (e < q["skip"])).astype(np.int8),
        "like": like.astype(np.int8),
        "share": share.astype(np.int8),
    }


def simulate(rows: int, seed: int, params: SynthParams | None = None,
             history: HistoryParams | None = None) -> pd.DataFrame:
    """All ``rows`` impressions, in generation order, with labels and oracle columns (and with
    ``history``, the list columns)."""
    return _simulate(rows, seed, params or SynthParams(), history)[0]


def _simulate(rows: int, seed: int, p: SynthParams,
              history: HistoryParams | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """The impressions and the solved logit intercepts (``played`` and one per task)."""
    rng, world, u, i, hist = _impressions(rows, seed, p, history)
    p_play, q = world.truth(u, i, hist)
    labels = draw_labels(rng, p_play, q, p.vcr_concentration)
    oracles = world.oracles(u, i, hist)
    users, items = world.users, world.items
    lists = {} if hist is None else synth_history.list_columns(
        world.taste, i, hist, _ids("v", world.n_items), _ids("c", p.n_categories))
    spec = feature_spec(p)
    raw = {
        "account_age_days": users["account_age"][u],
        "watch_minutes_30d": users["watch_minutes"][u],
        "item_age_days": items["item_age"][i],
    }
    frame = pd.DataFrame(
        {
            "user_id": _ids("u", world.n_users)[u],
            "device": np.asarray(DEVICES, dtype=object)[users["device"][u]],
            "account_age_days": raw["account_age_days"],
            "watch_minutes_30d": raw["watch_minutes_30d"],
            "user_group": np.asarray(spec.user_groups.values, dtype=object)[spec.user_groups.assign(raw)],
            "item_id": _ids("v", world.n_items)[i],
            "author_id": _ids("a", len(items["author_bias"]))[items["author"][i]],
            "category": _ids("c", p.n_categories)[items["category"][i]],
            "video_len": items["video_len"][i],
            "item_age_days": raw["item_age_days"],
            "item_state": np.asarray(spec.item_facet.values, dtype=object)[spec.item_facet.assign(raw)],
            **lists,
            **labels,
            **{f"oracle_{name}": oracles[name] for name in TASKS},
        }
    )
    return frame, {k: round(v, 6) for k, v in world.intercepts.items()}


ROW_GROUP_ROWS = 65_536
"""Rows per Parquet row group: the unit a reader loads, shuffles and hands to one worker."""


def generate(out_dir: Path, rows: int, seed: int, progress: bool = True, shards: int = 0,
             history: bool = False) -> FeatureSpec:
    """Write ``train/valid/test.parquet`` (80/10/10 of shuffled rows) and ``spec.yaml`` to ``out_dir``.

    ``shards`` K ≥ 1: each split is a directory ``<split>/`` of K files ``part-00000.parquet`` …
    (consecutive slices of equal size). Row groups hold :data:`ROW_GROUP_ROWS` rows. ``history``:
    rows also carry behaviour histories and tags (:mod:`mtrank.training.synth_history`).
    Deterministic: the same ``rows``, ``seed``, ``shards`` and ``history`` give the same bytes.
    """
    if rows < 10:
        raise ValueError(f"rows must be at least 10, got {rows}")
    if shards < 0:
        raise ValueError(f"shards must be >= 0, got {shards}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = SynthParams()
    hp = HistoryParams() if history else None
    frame, intercepts = _simulate(rows, seed, params, hp)
    order = np.random.default_rng([seed, 1]).permutation(rows)
    bounds = np.cumsum([0] + [round(rows * share) for _, share in SPLITS[:-1]] + [rows])
    bounds[-1] = rows
    for (split, _), a, b in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        part = frame.iloc[order[a:b]].reset_index(drop=True)
        if shards == 0:
            part.to_parquet(out_dir / f"{split}.parquet", index=False, row_group_size=ROW_GROUP_ROWS)
            continue
        split_dir = out_dir / split
        split_dir.mkdir(exist_ok=True)
        cuts = np.linspace(0, len(part), shards + 1).round().astype(int)
        for k, (c0, c1) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            part.iloc[c0:c1].to_parquet(split_dir / f"part-{k:05d}.parquet", index=False,
                                        row_group_size=ROW_GROUP_ROWS)
    spec = feature_spec(params, rows=rows, seed=seed, intercepts=intercepts, history=hp)
    spec.save(out_dir / "spec.yaml")
    if progress:
        print(f"synth: {rows} rows -> {out_dir} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return spec


def oracle_report(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per task: oracle AUC (binary) or oracle MSE on played rows (vcr), and the label's mean."""
    report: dict[str, dict[str, float]] = {}
    for name in BINARY_TASKS:
        y = frame[name].to_numpy(dtype=np.float64)
        report[name] = {
            "oracle_auc": auc(y, frame[f"oracle_{name}"].to_numpy()),
            "positive_rate": float(y.mean()),
        }
    played = frame["played"].to_numpy() == 1
    vcr = frame["vcr"].to_numpy(dtype=np.float64)[played]
    oracle = frame["oracle_vcr"].to_numpy(dtype=np.float64)[played]
    report["vcr"] = {
        "oracle_mse": mse(vcr, oracle),
        "variance": float(vcr.var()),
        "mean": float(vcr.mean()),
    }
    report["played"] = {"rate": float(played.mean())}
    return report
