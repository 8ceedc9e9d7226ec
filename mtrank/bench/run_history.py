"""``python -m mtrank.bench.run_history --repo REPO --out DIR [--redis URL|none] [--device cpu|cuda] [--quick]
[--sizes 100,500] [--prepare] [--workers N]``: the bench's history workload (:mod:`mtrank.bench.history`)
alone, without the hour of the other sections. Writes ``DIR/bench.json`` (a report of mode "history":
its section with the load average, the server, the engine curves, the service's points, the target
``history_service_over_engine_500`` and the other sizes under ``informational``) and ``DIR/bench.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtrank.bench.config import BenchError
from mtrank.bench.harness import run_history_bench


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    """The history workload alone; exit status 2 with one line on a bad option or a missing model."""
    p = argparse.ArgumentParser(prog="python -m mtrank.bench.run_history",
                                description="the bench's history workload alone")
    p.add_argument("--repo", type=Path, required=True,
                   help="the bench's model repository (the history model lives in REPO-history)")
    p.add_argument("--out", type=Path, required=True, help="directory for bench.json and bench.md")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/15",
                   help="Redis URL of the server's embedding store; 'none': in-process store")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="short windows, fewer engine batches (CI)")
    p.add_argument("--sizes", type=_sizes, help="candidates per request (default 100,500)")
    p.add_argument("--prepare", action="store_true", help="synth, train and export the history model when missing")
    p.add_argument("--workers", type=int, choices=range(0, 65), metavar="N", default=0,
                   help="MTRANK_WORKERS of the server (default 0: the service's default)")
    args = p.parse_args(argv)
    try:
        run_history_bench(args)
    except BenchError as e:
        print(f"mtrank bench history: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
