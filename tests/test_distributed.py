"""Data-parallel training with real torch.distributed workers (gloo on CPU): ``mtrank train --nproc
2`` and a plain ``torchrun`` run the same job, reproducibly, close to one process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtrank.cli import main
from mtrank.training.checkpoint import partial_dir

MODEL = {"embedding_dim": 4, "bottom_hidden": [32], "tower_hidden": [8]}
TRAIN = {"epochs": 1, "batch_size": 256, "eval_train_rows": 1000, "seed": 3}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    from mtrank.training.synth import generate

    out = tmp_path_factory.mktemp("ddp-data")
    generate(out, rows=20_000, seed=7, progress=False, shards=4)
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp-config") / "config.yaml"
    path.write_text(yaml.safe_dump({"name": "shared_bottom", "model": MODEL, "train": TRAIN}))
    return path


def _argv(data: Path, out: Path, config: Path) -> list[str]:
    return ["train", "--model", "shared_bottom", "--data", str(data), "--out", str(out), "--config", str(config)]


@pytest.fixture(scope="module")
def two_workers(sharded, config, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp-runs") / "nproc2"
    assert main([*_argv(sharded, out, config), "--nproc", "2"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_two_workers_train_every_row_once_and_say_so(two_workers, sharded):
    assert two_workers["workers"] == 2
    assert two_workers["rows_seen"] == two_workers["train_rows"] == 16_000
    per_worker = two_workers["samples_per_second_per_worker"]
    assert two_workers["samples_per_second"] == pytest.approx(2 * per_worker, rel=1e-3)


def test_two_workers_land_near_one_process(two_workers, sharded, config, tmp_path):
    assert main(_argv(sharded, tmp_path / "one", config)) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["workers"] == 1
    # Same global batch and steps; only the batches' composition differs.
    assert abs(two_workers["avg_auc"] - one["avg_auc"]) < 0.02, (two_workers["avg_auc"], one["avg_auc"])


def _torchrun(sharded: Path, out: Path, config: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mtrank.cli", *_argv(sharded, out, config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})


def _worker_errors(stderr: str) -> str:
    """The lines of a failed torchrun that say why a worker died (its tail is the launcher's summary)."""
    keys = ("error", "Error", "terminate", "Exception", "abort", "Signal")
    return "\n".join(line for line in stderr.splitlines() if any(k in line for k in keys))[-3000:]


def test_plain_torchrun_runs_the_same_job_reproducibly(two_workers, sharded, config, tmp_path):
    out = tmp_path / "torchrun"
    done = _torchrun(sharded, out, config)
    assert done.returncode == 0, _worker_errors(done.stderr) + "\n" + done.stderr[-2000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["workers"] == 2
    assert report["tasks"] == two_workers["tasks"], "one seed and one worker count give one result"


def test_bad_data_under_two_workers_is_one_line_and_writes_nothing(sharded, config, tmp_path, capfd):
    import shutil

    import pandas as pd

    data = tmp_path / "data"
    shutil.copytree(sharded, data)
    shard = data / "train" / "part-00003.parquet"
    pd.read_parquet(shard).drop(columns="item_id").to_parquet(shard, index=False)
    out = tmp_path / "run"
    assert main([*_argv(data, out, config), "--nproc", "2"]) == 2
    err = capfd.readouterr().err.strip()
    assert err == f"mtrank train: error: {shard}: missing feature column 'item_id' declared in spec 'synth_short_video'"
    assert not out.exists() and not partial_dir(out).exists()


def test_a_killed_two_worker_run_resumes_to_the_same_result(sharded, tmp_path):
    import signal
    import time

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "shared_bottom", "model": MODEL, "train": {
        "epochs": 2, "batch_size": 64, "eval_train_rows": 1000, "checkpoint_every": 7, "shuffle_rows": 1024}}))
    out = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "mtrank.cli", *_argv(sharded, out, config), "--nproc", "2"],
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, state, deadline = partial_dir(out) / "LATEST", None, time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        try:  # the checkpoint LATEST names may be replaced by a newer one (and removed) while this reads
            seen = json.loads((partial_dir(out) / "state" / latest.read_text().strip() / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        state = seen
        if state["epoch"] >= 1 and state["step"] > 0:
            break
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both workers, at once
    job.wait()
    assert state is not None and state["epoch"] >= 1 and state["step"] > 0, state
    assert not out.exists()

    assert main(["train", "--resume", str(out)]) == 0  # starts the run's two workers again
    resumed = json.loads((out / "metrics.json").read_text())
    assert main([*_argv(sharded, tmp_path / "whole", config), "--nproc", "2"]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert resumed["workers"] == 2 and resumed["rows_seen"] == whole["rows_seen"] == 2 * 16_000
    assert resumed["avg_auc"] == pytest.approx(whole["avg_auc"], abs=1e-6)


def test_a_worker_killed_by_a_signal_stops_the_job_with_a_line_naming_it(sharded, config, tmp_path):
    import signal
    import time

    out = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "mtrank.cli", *_argv(sharded, out, config), "--nproc", "2"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{job.pid}/task/{job.pid}/children")
    rank1, deadline = None, time.monotonic() + 60
    while rank1 is None and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                    rank1 = int(pid)
    assert rank1 is not None, "no worker of rank 1 seen"
    os.kill(rank1, signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGKILL
    assert "mtrank train: worker 1 was killed by SIGKILL" in err.splitlines()
    assert not out.exists()
