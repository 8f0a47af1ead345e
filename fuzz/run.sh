#!/usr/bin/env bash
# Builds the fuzz targets with clang (libFuzzer, ASan, UBSan), writes their seed corpus from the
# fixtures, and runs each for SECONDS (default 20). Exits non-zero when any target crashes, leaks,
# times out or throws anything but a UserError; the input that did it is left in
# BUILD/fuzz-artifacts/ and the log in BUILD/fuzz-logs/.
#   fuzz/run.sh [SECONDS] [BUILD_DIR (default build-fuzz-clang)]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
build=${2:-build-fuzz-clang}
fixtures=${FASTLLM_FIXTURES:-$(cd .. && pwd)/shared/fixtures}

if [ ! -f "$build/build.ninja" ]; then
  CC=clang-14 CXX=clang++-14 cmake -S . -B "$build" -G Ninja -DFASTLLM_FUZZ=ON \
    -DFASTLLM_CUDA=OFF -DFASTLLM_BENCHMARKS=OFF >/dev/null
fi
cmake --build "$build" --target fuzz_all -- -j"$(nproc)" >/dev/null

corpus=$build/fuzz-corpus
rm -rf "$corpus" "$build/fuzz-artifacts" "$build/fuzz-logs"
mkdir -p "$build/fuzz-artifacts" "$build/fuzz-logs"
# Open MPI's plug-ins, unloaded at exit, leave allocations LeakSanitizer cannot attribute: leaks are
# checked in every target that does not start MPI.
ASAN_OPTIONS=detect_leaks=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  "$build/fuzz/fuzz_make_seeds" "$fixtures" . "$corpus"

failed=0
for target in safetensors safetensors_index hf_config indexed_dataset hdf5_metadata yaml_config \
  flags; do
  log=$build/fuzz-logs/$target.log
  leaks=1
  if [ "$target" = hdf5_metadata ]; then leaks=0; fi
  if ASAN_OPTIONS=detect_leaks=$leaks OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    "$build/fuzz/fuzz_$target" "$corpus/$target" -max_total_time="$seconds" -timeout=10 \
    -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$build/fuzz-artifacts/$target-" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz $target: $runs runs in ${seconds} s, no crash"
  else
    echo "fuzz $target: FAILED (log $log, input in $build/fuzz-artifacts/)"
    tail -n 40 "$log"
    failed=1
  fi
done
exit "$failed"
