"""``mtrank simulate``: synthetic users' traffic to a running ``mtrank serve``, and their feedback.

The users and items are those of the synthetic world behind a data set made by ``mtrank synth``
(rebuilt from the ``rows`` and ``seed`` of its ``spec.yaml``: :func:`mtrank.training.synth.build_world`).
Each request is one user, drawn as the generator draws an impression's user (by activity, new
users' share fixed), with ``C`` distinct candidates drawn as it draws items (Zipf-like by
popularity), every feature as the data set holds it. The service ranks them; each returned item
at rank ``r`` is *seen* with probability ``discount(r)`` (default ``1 / log2(r + 1)``), and a seen
item's feedback is drawn from the generator's ground truth for that (user, item) pair, the way the
generator draws a row's labels (``played``, then the six tasks; ``vcr`` only when played). An
unseen item gets no feedback row, so it counts as no event: ranking matters because the better
items shown first are seen more often.

A data set made with ``--history`` has a world with users' interests and items' tags: each request
then also carries its user's session history (``hist_item_id``, ``hist_category``, most recent
first, drawn as the generator draws a row's) and each candidate its ``tags``, and the truth of a
seen item includes the history term for that request's history, as the data set's labels do.

The feedback table has one row per seen item: ``request_id``, ``item_id``, ``rank``, ``played`` and
the task columns — the format ``mtrank join-log`` and ``mtrank ab-report`` read. Every request is
drawn before the first is sent (``concurrency`` at a time) and the feedback after the last answer,
in request order, so a seed gives the same table at any concurrency.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from mtrank.spec import FeatureSpec
from mtrank.training.synth import BINARY_TASKS, DEVICES, TASKS, World, build_world, draw_labels, exposure
from mtrank.training.synth_history import Histories, HistoryParams

DISCOUNTS = "log2 (1/log2(r+1)), none (1), geometric:G (G^(r-1)), power:A (r^-A)"


def position_discount(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The probability that an item shown at rank ``r`` (1 = first) is seen: see :data:`DISCOUNTS`."""
    kind, _, arg = name.partition(":")
    if kind == "log2" and not arg:
        return lambda r: 1.0 / np.log2(np.asarray(r, dtype=np.float64) + 1.0)
    if kind == "none" and not arg:
        return lambda r: np.ones(np.shape(r))
    try:
        value = float(arg)
    except ValueError:
        value = None
    if kind == "geometric" and value is not None and 0.0 < value <= 1.0:
        return lambda r: value ** (np.asarray(r, dtype=np.float64) - 1.0)
    if kind == "power" and value is not None and value >= 0.0:
        return lambda r: np.asarray(r, dtype=np.float64) ** -value
    raise ValueError(f"--position-discount: unknown curve {name!r}; one of {DISCOUNTS}")


def load_world(data: Path) -> World:
    """The world behind the data set ``data`` (its ``spec.yaml`` names the generator's rows and seed)."""
    spec = FeatureSpec.load(Path(data) / "spec.yaml")
    extra = spec.extra or {}
    if extra.get("generator") != "mtrank.training.synth":
        raise ValueError(f"{data}: not a data set of mtrank synth (spec.extra.generator is {extra.get('generator')!r})")
    history = HistoryParams(**extra["history"]) if extra.get("history") else None
    world = build_world(int(extra["rows"]), int(extra["seed"]), history=history)
    solved = {k: round(v, 6) for k, v in world.intercepts.items()}
    if solved != {k: float(v) for k, v in extra.get("intercepts", {}).items()}:
        raise ValueError(f"{data}: its intercepts differ from this generator's: made by another version of it")
    return world


def _user(world: World, u: int) -> dict[str, Any]:
    users = world.users
    return {
        "user_id": f"u{u}",
        "features": {
            "account_age_days": float(users["account_age"][u]),
            "watch_minutes_30d": float(users["watch_minutes"][u]),
            "device": DEVICES[int(users["device"][u])],
        },
    }


def _candidate(world: World, i: int) -> dict[str, Any]:
    items = world.items
    return {
        "item_id": f"v{i}",
        "video_len": float(items["video_len"][i]),
        "features": {
            "author_id": f"a{int(items['author'][i])}",
            "category": f"c{int(items['category'][i])}",
            "item_age_days": float(items["item_age"][i]),
        },
    }


def _names(prefix: str, indices: np.ndarray) -> list[str]:
    return [f"{prefix}{int(k)}" for k in indices]


def draw_requests(world: World, rng: np.random.Generator, n: int, candidates: int,
                  prefix: str) -> tuple[list[tuple[int, dict[str, Any]]], Histories | None]:
    """``n`` request bodies, each with its user's index: users and candidates drawn by exposure; in a
    world with histories, each request's history (returned too, one per request) and the candidates'
    tags are in the bodies."""
    if not 1 <= candidates <= world.n_items:
        raise ValueError(f"--candidates must be in [1, {world.n_items}] (the world's items), got {candidates}")
    user_p, item_p = exposure(world.users, world.items, world.params)
    users = rng.choice(world.n_users, size=n, p=user_p)
    taste = world.taste
    histories = None if taste is None else world.draw_histories(users, rng)
    out = []
    for k, u in enumerate(users):
        items = rng.choice(world.n_items, size=candidates, replace=False, p=item_p)
        user, cands = _user(world, int(u)), [_candidate(world, int(i)) for i in items]
        if histories is not None:
            entries = histories.items[histories.offsets[k]:histories.offsets[k + 1]]
            user["features"] |= {"hist_item_id": _names("v", entries),
                                 "hist_category": _names("c", taste.item_category[entries])}
            for c, i in zip(cands, items, strict=True):
                c["features"]["tags"] = _names("t", taste.tags[taste.tag_offsets[i]:taste.tag_offsets[i + 1]])
        out.append((int(u), {"request_id": f"{prefix}-{k}", "user": user, "candidates": cands}))
    return out, histories


def send(url: str, bodies: list[dict[str, Any]], timeout_s: float = 30.0,
         concurrency: int = 1) -> list[dict[str, Any]]:
    """POST each body to ``URL/v1/rank``, at most ``concurrency`` at a time; the answers in the
    bodies' order, so that what is drawn from them does not depend on ``concurrency`` (the service's
    answer to a request does not depend on the requests batched with it). A refused request or a
    non-200 answer is an error."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    if concurrency == 1:
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            answers = []
            for body in bodies:
                try:
                    answers.append(_checked(url, client.post("/v1/rank", json=body)))
                except httpx.HTTPError as e:
                    raise ValueError(f"{url}/v1/rank: {e!r}") from None
            return answers
    return asyncio.run(_send_concurrently(url, bodies, timeout_s, concurrency))


async def _send_concurrently(url: str, bodies: list[dict[str, Any]], timeout_s: float,
                             concurrency: int) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = [{} for _ in bodies]
    next_index = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            for k in next_index:  # one iterator shared by the workers: each index is sent once
                try:
                    answers[k] = _checked(url, await client.post("/v1/rank", json=bodies[k]))
                except httpx.HTTPError as e:
                    raise ValueError(f"{url}/v1/rank: {e!r}") from None

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return answers


def _checked(url: str, r: httpx.Response) -> dict[str, Any]:
    if r.status_code != 200:
        raise ValueError(f"{url}/v1/rank answered {r.status_code}: {r.text[:200]}")
    return r.json()


def feedback(world: World, rng: np.random.Generator, shown: pd.DataFrame,
             discount: Callable[[np.ndarray], np.ndarray],
             histories: Histories | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Feedback of the seen items of ``shown`` (columns request_id, item_id, rank, user, item, and
    with ``histories`` (one per request) ``request``, the row's index in them), and which of them
    were seen."""
    seen = rng.random(len(shown)) < discount(shown["rank"].to_numpy())
    rows = shown[seen].reset_index(drop=True)
    history = None if histories is None else histories.take(rows["request"].to_numpy())
    p_play, q = world.truth(rows["user"].to_numpy(), rows["item"].to_numpy(), history)
    labels = draw_labels(rng, p_play, q, world.params.vcr_concentration)
    return pd.DataFrame({"request_id": rows["request_id"], "item_id": rows["item_id"],
                         "rank": rows["rank"].astype(np.int32), **labels}), seen


def expected_feedback(world: World, users: np.ndarray, items: np.ndarray, ranks: np.ndarray,
                      discount: str = "log2", history: Histories | None = None) -> dict[str, np.ndarray]:
    """Each binary task's expected label of the items ``items`` shown to ``users`` at ``ranks`` (the
    world's indices; rank 1 = first), as :func:`feedback` draws it: P(seen at the rank) × the
    oracle (an unseen item has no feedback row, which counts as no event). ``history``: each row's
    request history, in a world with histories."""
    seen = position_discount(discount)(np.asarray(ranks))
    oracles = world.oracles(np.asarray(users), np.asarray(items), history)
    return {t: seen * oracles[t] for t in BINARY_TASKS}


def run_simulation(url: str, data: Path, requests: int, candidates: int, out: Path, seed: int = 0,
                   discount: str = "log2", progress: bool = True, concurrency: int = 1) -> dict[str, Any]:
    """Send the traffic (``concurrency`` requests at a time), write the feedback table to ``out``
    (.parquet or .csv); a summary. The same ``seed`` gives the same table at any ``concurrency``."""
    curve = position_discount(discount)
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out must end in .parquet or .csv, got {out}")
    if requests < 1:
        raise ValueError(f"--requests must be at least 1, got {requests}")
    start = time.perf_counter()
    world = load_world(data)
    rng = np.random.default_rng([seed, 30])
    drawn, histories = draw_requests(world, rng, requests, candidates, prefix=f"sim{seed}")
    answers = send(url, [body for _, body in drawn], concurrency=concurrency)
    shown = pd.DataFrame(
        [(body["request_id"], it["item_id"], it["rank"], u, int(it["item_id"][1:]), k)
         for k, ((u, body), answer) in enumerate(zip(drawn, answers, strict=True)) for it in answer["items"]],
        columns=["request_id", "item_id", "rank", "user", "item", "request"],
    )
    table, seen = feedback(world, rng, shown, curve, histories)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:  # keys as Arrow ``string`` (pandas may write ``large_string``), as the impression log has them
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = {c: pa.array(table[c].tolist(), pa.string()) for c in ("request_id", "item_id")}
        pq.write_table(pa.table({**keys, **{c: table[c].to_numpy() for c in table.columns if c not in keys}}), out)
    summary = {
        "requests": requests,
        "shown": len(shown),
        "feedback_rows": len(table),
        "position_discount": discount,
        "seen_by_rank": {int(r): round(float(v), 4) for r, v in pd.Series(seen).groupby(shown["rank"]).mean().items()},
        "positives": {t: int(table[t].sum()) for t in TASKS if t != "vcr"},
    }
    if progress:
        print(f"simulate: {requests} requests -> {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return summary

