#!/usr/bin/env bash
# GPU check of the whole pipeline on one GPU, in one go (under 8 minutes on an H100/H200):
#   1. ingest a few thousand images (an image folder or tar given with --images, else a synthetic corpus);
#   2. embed them with resnet50 under bf16 autocast (AMP) on the GPU;
#   3. cluster the features (k-means assignment on the GPU: the torch backend);
#   4. train 2 epochs of DeeperCluster with VGG-16-BN at 224 px under `torchrun --nproc_per_node=1` (NCCL),
#      killed (SIGKILL) once its second checkpoint (the first inside an epoch) is on disk, and resumed;
#   5. measure the k-means assignment GFLOP/s on the GPU against its fp32 matmul peak (TF32 off).
# Prints images/s per stage, the GPU memory peak of each stage (nvidia-smi, sampled every 0.2 s) and, last, one
# JSON line with every figure.
#
# --cpu-smoke runs the same steps tiny on the CPU (gloo instead of NCCL, 32 px, a few dozen images), so that
# the script itself is tested where no GPU is.
#
# Usage: tools/gpu_check.sh [--cpu-smoke] [--images PATH] [--num-images N] [--workdir DIR] [--keep]
set -euo pipefail

MODE=gpu
IMAGES=""
NUM_IMAGES=""
WORKDIR=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu; shift ;;
    --images) IMAGES="$2"; shift 2 ;;
    --num-images) NUM_IMAGES="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
if [ -z "$WORKDIR" ]; then
  WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  [ "$KEEP" = 1 ] || trap 'rm -rf "$WORKDIR"' EXIT
fi
mkdir -p "$WORKDIR"

if [ "$MODE" = gpu ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: torch sees no CUDA device here; run with --cpu-smoke to check the script on the CPU" >&2
    exit 2
  fi
  DEVICE=cuda; SIZE=224; EMBED_MODEL=resnet50; ARCH=vgg16_bn; N=${NUM_IMAGES:-4000}; MIN=256; MAX=320
  BATCH=64; WORKERS=$(( $(nproc) > 8 ? 8 : $(nproc) )); LEVELS=10,100; PRECISION=bf16; NPROC_THREADS=""; PCA=64; EVERY=10
else
  DEVICE=cpu; SIZE=32; EMBED_MODEL=resnet50; ARCH=vgg16_bn; N=${NUM_IMAGES:-48}; MIN=36; MAX=44
  BATCH=8; WORKERS=0; LEVELS=2,2; PRECISION=fp32; NPROC_THREADS="--threads 1"; PCA=16; EVERY=2
fi
SUMMARY="$WORKDIR/summary.jsonl"
: > "$SUMMARY"

log() { echo "gpu_check [$MODE] $*" >&2; }

# The GPU memory in use (MiB) sampled every 0.2 s into $1 while a stage runs; its peak is read by gpu_peak.
gpu_sampler() {
  [ "$MODE" = gpu ] || return 0
  while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1 >> "$1"; sleep 0.2; done
}
gpu_peak() { [ -s "$1" ] && sort -n "$1" | tail -1 || echo null; }

# stage NAME COMMAND...: runs COMMAND, records its seconds and GPU memory peak; its stdout's last line (a
# JSON summary) goes to $WORKDIR/NAME.json.
stage() {
  local name=$1; shift
  local samples="$WORKDIR/$name.mem"; : > "$samples"
  gpu_sampler "$samples" & local sampler=$!
  local start; start=$("$PY" -c 'import time; print(time.time())')
  log "$name: $*"
  local status=0
  "$@" > "$WORKDIR/$name.out" || status=$?
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  local seconds; seconds=$("$PY" -c "import time; print(round(time.time() - $start, 2))")
  tail -1 "$WORKDIR/$name.out" > "$WORKDIR/$name.json"
  echo "{\"stage\": \"$name\", \"seconds\": $seconds, \"gpu_mib_peak\": $(gpu_peak "$samples")}" >> "$SUMMARY"
  if [ "$status" != 0 ]; then
    echo "gpu_check.sh: stage $name failed with exit status $status (its output: $WORKDIR/$name.out)" >&2
    exit "$status"
  fi
}

DE=("$PY" -m dataengine)

# 1. ingest
if [ -z "$IMAGES" ]; then
  stage synth "${DE[@]}" synth "$WORKDIR/corpus" --num-images "$N" --min-size "$MIN" --max-size "$MAX" \
    --no-anomalies --json
  INGEST_INPUT=(--yfcc "$WORKDIR/corpus/metadata.tsv" --images "$WORKDIR/corpus/images")
else
  INGEST_INPUT=(--images "$IMAGES")
fi
stage ingest "${DE[@]}" ingest --out "$WORKDIR/ingest" "${INGEST_INPUT[@]}" --shard-size 250 --json

# 2. embed (AMP is on by default on CUDA; random weights: the machine may have no network)
stage embed "${DE[@]}" embed "$WORKDIR/ingest" --out "$WORKDIR/features.zarr" --model "$EMBED_MODEL" \
  --image-size "$SIZE" --batch-size "$BATCH" --workers "$WORKERS" --device "$DEVICE" $NPROC_THREADS --json

# 3. cluster (k-means assignment on the GPU where there is one)
stage cluster "${DE[@]}" cluster "$WORKDIR/features.zarr" --name check --levels "$LEVELS" --pca "$PCA" \
  $NPROC_THREADS --json

# 4. train 2 epochs under torchrun, killed after its first checkpoint, then resumed
RUN="$WORKDIR/run"
DEVICE_OPTIONS=()
if "${DE[@]}" train --help 2>/dev/null | grep -q -- "--precision"; then  # a trainer that places itself on a GPU
  DEVICE_OPTIONS=(--device "$DEVICE" --precision "$PRECISION")
elif [ "$MODE" = gpu ]; then
  log "train: this trainer has no --device option; it trains on the CPU (its img/s is then no GPU figure)"
fi
TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m dataengine train "$WORKDIR/ingest"
       --out "$RUN" --mode deepercluster --arch "$ARCH" --image-size "$SIZE" --epochs 2 --levels "$LEVELS" --pca "$PCA"
       --batch-size "$BATCH" --workers "$WORKERS" --checkpoint-every "$EVERY" "${DEVICE_OPTIONS[@]}" $NPROC_THREADS --json)
log "train: ${TRAIN[*]} (killed after its second checkpoint)"
setsid "${TRAIN[@]}" > "$WORKDIR/train-killed.out" 2> "$WORKDIR/train-killed.err" &
TRAIN_PID=$!
killed=0
first=""
for _ in $(seq 1 3000); do  # every checkpoint is a new file renamed into place: a new inode
  inode=$(stat -c %i "$RUN/checkpoint.pt" 2>/dev/null || true)
  [ -z "$first" ] && first=$inode
  if [ -n "$inode" ] && [ "$inode" != "$first" ]; then kill -KILL -- "-$TRAIN_PID" 2>/dev/null && killed=1; break; fi
  kill -0 "$TRAIN_PID" 2>/dev/null || break
  sleep 0.2
done
wait "$TRAIN_PID" 2>/dev/null || true
if [ "$killed" != 1 ]; then
  echo "gpu_check.sh: the training run ended before its second checkpoint (see $WORKDIR/train-killed.err)" >&2
  exit 1
fi
"$PY" - "$RUN/checkpoint.pt" > "$WORKDIR/resumed_from.json" <<'EOF_PY'
import json, sys
import torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print(json.dumps({"epoch": state["epoch"], "step": state["step"], "total_steps": state["total_steps"]}))
EOF_PY
stage train "${TRAIN[@]}"

# 5. assignment GFLOP/s against the fp32 matmul peak, on the training's device
stage assign "$PY" - "$DEVICE" <<'EOF'
import json, sys, time
import numpy as np
import torch
from indexes.assign import Assigner

device = sys.argv[1]
torch.backends.cuda.matmul.allow_tf32 = False  # fp32 peak, as the assignment computes in fp32
rows, clusters, dim = (1 << 20, 4096, 128) if device == "cuda" else (1 << 14, 256, 64)
rng = np.random.default_rng(0)
x = rng.standard_normal((rows, dim), dtype=np.float32)
assigner = Assigner(rng.standard_normal((clusters, dim), dtype=np.float32), backend="torch" if device == "cuda" else "blas")
assigner.assign(x[: rows // 8])  # warm-up
def timed(fn):
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter(); fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best
assign_gflops = 2 * rows * clusters * dim / timed(lambda: assigner.assign(x)) / 1e9
side = 8192 if device == "cuda" else 1024
a = torch.randn(side, side, device=device); b = torch.randn(side, side, device=device)
a @ b
peak_gflops = 2 * side ** 3 / timed(lambda: a @ b) / 1e9
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print(json.dumps({"device": name, "assign_gflops": round(assign_gflops, 1), "fp32_matmul_gflops": round(peak_gflops, 1),
                  "fraction_of_peak": round(assign_gflops / peak_gflops, 3), "rows": rows, "clusters": clusters,
                  "dim": dim}))
EOF

# Figures
"$PY" - "$WORKDIR" "$MODE" <<'EOF'
import json, os, sys
work, mode = sys.argv[1], sys.argv[2]
def last(name):
    with open(os.path.join(work, name + ".json")) as handle:
        return json.loads(handle.read() or "{}")
stages = {s["stage"]: s for s in map(json.loads, open(os.path.join(work, "summary.jsonl")))}
embed, cluster, assign = last("embed"), last("cluster"), last("assign")
with open(os.path.join(work, "run", "metrics.jsonl")) as handle:
    epochs = [json.loads(line) for line in handle]
rows = embed.get("num_rows")
figures = {
    "mode": mode,
    "embed_images_per_second": embed.get("images_per_second"),
    "cluster_rows_per_second": round(rows / stages["cluster"]["seconds"], 1) if rows else None,
    "train_images_per_second": [round(e["samples_per_second"], 1) for e in epochs],
    "train_epochs": len(epochs), "resumed_from": last("resumed_from"),
    "gpu_mib_peak": {name: s["gpu_mib_peak"] for name, s in stages.items()},
    "seconds": {name: s["seconds"] for name, s in stages.items()},
    **{key: assign[key] for key in ("device", "assign_gflops", "fp32_matmul_gflops", "fraction_of_peak")},
}
assert len(epochs) == 2, f"expected 2 epochs in metrics.jsonl, found {len(epochs)}"
for key, value in figures.items():
    print(f"{key:26s} {value}", file=sys.stderr)
print(json.dumps(figures))
EOF
