#!/usr/bin/env bash
# One run on the GPU machine (../shared/GPU.md): configure and build in place, run the GPU tests,
# probe the fixtures on the CUDA backend in fp32 and bf16, time fastllm's training step and the
# Hugging Face peer on the same card, print one table last. Logs and results go under $OUT.
#
#   bash benchmarks/gpu/run.sh --prepare   on the development machine: copies what the run needs
#                                          from ../shared into .gpu/ (git-ignored; carry it along)
#   bash benchmarks/gpu/run.sh             on the GPU machine, from the repository root
#
# Stages can be picked with FASTLLM_GPU_STAGES (default "build tests probe throughput peer"), and
# the peer's torch.compile runs added with FASTLLM_GPU_COMPILE=1 (minutes each).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

if [ "${1:-}" = "--prepare" ]; then
  shared="$root/../shared"
  mkdir -p .gpu
  cp "$shared/anchors/hf_baseline.py" .gpu/
  rm -rf .gpu/fixtures && cp -r "$shared/fixtures" .gpu/fixtures
  echo "prepared .gpu/: $(du -sh .gpu | cut -f1); run with carry [\".gpu\"]"
  exit 0
fi

out=${OUT:-$root/out/gpu}
mkdir -p "$out"
build=${FASTLLM_GPU_BUILD:-$root/build-gpu}
stages=${FASTLLM_GPU_STAGES:-build tests probe throughput peer}
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
has_stage() { [[ " $stages " == *" $1 "* ]]; }
started=$(date +%s)
stamp() { echo "[$(($(date +%s) - started))s]"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/device.txt" 2>&1
note "device: $(head -1 "$out/device.txt")"
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
# 16 of Mistral-7B's 32 layers fit an 80 GB card with fp32 master weights and moments.
layers_7b=32
if [ "${gpu_mib:-0}" -lt 100000 ]; then layers_7b=16; fi

if has_stage build; then
  note "$(stamp) configure and build in $build"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_CUDA=ON \
    -DFASTLLM_BENCHMARKS=OFF -DFASTLLM_CUDA_ARCHITECTURES=90 \
    -DFASTLLM_FIXTURES="$root/.gpu/fixtures" >"$out/configure.log" 2>&1 ||
    { note "configure FAILED (configure.log)"; tail -20 "$out/configure.log"; exit 1; }
  targets=(fastllm step_throughput cuda_test_ops cuda_test_allocator cuda_test_model cuda_test_nccl)
  mapfile -t kernel_tests < <(cmake --build "$build" --target help | grep -o 'kernels_test_[a-z_]*' | sort -u)
  cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" "${kernel_tests[@]}" \
    >"$out/build.log" 2>&1 || { note "build FAILED (build.log)"; grep -m20 -B2 -A6 'error' "$out/build.log"; exit 1; }
  note "$(stamp) built"
fi

if has_stage tests; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  for t in "$build"/tests/cuda/cuda_test_* "$build"/tests/kernels/kernels_test_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    timeout 300 "$t" --gtest_output="xml:$out/$name.xml" >"$out/$name.log" 2>&1
    rc=$?
    result=$(grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ tests?' "$out/$name.log" | tr '\n' ' ')
    note "$(stamp) $name rc=$rc $result"
    if [ $rc -ne 0 ]; then grep -E '(Failure|FAILED|error)' "$out/$name.log" | head -15 | tee -a "$summary"; fi
  done
  # Tensor-core attention wrong but the portable kernels right: time the step on the latter.
  ops_log="$out/cuda_test_ops.log"
  if grep -q 'FAILED  \] Dtypes/CudaOps.AttentionForwardAndBackward/bf16' "$ops_log" 2>/dev/null &&
    ! grep -q 'FAILED  \] Dtypes/CudaOps.PortableAttentionForEveryCase/bf16' "$ops_log"; then
    export FASTLLM_CUDA_ATTENTION=simt
    note "tensor-core attention FAILED its test: the throughput below uses FASTLLM_CUDA_ATTENTION=simt"
  fi
fi

if has_stage probe; then
  if "$build/src/fastllm" probe --help 2>&1 | grep -q -- '--backend'; then
    for fixture in dev-mistral dev-mixtral dev-tied-nowindow; do
      for dtype in fp32 bf16; do
        result="$out/probe-$fixture-$dtype.safetensors"
        timeout 120 "$build/src/fastllm" probe --backend=cuda --dtype=$dtype \
          --pretrained_checkpoint_type=huggingface \
          --pretrained_checkpoint_path="$root/.gpu/fixtures/$fixture" \
          --input="$root/.gpu/fixtures/$fixture/reference.safetensors" --output="$result" \
          >"$out/probe-$fixture-$dtype.log" 2>&1 &&
          note "probe $fixture $dtype: $(python3 benchmarks/gpu/report.py probe "$result" \
            "$root/.gpu/fixtures/$fixture/reference.safetensors" 2>&1 | tail -1)" ||
          note "probe $fixture $dtype FAILED: $(tail -2 "$out/probe-$fixture-$dtype.log")"
      done
    done
  else
    note "probe: fastllm has no --backend flag yet, skipped"
  fi
fi

if has_stage throughput; then
  note "$(stamp) fastllm step throughput (Mistral-7B with $layers_7b layers)"
  timeout 420 "$build/benchmarks/gpu/step_throughput" --config=all --layers=$layers_7b \
    >"$out/fastllm.jsonl" 2>"$out/fastllm.err"
  cat "$out/fastllm.jsonl" >>"$summary"
fi

if has_stage peer; then
  note "$(stamp) Hugging Face peer"
  compile=()
  if [ "${FASTLLM_GPU_COMPILE:-0}" = 1 ]; then compile=(--compile); fi
  timeout 420 python3 benchmarks/gpu/hf_peer.py .gpu/hf_baseline.py --layers-7b $layers_7b \
    "${compile[@]}" >"$out/hf.json" 2>"$out/hf.err" || note "peer FAILED: $(tail -3 "$out/hf.err")"
fi

note "$(stamp) done"
python3 benchmarks/gpu/report.py table "$out/fastllm.jsonl" "$out/hf.json" 2>&1 | tee -a "$summary"
