"""Behaviour histories and tag lists for the synthetic short-video platform (``mtrank synth --history``).

The generative model (every number is a field of ``HistoryParams``, saved in ``spec.extra["history"]``):

1. **Interests.** Each user has 1 + Binomial(3, 0.5) interests: distinct categories, drawn half by
   the categories' impression share and half uniformly, with Dirichlet(1) weights.
2. **Sessions.** Each impression belongs to a session whose *active interest* is one of the user's
   interests (by weight), drawn per row, so a user's id cannot tell which one is active.
3. **Histories.** The row's recent watched items, most recent first. Length: low/high users
   Poisson(1.8 * sqrt(watch_minutes_30d)), new users Poisson(1 + 2 * account_age_days), capped at
   50; 2 % of low/high rows and 35 % of new users' rows are empty. Entry j (0 = most recent) comes
   from the active interest with probability 0.9 * 0.97^j, else from one of the user's
   interests by weight (70 %), else from all items by popularity. An entry from a category is one of its
   items, drawn by the same Zipf-like popularity as impressions.
4. **Impressions.** Half of the rows show an item of the active interest (retrieval); the others
   keep the item drawn as without histories.
5. **The history term.** ``m = sum_j 0.9^j [category(entry_j) = category(candidate)]``, a
   recency-weighted count of the entries that share the candidate's category; the shared
   engagement score gains ``2 * (1 - exp(-m / 2))``, so the play and every task
   move with it (the intercepts are solved with it included).
6. **Tags.** 300 tags; tag t's home category is ``t mod n_categories`` and it has a latent vector.
   An item carries 1 + Binomial(5, 0.4) distinct tags drawn by Gumbel top-k over
   ``tag_latent * item factor · tag vector + tag_home * [home = item's category]``, most relevant
   first. Tags do not enter the truth: they describe the item's latent factor and category.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from mtrank.spec import MultiField, SequenceField

LIST_TYPE = pa.list_(pa.string())
"""Arrow type of every list column: ``list<string>``."""


@dataclass(frozen=True)
class HistoryParams:
    """Every knob of the histories and tags; saved to ``spec.extra['history']``."""

    max_len: int = 50
    """Most entries of a history."""
    interests_max: int = 4
    """A user has 1 + Binomial(interests_max - 1, 0.5) interests (distinct categories)."""
    interest_concentration: float = 1.0
    """Dirichlet concentration of a user's weights over their interests."""
    len_per_sqrt_minute: float = 1.8
    """Low/high users' history length is Poisson(this * sqrt(watch_minutes_30d))."""
    new_len_base: float = 1.0
    new_len_per_day: float = 2.0
    """New users' history length is Poisson(new_len_base + new_len_per_day * account_age_days)."""
    empty_share: float = 0.02
    """Share of low/high users' rows with an empty history."""
    new_empty_share: float = 0.35
    """Share of new users' rows with an empty history."""
    focus: float = 0.9
    focus_decay: float = 0.97
    """Entry j (0 = most recent) is from the active interest with probability focus * focus_decay**j."""
    other_interest: float = 0.7
    """Otherwise it is from one of the user's interests with this probability, else from all items."""
    retrieval_share: float = 0.5
    """Share of impressions whose item is drawn from the session's active interest."""
    recency: float = 0.9
    """Weight of entry j in the match count: recency**j."""
    match_scale: float = 2.0
    """The match m enters as 1 - exp(-m / match_scale)."""
    effect: float = 2.0
    """Engagement gained by a candidate that fully matches the recent history."""
    n_tags: int = 300
    tags_max: int = 6
    tags_p: float = 0.4
    """An item has 1 + Binomial(tags_max - 1, tags_p) tags."""
    tag_home: float = 4.0
    """Tag score bonus of the tags whose home is the item's category."""
    tag_latent: float = 1.5
    """Tag score weight of item factor · tag vector (unit variance)."""


@dataclass(frozen=True)
class Histories:
    """The behaviour histories of a batch of rows: row r's entries are
    ``items[offsets[r]:offsets[r + 1]]`` (item indices, most recent first); ``interest`` is each
    row's active interest (a category index)."""

    offsets: np.ndarray
    items: np.ndarray
    interest: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def entry_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Row index and position (0 = most recent) of every entry."""
        lengths = self.lengths
        row = np.repeat(np.arange(len(self)), lengths)
        return row, np.arange(self.offsets[-1]) - self.offsets[row]

    def take(self, rows: np.ndarray) -> Histories:
        """The histories of ``rows`` (e.g. one user's history repeated for each of a request's candidates)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        source = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Histories(offsets, self.items[source], self.interest[rows])


@dataclass
class Taste:
    """What the histories are drawn from: each user's interests and the items of each category,
    plus each item's tags (``tag_offsets``/``tags``, like :class:`Histories`)."""

    params: HistoryParams
    interests: np.ndarray
    """(users, interests_max) category indices; unused slots repeat the first interest with weight 0."""
    weights: np.ndarray
    """(users, interests_max) interest weights, rows summing to 1."""
    item_category: np.ndarray
    item_p: np.ndarray
    """Impression probability of each item (its popularity)."""
    by_category: np.ndarray
    """Item indices sorted by category."""
    category_keys: np.ndarray
    """category + cumulative popularity share within the category, for ``by_category``'s items."""
    tag_offsets: np.ndarray
    tags: np.ndarray

    def items_of(self, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``category``, by popularity within the category (which must have items)."""
        pick = np.searchsorted(self.category_keys, category + rng.random(len(category)), side="right")
        return self.by_category[np.minimum(pick, len(self.by_category) - 1)]

    def _interest_of(self, u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One of each user's interests, by weight."""
        cum = np.cumsum(self.weights[u], axis=1)
        k = (cum < rng.random(len(u))[:, None] * cum[:, -1:]).sum(axis=1)
        return self.interests[u, np.minimum(k, self.interests.shape[1] - 1)]

    def _lengths(self, users: dict[str, np.ndarray], u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        hp = self.params
        new = users["is_new"][u]
        lam = np.where(new, hp.new_len_base + hp.new_len_per_day * users["account_age"][u],
                       hp.len_per_sqrt_minute * np.sqrt(users["watch_minutes"][u]))
        length = np.minimum(rng.poisson(lam), hp.max_len)
        empty = rng.random(len(u)) < np.where(new, hp.new_empty_share, hp.empty_share)
        return np.where(empty, 0, length)

    def draw(self, users: dict[str, np.ndarray], u: np.ndarray, rng: np.random.Generator) -> Histories:
        """A session's active interest and recent history for each row of users ``u``."""
        hp = self.params
        interest = self._interest_of(u, rng)
        offsets = np.concatenate([[0], np.cumsum(self._lengths(users, u, rng))]).astype(np.int64)
        hist = Histories(offsets, np.empty(0, dtype=np.int64), interest)
        row, pos = hist.entry_rows()
        focused = rng.random(len(row)) < hp.focus * hp.focus_decay**pos
        other = rng.random(len(row)) < hp.other_interest
        category = np.where(focused, interest[row], self._interest_of(u[row], rng))
        from_interest = focused | other
        items = np.where(from_interest, self.items_of(category, rng),
                         rng.choice(len(self.item_p), size=len(row), p=self.item_p))
        return Histories(offsets, items.astype(np.int64), interest)

    def retarget(self, i: np.ndarray, hist: Histories, rng: np.random.Generator) -> np.ndarray:
        """The impressions' items: ``retrieval_share`` of them from the session's active interest."""
        pick = rng.random(len(i)) < self.params.retrieval_share
        return np.where(pick, self.items_of(hist.interest, rng), i)

    def match(self, i: np.ndarray, hist: Histories) -> np.ndarray:
        """``m``: recency-weighted count of history entries in the candidate's category."""
        if len(hist) != len(i):
            raise ValueError(f"{len(hist)} histories for {len(i)} candidates: one per row")
        row, pos = hist.entry_rows()
        same = self.item_category[hist.items] == self.item_category[i][row]
        return np.bincount(row, weights=same * self.params.recency**pos, minlength=len(i))

    def engagement(self, i: np.ndarray, hist: Histories) -> np.ndarray:
        """The history term of the shared engagement score (step 5 of the module docstring)."""
        hp = self.params
        return hp.effect * (1.0 - np.exp(-self.match(i, hist) / hp.match_scale))


def _category_index(category: np.ndarray, item_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items sorted by category and the keys ``category + cumulative share`` that sample them."""
    order = np.argsort(category, kind="stable")
    cat = category[order]
    w = item_p[order]
    cum = np.cumsum(w)
    starts = np.searchsorted(cat, cat, side="left")
    ends = np.searchsorted(cat, cat, side="right") - 1
    before = np.where(starts > 0, cum[starts - 1], 0.0)
    share = (cum - before) / (cum[ends] - before)
    share[ends == np.arange(len(cat))] = 1.0  # each category's last key is exactly category + 1
    return order, cat + share


def _draw_interests(rng: np.random.Generator, n_users: int, category_p: np.ndarray,
                    hp: HistoryParams) -> tuple[np.ndarray, np.ndarray]:
    """Distinct interest categories per user (Gumbel top-k) and their Dirichlet weights."""
    k = hp.interests_max
    with np.errstate(divide="ignore"):
        score = np.log(category_p)[None, :] + rng.gumbel(size=(n_users, len(category_p)))
    interests = np.argsort(-score, axis=1)[:, :k]
    count = 1 + rng.binomial(k - 1, 0.5, n_users)
    used = np.arange(k)[None, :] < count[:, None]
    weights = rng.dirichlet(np.full(k, hp.interest_concentration), n_users) * used
    interests = np.where(used, interests, interests[:, :1])
    return interests, weights / weights.sum(axis=1, keepdims=True)


def _draw_tags(rng: np.random.Generator, items: dict[str, np.ndarray], n_categories: int,
               hp: HistoryParams) -> tuple[np.ndarray, np.ndarray]:
    """Each item's tags (offsets, tag indices), most relevant first (step 6)."""
    factor, category = items["factor"], items["category"]
    tag_factor = rng.standard_normal((hp.n_tags, factor.shape[1]))
    home = np.arange(hp.n_tags) % n_categories
    count = 1 + rng.binomial(hp.tags_max - 1, hp.tags_p, len(category))
    chosen = []
    for a in range(0, len(category), 4096):  # bounded memory: 4096 items x n_tags scores at a time
        score = hp.tag_latent * factor[a:a + 4096] @ tag_factor.T / np.sqrt(factor.shape[1])
        score += hp.tag_home * (home[None, :] == category[a:a + 4096, None])
        score += rng.gumbel(size=score.shape)
        top = np.argsort(-score, axis=1)[:, :hp.tags_max]
        chosen.append(top[np.arange(hp.tags_max)[None, :] < count[a:a + 4096, None]])
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    return offsets, np.concatenate(chosen).astype(np.int64)


def draw_taste(rng: np.random.Generator, users: dict[str, np.ndarray], items: dict[str, np.ndarray],
               item_p: np.ndarray, n_categories: int, hp: HistoryParams) -> Taste:
    """Users' interests, the category sampler and the items' tags (steps 1 and 6)."""
    category = items["category"]
    mass = np.bincount(category, weights=item_p, minlength=n_categories)
    present = (mass > 0).astype(np.float64)
    category_p = 0.5 * mass / mass.sum() + 0.5 * present / present.sum()
    interests, weights = _draw_interests(rng, len(users["bias"]), category_p, hp)
    order, keys = _category_index(category, item_p)
    tag_offsets, tags = _draw_tags(rng, items, n_categories, hp)
    return Taste(hp, interests, weights, category, item_p, order, keys, tag_offsets, tags)


def list_column(offsets: np.ndarray, values: np.ndarray, names: np.ndarray) -> pd.Series:
    """A ``list<string>`` column: row r holds ``names[values[offsets[r]:offsets[r + 1]]]``."""
    strings = pa.array(names, type=pa.string()).take(pa.array(values, type=pa.int64()))
    lists = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), strings)
    return pd.Series(pd.arrays.ArrowExtensionArray(lists), dtype=pd.ArrowDtype(LIST_TYPE))


def list_columns(taste: Taste, i: np.ndarray, hist: Histories, item_ids: np.ndarray,
                 category_ids: np.ndarray) -> dict[str, pd.Series]:
    """The rows' ``tags``, ``hist_item_id`` and ``hist_category`` columns."""
    tag_names = np.array([f"t{k}" for k in range(taste.params.n_tags)], dtype=object)
    item_tags = Histories(taste.tag_offsets, taste.tags, np.zeros(len(taste.tag_offsets) - 1)).take(i)
    return {
        "tags": list_column(item_tags.offsets, item_tags.items, tag_names),
        "hist_item_id": list_column(hist.offsets, hist.items, item_ids),
        "hist_category": list_column(hist.offsets, taste.item_category[hist.items], category_ids),
    }


def list_fields(hp: HistoryParams) -> tuple[tuple[MultiField, ...], tuple[SequenceField, ...]]:
    """The spec's ``multi`` field (the items' tags) and ``sequence`` fields (the histories, whose
    entries use the candidates' ``item_id`` and ``category`` tables and attend to the candidate)."""
    return (
        (MultiField("tags", side="item", pooling="mean", max_len=8),),
        (SequenceField("hist_item_id", share="item_id", max_len=hp.max_len, pooling="attention"),
         SequenceField("hist_category", share="category", max_len=hp.max_len, pooling="attention")),
    )


def histories_from_frame(frame: pd.DataFrame, interest: np.ndarray | None = None) -> Histories:
    """The :class:`Histories` of a data set's rows, read back from its ``hist_item_id`` column
    (item ids ``v<k>``); the active interests are not in the data (``interest`` if known, else -1)."""
    lists = pa.array(frame["hist_item_id"], type=LIST_TYPE)
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    ids = pd.Series(lists.flatten().to_numpy(zero_copy_only=False), dtype=object)
    items = ids.str.slice(1).astype(np.int64).to_numpy()
    return Histories(offsets - offsets[0], items, np.full(len(frame), -1) if interest is None else interest)
