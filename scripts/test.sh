#!/usr/bin/env bash
# Installs what is missing, configures, builds and runs every test.
#   scripts/test.sh              the default suite (fast, complete)
#   FASTLLM_TEST_LABELS=slow scripts/test.sh    adds the tests labelled slow (slow,hf: and hf)
#   FASTLLM_SANITIZE=1 scripts/test.sh          an ASan/UBSan build of the host tests (build-asan/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

jobs=$(nproc)
build=build
extra=()
if [ "${FASTLLM_SANITIZE:-0}" = 1 ]; then
  build="build-asan"
  extra=(-DFASTLLM_SANITIZE=ON -DFASTLLM_CUDA=OFF -DFASTLLM_BENCHMARKS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo)
  # Open MPI's plugins leak at exit in ways no suppression can name (they are dlopened without
  # symbols), so leak checking is off; address and undefined-behaviour checks stay on.
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi
cmake -S . -B "$build" -G Ninja "${extra[@]}" >/dev/null
cmake --build "$build" -j "$jobs"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Labels left out unless FASTLLM_TEST_LABELS names them (comma-separated): slow, and hf (needs the
# transformers and PyTorch that setup.sh then installs).
excluded=()
for label in slow hf; do
  if [[ ",${FASTLLM_TEST_LABELS:-}," != *,$label,* ]]; then excluded+=("$label"); fi
done
label_args=()
if [ ${#excluded[@]} -gt 0 ]; then label_args=(-LE "^($(IFS='|'; echo "${excluded[*]}"))\$"); fi
ctest --test-dir "$build" --output-on-failure -j "$jobs" "${label_args[@]}"
