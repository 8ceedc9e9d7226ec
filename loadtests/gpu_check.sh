#!/usr/bin/env bash
# GPU check of issue 17, on a machine with an NVIDIA GPU, in one go (budget: 8 minutes):
#   1. nvidia-smi (captured);
#   2. a fresh venv with the `gpu` extra: pip install '.[gpu,train,dev]' (torch from the CPU wheel
#      index first, so pip does not pull a multi-GB CUDA torch that training the demo model does
#      not need);
#   3. the demo-sized model: synthetic data, one epoch of PLE, export (what `mtrank bench --prepare` does);
#   4. `mtrank serve` with MTRANK_DEVICE=cuda: /v1/models must report provider CUDAExecutionProvider,
#      and one 1000-candidate /v1/rank must answer 200;
#   5. `mtrank bench --device cuda --sizes 1000` (engine reference on the CUDA provider, service,
#      naive server, tail and overload points at 1000 candidates).
#
# Usage: loadtests/gpu_check.sh OUT_DIR [--wheelhouse DIR] [--system-site-packages] [--extras LIST]
#   OUT_DIR      results: gpu_check.log, nvidia-smi.txt, pip-freeze.txt, models.json, rank.json,
#                serve.log, bench/ (bench.json, bench.md, plots), timings.txt, summary.txt
#   --wheelhouse DIR          install offline from DIR (pip --no-index --find-links DIR)
#   --system-site-packages    let the venv see the packages of the interpreter that makes it (also
#                             when that interpreter is itself a venv, as on images that ship PyTorch
#                             in one); a torch found there is used as it is, not reinstalled
#   --extras LIST             mtrank's extras to install (default gpu,train,dev; an image whose own
#                             torch differs from the train extra's pin takes `gpu` and its own
#                             onnx, pyarrow and pandas)
# pip's own PIP_* variables (PIP_INDEX_URL, PIP_FIND_LINKS, ...) pass through. TORCH_INDEX_URL
# overrides the CPU wheel index of torch; PYTHON the interpreter (default python3, >= 3.11).
# Redis: MTRANK_GPU_CHECK_REDIS_URL if set and reachable, else a throwaway redis-server when one
# is installed, else the in-process store (the bench's lookup figure is then skipped).
# Exit status: 0 when every step ran within the budget, 3 when they ran but took longer than 8
# minutes, another non-zero status when a step failed (the log says which).
set -euo pipefail

BUDGET_S=480
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUT_DIR [--wheelhouse DIR] [--system-site-packages] [--extras LIST]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
WHEELHOUSE=""
SYSTEM_SITE=0
EXTRAS=gpu,train,dev
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheelhouse) WHEELHOUSE=$(cd "$2" && pwd); shift 2 ;;
        --system-site-packages) SYSTEM_SITE=1; shift ;;
        --extras) EXTRAS=$2; shift 2 ;;
        *) echo "$0: unknown option $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mtrank-gpu-check.XXXXXX")
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
exec > >(tee "$OUT/gpu_check.log") 2>&1

STARTED=$(date +%s)
STEP_NAME=""
STEP_STARTED=$STARTED
SERVER_PID=""
REDIS_PID=""
: > "$OUT/timings.txt"

step() {  # step NAME: closes the previous step's timing, opens the next
    local now
    now=$(date +%s)
    if [[ -n "$STEP_NAME" ]]; then
        printf '%-10s %4d s\n' "$STEP_NAME" $((now - STEP_STARTED)) | tee -a "$OUT/timings.txt"
    fi
    STEP_NAME=$1
    STEP_STARTED=$now
    [[ -n "$1" ]] && echo "==> [$((now - STARTED)) s] $1"
    return 0
}

finish() {
    local status=$?
    set +e
    for pid in $SERVER_PID $REDIS_PID; do
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -n "$STEP_NAME" && $status -ne 0 ]]; then
        echo "FAILED in step '$STEP_NAME' (exit status $status)"
    fi
    step ""
    local total=$(( $(date +%s) - STARTED ))
    printf '%-10s %4d s (budget %d s)\n' total "$total" "$BUDGET_S" | tee -a "$OUT/timings.txt"
    rm -rf "$WORK"
    if [[ $status -eq 0 && $total -gt $BUDGET_S ]]; then
        echo "every step ran, but in $total s: over the $BUDGET_S s budget"
        status=3
    fi
    exit "$status"
}
trap finish EXIT

step gpu
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this machine has no NVIDIA driver"; exit 1; }
nvidia-smi | tee "$OUT/nvidia-smi.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/gpu.csv"
echo "work dir $WORK; repository $ROOT; git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"

step venv
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
if [[ $SYSTEM_SITE == 1 ]]; then
    # venv --system-site-packages would show the base interpreter's packages, not those of a venv
    # the image runs python3 from; a .pth file after the venv's own site-packages shows the latter,
    # and the venv's own packages (onnxruntime-gpu) still come first.
    "$PYTHON" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
        > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_image_site.pth"
fi
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off)
[[ -n "$WHEELHOUSE" ]] && PIP+=(--no-index --find-links "$WHEELHOUSE")
if [[ $SYSTEM_SITE == 1 ]] && "$PY" -c 'import torch' 2>/dev/null; then
    echo "torch from the image: $("$PY" -c 'import torch; print(torch.__version__, torch.__file__)')"
elif [[ -n "$WHEELHOUSE" ]]; then
    "${PIP[@]}" "torch==2.13.0"
else
    "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
fi
"${PIP[@]}" "$ROOT[$EXTRAS]"
"$PY" -m pip freeze > "$OUT/pip-freeze.txt"
# onnxruntime and onnxruntime-gpu own the same package directory: only the GPU build may be in the
# venv (an image's CPU build outside it is shadowed, and the provider check below proves it).
if "$PY" -m pip freeze --local | grep -qiE '^onnxruntime=='; then
    echo "the CPU onnxruntime got installed beside onnxruntime-gpu (see pip-freeze.txt)"; exit 1
fi
"$PY" - <<'EOF'
import onnxruntime as ort

print("onnxruntime", ort.__version__, "device", ort.get_device(), "providers", ort.get_available_providers())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    raise SystemExit("onnxruntime-gpu has no CUDA provider")
EOF

step model
# Run from the work dir: the checkout's own packages must not shadow the installed ones.
cd "$WORK"
"$PY" -m mtrank.bench.prepare "$WORK/bench/repo" ple

step serve
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MTRANK_DEVICE=cuda MTRANK_LOG_LEVEL=info "$WORK/venv/bin/mtrank" serve --repo "$WORK/bench/repo" --port "$PORT" \
    > "$OUT/serve.log" 2>&1 &
SERVER_PID=$!
"$PY" - "$PORT" "$WORK/bench/repo" "$OUT" "$SERVER_PID" <<'EOF'
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from mtrank.bench.workload import Catalog, RequestFactory

port, repo, out, pid = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)
deadline = time.monotonic() + 180
while True:
    status = Path(f"/proc/{pid}/status")
    if not status.exists() or "\nState:\tZ" in status.read_text():
        raise SystemExit("mtrank serve exited before it was ready (see serve.log)")
    try:
        if client.get("/readyz").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("the server did not get ready within 180 s (see serve.log)")
    time.sleep(0.5)
models = client.get("/v1/models").json()
(out / "models.json").write_text(json.dumps(models, indent=1))
version = models["models"][0]["versions"][-1]
print("serving", models["models"][0]["name"], "v", version["version"], "on", version["device"], version["provider"])
if version["provider"] != "CUDAExecutionProvider":
    raise SystemExit(f"provider is {version['provider']}, not CUDAExecutionProvider")
body = RequestFactory(Catalog.from_repo(repo, "ple")).request(np.random.default_rng(0), 1000)
started = time.perf_counter()
r = client.post("/v1/rank", json=body)
print(f"/v1/rank, 1000 candidates: {r.status_code} in {1000 * (time.perf_counter() - started):.1f} ms")
(out / "rank.json").write_text(r.text)
if r.status_code != 200:
    raise SystemExit(f"/v1/rank answered {r.status_code}: {r.text[:300]}")
EOF
kill "$SERVER_PID" 2>/dev/null || true
wait "$SERVER_PID" || true
SERVER_PID=""

step redis
REDIS_URL=none
if [[ -n "${MTRANK_GPU_CHECK_REDIS_URL:-}" ]] && redis-cli -u "$MTRANK_GPU_CHECK_REDIS_URL" ping >/dev/null 2>&1; then
    REDIS_URL=$MTRANK_GPU_CHECK_REDIS_URL
elif command -v redis-server >/dev/null; then
    REDIS_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" \
        > "$OUT/redis.log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 50); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
fi
echo "embedding store for the bench: $REDIS_URL"
# The servers the bench starts must not see this script's variable (unknown MTRANK_* are warned about).
unset MTRANK_GPU_CHECK_REDIS_URL

step bench
"$WORK/venv/bin/mtrank" bench --repo "$WORK/bench/repo" --model ple --out "$OUT/bench" --device cuda \
    --sizes 1000 --concurrencies 1,4,16,64 --redis "$REDIS_URL"

step summary
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
report = json.loads((out / "bench" / "bench.json").read_text())
gpu = (out / "gpu.csv").read_text().splitlines()[1:]
print(f"GPU: {'; '.join(gpu)}")
print(f"engine peak ({report['engine']['provider']}): {report['engine']['peak']['rows_per_s']:,.0f} rows/s "
      f"at batch {report['engine']['peak']['batch']}")
print("servers:", {name: s.get("provider") for name, s in report["servers"].items()})
for name, r in report["ratios"].items():
    print(f"{name}: {r['value']} (target {r['op']} {r['target']}: {'met' if r['met'] else 'not met'})"
          + (f" [{r['missing']}]" if r.get("missing") else ""))
EOF
step ""
