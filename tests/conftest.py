"""Shared fixtures: a real Redis, a small synthetic data set, trained runs and exported versions.

Expensive artefacts are session-scoped and cached by model name, so every test file that needs
"a trained PLE" or "an exported MFH" shares one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_REDIS_URL = os.environ.get("MTRANK_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# Small but realistic: every group and facet present, trains in seconds.
SYNTH_ROWS = 20_000
SYNTH_SEED = 7
FAST_MODEL_CONFIGS = {
    "train": {"epochs": 1, "batch_size": 512, "eval_train_rows": 2000, "threads": 1},
}


def _need(reason: str) -> None:
    """A missing dependency fails in CI and skips on a developer machine."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing dependency is a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as e:
        _need(f"no Redis at {TEST_REDIS_URL}: {e}")
    return TEST_REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str):
    """A key namespace of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"mtrank-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from mtrank.training.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, rows=SYNTH_ROWS, seed=SYNTH_SEED, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(synth_dir: Path, tmp_path_factory) -> Callable[[str], Path]:
    """``trained_run("ple")`` → a run directory trained for one short epoch (cached)."""
    import yaml

    from mtrank.training.trainer import train

    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            out = tmp_path_factory.mktemp(f"run-{model}")
            config = out / "config.yaml"
            config.write_text(yaml.safe_dump(FAST_MODEL_CONFIGS))
            train(model, synth_dir, out, config_path=config, progress=False)
            cache[model] = out
        return cache[model]

    return get


@pytest.fixture(scope="session")
def exported_repo(trained_run, tmp_path_factory) -> Callable[[str], Path]:
    """``exported_repo("ple")`` → a model repository holding version 1 of model ``ple`` (cached)."""
    from mtrank.export.exporter import export_run

    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            repo = tmp_path_factory.mktemp(f"repo-{model}")
            export_run(trained_run(model), repo, name=model)
            cache[model] = repo
        return cache[model]

    return get
