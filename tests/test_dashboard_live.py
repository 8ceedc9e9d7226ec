"""The Grafana dashboard against a real Prometheus scraping real ``mtrank serve`` processes.

Two replicas of the toy model (Redis embedding store, buckets ``a`` and ``b``): one writes its
impression log, the other's log directory cannot be written (so drops are counted). Prometheus
(Debian's ``prometheus`` package, which .ci/run installs for promtool) scrapes both every second
with the project's prometheus.yml and alerts.yml. After traffic that exercises every panel — ranked
answers, bad and oversized requests, ids missing from the store — every expression of every panel
is evaluated through Prometheus' HTTP API with Grafana's variables substituted, once with "All"
and once with one value of each variable, and must return data with values that fit what was sent.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from mtrank.bench.impressions import read_only_directory
from mtrank.bench.server import RemoteServer, free_port
from mtrank.export.store_loader import load_embeddings
from tests.conftest import _need
from tests.deploy_refs import ALERTS, DASHBOARD, ROOT, alert_exprs
from tests.server import TOY_TASKS, build_toy_version, rank_body

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SCRAPE_S = 1
MAX_CANDIDATES = 64
BUCKETS = json.dumps([{"name": "a", "share": 50}, {"name": "b", "share": 50}])
TASKS = [t for t, _ in TOY_TASKS]


# -- Prometheus ------------------------------------------------------------------------------


class Prometheus:
    """A Prometheus server on a loopback port, with the project's config pointed at ``targets``."""

    def __init__(self, binary: str, targets: list[str], workdir: Path):
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"] |= {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
        config["rule_files"] = [str(ALERTS)]
        (job,) = [c for c in config["scrape_configs"] if c["job_name"] == "mtrank"]
        job.pop("dns_sd_configs")
        job |= {"scrape_interval": f"{SCRAPE_S}s", "static_configs": [{"targets": targets}]}
        config["scrape_configs"] = [job]
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=30.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("prometheus not ready after 60 s")

    def api(self, path: str, **params: str) -> object:
        r = self.client.get(f"/api/v1/{path}", params=params)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        _need("prometheus is not on PATH (Debian: apt-get install -y --no-install-recommends prometheus; "
              ".ci/run installs it)")
    return path


# -- traffic ---------------------------------------------------------------------------------


@dataclass
class Sent:
    """What the traffic phase sent and got back, to hold the panels' values to."""

    answers: int = 0
    by_bucket: dict[str, int] = field(default_factory=dict)
    candidates: list[int] = field(default_factory=list)
    predictions: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    """(bucket, task) → every returned item's prediction."""
    invalid: int = 0
    too_large: int = 0
    seconds: float = 0.0


def _send(client: httpx.Client, i: int, sent: Sent) -> None:
    """One request of a mix: mostly answered (5-40 candidates, some ids unknown to the store), one in
    ten a 422 (no candidates), one in fifteen a 413 (too many)."""
    if i % 10 == 9:
        r = client.post("/v1/rank", json={**rank_body(f"u{i % 200}", n=3), "candidates": []})
        assert r.status_code == 422, r.text
        sent.invalid += 1
        return
    if i % 15 == 14:
        r = client.post("/v1/rank", json=rank_body(f"u{i % 200}", n=MAX_CANDIDATES + 1))
        assert r.status_code == 413, r.text
        sent.too_large += 1
        return
    n = (5, 12, 40)[i % 3]
    body = rank_body(f"u{(7 * i) % 230}", n=n, offset=(37 * i) % 520)  # u200+ and v500+ are not in the store
    body["request_id"] = f"live-{i}"
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    sent.answers += 1
    sent.by_bucket[answer["bucket"]] = sent.by_bucket.get(answer["bucket"], 0) + 1
    sent.candidates.append(n)
    for item in answer["items"]:
        for task, value in item["tasks"].items():
            sent.predictions.setdefault((answer["bucket"], task), []).append(value)


def _traffic(servers: list[RemoteServer], seconds: float, start: int = 0) -> Sent:
    """Requests to every server, one client thread each, for ``seconds``."""
    sent = [Sent() for _ in servers]

    def run(k: int) -> None:
        with httpx.Client(base_url=servers[k].url, timeout=30.0) as client:
            i, deadline = start, time.monotonic() + seconds
            while time.monotonic() < deadline:
                _send(client, i, sent[k])
                i += 1
                time.sleep(0.005)

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = Sent(seconds=time.monotonic() - started)
    for s in sent:
        total.answers += s.answers
        total.invalid += s.invalid
        total.too_large += s.too_large
        total.candidates += s.candidates
        for b, n in s.by_bucket.items():
            total.by_bucket[b] = total.by_bucket.get(b, 0) + n
        for key, values in s.predictions.items():
            total.predictions.setdefault(key, []).extend(values)
    return total


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    prometheus: Prometheus
    instances: list[str]
    """Prometheus' ``instance`` label of each replica: the writable log first, the read-only one second."""
    sent: Sent
    at: float
    """The time the panels are evaluated at (seconds since the epoch)."""
    rate_interval: str
    """What Grafana's ``$__rate_interval`` stands for: the window that holds the traffic phase."""


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _last_scrapes(prom: Prometheus) -> list[float]:
    """When each target was last scraped successfully (seconds since the epoch; 0: not yet)."""
    targets = prom.api("targets")["activeTargets"]
    return [_epoch(t["lastScrape"]) if t["health"] == "up" and t["lastScrape"][:1] != "0" else 0.0
            for t in targets] or [0.0]


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", rfc3339.replace("Z", "+00:00"))).timestamp()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url) -> Iterator[Stack]:
    binary = _prometheus_binary()
    tmp = tmp_path_factory.mktemp("live")
    repo = tmp / "repo"
    build_toy_version(repo)
    prefix = f"mtrank-live-{free_port()}"
    try:
        yield from _run_stack(binary, repo, tmp, redis_url, prefix)
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)


def _run_stack(binary: str, repo: Path, tmp: Path, redis_url: str, prefix: str) -> Iterator[Stack]:
    """The two replicas and Prometheus, after the warm-up and the traffic phase; stopped afterwards."""
    load_embeddings(repo, "toy", redis_url, prefix=prefix, progress=False)
    env = {"MTRANK_STORE_URL": redis_url, "MTRANK_STORE_PREFIX": prefix, "MTRANK_BUCKETS": BUCKETS,
           "MTRANK_MAX_CANDIDATES": str(MAX_CANDIDATES)}
    with ExitStack() as stack:
        ro_dir, wrapper, _ = stack.enter_context(read_only_directory(tmp / "read-only-log"))
        servers = [
            stack.enter_context(RemoteServer(repo, env=env | {"MTRANK_IMPRESSION_LOG": str(tmp / "log"),
                                                              "MTRANK_IMPRESSION_ROTATE_S": "1"})),
            stack.enter_context(RemoteServer(repo, env=env | {"MTRANK_IMPRESSION_LOG": str(ro_dir)},
                                             wrapper=wrapper)),
        ]
        prom = Prometheus(binary, [s.url.removeprefix("http://") for s in servers], tmp / "prometheus")
        stack.callback(prom.stop)
        # Every labelled series exists before the first scrape that counts: the rates below then
        # see the traffic phase's increases, not series appearing mid-window.
        _traffic(servers, 1.0, start=10_000)
        time.sleep(1.5)  # the prediction histogram is flushed once a second
        warmed = time.time()
        _wait(lambda: min(_last_scrapes(prom)) > warmed, 30, "a scrape of both replicas after the warm-up")
        # The panels are read over a window that starts just before these scrapes (each target's
        # previous one is a scrape interval earlier): it holds the traffic phase and nothing before.
        window_start = min(_last_scrapes(prom)) - 0.05
        sent = _traffic(servers, 6.0)
        time.sleep(1.5)
        done = time.time()
        _wait(lambda: min(_last_scrapes(prom)) > done, 30, "a scrape of both replicas after the traffic")
        at = time.time()
        yield Stack(prometheus=prom, instances=[s.url.removeprefix("http://") for s in servers], sent=sent, at=at,
                    rate_interval=f"{round(1000 * (at - window_start))}ms")


# -- the dashboard ---------------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    out = []
    for panel in _dashboard()["panels"]:
        out += [panel, *panel.get("panels", [])]
    return [p for p in out if p["type"] != "row"]


def _variables() -> dict[str, tuple[str, str]]:
    """Query variable → (metric, label) of its ``label_values(metric, label)``."""
    out = {}
    for v in _dashboard()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["query"])
            assert m, v["query"]
            out[v["name"]] = (m.group(1), m.group(2))
    return out


def _grafana_regex(value: str) -> str:
    """A single selected value as Grafana writes it into a Prometheus regex matcher (escaped)."""
    return re.sub(r"([\\.+*?^$()\[\]{}|])", r"\\\\\1", value)


def _substitute(expr: str, values: dict[str, str], rate_interval: str) -> str:
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def _series(result: list[dict], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in result}


def test_the_dashboards_template_variables_list_what_the_replicas_export(stack):
    expected = {"instance": set(stack.instances), "bucket": {"a", "b"}, "model": {"toy"}, "task": set(TASKS)}
    variables = _variables()
    assert set(variables) == set(expected)
    for name, (metric, label) in variables.items():
        values = set(stack.prometheus.api(f"label/{label}/values", **{"match[]": metric}))
        # Requests refused before a bucket is chosen carry the bucket "none".
        assert values - {"none"} == expected[name], name


def test_the_alert_rules_load_and_evaluate_in_prometheus(stack):
    groups = stack.prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == set(alert_exprs())
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule.get("lastError"))


def _finite(values: dict, lo: float, hi: float, where: str) -> None:
    assert values, f"{where}: no series"
    for key, v in values.items():
        assert math.isfinite(v) and lo <= v <= hi, f"{where} {key}: {v}"


def _check_panel(title: str, results: list[list[dict]], stack: Stack, one: dict[str, str] | None) -> None:
    """The panel's values against what the traffic phase sent; ``one``: the single values selected."""
    sent, n = stack.sent, len(stack.instances) if one is None else 1
    first = results[0]
    buckets = {"a", "b"} if one is None else {one["bucket"]}
    tasks = set(TASKS) if one is None else {one["task"]}
    if title == "Rank requests/s":
        _finite(_series(first), 0.05, 1e4, title)
    elif title in ("p99 rank latency", "Rank latency percentiles by bucket", "Queue wait by model and group",
                   "Inference time by group and device", "Embedding lookup time by store", "Event-loop lag by replica"):
        for r in results:
            _finite(_series(r, "bucket", "model", "group", "store", "instance"), 0.0, 5.0, title)
        if title == "Rank latency percentiles by bucket":
            # Requests refused before a bucket is chosen (422, 413) are timed under the bucket "none".
            assert {k[0] for k in _series(first, "bucket")} - {"none"} == buckets
        if title == "Embedding lookup time by store":
            assert set(_series(first, "store")) == {("redis",)}
        if title == "Event-loop lag by replica":
            assert len(_series(first, "instance")) == n
    elif title == "Rank 5xx ratio":
        assert _series(first) == {(): 0.0}
    elif title in ("Embedding cache hit ratio", "Embedding store degraded", "Replicas without a model"):
        values = _series(first, "instance")
        _finite(values, 0.0, 1.0, title)
        if title == "Embedding cache hit ratio":
            assert min(values.values()) > 0  # the same ids come back within the cache's lifetime
        else:
            assert set(values.values()) == {0.0}
    elif title == "Rank requests by bucket and status":
        values = _series(first, "bucket", "status")
        _finite(values, 0.0, 1e4, title)
        assert {b for b, s in values if s == "200" and values[b, s] > 0} == buckets
    elif title == "Requests by route and status":
        values = _series(first, "route", "status")
        assert values[("/v1/rank", "200")] > 0 and values[("/v1/rank", "422")] > 0 and values[("/v1/rank", "413")] > 0
    elif title == "Rejections by reason":
        values = _series(first, "reason")
        _finite(values, 0.0, 1e4, title)
        assert values[("invalid",)] > 0 and values[("too_large",)] > 0 and values[("overloaded",)] == 0
        assert _series(results[1]) == {(): 0.0}  # no refusal was paced
    elif title == "In-flight requests":
        _finite(_series(first, "instance"), 0.0, 100.0, title)
        assert len(first) == n
    elif title == "Candidates per request":
        for r in results[:3]:
            _finite(_series(r), 1.0, 2.0 * max(sent.candidates), title)
        # sum ÷ count over the window, which holds the traffic phase and nothing before: the mean of what
        # was sent, up to rate()'s extrapolation, which differs a little between the replicas' scrape times.
        (mean,) = _series(results[3]).values()
        assert mean == pytest.approx(np.mean(sent.candidates), rel=1e-3) if one is None else 5 <= mean <= 40
    elif title in ("Batch rows distribution", "Prediction distribution"):
        values = _series(first, "le")
        _finite(values, 0.0, 1e9, title)
        ordered = sorted(values.items(), key=lambda kv: float(kv[0][0]))
        assert [v for _, v in ordered] == sorted(v for _, v in ordered)  # cumulative buckets
        assert ordered[-1][0] == ("+Inf",) and ordered[-1][1] > 0
    elif title == "Mean batch rows by model and group":
        _finite(_series(first, "model", "group"), 1.0, 1000.0, title)
    elif title == "Batches/s by model and group":
        _finite(_series(first, "model", "group"), 0.05, 1e4, title)
    elif title == "Missing ids by table":
        values = _series(first, "table")
        assert values[("item_id",)] > 0 and values[("author_id",)] > 0 and values[("user_id",)] > 0
    elif title == "Redis errors and degraded replicas":
        assert set(_series(first, "instance").values()) == {0.0} and _series(results[1]) == {(): 0.0}
    elif title == "Model versions":
        values = _series(first, "model", "version", "device", "instance")
        assert {k[:3] for k in values} == {("toy", "1", "cpu")} and len(values) == n
        assert set(values.values()) == {1.0}
    elif title == "Models loaded per replica":
        assert set(_series(first, "instance").values()) == {1.0} and len(first) == n
    elif title == "Mean prediction by bucket and task":
        values = _series(first, "bucket", "task")
        assert set(values) == {(b, t) for b in buckets for t in tasks}
        for (bucket, task), mean in values.items():
            sent_values = sent.predictions[bucket, task]
            if one is None:  # both replicas: every prediction the traffic phase got back (as above)
                assert mean == pytest.approx(np.mean(sent_values), abs=1e-3), (bucket, task)
            assert min(sent_values) <= mean <= max(sent_values), (bucket, task)
    elif title == "Impression log records/s":
        logged, dropped = _series(first), _series(results[1], "reason")
        assert logged[()] > 0 if one is None or one["instance"] == stack.instances[0] else logged[()] == 0
        wrote_none = one is None or one["instance"] == stack.instances[1]
        assert (dropped[("write_error",)] > 0) == wrote_none and dropped[("queue_full",)] == 0
    else:
        raise AssertionError(f"panel {title!r} has no check here: add one")


@pytest.mark.parametrize("selection", ["all", "writable-log replica", "read-only-log replica"])
def test_every_panel_returns_data_that_fits_the_traffic(stack, selection):
    """With "All" (Grafana's ``.*``), and with one replica, bucket ``b`` and task ``vtr`` selected."""
    if selection == "all":
        values, one = dict.fromkeys(_variables(), ".*"), None
    else:
        replica = stack.instances[0 if selection.startswith("writable") else 1]
        one = {"instance": replica, "bucket": "b", "model": "toy", "task": "vtr"}
        values = {k: _grafana_regex(v) for k, v in one.items()}
    checked = []
    for panel in _panels():
        results = [stack.prometheus.query(_substitute(t["expr"], values, stack.rate_interval), stack.at)
                   for t in panel["targets"]]
        empty = [t["expr"] for t, r in zip(panel["targets"], results, strict=True) if not r]
        assert not empty, (panel["title"], empty)
        _check_panel(panel["title"], results, stack, one)
        checked.append(panel["title"])
    assert len(checked) == len(_panels()) >= 25
