#!/usr/bin/env bash
# Training-step throughput of fastllm (bench_step, host backend) next to transformers'
# MistralForCausalLM on PyTorch's CPU path, same model, batch, sequence and thread count.
# See benchmarks/step/README.md. Settings (environment):
#   THREADS   threads for both sides (default: all cores)
#   BATCHES   batch sizes to run, e.g. "1 4" (default "1"); the sequence is 512
#   OPTIMIZER 1 to add the AdamW update to the step on both sides (default 0)
#   ROUNDS    alternating rounds of both sides (default 3); REPS timed steps per round and side
#             (default 5), each after a warm-up step
#   BUILD     fastllm build folder (default build-step), VENV the Python environment for the peer
#             (default $BUILD/venv); both are made when missing. BENCH_STEP: a bench_step binary
#             to run instead of $BUILD's
#   KEEP_OPENBLAS_CORETYPE  1 to keep an OPENBLAS_CORETYPE set in the environment (by default it
#             is unset for fastllm, so that OpenBLAS picks its kernels for this CPU)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
THREADS=${THREADS:-$(nproc)}
BATCHES=${BATCHES:-1}
OPTIMIZER=${OPTIMIZER:-0}
ROUNDS=${ROUNDS:-3}
REPS=${REPS:-5}
BUILD=${BUILD:-$ROOT/build-step}
VENV=${VENV:-$BUILD/venv}
BENCH_STEP=${BENCH_STEP:-$BUILD/benchmarks/bench_step}
TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=5.17.0

if [[ ! -x $BENCH_STEP ]]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_BENCHMARKS=ON \
    -DFASTLLM_CUDA=OFF >/dev/null
  cmake --build "$BUILD" --target bench_step -j "$(nproc)"
fi

if ! "$VENV/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  python3 -m venv "$VENV"
  # PyPI's torch is the CUDA build, which runs on the CPU too. Its CUDA packages are over 3 GB:
  # where a CUDA 13 installation provides most of the libraries it links against, the three it
  # lacks are enough; otherwise all of them.
  "$VENV/bin/pip" install -q --no-deps "torch==$TORCH_VERSION"
  "$VENV/bin/pip" install -q filelock typing-extensions sympy networkx jinja2 fsspec numpy \
    "transformers==$TRANSFORMERS_VERSION"
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    "$VENV/bin/pip" install -q --no-deps nvidia-cufile==1.15.1.6 nvidia-cusparselt-cu13==0.8.0 \
      nvidia-nvshmem-cu13==3.4.5
  fi
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  fi
fi

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
fastllm_env=(env)
[[ ${KEEP_OPENBLAS_CORETYPE:-0} == 1 ]] || fastllm_env+=(-u OPENBLAS_CORETYPE)
fastllm_env+=("OMP_NUM_THREADS=$THREADS")
optimizer_flag=()
[[ $OPTIMIZER == 1 ]] && optimizer_flag=(--optimizer)

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
  for batch in $BATCHES; do
    "${fastllm_env[@]}" "$BENCH_STEP" \
      --benchmark_filter="BM_Step/batch:$batch/seq:512/window:0/optimizer:$OPTIMIZER/" \
      --benchmark_repetitions="$REPS" --benchmark_min_time=0 --benchmark_format=json \
      >"$OUT/fastllm_${batch}_$round.json"
    OMP_NUM_THREADS=$THREADS "$VENV/bin/python" "$ROOT/benchmarks/step/hf_step.py" \
      --batch "$batch" --threads "$THREADS" --repetitions "$REPS" --iterations 1 \
      "${optimizer_flag[@]}" \
      >"$OUT/torch_${batch}_$round.jsonl"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$OUT" "$THREADS" "$BATCHES" <<'EOF'
import glob, json, os, platform, statistics, sys

out, threads, batches = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
           platform.processor())
print(f"machine: {cpu}, {os.cpu_count()} cores; threads {threads}")
for batch in batches:
    fast, blas = [], ""
    for path in sorted(glob.glob(f"{out}/fastllm_{batch}_*.json")):
        report = json.load(open(path))
        blas = report["context"].get("blas", "")
        fast += [b["tokens/s"] for b in report["benchmarks"] if b.get("run_type") == "iteration"]
    peers = {}
    for path in sorted(glob.glob(f"{out}/torch_{batch}_*.jsonl")):
        for line in open(path):
            r = json.loads(line)
            peers.setdefault(r["impl"], []).append(r)
            versions = f"torch {r['torch']}, transformers {r['transformers']}"
    print(f"fastllm OpenBLAS: {blas}")
    print(f"peer: MistralForCausalLM, {versions}")
    print(f"{'batch x seq':>12} {'side':>18} {'median tok/s':>13} {'best tok/s':>11}")
    print(f"{batch + ' x 512':>12} {'fastllm':>18} {statistics.median(fast):13.1f} {max(fast):11.1f}")
    medians = {k: statistics.median(r["tokens_per_s_median"] for r in rs) for k, rs in peers.items()}
    bests = {k: max(r["tokens_per_s_best"] for r in rs) for k, rs in peers.items()}
    for impl in peers:
        print(f"{'':>12} {'pytorch ' + impl:>18} {medians[impl]:13.1f} {bests[impl]:11.1f}")
    med_impl, best_impl = max(medians, key=medians.get), max(bests, key=bests.get)
    print(f"ratio fastllm / pytorch: median {statistics.median(fast) / medians[med_impl]:.2f} "
          f"(vs {med_impl}), best {max(fast) / bests[best_impl]:.2f} (vs {best_impl})")
EOF
