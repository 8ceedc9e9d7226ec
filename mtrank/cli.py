"""The ``mtrank`` command. Subcommands import their stage lazily: serving never loads torch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _synth(a: argparse.Namespace) -> None:
    from mtrank.training.synth import generate

    generate(a.out, rows=a.rows, seed=a.seed, shards=a.shards, history=a.history)
    splits = f"{{train,valid,test}}/ ({a.shards} Parquet files each)" if a.shards else "{train,valid,test}.parquet"
    print(f"wrote {a.out}/{splits} and {a.out}/spec.yaml")


def _train(a: argparse.Namespace) -> int:
    if a.resume is None and None in (a.model, a.data, a.out):
        raise CLIError("--model, --data and --out are required (or --resume RUN to continue a killed run)")
    nproc = a.nproc
    if a.resume is not None and nproc is None:
        from mtrank.training.trainer import resume_world

        nproc = resume_world(a.resume)
    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        from mtrank.training.distributed import launch

        return launch(_without_option(a.argv, "--nproc"), nproc)
    if a.resume is not None:
        from mtrank.training.trainer import resume

        report = resume(a.resume, progress=True)
        out = a.resume
    else:
        from mtrank.training.trainer import train

        overrides = {"lr": a.lr, "batch_size": a.batch_size, "patience": a.patience, "threads": a.threads,
                     "loss_weighting": a.loss_weighting}
        report = train(
            a.model, a.data, a.out, config_path=a.config, epochs=a.epochs, seed=a.seed,
            baseline=a.baseline, spec_path=a.spec, overrides={k: v for k, v in overrides.items() if v is not None},
        )
        out = a.out
    if report is not None:  # rank 0 of a data-parallel job, or the only process
        _print_summary(report)
        print(f"wrote {out}/metrics.json")
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _evaluate(a: argparse.Namespace) -> None:
    from mtrank.training.evaluate import evaluate_run

    report = evaluate_run(a.run, a.data, split=a.split, baseline=a.baseline, stem_pair=a.stem_pair)
    _print_summary(report)
    print(f"wrote {a.run}/{'metrics.json' if a.split == 'test' else f'metrics.{a.split}.json'}")


def _export(a: argparse.Namespace) -> None:
    from mtrank.export.exporter import export_run

    version_dir = export_run(a.run, a.repo, name=a.name, fp16=a.fp16)
    print(f"wrote {version_dir}")


def _load_embeddings(a: argparse.Namespace) -> None:
    from mtrank.export.store_loader import load_embeddings

    # From the environment (a Kubernetes Secret, say), the URL and its password stay out of the
    # process's arguments, which every user of the host can read.
    url = _store_flag(a, "load-embeddings") or os.environ.get("MTRANK_STORE_URL") or os.environ.get("MTRANK_REDIS_URL")
    if not url:
        sys.exit("mtrank load-embeddings: no store URL: pass --store or set MTRANK_STORE_URL")
    load_embeddings(a.repo, a.model, url, version=a.version, prune=a.prune, shards=a.shards,
                    prefix=_store_prefix(a))


def _store_prefix(a: argparse.Namespace) -> str:
    """``--prefix``, else the service's ``MTRANK_STORE_PREFIX`` (or its old name), else ``mtrank``:
    the loaders write where a service with the same environment reads."""
    from mtrank import store_keys

    return (a.prefix or os.environ.get("MTRANK_STORE_PREFIX") or os.environ.get("MTRANK_REDIS_PREFIX")
            or store_keys.DEFAULT_PREFIX)


def _add_prefix(s: argparse.ArgumentParser) -> None:
    s.add_argument("--prefix", help="key prefix in the store, as the service's MTRANK_STORE_PREFIX "
                                    "(default MTRANK_STORE_PREFIX, else mtrank)")


def _store_flag(a: argparse.Namespace, command: str) -> str | None:
    """``--store``, or the deprecated ``--redis`` with one warning."""
    if a.redis is not None:
        print(f"mtrank {command}: warning: --redis is deprecated; use --store (it still works in this version)",
              file=sys.stderr)
    return a.store if a.store is not None else a.redis


def _serve(a: argparse.Namespace) -> None:
    from mtrank.service.main import serve

    serve(repo=a.repo, host=a.host, port=a.port, store_url=_store_flag(a, "serve"))


def _bench(a: argparse.Namespace) -> None:
    from mtrank.bench.harness import run_bench

    run_bench(a)


def _positive_ints(text: str) -> list[int]:
    """``"20,500"`` → ``[20, 500]``; anything else is an argparse error (exit 2)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    """A positive integer; anything else is an argparse error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _tune_fusion(a: argparse.Namespace) -> None:
    from mtrank.training.fusion_tuning import TuningConfig, parse_task_values, tune_fusion

    cfg = TuningConfig(
        value=parse_task_values(a.value, "--value") if a.value else None,
        objective=a.objective, k=a.k, length_fn=a.length_fn, budget=a.budget, seed=a.seed,
        treatment_share=a.treatment_share, max_task_loss=a.max_task_loss,
        baseline_weights=parse_task_values(a.baseline_weights, "--baseline-weights") if a.baseline_weights else None,
        group_by=a.group_by, weight_bound=a.weight_bound, watch_task=a.watch_task, model=a.model,
    )
    report = tune_fusion(a.run, a.data, a.out, cfg, progress=not a.quiet)
    b, t, name = report["baseline"], report["tuned"], f"{a.objective}@{a.k}"

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:+.2f} %"

    print(f"{name} on {report['splits']['heldout']}: baseline {b['heldout']:.4f} → tuned {t['heldout']:.4f} "
          f"({pct(report['improvement']['heldout'])})"
          + (f"; oracle {b['heldout_oracle']:.4f} → {t['heldout_oracle']:.4f} "
             f"({pct(report['improvement']['heldout_oracle'])})" if b["heldout_oracle"] is not None else ""))
    if not report["found_better"]:
        print("no candidate beat the baseline on valid: the treatment bucket repeats the control")
    print(f"wrote {a.out}/buckets.json, {a.out}/report.json and {a.out}/report.md")


def _demo(a: argparse.Namespace) -> None:
    from mtrank.demo import run_demo

    run_demo(a.workdir, host=a.host, port=a.port, rows=a.rows, model=a.model)


def _print_summary(report: dict) -> None:
    """One line: average AUC (only when a task is binary), then each task's AUC or MSE."""
    line = []
    if report.get("avg_auc") is not None:
        line.append(f"avg_auc={report['avg_auc']:.4f}")
    if report.get("avg_oracle_auc") is not None:
        line.append(f"avg_oracle_auc={report['avg_oracle_auc']:.4f}")
    for name, m in report.get("tasks", {}).items():
        if "auc" in m:
            line.append(f"{name}_auc={m['auc']:.4f}" if m["auc"] is not None else f"{name}_auc=None")
        else:
            # .4g: an MSE of 0.0001234 or 1234.5 keeps its significant digits.
            line.append(f"{name}_mse={m['mse']:.4g}" if m.get("mse") is not None else f"{name}_mse=None")
    print(" ".join(line))


def _add_synth(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("synth", help="generate a synthetic short-video data set")
    s.add_argument("--out", type=Path, required=True, help="directory for train/valid/test Parquet files and spec.yaml")
    s.add_argument("--rows", type=int, default=200_000, help="rows in all splits together (default 200000)")
    s.add_argument("--seed", type=int, default=1, help="generator seed: same seed, same data (default 1)")
    s.add_argument("--shards", type=int, default=0,
                   help="write each split as a directory of this many Parquet files (default 0: one file per split)")
    s.add_argument("--history", action="store_true",
                   help="rows also carry the user's recent history (hist_item_id, hist_category) and the item's "
                        "tags as Parquet list columns, and the truth depends on the history (docs/data.md)")
    s.set_defaults(func=_synth)


def _add_train(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train", help="train a model on a data directory")
    s.add_argument("--model", help="registered model name (single, ple, mfh, stem, ...)")
    s.add_argument("--data", type=Path,
                   help="data directory with train, valid and test splits (Parquet files or directories, or CSV)")
    s.add_argument("--out", type=Path,
                   help="run directory to write (checkpoint, metrics.json); OUT.partial holds checkpoints meanwhile")
    s.add_argument("--config", type=Path, help="YAML config with model: and train: sections (e.g. configs/ple.yaml)")
    s.add_argument("--epochs", type=int, help="most passes over the train split (overrides train.epochs)")
    s.add_argument("--seed", type=int, help="seed of initialisation and shuffling (overrides train.seed)")
    s.add_argument("--lr", type=float, help="Adam learning rate (overrides train.lr)")
    s.add_argument("--batch-size", type=int, help="rows per optimiser step (overrides train.batch_size)")
    s.add_argument("--patience", type=int,
                   help="epochs without validation improvement before stopping (overrides train.patience)")
    s.add_argument("--threads", type=int, help="torch intra-op threads (overrides train.threads)")
    s.add_argument("--loss-weighting", choices=("static", "dynamic", "uncertainty"),
                   help="how task losses are combined (overrides train.loss_weighting)")
    s.add_argument("--baseline", type=Path, help="a `single` run directory, for MTL gain")
    s.add_argument("--spec", type=Path, help="feature spec (default DATA/spec.yaml)")
    s.add_argument("--nproc", type=_positive_int,
                   help="data-parallel workers on this machine (torch.distributed: gloo on CPU, NCCL with CUDA); "
                        "under torchrun, leave it out")
    s.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue the killed run whose --out was RUN from its last checkpoint (RUN.partial)")
    s.set_defaults(func=_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("evaluate", help="recompute a run's metrics.json")
    s.add_argument("--run", type=Path, required=True, help="trained run directory")
    s.add_argument("--data", type=Path, required=True, help="data directory holding the split to score")
    s.add_argument("--split", default="test",
                   help="split to score (default test → RUN/metrics.json; others → RUN/metrics.<split>.json)")
    s.add_argument("--baseline", type=Path, help="a `single` run directory on the same data, for MTL gain")
    s.add_argument("--stem-pair", help="TASK_A,TASK_B: report the STEM paper's subsets for two tasks")
    s.set_defaults(func=_evaluate)


def _add_export(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("export", help="export a run to the model repository")
    s.add_argument("--run", type=Path, required=True, help="trained run directory")
    s.add_argument("--repo", type=Path, required=True, help="model repository root; writes REPO/NAME/<next version>/")
    s.add_argument("--name", help="model name in the repository (default: the model kind)")
    s.add_argument("--fp16", action="store_true", help="also write fp16 graphs (parity within 1e-2)")
    s.set_defaults(func=_export)


def _add_load_embeddings(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("load-embeddings", help="load a version's store-held tables into Redis")
    s.add_argument("--repo", type=Path, required=True, help="model repository root")
    s.add_argument("--model", required=True, help="model name in the repository")
    s.add_argument("--version", type=int, help="version to load (default: the newest)")
    s.add_argument("--store", help="Redis URL, as for serve --store (default MTRANK_STORE_URL)")
    s.add_argument("--redis", help="deprecated: --store")
    s.add_argument("--prune", action="store_true", help="delete the keys of the model's other versions")
    s.add_argument("--shards", type=_positive_int,
                   help="hash tags per version, shared by its tables (default: from the version's size and "
                        "the Redis Cluster's primaries, one per 64 MiB of vectors up to one per primary; "
                        "1 on a single Redis)")
    _add_prefix(s)
    s.set_defaults(func=_load_embeddings)


def _add_load_histories(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("load-histories", help="load per-user history records (sequence fields a request leaves out)")
    s.add_argument("--repo", type=Path, required=True, help="model repository root")
    s.add_argument("--model", required=True, help="model name in the repository")
    s.add_argument("--version", type=int, help="version to load (default: the newest)")
    s.add_argument("--table", type=Path, required=True,
                   help="Parquet or CSV file: a user id column and a list column per sequence field "
                        "(CSV: each list a JSON array), most recent first")
    s.add_argument("--user-column", default="user_id", help="the table's user id column (default user_id)")
    s.add_argument("--store", help="embedding store URL (default MTRANK_STORE_URL; unset or inprocess://: the "
                                   "in-process store's file REPO/<model>/<version>.histories)")
    _add_prefix(s)

    def load(a: argparse.Namespace) -> None:
        from mtrank.export.history_loader import load_histories

        url = a.store or os.environ.get("MTRANK_STORE_URL") or os.environ.get("MTRANK_REDIS_URL")
        load_histories(a.repo, a.model, a.table, version=a.version, user_column=a.user_column, store_url=url,
                       prefix=_store_prefix(a))

    s.set_defaults(func=load)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve the model repository over HTTP")
    s.add_argument("--repo", type=Path, help="model repository root (default MTRANK_MODEL_REPO)")
    s.add_argument("--host", help="address to listen on (default MTRANK_HOST or 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default MTRANK_PORT or 8000)")
    s.add_argument("--store", help="embedding store URL (redis://, rediss://, unix://, redis+cluster://, "
                                   "rediss+cluster://, inprocess://; default MTRANK_STORE_URL; unset: in-process)")
    s.add_argument("--redis", help="deprecated: --store")
    s.set_defaults(func=_serve)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench", help="benchmark engine, service, naive server, overload and lookups")
    s.add_argument("--repo", type=Path, required=True, help="model repository root")
    s.add_argument("--model", required=True, help="model name in the repository")
    s.add_argument("--out", type=Path, required=True, help="directory for the results and profiles")
    s.add_argument("--redis", default="redis://127.0.0.1:6379/15",
                   help="Redis URL of the servers' embedding store and the lookup benchmark; 'none': in-process store")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="MTRANK_DEVICE of the servers and the engine reference's provider (cuda: exit 2 when unusable)")
    s.add_argument("--quick", action="store_true", help="smoke run, under 2 minutes (CI)")
    s.add_argument("--sizes", type=_positive_ints,
                   help="candidates per request, e.g. '1000' or '20,500' (default 20,100,500,1000; quick 20,500)")
    s.add_argument("--concurrencies", type=_positive_ints,
                   help="closed-loop concurrencies, e.g. '1,4,16,64' (default 1,2,4,…,64; quick 1,16,32)")
    s.add_argument("--prepare", action="store_true",
                   help="synth, train and export the model first when REPO has no version of it")
    s.add_argument("--workers", type=int, choices=range(0, 65), metavar="N", default=0,
                   help="MTRANK_WORKERS of the servers under test (default 0, the service's default: one per core)")
    s.set_defaults(func=_bench)


def _add_tune_fusion(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("tune-fusion", help="search the fusion weights offline and write A/B buckets")
    s.add_argument("--run", type=Path, required=True, help="trained run directory (scores the logged rows)")
    s.add_argument("--data", type=Path, required=True,
                   help="data directory with valid (searched) and test (held-out) splits")
    s.add_argument("--out", type=Path, required=True, help="writes buckets.json, report.json, report.md and plots here")
    s.add_argument("--value", help="value of an impression per task, e.g. 'vtr=1,finish=2,like=5,share=10,skip=-1' "
                                   "(required by the ndcg objective)")
    s.add_argument("--objective", choices=("ndcg", "watch_time"), default="ndcg",
                   help="ndcg: mean NDCG@k of the value; watch_time: mean watch seconds (vcr × video_len) of the top k")
    s.add_argument("--k", type=int, default=10, help="rows at the top of each ranking list that count (default 10)")
    s.add_argument("--length-fn", choices=("none", "log1p", "sigmoid", "power"), default="none",
                   help="f(video_len) of the treatment; its parameters are searched too (default none: f = 1)")
    s.add_argument("--budget", type=int, default=200, help="objective evaluations of the CMA-ES search (default 200)")
    s.add_argument("--seed", type=int, default=0, help="seed of the search: same seed, same weights (default 0)")
    s.add_argument("--treatment-share", type=float, default=10.0,
                   help="percent of users in the tuned 'treatment' bucket; 'control' gets the rest (default 10)")
    s.add_argument("--max-task-loss", type=float,
                   help="guardrail: no task's own NDCG@k on valid may drop more than this percent vs the baseline")
    s.add_argument("--baseline-weights", help="untuned weights 'task=w,...' for 'control' and the search's start "
                                              "(default 1 for every task; unlisted tasks get 0)")
    s.add_argument("--group-by", help="column naming the ranking lists (default request_id or session_id when "
                                      "present, else user_id)")
    s.add_argument("--weight-bound", type=float, default=4.0,
                   help="search each weight within [-bound, bound] (default 4)")
    s.add_argument("--watch-task", default="vcr",
                   help="completion-ratio task of the watch_time objective (default vcr)")
    s.add_argument("--model", help="model name both buckets serve (default: the repository's first model)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_tune_fusion)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("demo", help="synth → train → export → serve on 127.0.0.1:8000")
    s.add_argument("--workdir", type=Path, default=Path("mtrank-demo"),
                   help="directory for the data, run and repository (default mtrank-demo)")
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000)")
    s.add_argument("--rows", type=int, default=100_000, help="synthetic rows to generate (default 100000)")
    s.add_argument("--model", default="mfh", help="model to train (default mfh)")
    s.set_defaults(func=_demo)


def _add_join_log(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("join-log", help="impression log + feedback table → a data set the trainer reads")
    s.add_argument("--impressions", type=Path, required=True, help="impression log directory (MTRANK_IMPRESSION_LOG)")
    s.add_argument("--feedback", type=Path, required=True,
                   help="feedback table (.parquet or .csv) keyed by request_id and item_id, with the spec's label "
                        "and space columns")
    s.add_argument("--out", type=Path, required=True, help="directory for train/valid/test Parquet files and spec.yaml")
    s.add_argument("--spec", type=Path, help="feature spec of the served model (default: from --repo's manifest of "
                                             "the logged model version; it has no sample spaces)")
    s.add_argument("--repo", type=Path, help="model repository holding the logged model version")
    s.add_argument("--valid-frac", type=float, default=0.1, help="share of requests, by time, in valid (default 0.1)")
    s.add_argument("--test-frac", type=float, default=0.1, help="share of the latest requests in test (default 0.1)")

    def join(a: argparse.Namespace) -> None:
        import json

        from mtrank.impression_join import join_log
        from mtrank.spec import FeatureSpec

        spec = FeatureSpec.load(a.spec) if a.spec is not None else None
        report = join_log(a.impressions, a.feedback, a.out, spec=spec, repo=a.repo, valid_frac=a.valid_frac,
                          test_frac=a.test_frac)
        print(json.dumps(report.to_dict()))
        print(f"wrote {a.out}/{{train,valid,test}}.parquet and {a.out}/spec.yaml")

    s.set_defaults(func=join)


def _add_ab_report(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("ab-report", help="impression log + feedback → per-bucket engagement, value, calibration, "
                                         "differences to control with user-clustered 95 %% CIs, SRM test "
                                         "(needs the train extra: matplotlib)")
    s.add_argument("--impressions", type=Path, required=True, help="impression log directory (MTRANK_IMPRESSION_LOG)")
    s.add_argument("--feedback", type=Path, required=True,
                   help="feedback table (.parquet or .csv) keyed by request_id and item_id, a column per task")
    s.add_argument("--out", type=Path, required=True, help="directory for report.json, report.md and the plots")
    s.add_argument("--value", help="value per impression, Σ v·label: 'vtr=1,finish=2,...' (as tune-fusion; "
                                   "default: 1 for every binary task)")
    s.add_argument("--k", type=int, default=10, help="only items shown at rank ≤ k count (default 10)")
    shares = s.add_mutually_exclusive_group()
    shares.add_argument("--buckets", help="MTRANK_BUCKETS JSON (text or a .json file): the configured shares")
    shares.add_argument("--shares", help="configured shares in percent: 'control=50,treatment=50' "
                                         "(default: equal shares of the buckets in the log)")
    s.add_argument("--control", help="control bucket (default: the first configured, else the first by name)")

    def report(a: argparse.Namespace) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("needs matplotlib: pip install 'mtrank[train]'") from None
        from mtrank.ab_report import ab_report, default_value, parse_shares, read_shown, write_report
        from mtrank.training.fusion_tuning import parse_task_values

        value = parse_task_values(a.value, "--value") if a.value else None
        configured = parse_shares(a.buckets or a.shares) if (a.buckets or a.shares) else None
        shown = read_shown(a.impressions, a.feedback, a.k)
        result = ab_report(shown, value if value is not None else default_value(shown), a.k, control=a.control,
                           shares=configured)
        write_report(result, a.out)
        print(f"wrote {a.out}/report.json, {a.out}/report.md and its plots")

    s.set_defaults(func=report)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("simulate", help="synthetic users' /v1/rank traffic to a running mtrank serve; their "
                                         "position-discounted feedback from the generator's ground truth")
    s.add_argument("--url", required=True, help="base URL of the running service, e.g. http://127.0.0.1:8000")
    s.add_argument("--data", type=Path, required=True, help="a data set made by mtrank synth (its world is rebuilt)")
    s.add_argument("--requests", type=int, required=True, help="requests to send, one user each")
    s.add_argument("--candidates", type=int, default=20, help="distinct candidates per request (default 20)")
    s.add_argument("--out", type=Path, required=True, help="feedback table to write (.parquet or .csv)")
    s.add_argument("--seed", type=int, default=0, help="seed of the traffic and the feedback draws (default 0)")
    s.add_argument("--position-discount", default="log2",
                   help="P(seen) at rank r: log2 (1/log2(r+1), default), none, geometric:G, power:A")
    s.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight at once (default 1); the feedback is the same for a seed at any value")

    def simulate(a: argparse.Namespace) -> None:
        import json

        from mtrank.training.simulate import run_simulation

        summary = run_simulation(a.url, a.data, a.requests, a.candidates, a.out, seed=a.seed,
                                 discount=a.position_discount, concurrency=a.concurrency)
        print(json.dumps(summary))

    s.set_defaults(func=simulate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtrank", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_train, _add_evaluate, _add_export, _add_load_embeddings, _add_load_histories,
                _add_serve, _add_bench, _add_tune_fusion, _add_demo, _add_join_log, _add_ab_report, _add_simulate):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from mtrank.spec import SpecError

    try:
        status = args.func(args)  # None, or the exit status of a job it launched
    except (CLIError, SpecError, FileNotFoundError, ValueError) as e:
        # In a data-parallel job every worker checks the same data and config; rank 0 says what is wrong.
        if not (os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1):
            print(f"mtrank {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status or 0


def run() -> None:
    """The console script: ``main()``'s status is the process's exit status."""
    status = main()
    # A data-parallel worker that joined its process group ends without the interpreter's
    # finalisation (mtrank.training.distributed.exit_worker). Looked up, not imported: serving never
    # loads torch.
    workers = sys.modules.get("mtrank.training.distributed")
    if workers is not None and workers.joined_group():
        workers.exit_worker(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
