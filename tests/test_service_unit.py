"""Service parts without a server: fusion, buckets, settings, batcher, stores (real ORT, real Redis)."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mtrank import fusion
from mtrank.bench.server import free_port
from mtrank.fusion import BucketConfig, LengthFn
from mtrank.manifest import DenseInfo
from mtrank.service.admission import Admission
from mtrank.service.batcher import Batcher, LoadEstimate
from mtrank.service.buckets import BucketTable, user_slot
from mtrank.service.errors import DeadlineExceeded, Overloaded
from mtrank.service.runner import GraphRunner, best_batch_rows
from mtrank.service.settings import ConfigError, load_settings
from mtrank.service.stores import InProcessStore, LocalTable, lookup, open_url, unique_ids
from mtrank.spec import Facet, FacetRule
from mtrank.transform import FeatureTransform, TransformError
from tests.server import TOY_ITEMS, TOY_USERS, build_toy_version

# -- fusion ---------------------------------------------------------------------------------


def test_fusion_log_space_equals_the_product_of_powers():
    rng = np.random.default_rng(0)
    tasks = {"vtr": rng.uniform(0.01, 1, 50), "like": rng.uniform(0.01, 1, 50), "vcr": rng.uniform(0.01, 1, 50)}
    weights = {"vtr": 1.0, "like": 0.5, "vcr": 2.0}
    length = rng.uniform(0, 600, 50)
    fn = LengthFn(kind="power", beta=0.3, offset=1.0)
    direct = tasks["vtr"] ** 1.0 * tasks["like"] ** 0.5 * tasks["vcr"] ** 2.0 * (length + 1.0) ** 0.3
    np.testing.assert_allclose(np.exp(fusion.log_scores(tasks, weights, length, fn)), direct, rtol=1e-12)


@pytest.mark.parametrize(
    ("fn", "length", "expected"),
    [
        (LengthFn(kind="none"), 120.0, 1.0),
        (LengthFn(kind="log1p", alpha=2.0, scale=10.0), 90.0, (1 + math.log1p(9.0)) ** 2),
        (LengthFn(kind="log1p"), 0.0, 1.0),
        (LengthFn(kind="sigmoid", center=30.0, width=10.0), 30.0, 0.5),
        (LengthFn(kind="sigmoid", center=30.0, width=10.0), 50.0, 1 / (1 + math.exp(-2.0))),
        (LengthFn(kind="sigmoid", center=30.0, width=-10.0), 50.0, 1 / (1 + math.exp(2.0))),
        (LengthFn(kind="power", beta=-0.5, offset=1.0), 99.0, 0.1),
        (LengthFn(kind="power", beta=0.3, offset=1.0), 0.0, 1.0),
    ],
)
def test_length_factor_matches_its_definition(fn, length, expected):
    assert fusion.length_factor(np.array([length]), fn)[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["none", "log1p", "sigmoid", "power"])
def test_length_factor_is_finite_and_positive_over_the_allowed_range(kind):
    log_f = fusion.log_length_factor(np.array([0.0, 1e-9, 1.0, 3600.0, 86400.0]), LengthFn(kind=kind))
    assert np.all(np.isfinite(log_f))


def test_fusion_clips_zero_nan_and_regression_outputs():
    tasks = {"vtr": np.array([0.0, np.nan, 0.5]), "vcr": np.array([1.7, 0.2, -0.3])}
    log_s = fusion.log_scores(tasks, {"vtr": 1.0, "vcr": 1.0}, np.zeros(3), LengthFn())
    assert np.all(np.isfinite(log_s))
    floor = math.log(fusion.P_MIN)
    np.testing.assert_allclose(log_s, [floor + 0.0, floor + math.log(0.2), math.log(0.5) + floor])


def test_negative_weight_ranks_a_likely_skip_lower():
    tasks = {"vtr": np.array([0.5, 0.5]), "skip": np.array([0.9, 0.1])}
    order = fusion.rank_order(fusion.log_scores(tasks, {"vtr": 1.0, "skip": -1.0}, np.zeros(2), LengthFn()))
    assert order.tolist() == [1, 0]


def test_rank_order_keeps_request_order_on_ties():
    assert fusion.rank_order(np.array([0.0, 1.0, 0.0, 1.0])).tolist() == [1, 3, 0, 2]


# -- the user group of one request -----------------------------------------------------------


def test_the_user_group_of_one_row_is_the_array_transforms_answer():
    """FeatureTransform.facet_one (plain Python, per request) against FeatureTransform.facet (numpy):
    every rule op, values on the thresholds, missing and NaN values (the dense default, or no rule
    when there is none), booleans, ints and numpy scalars."""
    rules = (FacetRule("heavy", "watch", "ge", 10.0), FacetRule("new", "age", "lt", 3.0),
             FacetRule("new", "age", "eq", 5.0), FacetRule("light", "watch", "gt", 0.0),
             FacetRule("light", "tenure", "le", -1.0))
    facet = Facet("group", ("heavy", "new", "light", "other"), rules, default="other")
    dense = [DenseInfo("watch", "user", "log1p", 0.0, 1.0, 12.0), DenseInfo("age", "user", "none", 0.0, 1.0, 0.0)]
    transform = FeatureTransform(dense, [], user_groups=facet)
    rng = np.random.default_rng(0)
    pool = [None, math.nan, True, False, 0, 3, 5, 10, -1, 0.0, 2.999, 3.0, 5.0, 9.5, 10.0, np.float32(10.0),
            np.int64(5), -1.5]
    seen = set()
    for _ in range(3000):
        values = {name: pool[rng.integers(len(pool))] for name in ("watch", "age", "tenure") if rng.random() < 0.8}
        one = transform.facet_one(facet, values)
        assert one == int(transform.facet(facet, values, 1)[0]), values
        seen.add(one)
    assert seen == {0, 1, 2, 3}
    with pytest.raises(TransformError, match="age: must be a number, got a string"):
        transform.facet_one(facet, {"age": "7"})
    # Not a scalar (the service never decodes one, a library caller might): the array path answers.
    row = {"watch": 1.0, "age": [2.0]}
    assert transform.facet_one(facet, row) == int(transform.facet(facet, row, 1)[0]) == 1
    with pytest.raises(TransformError, match="age: 2 values for 1 rows"):
        transform.facet_one(facet, {"watch": 1.0, "age": [2.0, 9.0]})


# -- buckets --------------------------------------------------------------------------------


def _table(shares, salt="s1"):
    return BucketTable(tuple(BucketConfig(name=f"b{i}", share=s) for i, s in enumerate(shares)), salt)


def test_bucket_shares_within_one_point_over_100k_users():
    table = _table([50.0, 30.0, 15.5, 4.5])
    names = [table.assign(f"user-{i}").name for i in range(100_000)]
    for b in table.buckets:
        share = 100.0 * names.count(b.name) / len(names)
        assert abs(share - b.share) <= 1.0, (b.name, share)


def test_bucket_assignment_is_stable_across_processes_and_depends_on_the_salt():
    ids = [f"user-{i}" for i in range(200)]
    here = [user_slot("s1", u) for u in ids]
    code = (
        "from mtrank.service.buckets import user_slot;"
        "print(','.join(str(user_slot('s1', f'user-{i}')) for i in range(200)))"
    )
    # A fresh interpreter has a different str hash seed: the slots must not depend on it.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parents[1])
    assert [int(x) for x in out.stdout.strip().split(",")] == here
    assert [user_slot("other-salt", u) for u in ids] != here


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        ({"MTRANK_BUCKETS": '[{"name": "a", "share": 60}, {"name": "b", "share": 30}]'}, "MTRANK_BUCKETS",
         "shares add up to 90, not 100"),
        ({"MTRANK_BUCKETS": "[{not json"}, "MTRANK_BUCKETS", "JSON"),
        ({"MTRANK_BUCKETS": '[{"name": "a", "share": 100, "length_fn": {"kind": "cubic"}}]'}, "MTRANK_BUCKETS",
         "length_fn.kind"),
        ({"MTRANK_BUCKETS": '[{"name": "a", "share": 50}, {"name": "a", "share": 50}]'}, "MTRANK_BUCKETS", "unique"),
        ({"MTRANK_DEVICE": "tpu"}, "MTRANK_DEVICE", "cuda"),
        ({"MTRANK_PORT": "eighty"}, "MTRANK_PORT", "integer"),
        ({"MTRANK_MAX_BATCH_ROWS": "-1"}, "MTRANK_MAX_BATCH_ROWS", "greater"),
        ({"MTRANK_STORE_URL": "http://localhost"}, "MTRANK_STORE_URL", "store URL"),
        ({"MTRANK_REDIS_URL": "http://localhost"}, "MTRANK_REDIS_URL", "store URL"),
        ({"MTRANK_MAX_QUEUE_ROWS": "100"}, "MTRANK_MAX_QUEUE_ROWS", "max_candidates"),
        ({"MTRANK_BATCHING": "perhaps"}, "MTRANK_BATCHING", "boolean"),
    ],
)
def test_bad_setting_names_the_variable(monkeypatch, env, variable, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_settings()
    message = str(e.value)
    assert message.startswith(f"{variable}: ") and words in message and "\n" not in message


def test_settings_defaults_and_overrides(monkeypatch):
    monkeypatch.setenv("MTRANK_PORT", "9001")
    monkeypatch.delenv("MTRANK_REDIS_URL", raising=False)
    monkeypatch.delenv("MTRANK_STORE_URL", raising=False)
    s = load_settings(host="0.0.0.0")
    assert (s.port, s.host, s.store_url, s.max_batch_rows, s.max_queue_delay_ms) == (9001, "0.0.0.0", None, 0, 2.0)
    assert load_settings(port=9100).port == 9100


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "400000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({}, None),
    ],
    ids=["v2 unlimited", "v2 1.5 cores", "v1 unlimited", "v1 4 cores", "no cgroup"],
)
def test_cpu_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, quota):
    from mtrank.service.settings import cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == quota


def test_workers_default_to_one_per_available_core_within_the_quota(monkeypatch):
    import mtrank.service.settings as settings

    monkeypatch.delenv("MTRANK_WORKERS", raising=False)
    monkeypatch.setattr(settings.os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setattr(settings, "cpu_quota", lambda: 2.5)
    assert settings.available_cores() == 2 and load_settings().worker_count() == 2
    monkeypatch.setattr(settings, "cpu_quota", lambda: None)
    assert load_settings().worker_count() == settings.AUTO_WORKERS_MAX
    assert load_settings(workers=3).worker_count() == 3
    monkeypatch.setattr(settings, "cpu_quota", lambda: 0.5)
    assert settings.available_cores() == 1 and load_settings().worker_count() == 1
    # No CPU limit (a Kubernetes pod with only a request): MTRANK_CPUS says how many cores are its.
    monkeypatch.setattr(settings, "cpu_quota", lambda: None)
    monkeypatch.setenv("MTRANK_CPUS", "4")
    s = load_settings()
    assert (s.cores(), s.worker_count(), s.concurrency(s.cores() // s.worker_count())) == (4, 4, (2, 1))


# -- batcher (a real ONNX Runtime session on a tiny graph) ----------------------------------


def _tiny_graph(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).normal(0, 1, (4, 2)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["dense", "w"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Gather", ["p", "k0"], ["a"], axis=1),
        helper.make_node("Gather", ["p", "k1"], ["b"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch"]) for n in ("a", "b")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, np.int64), "k0"),
         numpy_helper.from_array(np.array(1, np.int64), "k1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def tiny_runner(tmp_path_factory) -> GraphRunner:
    runner = GraphRunner(_tiny_graph(tmp_path_factory.mktemp("tiny") / "tiny.onnx"), device="cpu",
                         intra_op_threads=1)
    runner.warm_up((1, 64))
    return runner


class _Recorder:
    """Wraps a runner's run to record the rows of every inference call and how many ran at once."""

    def __init__(self, runner: GraphRunner, delay_s: float = 0.0):
        self.runner = runner
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, feed):
        with self._lock:
            self.batches.append(len(feed["dense"]))
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            return self.runner.run(feed)
        finally:
            with self._lock:
                self.running -= 1


def _batcher(runner: GraphRunner, run=None, **kwargs) -> Batcher:
    return Batcher(run or runner.run, runner.output_names, "tiny", "all", "cpu", **kwargs)


def _rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 4)).astype(np.float32)


def test_batcher_runs_at_once_when_idle_and_merges_what_queues_while_busy(tiny_runner):
    async def main():
        rec = _Recorder(tiny_runner, delay_s=0.1)
        batcher = _batcher(tiny_runner, rec, max_batch_rows=1000, max_queue_delay_s=0.05)
        inputs = [_rows(i, n) for i, n in enumerate([3, 1, 7, 5, 2, 9])]
        deadline = time.monotonic() + 5
        first = asyncio.ensure_future(batcher.submit({"dense": inputs[0]}, deadline))
        await asyncio.sleep(0.02)  # the first is running: the five behind it queue
        outs = await asyncio.gather(first, *(batcher.submit({"dense": x}, deadline) for x in inputs[1:]))
        await batcher.close()
        return rec.batches, inputs, outs

    batches, inputs, outs = asyncio.run(main())
    assert batches == [3, 24]  # the first request ran alone at once; the five behind it in one call
    for x, out in zip(inputs, outs, strict=True):
        alone_a, alone_b = tiny_runner.run({"dense": x})
        assert out["a"].shape == (len(x),)
        np.testing.assert_allclose(out["a"], alone_a, atol=1e-6, rtol=0)
        np.testing.assert_allclose(out["b"], alone_b, atol=1e-6, rtol=0)


def test_batch_invariance_scores_do_not_depend_on_batch_neighbours(tiny_runner):
    """A request's outputs are the same alone, batched with small and with large neighbours."""
    x = _rows(99, 11)

    async def scores(neighbours: list[np.ndarray]) -> dict[str, np.ndarray]:
        batcher = _batcher(tiny_runner, max_batch_rows=4096, max_queue_delay_s=0.05)
        deadline = time.monotonic() + 5
        results = await asyncio.gather(*(batcher.submit({"dense": r}, deadline) for r in [*neighbours, x]))
        await batcher.close()
        return results[-1]

    alone = asyncio.run(scores([]))
    for neighbours in ([_rows(1, 1)], [_rows(i, 200) for i in range(5)], [_rows(7, 2000)]):
        batched = asyncio.run(scores(neighbours))
        for name in ("a", "b"):
            np.testing.assert_allclose(batched[name], alone[name], atol=1e-6, rtol=0)


def test_batcher_splits_at_max_batch_rows_and_runs_an_oversized_request_whole_when_busy(tiny_runner):
    async def main():
        rec = _Recorder(tiny_runner)
        batcher = _batcher(tiny_runner, rec, max_batch_rows=10, max_queue_delay_s=0.02, max_concurrent=1)
        deadline = time.monotonic() + 5
        big = _rows(2, 25)
        outs = await asyncio.gather(*(batcher.submit({"dense": x}, deadline) for x in [_rows(0, 6), _rows(1, 6), big]))
        await batcher.close()
        return rec.batches, big, outs[-1]

    batches, big, out = asyncio.run(main())
    # 6 runs at once; 6 waits alone (6 + 6 > 10); the 25-row request, arriving at a busy graph, runs whole.
    assert batches == [6, 6, 25]
    alone = tiny_runner.run({"dense": big})
    np.testing.assert_allclose(out["a"], alone[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["b"], alone[1], atol=1e-6, rtol=0)


def test_a_large_request_on_an_idle_graph_runs_as_chunks_at_the_same_time(tiny_runner):
    rec = _Recorder(tiny_runner, delay_s=0.1)

    async def main():
        batcher = _batcher(tiny_runner, rec, max_batch_rows=10, max_queue_delay_s=0.0, max_concurrent=2)
        out = await batcher.submit({"dense": _rows(5, 20)}, time.monotonic() + 10)
        await batcher.close()
        return out

    assert len(asyncio.run(main())["a"]) == 20 and rec.peak == 2


def test_batcher_full_queue_raises_overloaded(tiny_runner):
    async def main():
        batcher = _batcher(tiny_runner, _Recorder(tiny_runner, delay_s=0.2), max_batch_rows=8,
                           max_queue_delay_s=0.0, max_queue_rows=20, max_concurrent=1)
        deadline = time.monotonic() + 5
        first = asyncio.ensure_future(batcher.submit({"dense": _rows(0, 8)}, deadline))
        await asyncio.sleep(0.05)  # the first batch is running; the queue is empty again
        waiting = [asyncio.ensure_future(batcher.submit({"dense": _rows(i, 8)}, deadline)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit({"dense": _rows(3, 8)}, deadline)
        await asyncio.gather(first, *waiting)
        await batcher.close()

    asyncio.run(main())


def test_batcher_drops_expired_and_cancelled_requests_before_running_them(tiny_runner):
    async def main():
        rec = _Recorder(tiny_runner, delay_s=0.1)
        batcher = _batcher(tiny_runner, rec, max_batch_rows=1000, max_queue_delay_s=0.0, max_concurrent=1)
        now = time.monotonic()
        busy = asyncio.ensure_future(batcher.submit({"dense": _rows(0, 2)}, now + 5))
        await asyncio.sleep(0.02)  # the worker is inside the first run; these three wait
        expired = asyncio.ensure_future(batcher.submit({"dense": _rows(1, 3)}, now + 0.05))
        gone = asyncio.ensure_future(batcher.submit({"dense": _rows(2, 4)}, now + 5))
        alive = asyncio.ensure_future(batcher.submit({"dense": _rows(3, 5)}, now + 5))
        await asyncio.sleep(0)
        gone.cancel()
        await busy
        out = await alive
        with pytest.raises(DeadlineExceeded):
            await expired
        await batcher.close()
        return rec.batches, out

    batches, out = asyncio.run(main())
    assert batches == [2, 5] and len(out["a"]) == 5


def test_the_batch_size_is_where_rows_per_second_peaks():
    # Seconds per call of a graph that is fastest per row at 256 rows and slows down after.
    timings = [(1, 0.0001), (64, 0.002), (128, 0.0035), (256, 0.006), (512, 0.0125), (1024, 0.03), (4096, 0.15)]
    assert best_batch_rows(timings) == 256
    assert best_batch_rows(timings, within=0.5) == 64
    # The demo PLE on one thread (rows/s, bench run): 128 is within 10 % of the 512 peak, 256 within 3 %.
    measured = [(n, n / rate) for n, rate in ((1, 3e3), (64, 56e3), (128, 65e3), (256, 71e3), (512, 73e3),
                                              (1024, 69e3), (4096, 58e3))]
    assert best_batch_rows(measured) == 256
    flat = [(1, 0.001), (64, 0.002), (128, 0.004), (4096, 0.128)]  # constant per-row cost past 64
    assert best_batch_rows(flat) == 64


def test_a_lone_request_does_not_wait_for_the_queue_delay(tiny_runner):
    async def main():
        batcher = _batcher(tiny_runner, max_queue_delay_s=30.0)
        # Far below the 30 s delay: an idle graph runs the request at once.
        out = await asyncio.wait_for(batcher.submit({"dense": _rows(0, 4)}, time.monotonic() + 60), timeout=5.0)
        await batcher.close()
        return out

    assert len(asyncio.run(main())["a"]) == 4


def test_several_batches_of_a_graph_run_at_once(tiny_runner):
    rec = _Recorder(tiny_runner, delay_s=0.2)

    async def staggered():
        batcher = _batcher(tiny_runner, rec, max_queue_delay_s=0.0, max_concurrent=3)
        deadline = time.monotonic() + 10

        async def later(i: int):
            await asyncio.sleep(0.02 * i)
            return await batcher.submit({"dense": _rows(i, 2)}, deadline)

        await asyncio.gather(*(later(i) for i in range(3)))
        await batcher.close()

    asyncio.run(staggered())
    assert rec.peak == 3


def test_a_request_that_cannot_meet_its_deadline_is_refused_before_it_queues(tiny_runner):
    async def main():
        load = LoadEstimate(parallelism=1)
        load.observe(rows=100, seconds=1.0)  # the engine does 100 rows/s
        batcher = _batcher(tiny_runner, _Recorder(tiny_runner, delay_s=0.3), max_queue_delay_s=0.0,
                           max_concurrent=1, load=load)
        now = time.monotonic()
        running = asyncio.ensure_future(batcher.submit({"dense": _rows(0, 50)}, now + 10))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(batcher.submit({"dense": _rows(1, 50)}, now + 10))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:  # 25 + 50 + 50 rows ahead at 100 rows/s: 1.25 s
            await batcher.submit({"dense": _rows(2, 50)}, now + 0.5)
        assert refused.value.retry_after_s >= 1
        later = await batcher.submit({"dense": _rows(3, 10)}, now + 30)  # a patient one is taken
        await asyncio.gather(running, queued)
        await batcher.close()
        return later

    assert len(asyncio.run(main())["a"]) == 10


def test_admission_refuses_a_body_before_reading_it_only_when_busy():
    load = LoadEstimate(parallelism=1)
    admission = Admission(load)
    admission.check("100000", budget_s=0.001)  # nothing learnt yet: admitted
    admission.learn(body_bytes=10_000, rows=100)  # 100 bytes per candidate
    load.observe(rows=1000, seconds=1.0)  # 1000 rows/s
    admission.check("100000", budget_s=0.5)  # idle: admitted, it would run at once
    load.queued_rows = 2000
    with pytest.raises(Overloaded):
        admission.check("100000", budget_s=0.5)  # ~1000 rows behind 2000 queued: ~3 s
    admission.check("1000", budget_s=3.0)  # a small one fits


def test_unbatched_mode_runs_one_request_per_inference(tiny_runner):
    async def main():
        rec = _Recorder(tiny_runner)
        batcher = _batcher(tiny_runner, rec, max_queue_delay_s=0.05, batching=False)
        deadline = time.monotonic() + 5
        await asyncio.gather(*(batcher.submit({"dense": _rows(i, 3)}, deadline) for i in range(4)))
        return rec.batches

    assert asyncio.run(main()) == [3, 3, 3, 3]


# -- embedding stores -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_version(tmp_path_factory) -> Path:
    return build_toy_version(tmp_path_factory.mktemp("toy-repo"), "toy", 1)


def _tables(vdir: Path) -> dict[str, LocalTable]:
    from mtrank.manifest import load_manifest

    m = load_manifest(vdir)
    return {f: LocalTable(m.name, m.version, info, vdir) for f, info in m.tables.items()}


def test_the_ids_of_a_lookup_are_asked_once_each_in_first_seen_order():
    ids = ["a7", "a2", "a7", "a9", "a2", "a7"]
    distinct, inverse = unique_ids(ids)
    assert distinct == ["a7", "a2", "a9"] and inverse.tolist() == [0, 1, 0, 2, 1, 0]
    assert [distinct[j] for j in inverse] == ids
    assert unique_ids(["v1", "v2"]) == (["v1", "v2"], None)  # distinct already: no gather


def test_in_process_store_gives_default_vectors_for_missing_ids(toy_version):
    table = _tables(toy_version)["item_id"]
    ids = [TOY_ITEMS[3], "no-such-item", TOY_ITEMS[3], "", TOY_ITEMS[0]]
    vectors, missing, degraded = asyncio.run(lookup(InProcessStore(), table, ids))
    assert vectors.shape == (5, table.width) and vectors.dtype == np.float32
    assert (missing, degraded) == (2, False)
    np.testing.assert_array_equal(vectors[1], table.vectors[0])
    np.testing.assert_array_equal(vectors[3], table.vectors[0])
    np.testing.assert_array_equal(vectors[0], table.vectors[4])  # row i + 1 holds ids[i]
    np.testing.assert_array_equal(vectors[4], table.vectors[1])


@pytest.mark.redis
def test_redis_and_in_process_stores_return_identical_vectors(toy_version, redis_url, redis_prefix):
    from mtrank.export.store_loader import load_embeddings

    load_embeddings(toy_version.parent.parent, "toy", redis_url, prefix=redis_prefix, progress=False)
    tables = _tables(toy_version)
    requests = [
        (tables["user_id"], [TOY_USERS[5]]),
        (tables["item_id"], [*TOY_ITEMS[:40], "missing-1", TOY_ITEMS[7]]),
        (tables["author_id"], ["a3", "a3", "nope", "a59"]),
    ]

    async def main():
        store = open_url(redis_url, prefix=redis_prefix, timeout_s=1.0)
        try:
            assert await store.version_problem(list(tables.values())) is None
            first, degraded1 = await store.lookup_many(requests)
            cached, degraded2 = await store.lookup_many(requests)  # now from the in-process cache
            return first, cached, degraded1 or degraded2, len(store.cache)
        finally:
            await store.close()

    from_redis, from_cache, degraded, cached_entries = asyncio.run(main())
    local, _ = asyncio.run(InProcessStore().lookup_many(requests))
    assert not degraded and cached_entries == 1 + 41 + 3
    for r, c, loc in zip(from_redis, from_cache, local, strict=True):
        np.testing.assert_array_equal(r.vectors, loc.vectors)
        np.testing.assert_array_equal(c.vectors, loc.vectors)
        assert r.missing == c.missing == loc.missing


@pytest.mark.redis
def test_redis_store_reports_a_version_whose_tables_are_not_loaded(toy_version, redis_url, redis_prefix):
    async def main():
        store = open_url(redis_url, prefix=redis_prefix, timeout_s=1.0)
        try:
            return await store.version_problem(list(_tables(toy_version).values()))
        finally:
            await store.close()

    problem = asyncio.run(main())
    assert problem is not None and "not loaded in Redis" in problem and "load-embeddings" in problem


def test_unreachable_redis_degrades_to_default_vectors_and_retries_after_backoff(toy_version):
    table = _tables(toy_version)["item_id"]

    async def main():
        store = open_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2, retry_s=0.3)
        try:
            vectors, missing, degraded = await lookup(store, table, TOY_ITEMS[:4])
            reason_now = await store.health()
            started = time.perf_counter()
            await lookup(store, table, TOY_ITEMS[:4])  # breaker open: no Redis call, no wait
            fast = time.perf_counter() - started
            await asyncio.sleep(0.35)
            reason_later = await store.health()  # retries (and fails) again
            return vectors, missing, degraded, reason_now, fast, reason_later
        finally:
            await store.close()

    vectors, missing, degraded, reason_now, fast, reason_later = asyncio.run(main())
    assert degraded and missing == 0  # not fetched is not "missing from the table"
    np.testing.assert_array_equal(vectors, np.repeat(table.vectors[:1], 4, axis=0))
    assert "degraded" in reason_now and "degraded" in reason_later and fast < 0.05


def test_workers_start_the_next_batch_while_the_event_loop_is_busy(tiny_runner):
    rec = _Recorder(tiny_runner, delay_s=0.05)

    async def main():
        batcher = _batcher(tiny_runner, rec, max_batch_rows=4, max_queue_delay_s=0.0, max_concurrent=1)
        deadline = time.monotonic() + 10
        futures = [asyncio.ensure_future(batcher.submit({"dense": _rows(i, 4)}, deadline)) for i in range(3)]
        await asyncio.sleep(0.01)  # all three queued, the first running
        time.sleep(0.4)  # the loop is busy far longer than the three batches take
        ran_while_blocked = list(rec.batches)
        outs = await asyncio.gather(*futures)
        await batcher.close()
        return ran_while_blocked, outs

    ran_while_blocked, outs = asyncio.run(main())
    assert ran_while_blocked == [4, 4, 4] and all(len(o["a"]) == 4 for o in outs)


def _answer_at(admission: Admission, concurrency: int, latency_s: float, answers: int = 200) -> None:
    """``answers`` requests answered in ``latency_s`` each with ``concurrency`` in flight."""
    for _ in range(answers):
        admission.inflight = concurrency
        admission.answered(latency_s)


def test_admission_limits_requests_in_flight_to_what_the_deadline_allows():
    admission = Admission(LoadEstimate(parallelism=2), parallel=2)
    # 16 in flight answered in 150 ms each: ~107 answers/s. A 500 ms deadline allows 200 ms
    # (LATENCY_SHARE), so all 16 may stay in flight: a saturated closed loop is not cut down.
    _answer_at(admission, 16, 0.150)
    assert admission.inflight_limit(0.5) == float("inf")
    admission.inflight = 16
    admission.check(None, budget_s=0.5)
    # At 400 ms each (e.g. the loop falling behind), ~40 answers/s: 200 ms allows 8 in flight.
    _answer_at(admission, 16, 0.400)
    assert admission.inflight_limit(0.5) == pytest.approx(8.0, rel=0.02)
    admission.inflight = 9
    with pytest.raises(Overloaded, match="9 requests in flight, the most that can be answered within 40% of the 500"):
        admission.check(None, budget_s=0.5)
    admission.inflight = 7
    admission.check(None, budget_s=0.5)
    admission.inflight = 12
    admission.check(None, budget_s=2.0)  # 40 % of a 2 s deadline is 800 ms: no limit
    # Never below the engine's parallelism + 1, however slow the answers.
    _answer_at(admission, 4, 2.0)
    assert admission.inflight_limit(0.5) == 3.0
    admission.inflight = 2
    admission.check(None, budget_s=0.5)
    # The loop caught up: no limit.
    _answer_at(admission, 4, 0.010)
    admission.inflight = 50
    admission.check(None, budget_s=0.5)


def test_a_failed_inference_fails_its_batch_only_and_the_worker_goes_on(tiny_runner):
    calls = []

    def run(feed):
        calls.append(len(feed["dense"]))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return tiny_runner.run(feed)

    async def main():
        batcher = _batcher(tiny_runner, run, max_concurrent=1)
        deadline = time.monotonic() + 5
        with pytest.raises(RuntimeError, match="inference failed: out of memory"):
            await batcher.submit({"dense": _rows(0, 3)}, deadline)
        out = await batcher.submit({"dense": _rows(1, 4)}, deadline)
        await batcher.close()
        return out

    assert len(asyncio.run(main())["a"]) == 4 and calls == [3, 4]


def test_close_waits_for_the_running_batch_and_fails_what_is_queued(tiny_runner):
    rec = _Recorder(tiny_runner, delay_s=0.2)

    async def main():
        batcher = _batcher(tiny_runner, rec, max_batch_rows=4, max_queue_delay_s=0.0, max_concurrent=1)
        deadline = time.monotonic() + 5
        running = asyncio.ensure_future(batcher.submit({"dense": _rows(0, 4)}, deadline))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit({"dense": _rows(1, 4)}, deadline))
        await asyncio.sleep(0.01)
        await batcher.close()
        assert not any(w.is_alive() for w in batcher._workers)
        with pytest.raises(DeadlineExceeded, match="unloaded"):
            await queued
        with pytest.raises(DeadlineExceeded, match="unloaded"):
            await batcher.submit({"dense": _rows(2, 4)}, deadline)
        return await running

    assert len(asyncio.run(main())["a"]) == 4 and rec.batches == [4]


def test_event_loop_lag_is_what_a_blocked_loop_delays_a_timer():
    from mtrank.service import metrics
    from mtrank.service.serving import watch_event_loop_lag

    def lag_sum() -> float:
        return next(s.value for s in metrics.EVENT_LOOP_LAG.collect()[0].samples if s.name.endswith("_sum"))

    async def main() -> tuple[float, float, float]:
        watcher = asyncio.get_running_loop().create_task(watch_event_loop_lag(interval_s=0.01))
        await asyncio.sleep(0.1)  # idle: timers fire on time
        idle = lag_sum() - before
        started = time.perf_counter()
        time.sleep(0.3)  # a step that holds the loop
        held = time.perf_counter() - started
        await asyncio.sleep(0.05)
        watcher.cancel()
        return idle, lag_sum() - before, held

    before = lag_sum()
    idle, blocked, held = asyncio.run(main())
    # Bounds from the measured hold, not from the 0.3 s asked for: on a loaded host the sleep itself
    # overruns and each idle timer may fire a few milliseconds late.
    assert idle < 0.1
    assert held - 0.05 <= blocked - idle <= held + 0.1


def test_workers_time_their_graphs_one_at_a_time(tmp_path, monkeypatch):
    from mtrank.service.workers import WARM_UP_LOCK_VARIABLE, warm_up_turn

    monkeypatch.setenv(WARM_UP_LOCK_VARIABLE, str(tmp_path / "warm-up.lock"))
    spans: list[tuple[float, float]] = []

    def turn() -> None:
        with warm_up_turn():
            started = time.monotonic()
            time.sleep(0.2)
            spans.append((started, time.monotonic()))

    threads = [threading.Thread(target=turn) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans)), spans


def test_a_busy_loop_accepts_every_waiting_connection_at_once():
    """On a loop whose iterations each take 20 ms (a busy service), 100 connections that wait in the
    kernel's queue are all accepted within a few iterations (libuv alone takes one per iteration)."""
    from mtrank.service.listener import listening_socket, loop_factory

    made: list[float] = []

    class Counting(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(time.monotonic())

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        sock = listening_socket("127.0.0.1", 0)
        server = await loop.create_server(Counting, sock=sock)
        port = sock.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        stop = time.monotonic() + 0.3

        def busy() -> None:
            time.sleep(0.02)
            if time.monotonic() < stop:
                loop.call_soon(busy)

        started = time.monotonic()
        loop.call_soon(busy)
        while time.monotonic() < stop:
            await asyncio.sleep(0.02)
        server.close()
        sock.close()
        for c in clients:
            c.close()
        return len(made), max(made) - started if made else float("inf")

    factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        accepted, last_s = runner.run(main())
    assert accepted == 100, f"{accepted} of 100 waiting connections accepted in 0.3 s of a busy loop"
    assert last_s < 0.15, f"the last connection was accepted {last_s * 1000:.0f} ms after the loop got busy"


def test_refusals_beyond_a_multiple_of_the_answer_rate_are_paced():
    from mtrank.service.admission import BURST_S, MAX_HOLD_S, REFUSAL_FLOOR_PER_S, REFUSALS_PER_ANSWER

    now = [1000.0]
    admission = Admission(LoadEstimate(parallelism=1), clock=lambda: now[0])
    # Nothing answered: the floor rate, BURST_S of it at once, then one per 1/rate.
    burst = int(REFUSAL_FLOOR_PER_S * BURST_S)
    holds = [admission.refusal_hold_s(budget_s=0.5) for _ in range(burst + 3)]
    assert holds[:burst] == [0.0] * burst
    assert holds[burst:] == pytest.approx([1 / REFUSAL_FLOOR_PER_S, 2 / REFUSAL_FLOOR_PER_S, 3 / REFUSAL_FLOOR_PER_S])
    # However many wait, none is held past the deadline or MAX_HOLD_S.
    assert max(admission.refusal_hold_s(budget_s=0.2) for _ in range(500)) == pytest.approx(0.2)
    assert max(admission.refusal_hold_s(budget_s=30.0) for _ in range(500)) == pytest.approx(MAX_HOLD_S)
    assert admission.held == 3 + 1000
    assert admission.refusal_hold_s(budget_s=-0.01) == 0.0 and admission.held == 1003  # past its deadline

    # Answers at 16 in flight, 200 ms each: 80 a second by Little's law, and so many times that at once.
    admission = Admission(LoadEstimate(parallelism=1), clock=lambda: now[0])
    _answer_at(admission, 16, 0.200)
    assert admission.answer_rate() == pytest.approx(80.0, rel=0.02)
    rate = REFUSALS_PER_ANSWER * admission.answer_rate()
    assert rate > REFUSAL_FLOOR_PER_S
    at_once = 0
    while (hold := admission.refusal_hold_s(budget_s=0.5)) == 0.0:
        at_once += 1
    assert at_once == int(rate * BURST_S) and 0 < hold <= 1 / rate
    assert admission.refusal_hold_s(budget_s=0.5) - hold == pytest.approx(1 / rate, rel=0.02)
    # The rate is the service's, not the moment's: a pause does not bring back the floor.
    now[0] += 10.0
    assert admission.answer_rate() == pytest.approx(80.0, rel=0.02)
