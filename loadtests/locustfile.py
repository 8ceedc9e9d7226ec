"""Locust scenario: a recommender front end calling ``POST /v1/rank``.

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8000

What it sends, per simulated front end (all shares are environment variables, defaults shown):

- users Zipf-distributed over the model's user table (a few heavy users, a long tail), and a share
  of new users the store has never seen, with young accounts (``MTRANK_LOCUST_NEW_USERS=0.05``);
- candidate lists drawn Zipf-distributed from the item table (popular items appear in most lists),
  their size log-normal around 500 (``MTRANK_LOCUST_CANDIDATES=500``), clipped to [1, 2000];
- ``top_k`` 50 or 100 (a feed page), task scores asked for by a share of calls;
- a share of bad requests (``MTRANK_LOCUST_BAD=0.02``): a negative ``video_len``, a missing user,
  a string where a number belongs, or more candidates than the limit. They must be refused with
  413/422; locust counts them as failures only if the service answers anything else.

The user and item ids come from a model version in ``MTRANK_LOCUST_REPO`` / ``MTRANK_LOCUST_MODEL``
(default ``bench/repo`` / ``ple``, the bench's model) so that lookups hit real keys; without a
repository ``u<k>`` / ``v<k>`` ids are used. Think time between calls: 0–50 ms.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import orjson
from locust import FastHttpUser, between, events, task

from mtrank.bench.workload import Catalog, RequestFactory

REPO = Path(os.environ.get("MTRANK_LOCUST_REPO", "bench/repo"))
MODEL = os.environ.get("MTRANK_LOCUST_MODEL", "ple")
NEW_USER_SHARE = float(os.environ.get("MTRANK_LOCUST_NEW_USERS", "0.05"))
BAD_SHARE = float(os.environ.get("MTRANK_LOCUST_BAD", "0.02"))
MEDIAN_CANDIDATES = int(os.environ.get("MTRANK_LOCUST_CANDIDATES", "500"))
MAX_CANDIDATES = int(os.environ.get("MTRANK_MAX_CANDIDATES", "2000"))
SIGMA = 0.5
"""Log-normal spread of the candidate count: half the requests within ~0.7× to 1.4× the median."""


def _factory() -> RequestFactory:
    try:
        catalog = Catalog.from_repo(REPO, MODEL)
    except (OSError, ValueError):
        from mtrank.manifest import Manifest

        catalog = Catalog(Manifest(name=MODEL, kind="none", version=0, tasks=[], dense=[], sparse=[], graphs={},
                                   tables={}), {})
    return RequestFactory(catalog)


FACTORY = _factory()


def candidate_count(rng: np.random.Generator) -> int:
    return int(np.clip(round(rng.lognormal(np.log(MEDIAN_CANDIDATES), SIGMA)), 1, MAX_CANDIDATES))


def bad_request(rng: np.random.Generator) -> tuple[str, dict, tuple[int, ...]]:
    """(what is wrong, body, statuses the service must answer)."""
    body = FACTORY.request(rng, 20)
    kind = rng.integers(4)
    if kind == 0:
        body["candidates"][3]["video_len"] = -5.0
        return "negative video_len", body, (422,)
    if kind == 1:
        del body["user"]
        return "missing user", body, (422,)
    if kind == 2:
        body["candidates"][0]["features"] = {"item_age_days": "yesterday"}
        return "string for a number", body, (422,)
    body["candidates"] = FACTORY.candidates(rng, MAX_CANDIDATES + 1)
    return "too many candidates", body, (413,)


class RecommenderFrontEnd(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = np.random.default_rng(random.getrandbits(32))

    @task
    def rank(self) -> None:
        rng = self.rng
        if rng.random() < BAD_SHARE:
            what, body, expected = bad_request(rng)
            with self.client.post("/v1/rank", data=orjson.dumps(body), headers={"content-type": "application/json"},
                                  name=f"/v1/rank [bad: {what}]", catch_response=True) as r:
                if r.status_code in expected:
                    r.success()
                else:
                    r.failure(f"expected {expected}, got {r.status_code}")
            return
        n = candidate_count(rng)
        body = FACTORY.request(rng, n, new_user=rng.random() < NEW_USER_SHARE,
                               top_k=int(rng.choice([50, 100])), return_task_scores=bool(rng.random() < 0.3))
        size = "<=200" if n <= 200 else "<=800" if n <= 800 else ">800"
        with self.client.post("/v1/rank", data=orjson.dumps(body), headers={"content-type": "application/json"},
                              name=f"/v1/rank [{size} candidates]", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
            elif len(orjson.loads(r.content)["items"]) != min(n, body["top_k"]):
                r.failure("wrong number of items")
            else:
                r.success()


@events.test_start.add_listener
def _describe(environment, **_kwargs) -> None:
    users = len(FACTORY.users)
    items = len(FACTORY.items)
    print(f"mtrank locust: {users} users, {items} items from {REPO}/{MODEL}; candidates ~{MEDIAN_CANDIDATES} "
          f"(log-normal), new users {NEW_USER_SHARE:.0%}, bad requests {BAD_SHARE:.0%}", flush=True)
