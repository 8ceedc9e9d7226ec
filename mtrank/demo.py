"""``mtrank demo``: synthetic data → train → export → serve, the first thing a new user runs.

Each step is skipped when its output already exists, so a second run starts serving at once.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

# Skips are bad news: a negative exponent makes a likely skip lower the score. The treatment
# bucket also favours longer videos, f(len) = (1 + log1p(len / 30 s))^0.5.
_WEIGHTS = {"vtr": 1.0, "vcr": 1.0, "finish": 0.5, "skip": -0.5, "like": 1.0, "share": 1.0}
DEMO_BUCKETS = [
    {"name": "control", "share": 50, "weights": _WEIGHTS, "length_fn": {"kind": "none"}},
    {"name": "treatment", "share": 50, "weights": _WEIGHTS,
     "length_fn": {"kind": "log1p", "alpha": 0.5, "scale": 30.0}},
]


def _step(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def sample_request(data_dir: Path, n_candidates: int = 5) -> dict:
    """A request built from real test rows: one user and a few of the items shown to users."""
    from mtrank.training.frames import load_spec
    from mtrank.training.streaming import load_split

    spec = load_spec(data_dir)
    frame = load_split(data_dir, "test", spec)
    user = frame.iloc[0]
    items = frame.drop_duplicates("item_id").head(n_candidates)
    user_fields = [f.name for f in (*spec.dense, *spec.sparse) if f.side == "user" and f.name != "user_id"]
    item_fields = [
        f.name for f in (*spec.dense, *spec.sparse) if f.side == "item" and f.name not in ("item_id", "video_len")
    ]

    def plain(v):
        return v.item() if hasattr(v, "item") else v

    return {
        "request_id": "demo-1",
        "user": {"user_id": str(user["user_id"]), "features": {k: plain(user[k]) for k in user_fields}},
        "candidates": [
            {
                "item_id": str(row["item_id"]),
                "video_len": float(row["video_len"]),
                "features": {k: plain(row[k]) for k in item_fields},
            }
            for _, row in items.iterrows()
        ],
        "top_k": n_candidates,
        "return_task_scores": True,
    }


def run_demo(workdir: Path, host: str = "127.0.0.1", port: int = 8000, rows: int = 100_000, model: str = "mfh") -> None:
    from mtrank.manifest import list_versions

    workdir = Path(workdir)
    data_dir, run_dir, repo = workdir / "data", workdir / f"run-{model}", workdir / "repo"
    if not (data_dir / "spec.yaml").is_file():
        from mtrank.training.synth import generate

        _step(f"generating {rows} synthetic impressions into {data_dir}")
        generate(data_dir, rows=rows, seed=1)
    if not (run_dir / "checkpoint.json").is_file():
        from mtrank.training.trainer import train

        config = Path(__file__).resolve().parents[1] / "configs" / f"{model}.yaml"
        _step(f"training {model} into {run_dir}")
        report = train(model, data_dir, run_dir, config_path=config if config.is_file() else None, epochs=2)
        _step(f"test avg AUC {report['avg_auc']:.4f} (oracle {report.get('avg_oracle_auc')})")
    if not list_versions(repo, model):
        from mtrank.export.exporter import export_run

        _step(f"exporting to {repo}")
        export_run(run_dir, repo, name=model)

    body = json.dumps(sample_request(data_dir))
    url = f"http://{host}:{port}/v1/rank"
    print("\nReady-to-paste request (once the server says it is up):\n", file=sys.stderr)
    print(f"curl -s {url} -H 'content-type: application/json' -d {shlex.quote(body)}\n", file=sys.stderr, flush=True)

    from mtrank.service.main import serve

    if "MTRANK_BUCKETS" not in os.environ:
        os.environ["MTRANK_BUCKETS"] = json.dumps(DEMO_BUCKETS)
        _step("A/B buckets: control and treatment (see mtrank/demo.py; MTRANK_BUCKETS overrides)")
    _step(f"serving {repo} on http://{host}:{port} (in-process embedding store; Ctrl-C stops)")
    serve(repo=repo, host=host, port=port, store_url=None)
